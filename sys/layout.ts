/**
 * C struct layouts (x86_64 Linux), declared once with their sizes and field
 * offsets. `tests/sys/layout_test.ts` compiles a C program that prints the
 * same values from the system headers and compares.
 *
 * @module
 */

/** `struct iovec` (sys/uio.h). */
export const IOVEC = { size: 16, iov_base: 0, iov_len: 8 } as const;

/** `struct epoll_event` (sys/epoll.h): packed on x86_64. */
export const EPOLL_EVENT = { size: 12, events: 0, data: 4 } as const;

/** `struct timespec` (time.h). */
export const TIMESPEC = { size: 16, tv_sec: 0, tv_nsec: 8 } as const;

/** `struct iocb` (linux/aio_abi.h, little endian). */
export const IOCB = {
  size: 64,
  aio_data: 0,
  aio_key: 8,
  aio_rw_flags: 12,
  aio_lio_opcode: 16,
  aio_reqprio: 18,
  aio_fildes: 20,
  aio_buf: 24,
  aio_nbytes: 32,
  aio_offset: 40,
  aio_reserved2: 48,
  aio_flags: 56,
  aio_resfd: 60,
} as const;

/** `struct io_event` (linux/aio_abi.h). */
export const IO_EVENT = { size: 32, data: 0, obj: 8, res: 16, res2: 24 } as const;

/**
 * The kernel's `struct aio_ring` header (fs/aio.c), mapped at the io context
 * address; `io_event`s follow the header. Not in a uapi header: the kernel
 * keeps it stable because libaio peeks it too (AIO_RING_MAGIC 0xa10a10a1).
 */
export const AIO_RING = {
  size: 32,
  id: 0,
  nr: 4,
  head: 8,
  tail: 12,
  magic: 16,
  compat_features: 20,
  incompat_features: 24,
  header_length: 28,
} as const;

/** `struct io_sqring_offsets` (linux/io_uring.h). */
export const IO_SQRING_OFFSETS = {
  size: 40,
  head: 0,
  tail: 4,
  ring_mask: 8,
  ring_entries: 12,
  flags: 16,
  dropped: 20,
  array: 24,
  resv1: 28,
  user_addr: 32,
} as const;

/** `struct io_cqring_offsets` (linux/io_uring.h). */
export const IO_CQRING_OFFSETS = {
  size: 40,
  head: 0,
  tail: 4,
  ring_mask: 8,
  ring_entries: 12,
  overflow: 16,
  cqes: 20,
  flags: 24,
  resv1: 28,
  user_addr: 32,
} as const;

/** `struct io_uring_params` (linux/io_uring.h). */
export const IO_URING_PARAMS = {
  size: 120,
  sq_entries: 0,
  cq_entries: 4,
  flags: 8,
  sq_thread_cpu: 12,
  sq_thread_idle: 16,
  features: 20,
  wq_fd: 24,
  resv: 28,
  sq_off: 40,
  cq_off: 80,
} as const;

/** `struct io_uring_sqe` (linux/io_uring.h). */
export const IO_URING_SQE = {
  size: 64,
  opcode: 0,
  flags: 1,
  ioprio: 2,
  fd: 4,
  off: 8,
  addr: 16,
  len: 24,
  rw_flags: 28,
  user_data: 32,
  buf_index: 40,
  personality: 42,
  splice_fd_in: 44,
  addr3: 48,
} as const;

/** `struct io_uring_cqe` (linux/io_uring.h, without CQE32). */
export const IO_URING_CQE = { size: 16, user_data: 0, res: 8, flags: 12 } as const;

/** `struct msghdr` (sys/socket.h). */
export const MSGHDR = {
  size: 56,
  msg_name: 0,
  msg_namelen: 8,
  msg_iov: 16,
  msg_iovlen: 24,
  msg_control: 32,
  msg_controllen: 40,
  msg_flags: 48,
} as const;

/** `struct cmsghdr` (sys/socket.h); data starts at CMSG_DATA = 16. */
export const CMSGHDR = { size: 16, cmsg_len: 0, cmsg_level: 8, cmsg_type: 12, data: 16 } as const;

/** `struct sockaddr_un` (sys/un.h). */
export const SOCKADDR_UN = { size: 110, sun_family: 0, sun_path: 2, pathMax: 108 } as const;

/** `struct sockaddr_in` (netinet/in.h); port and address in network order. */
export const SOCKADDR_IN = { size: 16, sin_family: 0, sin_port: 2, sin_addr: 4 } as const;

/** `struct sockaddr_in6` (netinet/in.h). */
export const SOCKADDR_IN6 = {
  size: 28,
  sin6_family: 0,
  sin6_port: 2,
  sin6_flowinfo: 4,
  sin6_addr: 8,
  sin6_scope_id: 24,
} as const;

