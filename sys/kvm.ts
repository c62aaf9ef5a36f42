/**
 * KVM ioctls (Documentation/virt/kvm/api.rst): what a minimal x86 VMM needs to
 * create a VM with memory, an in-kernel 8259/IOAPIC, one vCPU, and the
 * eventfd bindings (KVM_IOEVENTFD, KVM_IRQFD) that let the data path bypass
 * user space. Every failure throws {@link SysError}; struct layouts are in
 * layout.ts, checked against <linux/kvm.h> by tests/sys/layout_test.ts, and
 * the ioctl numbers by tests/sys/kvm_test.ts.
 *
 * @module
 */

import { libc } from "./libc.ts";
import { check, lastErrno, SysError } from "./sys_error.ts";
import { EAGAIN, EINTR } from "./errno.ts";
import { O_RDWR, open } from "./file.ts";
import {
  KVM_DTABLE,
  KVM_IOEVENTFD_STRUCT,
  KVM_IRQ_LEVEL,
  KVM_IRQFD_STRUCT,
  KVM_REGS_STRUCT,
  KVM_SEGMENT,
  KVM_SREGS_STRUCT,
  KVM_USERSPACE_MEMORY_REGION,
} from "./layout.ts";
import { MAP_SHARED, MappedRegion, mmap, PROT_READ, PROT_WRITE } from "./mman.ts";

/** The ioctl numbers (x86_64 encodings of linux/kvm.h's _IO/_IOR/_IOW). */
export const KVM_IOCTL = {
  GET_API_VERSION: 0xae00,
  CREATE_VM: 0xae01,
  CHECK_EXTENSION: 0xae03,
  GET_VCPU_MMAP_SIZE: 0xae04,
  CREATE_VCPU: 0xae41,
  SET_USER_MEMORY_REGION: 0x4020ae46,
  SET_TSS_ADDR: 0xae47,
  CREATE_IRQCHIP: 0xae60,
  IRQ_LINE: 0x4008ae61,
  IRQFD: 0x4020ae76,
  IOEVENTFD: 0x4040ae79,
  RUN: 0xae80,
  GET_REGS: 0x8090ae81,
  SET_REGS: 0x4090ae82,
  GET_SREGS: 0x8138ae83,
  SET_SREGS: 0x4138ae84,
} as const;

/** The only KVM API version there is (KVM_GET_API_VERSION). */
export const KVM_API_VERSION = 12;

/** KVM_CHECK_EXTENSION capabilities used here (linux/kvm.h). */
export const KVM_CAP_IRQCHIP = 0;
export const KVM_CAP_USER_MEMORY = 3;
export const KVM_CAP_SET_TSS_ADDR = 4;
export const KVM_CAP_IRQFD = 32;
export const KVM_CAP_IOEVENTFD = 36;

/** kvm_run.exit_reason values (linux/kvm.h). */
export const KVM_EXIT_UNKNOWN = 0;
export const KVM_EXIT_EXCEPTION = 1;
export const KVM_EXIT_IO = 2;
export const KVM_EXIT_HLT = 5;
export const KVM_EXIT_MMIO = 6;
export const KVM_EXIT_SHUTDOWN = 8;
export const KVM_EXIT_FAIL_ENTRY = 9;
export const KVM_EXIT_INTR = 10;
export const KVM_EXIT_INTERNAL_ERROR = 17;
export const KVM_EXIT_SYSTEM_EVENT = 24;

/** kvm_run.io.direction. */
export const KVM_EXIT_IO_IN = 0;
export const KVM_EXIT_IO_OUT = 1;

/** struct kvm_ioeventfd flags. */
export const KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0;
export const KVM_IOEVENTFD_FLAG_PIO = 1 << 1;
export const KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2;

/** struct kvm_irqfd flags. */
export const KVM_IRQFD_FLAG_DEASSIGN = 1 << 0;

function ioctlBuf(fd: number, req: number, buf: Uint8Array<ArrayBuffer>, what: string): number {
  return check(`ioctl(${what})`, libc.ioctl(fd, BigInt(req), buf));
}

function ioctlVal(fd: number, req: number, arg: number, what: string): number {
  return check(`ioctl(${what})`, libc.ioctl_v(fd, BigInt(req), BigInt(arg)));
}

/**
 * Opens /dev/kvm (O_RDWR, O_CLOEXEC) and checks KVM_GET_API_VERSION.
 *
 * @example
 * ```ts ignore
 * const kvm = openKvm();
 * ```
 */
