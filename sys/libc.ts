/**
 * The one `Deno.dlopen` of the project: libc symbols with their C signatures.
 *
 * Internal to `sys/`. Other layers use the typed wrappers re-exported by
 * `sys/mod.ts`, which turn a -1/errno into a thrown {@link SysError}.
 *
 * Conventions that keep hot calls on Deno's fast FFI path:
 * - file descriptors, flags and counts are `i32`/`u32`;
 * - sizes and offsets are `usize`/`i64` and must be passed as `bigint`
 *   (a JS number passed to a 64-bit parameter is about 20x slower);
 * - memory is either a `buffer` (a typed array, including one over a
 *   SharedArrayBuffer) or a `pointer` (a `Deno.PointerValue`); variants named
 *   `*_p` take a raw pointer where the primary form takes a buffer.
 * - `syscall` is declared with six 64-bit arguments: on x86_64 the variadic C
 *   function reads them from the same registers.
 *
 * Each Worker (IOThread, thread-pool worker) evaluates this module again and so
 * gets its own handle; `errno` is per thread and read right after a failure.
 *
 * @module
 */

const SYMBOLS = {
  __errno_location: { parameters: [], result: "pointer" },

  // unistd / fcntl
  close: { parameters: ["i32"], result: "i32" },
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  read_p: { name: "read", parameters: ["i32", "pointer", "usize"], result: "isize" },
  write_p: { name: "write", parameters: ["i32", "pointer", "usize"], result: "isize" },
  // For transfers that cannot exceed 2^31 - 1 bytes (an eventfd's 8): the i32
  // result is the low half of the register that holds ssize_t, exact for such
  // results and for -1. An isize result comes back to JavaScript as a boxed
  // number or a BigInt: ~40 bytes of garbage a call, a young-generation GC
  // (~0.2 ms pause) every few dozen thousand eventfd writes on the data path.
  read_i32: { name: "read", parameters: ["i32", "buffer", "usize"], result: "i32" },
  write_i32: { name: "write", parameters: ["i32", "buffer", "usize"], result: "i32" },
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  pread: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  pwrite: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  pread_p: { name: "pread", parameters: ["i32", "pointer", "usize", "i64"], result: "isize" },
  pwrite_p: { name: "pwrite", parameters: ["i32", "pointer", "usize", "i64"], result: "isize" },
  preadv: { parameters: ["i32", "buffer", "i32", "i64"], result: "isize" },
  pwritev: { parameters: ["i32", "buffer", "i32", "i64"], result: "isize" },
  preadv_p: { name: "preadv", parameters: ["i32", "pointer", "i32", "i64"], result: "isize" },
  pwritev_p: { name: "pwritev", parameters: ["i32", "pointer", "i32", "i64"], result: "isize" },
  fdatasync: { parameters: ["i32"], result: "i32" },
  fsync: { parameters: ["i32"], result: "i32" },
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32" },
  ftruncate: { parameters: ["i32", "i64"], result: "i32" },
  fstat: { parameters: ["i32", "buffer"], result: "i32" },
  statx: { parameters: ["i32", "buffer", "i32", "u32", "buffer"], result: "i32" },
  statfs: { parameters: ["buffer", "buffer"], result: "i32" },
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
  ioctl_v: { name: "ioctl", parameters: ["i32", "u64", "u64"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  unlink: { parameters: ["buffer"], result: "i32" },
  pipe2: { parameters: ["buffer", "i32"], result: "i32" },
  getpid: { parameters: [], result: "i32" },
  gettid: { parameters: [], result: "i32" },
  sysconf: { parameters: ["i32"], result: "i64" },
  clock_gettime: { parameters: ["i32", "buffer"], result: "i32" },
  sched_yield: { parameters: [], result: "i32" },

  // eventfd / epoll
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  epoll_create1: { parameters: ["i32"], result: "i32" },
  epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  epoll_wait: { parameters: ["i32", "buffer", "i32", "i32"], result: "i32" },
  /** Runs on a Deno blocking thread and returns a Promise: control plane only. */
  epoll_wait_async: {
    name: "epoll_wait",
    parameters: ["i32", "buffer", "i32", "i32"],
    result: "i32",
    nonblocking: true,
  },
  /** Blocking read on a Deno blocking thread (Promise): control plane only. */
  read_async: {
    name: "read",
    parameters: ["i32", "buffer", "usize"],
    result: "isize",
    nonblocking: true,
  },

  /**
   * File I/O on a Deno blocking thread (Promise): many calls in flight from one
   * thread-pool Worker. errno stays in the blocking thread; see file.ts.
   */
  preadv_async: {
    name: "preadv",
    parameters: ["i32", "pointer", "i32", "i64"],
    result: "isize",
    nonblocking: true,
  },
  pwritev_async: {
    name: "pwritev",
    parameters: ["i32", "pointer", "i32", "i64"],
    result: "isize",
    nonblocking: true,
  },
  fdatasync_async: { name: "fdatasync", parameters: ["i32"], result: "i32", nonblocking: true },
  fallocate_async: {
    name: "fallocate",
    parameters: ["i32", "i32", "i64", "i64"],
    result: "i32",
    nonblocking: true,
  },

  // memory
  mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  madvise: { parameters: ["pointer", "usize", "i32"], result: "i32" },
  mprotect: { parameters: ["pointer", "usize", "i32"], result: "i32" },
  memfd_create: { parameters: ["buffer", "u32"], result: "i32" },
  /** Raw-address memcpy/memset (bounce buffers, zero padding); addresses as bigint. */
  memcpy_a: { name: "memcpy", parameters: ["u64", "u64", "usize"], result: "void" },
  memset_a: { name: "memset", parameters: ["u64", "i32", "usize"], result: "void" },

  // sockets
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  socketpair: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  listen: { parameters: ["i32", "i32"], result: "i32" },
  accept4: { parameters: ["i32", "pointer", "pointer", "i32"], result: "i32" },
  recvmsg: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  sendmsg: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  /** sendmsg with a msghdr at a raw address (gathered writes of guest memory). */
  sendmsg_p: { name: "sendmsg", parameters: ["i32", "pointer", "i32"], result: "isize" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  getaddrinfo: { parameters: ["buffer", "buffer", "buffer", "buffer"], result: "i32" },
  freeaddrinfo: { parameters: ["pointer"], result: "void" },
  gai_strerror: { parameters: ["i32"], result: "pointer" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },

  // signals (pthread_sigmask returns an errno value: no errno involved)
  pthread_sigmask: { parameters: ["i32", "buffer", "buffer"], result: "i32" },

  // raw system calls (Linux AIO, io_uring, anything glibc does not wrap)
  syscall: { parameters: ["i64", "i64", "i64", "i64", "i64", "i64", "i64"], result: "i64" },
} as const;

const handle = Deno.dlopen("libc.so.6", SYMBOLS);

/** The raw libc symbols; sys/ wrappers only. */
export const libc = handle.symbols;

/** Type of the raw symbol table, for wrappers that take it as a parameter. */
export type Libc = typeof libc;
