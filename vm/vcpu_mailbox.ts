/**
 * The mailbox between a vCPU Worker and the main thread: one
 * SharedArrayBuffer of Int32 words. The vCPU thread sits in KVM_RUN (a
 * blocking FFI call) and never runs its Deno event loop, so postMessage
 * cannot reach it; as aio/ does for IOThreads, the two sides talk through
 * shared memory announced by an eventfd write (vCPU -> main: the main
 * thread's AioContext wakes) and Atomics.wait/notify (main -> vCPU: the vCPU
 * thread sleeps in Atomics.wait until its exit is answered).
 *
 * @module
 */

/** Word indexes of the mailbox. */
export const MB = {
  /** {@link VCPU_STATE} */
  STATE: 0,
  /** {@link EXIT_KIND} */
  KIND: 1,
  /** 1: the guest wrote (OUT, MMIO store); 0: it reads. */
  WRITE: 2,
  /** Port or guest-physical address, low and high halves. */
  ADDR_LO: 3,
  ADDR_HI: 4,
  /** Access width in bytes (1, 2, 4, 8). */
  SIZE: 5,
  /** The value written, or the value to return for a read (little-endian halves). */
  DATA_LO: 6,
  DATA_HI: 7,
  /** kvm_run.exit_reason of an END exit. */
  REASON: 8,
  /** errno of an ERROR exit; internal.suberror of an internal error. */
  ERRNO: 9,
  /** Exits answered in the vCPU thread itself (interrupt status/ack). */
  FAST_EXITS: 10,
  /** Exits handed to the main thread. */
  SLOW_EXITS: 11,
  /** Words in the mailbox. */
  WORDS: 16,
} as const;

/** MB.STATE values: who owns the mailbox. */
export const VCPU_STATE = {
  /** The vCPU thread runs the guest. */
  RUNNING: 0,
  /** An exit waits for the main thread. */
  EXIT: 1,
  /** The main thread answered: run on. */
  RESUME: 2,
  /** The main thread answered: leave the run loop. */
  STOP: 3,
} as const;

/** MB.KIND values. */
export const EXIT_KIND = {
  IO: 1,
  MMIO: 2,
  /** The guest cannot go on (HLT without an in-kernel irqchip, shutdown, entry failure...). */
  END: 3,
  /** KVM_RUN failed (MB.ERRNO). */
  ERROR: 4,
} as const;

/**
 * What the main thread posts to a vCPU Worker once (structured-cloned).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { MB, type VcpuInit } from "./vcpu_mailbox.ts";
 * const init: VcpuInit = {
 *   vcpuFd: 5, runAddr: 0x7f0000000000, runSize: 12288, exitFd: 6,
 *   mailbox: new SharedArrayBuffer(MB.WORDS * 4), isr: new SharedArrayBuffer(4), mmioBase: 0xd0000000,
 * };
 * assert.equal(init.runSize, 12288);
 * ```
 */
export interface VcpuInit {
  vcpuFd: number;
  /** Host address of the vCPU's mapped kvm_run (mapped by the main thread). */
  runAddr: number;
  runSize: number;
  /** eventfd the vCPU thread writes when an exit waits in the mailbox. */
  exitFd: number;
  mailbox: SharedArrayBuffer;
  /**
   * The virtio-mmio device's interrupt status word: reads of InterruptStatus
   * and writes of InterruptACK are answered in the vCPU thread (they are on
   * every interrupt's path; a main-thread round trip costs ~55 us here).
   */
  isr: SharedArrayBuffer;
  /** Guest-physical base of the virtio-mmio device (0: none). */
  mmioBase: number;
}

/** virtio-mmio InterruptStatus and InterruptACK (virtio 1.2, 4.2.2). */
export const MMIO_INTERRUPT_STATUS = 0x060;
export const MMIO_INTERRUPT_ACK = 0x064;