export function openKvm(path = "/dev/kvm"): number {
  const fd = open(path, O_RDWR);
  const v = kvmGetApiVersion(fd);
  if (v !== KVM_API_VERSION) {
    libc.close(fd);
    throw new SysError("ioctl(KVM_GET_API_VERSION)", 0, `API version ${v}, want 12`);
  }
  return fd;
}

/**
 * KVM_GET_API_VERSION on the /dev/kvm fd (12 on every kernel since 2.6.22).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { kvmGetApiVersion } from "./kvm.ts";
 * assert.throws(() => kvmGetApiVersion(-1), { code: "EBADF" });
 * ```
 */
export function kvmGetApiVersion(kvmFd: number): number {
  return ioctlVal(kvmFd, KVM_IOCTL.GET_API_VERSION, 0, "KVM_GET_API_VERSION");
}

/**
 * KVM_CHECK_EXTENSION: 0 when the capability is absent, else a positive value.
 *
 * @example
 * ```ts ignore
 * if (kvmCheckExtension(kvm, KVM_CAP_IOEVENTFD) === 0) throw new Error("no ioeventfd");
 * ```
 */
export function kvmCheckExtension(fd: number, cap: number): number {
  return ioctlVal(fd, KVM_IOCTL.CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION");
}

/**
 * KVM_CREATE_VM (machine type 0): the VM fd.
 *
 * @example
 * ```ts ignore
 * const vm = kvmCreateVm(openKvm());
 * ```
 */
export function kvmCreateVm(kvmFd: number): number {
  return ioctlVal(kvmFd, KVM_IOCTL.CREATE_VM, 0, "KVM_CREATE_VM");
}

/**
 * KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd (kvm_run and what follows).
 *
 * @example
 * ```ts ignore
 * const size = kvmGetVcpuMmapSize(kvm);
 * ```
 */
export function kvmGetVcpuMmapSize(kvmFd: number): number {
  return ioctlVal(kvmFd, KVM_IOCTL.GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
}

/**
 * KVM_SET_TSS_ADDR: three pages of guest-physical space Intel VMX uses to run
 * real mode; must not overlap guest memory.
 *
 * @example
 * ```ts ignore
 * kvmSetTssAddr(vm, 0xfffbd000);
 * ```
 */
export function kvmSetTssAddr(vmFd: number, addr: number): void {
  ioctlVal(vmFd, KVM_IOCTL.SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR");
}

/**
 * One guest memory slot (struct kvm_userspace_memory_region).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { KvmMemoryRegion } from "./kvm.ts";
 * const r: KvmMemoryRegion = { slot: 0, guestPhysAddr: 0, memorySize: 1 << 20, userspaceAddr: 0x7f0000000000 };
 * assert.equal(r.memorySize, 1048576);
 * ```
 */
export interface KvmMemoryRegion {
  slot: number;
  flags?: number;
  guestPhysAddr: number;
  memorySize: number;
  userspaceAddr: number;
}

/**
 * KVM_SET_USER_MEMORY_REGION: maps host memory at a guest-physical address
 * (size 0 deletes the slot).
 *
 * @example
 * ```ts ignore
 * kvmSetUserMemoryRegion(vm, { slot: 0, guestPhysAddr: 0, memorySize: ram.length, userspaceAddr: ram.addr });
 * ```
 */
export function kvmSetUserMemoryRegion(vmFd: number, r: KvmMemoryRegion): void {
  const L = KVM_USERSPACE_MEMORY_REGION;
  const b = new Uint8Array(L.size);
  const v = new DataView(b.buffer);
  v.setUint32(L.slot, r.slot, true);
  v.setUint32(L.flags, r.flags ?? 0, true);
  v.setBigUint64(L.guest_phys_addr, BigInt(r.guestPhysAddr), true);
  v.setBigUint64(L.memory_size, BigInt(r.memorySize), true);
  v.setBigUint64(L.userspace_addr, BigInt(r.userspaceAddr), true);
  ioctlBuf(vmFd, KVM_IOCTL.SET_USER_MEMORY_REGION, b, "KVM_SET_USER_MEMORY_REGION");
}

/**
 * KVM_CREATE_IRQCHIP: the in-kernel 8259 pair, IOAPIC and local APICs; GSIs
 * 0-15 reach the 8259 (and IOAPIC), which KVM_IRQFD and KVM_IRQ_LINE drive.
 *
 * @example
 * ```ts ignore
 * kvmCreateIrqchip(vm);
 * ```
 */
export function kvmCreateIrqchip(vmFd: number): void {
  ioctlVal(vmFd, KVM_IOCTL.CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");
}

/**
 * KVM_IRQ_LINE: raises (1) or lowers (0) a GSI from user space. Allocates
 * nothing (an IOThread may call it per completion).
 *
 * @example
 * ```ts ignore
 * kvmIrqLine(vm, 5, 1); kvmIrqLine(vm, 5, 0); // an edge on GSI 5
 * ```
 */
export function kvmIrqLine(vmFd: number, irq: number, level: number): void {
  irqLevel[0] = irq;
  irqLevel[1] = level;
  ioctlBuf(vmFd, KVM_IOCTL.IRQ_LINE, irqLevelBytes, "KVM_IRQ_LINE");
}

/** struct kvm_irq_level, reused (this thread's: every Worker evaluates the module anew). */
const irqLevelBytes = new Uint8Array(KVM_IRQ_LEVEL.size);
const irqLevel = new Uint32Array(irqLevelBytes.buffer);

/**
 * KVM_CREATE_VCPU: the vCPU fd.
 *
 * @example
 * ```ts ignore
 * const vcpu = kvmCreateVcpu(vm, 0);
 * ```
 */
export function kvmCreateVcpu(vmFd: number, id: number): number {
  return ioctlVal(vmFd, KVM_IOCTL.CREATE_VCPU, id, "KVM_CREATE_VCPU");
}

/**
 * Maps a vCPU's `struct kvm_run` (size from {@link kvmGetVcpuMmapSize}),
 * shared with the kernel: exit reasons and exit data are read from it.
 *
 * @example
 * ```ts ignore
 * const run = kvmMapRun(vcpu, kvmGetVcpuMmapSize(kvm));
 * ```
 */
export function kvmMapRun(vcpuFd: number, size: number): MappedRegion {
  return new MappedRegion(mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpuFd, 0), size);
}

/**
 * KVM_RUN: runs the vCPU until an exit user space must handle (blocking: the
 * calling thread runs nothing else meanwhile). Returns false when the run was
 * interrupted (EINTR, EAGAIN) before an exit, true when kvm_run holds one.
 *
 * @example
 * ```ts ignore
 * while (kvmRun(vcpu)) handle(run);
 * ```
 */
export function kvmRun(vcpuFd: number): boolean {
  const r = libc.ioctl_v(vcpuFd, BigInt(KVM_IOCTL.RUN), 0n);
  if (r >= 0) return true;
  const errno = lastErrno();
  if (errno === EINTR || errno === EAGAIN) return false;
  throw new SysError("ioctl(KVM_RUN)", errno);
}

/** The general-purpose registers (struct kvm_regs); u64 each. */
export type KvmRegs = Record<Exclude<keyof typeof KVM_REGS_STRUCT, "size">, bigint>;

const REG_NAMES = Object.keys(KVM_REGS_STRUCT).filter((k) => k !== "size") as (keyof KvmRegs)[];

/**
 * KVM_GET_REGS.
 *
 * @example
 * ```ts ignore
 * const regs = kvmGetRegs(vcpu); console.log(regs.rip);
 * ```
 */
export function kvmGetRegs(vcpuFd: number): KvmRegs {
  const b = new Uint8Array(KVM_REGS_STRUCT.size);
  ioctlBuf(vcpuFd, KVM_IOCTL.GET_REGS, b, "KVM_GET_REGS");
  const v = new DataView(b.buffer);
  const out = {} as KvmRegs;
  for (const n of REG_NAMES) out[n] = v.getBigUint64(KVM_REGS_STRUCT[n], true);
  return out;
}

/**
 * KVM_SET_REGS.
 *
 * @example
 * ```ts ignore
 * kvmSetRegs(vcpu, { ...kvmGetRegs(vcpu), rip: 0x100000n, rflags: 2n });
 * ```
 */
export function kvmSetRegs(vcpuFd: number, regs: KvmRegs): void {
  const b = new Uint8Array(KVM_REGS_STRUCT.size);
  const v = new DataView(b.buffer);
  for (const n of REG_NAMES) v.setBigUint64(KVM_REGS_STRUCT[n], BigInt.asUintN(64, regs[n]), true);
  ioctlBuf(vcpuFd, KVM_IOCTL.SET_REGS, b, "KVM_SET_REGS");
}

/**
 * A segment register as KVM sees it (struct kvm_segment).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { KvmSegment } from "./kvm.ts";
 * const cs: KvmSegment = { base: 0n, limit: 0xffffffff, selector: 8, type: 11, present: 1,
 *   dpl: 0, db: 1, s: 1, l: 0, g: 1, avl: 0, unusable: 0 };
 * assert.equal(cs.selector, 8);
 * ```
 */
export interface KvmSegment {
  base: bigint;
  limit: number;
  selector: number;
  type: number;
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable: number;
}

/** A descriptor table register (struct kvm_dtable). */
export interface KvmDtable {
  base: bigint;
  limit: number;
}

/**
 * The special registers (struct kvm_sregs), without the interrupt bitmap
 * (kept as read and written back unchanged).
 *
 * @example
 * ```ts ignore
 * const s = kvmGetSregs(vcpu); s.cr0 |= 1n; kvmSetSregs(vcpu, s);
 * ```
 */
export interface KvmSregs {
  cs: KvmSegment;
  ds: KvmSegment;
  es: KvmSegment;
  fs: KvmSegment;
  gs: KvmSegment;
  ss: KvmSegment;
  tr: KvmSegment;
  ldt: KvmSegment;
  gdt: KvmDtable;
  idt: KvmDtable;
  cr0: bigint;
  cr2: bigint;
  cr3: bigint;
  cr4: bigint;
  cr8: bigint;
  efer: bigint;
  apicBase: bigint;
  /** The raw interrupt_bitmap (32 bytes). */
  interruptBitmap: Uint8Array;
}

const SEGMENTS = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"] as const;
const SEG_BYTES = ["type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable"] as const;
const CRS = [
  ["cr0", "cr0"],
  ["cr2", "cr2"],
  ["cr3", "cr3"],
  ["cr4", "cr4"],
  ["cr8", "cr8"],
  ["efer", "efer"],
  ["apicBase", "apic_base"],
] as const;

/**
 * KVM_GET_SREGS.
 *
 * @example
 * ```ts ignore
 * const s = kvmGetSregs(vcpu);
 * ```
 */
export function kvmGetSregs(vcpuFd: number): KvmSregs {
  const L = KVM_SREGS_STRUCT;
  const b = new Uint8Array(L.size);
  ioctlBuf(vcpuFd, KVM_IOCTL.GET_SREGS, b, "KVM_GET_SREGS");
  const v = new DataView(b.buffer);
  const seg = (at: number): KvmSegment => {
    const s = {
      base: v.getBigUint64(at + KVM_SEGMENT.base, true),
      limit: v.getUint32(at + KVM_SEGMENT.limit, true),
      selector: v.getUint16(at + KVM_SEGMENT.selector, true),
    } as KvmSegment;
    for (const k of SEG_BYTES) s[k] = v.getUint8(at + KVM_SEGMENT[k]);
    return s;
  };
  const dt = (at: number): KvmDtable => ({
    base: v.getBigUint64(at + KVM_DTABLE.base, true),
    limit: v.getUint16(at + KVM_DTABLE.limit, true),
  });
  const out = {} as KvmSregs;
  for (const n of SEGMENTS) out[n] = seg(L[n]);
  out.gdt = dt(L.gdt);
  out.idt = dt(L.idt);
  for (const [k, f] of CRS) out[k] = v.getBigUint64(L[f], true);
  out.interruptBitmap = b.slice(L.interrupt_bitmap, L.interrupt_bitmap + 32);
  return out;
}

/**
 * KVM_SET_SREGS.
 *
 * @example
 * ```ts ignore
 * kvmSetSregs(vcpu, { ...kvmGetSregs(vcpu), cr0: 0x11n });
 * ```
 */
export function kvmSetSregs(vcpuFd: number, s: KvmSregs): void {
  const L = KVM_SREGS_STRUCT;
  const b = new Uint8Array(L.size);
  const v = new DataView(b.buffer);
  for (const n of SEGMENTS) {
    const at = L[n], g = s[n];
    v.setBigUint64(at + KVM_SEGMENT.base, BigInt.asUintN(64, g.base), true);
    v.setUint32(at + KVM_SEGMENT.limit, g.limit >>> 0, true);
    v.setUint16(at + KVM_SEGMENT.selector, g.selector, true);
    for (const k of SEG_BYTES) v.setUint8(at + KVM_SEGMENT[k], g[k]);
  }
  for (const [n, d] of [["gdt", s.gdt], ["idt", s.idt]] as const) {
    v.setBigUint64(L[n] + KVM_DTABLE.base, BigInt.asUintN(64, d.base), true);
    v.setUint16(L[n] + KVM_DTABLE.limit, d.limit, true);
  }
  for (const [k, f] of CRS) v.setBigUint64(L[f], BigInt.asUintN(64, s[k]), true);
  b.set(s.interruptBitmap.subarray(0, 32), L.interrupt_bitmap);
  ioctlBuf(vcpuFd, KVM_IOCTL.SET_SREGS, b, "KVM_SET_SREGS");
}

/**
 * One KVM_IOEVENTFD binding: a guest write of `len` bytes to `addr` (MMIO, or
 * a port with `pio`) signals `fd` inside the kernel, with no exit to user
 * space; with `datamatch` only writes of that value do.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { KvmIoeventfd } from "./kvm.ts";
 * const e: KvmIoeventfd = { addr: 0xd0000050, len: 4, fd: 9, datamatch: 0 };
 * assert.equal(e.len, 4);
 * ```
 */
export interface KvmIoeventfd {
  addr: number;
  /** 0 (any width), 1, 2, 4 or 8. */
  len: number;
  fd: number;
  datamatch?: number;
  pio?: boolean;
}

function ioeventfd(vmFd: number, e: KvmIoeventfd, deassign: boolean): void {
  const L = KVM_IOEVENTFD_STRUCT;
  const b = new Uint8Array(L.size);
  const v = new DataView(b.buffer);
  let flags = deassign ? KVM_IOEVENTFD_FLAG_DEASSIGN : 0;
  if (e.pio) flags |= KVM_IOEVENTFD_FLAG_PIO;
  if (e.datamatch !== undefined) {
    flags |= KVM_IOEVENTFD_FLAG_DATAMATCH;
    v.setBigUint64(L.datamatch, BigInt(e.datamatch), true);
  }
  v.setBigUint64(L.addr, BigInt(e.addr), true);
  v.setUint32(L.len, e.len, true);
  v.setInt32(L.fd, e.fd, true);
  v.setUint32(L.flags, flags, true);
  ioctlBuf(vmFd, KVM_IOCTL.IOEVENTFD, b, deassign ? "KVM_IOEVENTFD deassign" : "KVM_IOEVENTFD");
}

/**
 * KVM_IOEVENTFD: binds a guest write to an eventfd.
 *
 * @example
 * ```ts ignore
 * kvmIoeventfd(vm, { addr: base + 0x50, len: 4, fd: kick, datamatch: 0 });
 * ```
 */
export function kvmIoeventfd(vmFd: number, e: KvmIoeventfd): void {
  ioeventfd(vmFd, e, false);
}

/**
 * KVM_IOEVENTFD with DEASSIGN: removes a binding made by {@link kvmIoeventfd}
 * (the same fields must be given).
 *
 * @example
 * ```ts ignore
 * kvmIoeventfdDeassign(vm, { addr: base + 0x50, len: 4, fd: kick, datamatch: 0 });
 * ```
 */
export function kvmIoeventfdDeassign(vmFd: number, e: KvmIoeventfd): void {
  ioeventfd(vmFd, e, true);
}

function irqfd(vmFd: number, fd: number, gsi: number, flags: number, what: string): void {
  const L = KVM_IRQFD_STRUCT;
  const b = new Uint8Array(L.size);
  const v = new DataView(b.buffer);
  v.setUint32(L.fd, fd, true);
  v.setUint32(L.gsi, gsi, true);
  v.setUint32(L.flags, flags, true);
  ioctlBuf(vmFd, KVM_IOCTL.IRQFD, b, what);
}

/**
 * KVM_IRQFD: a write to `fd` raises an edge on `gsi` inside the kernel.
 *
 * @example
 * ```ts ignore
 * kvmIrqfd(vm, callFd, 5);
 * ```
 */
export function kvmIrqfd(vmFd: number, fd: number, gsi: number): void {
  irqfd(vmFd, fd, gsi, 0, "KVM_IRQFD");
}

/**
 * KVM_IRQFD with DEASSIGN: unbinds an eventfd from its GSI.
 *
 * @example
 * ```ts ignore
 * kvmIrqfdDeassign(vm, callFd, 5);
 * ```
 */
export function kvmIrqfdDeassign(vmFd: number, fd: number, gsi: number): void {
  irqfd(vmFd, fd, gsi, KVM_IRQFD_FLAG_DEASSIGN, "KVM_IRQFD deassign");
}
