/**
 * sys/: the only layer that calls `Deno.dlopen`. Typed bindings over libc and
 * Linux system calls (eventfd, epoll, mmap, file I/O, Linux AIO, io_uring,
 * Unix sockets with fd passing, KVM ioctls), struct layouts, and
 * {@link SysError} for every failure.
 *
 * Not for: policy. Nothing here keeps state beyond a descriptor or mapping;
 * event loops live in aio/, block drivers in block/.
 *
 * @module
 */

export * from "./errno.ts";
export { check, lastErrno, retOrErrno, SysError } from "./sys_error.ts";
export * from "./pointer.ts";
export * from "./layout.ts";
export * from "./fd.ts";
export * from "./mman.ts";
export * from "./eventfd.ts";
export * from "./epoll.ts";
export * from "./clock.ts";
export * from "./socket.ts";
export * from "./file.ts";
export * from "./linux_aio.ts";
export * from "./io_uring.ts";
export * from "./signal.ts";
export * from "./sched.ts";
export * from "./resident.ts";
export * from "./kvm.ts";
export * from "./tcp.ts";
export * from "./rbd.ts";