/** `struct addrinfo` (netdb.h, x86_64). */
export const ADDRINFO = {
  size: 48,
  ai_flags: 0,
  ai_family: 4,
  ai_socktype: 8,
  ai_protocol: 12,
  ai_addrlen: 16,
  ai_addr: 24,
  ai_canonname: 32,
  ai_next: 40,
} as const;

/** `struct stat` (x86_64 sys/stat.h). */
export const STAT = {
  size: 144,
  st_dev: 0,
  st_ino: 8,
  st_nlink: 16,
  st_mode: 24,
  st_uid: 28,
  st_gid: 32,
  st_rdev: 40,
  st_size: 48,
  st_blksize: 56,
  st_blocks: 64,
} as const;

/** `struct statx` (linux/stat.h). */
export const STATX = {
  size: 256,
  stx_mask: 0,
  stx_blksize: 4,
  stx_attributes: 8,
  stx_nlink: 16,
  stx_uid: 20,
  stx_gid: 24,
  stx_mode: 28,
  stx_ino: 32,
  stx_size: 40,
  stx_blocks: 48,
  stx_dio_mem_align: 152,
  stx_dio_offset_align: 156,
} as const;

/** `struct statfs` (sys/vfs.h, x86_64): only the filesystem magic is read. */
export const STATFS = { size: 120, f_type: 0 } as const;

/** `struct kvm_userspace_memory_region` (linux/kvm.h). */
export const KVM_USERSPACE_MEMORY_REGION = {
  size: 32,
  slot: 0,
  flags: 4,
  guest_phys_addr: 8,
  memory_size: 16,
  userspace_addr: 24,
} as const;

/** `struct kvm_irq_level` (linux/kvm.h): `irq` is a union with `status`. */
export const KVM_IRQ_LEVEL = { size: 8, irq: 0, level: 4 } as const;

/** `struct kvm_irqfd` (linux/kvm.h). */
export const KVM_IRQFD_STRUCT = { size: 32, fd: 0, gsi: 4, flags: 8, resamplefd: 12 } as const;

/** `struct kvm_ioeventfd` (linux/kvm.h). */
export const KVM_IOEVENTFD_STRUCT = {
  size: 64,
  datamatch: 0,
  addr: 8,
  len: 16,
  fd: 20,
  flags: 24,
} as const;

/** `struct kvm_regs` (asm/kvm.h, x86): 18 u64 registers in this order. */
export const KVM_REGS_STRUCT = {
  size: 144,
  rax: 0,
  rbx: 8,
  rcx: 16,
  rdx: 24,
  rsi: 32,
  rdi: 40,
  rsp: 48,
  rbp: 56,
  r8: 64,
  r9: 72,
  r10: 80,
  r11: 88,
  r12: 96,
  r13: 104,
  r14: 112,
  r15: 120,
  rip: 128,
  rflags: 136,
} as const;

/** `struct kvm_segment` (asm/kvm.h, x86). */
export const KVM_SEGMENT = {
  size: 24,
  base: 0,
  limit: 8,
  selector: 12,
  type: 14,
  present: 15,
  dpl: 16,
  db: 17,
  s: 18,
  l: 19,
  g: 20,
  avl: 21,
  unusable: 22,
} as const;

/** `struct kvm_dtable` (asm/kvm.h, x86). */
export const KVM_DTABLE = { size: 16, base: 0, limit: 8 } as const;

/** `struct kvm_sregs` (asm/kvm.h, x86): eight kvm_segments, two kvm_dtables, control registers. */
export const KVM_SREGS_STRUCT = {
  size: 312,
  cs: 0,
  ds: 24,
  es: 48,
  fs: 72,
  gs: 96,
  ss: 120,
  tr: 144,
  ldt: 168,
  gdt: 192,
  idt: 208,
  cr0: 224,
  cr2: 232,
  cr3: 240,
  cr4: 248,
  cr8: 256,
  efer: 264,
  apic_base: 272,
  interrupt_bitmap: 280,
} as const;

/**
 * `struct kvm_run` (linux/kvm.h), the page a vCPU fd maps: the header and the
 * exit union members a minimal VMM reads (`io`, `mmio`, `internal`,
 * `fail_entry`), flattened as `<member>_<field>`.
 */
export const KVM_RUN_STRUCT = {
  size: 2352,
  request_interrupt_window: 0,
  immediate_exit: 1,
  exit_reason: 8,
  ready_for_interrupt_injection: 12,
  if_flag: 13,
  flags: 14,
  cr8: 16,
  apic_base: 24,
  io_direction: 32,
  io_size: 33,
  io_port: 34,
  io_count: 36,
  io_data_offset: 40,
  mmio_phys_addr: 32,
  mmio_data: 40,
  mmio_len: 48,
  mmio_is_write: 52,
  internal_suberror: 32,
  internal_ndata: 36,
  internal_data: 40,
  fail_entry_hardware_entry_failure_reason: 32,
  fail_entry_cpu: 40,
} as const;
