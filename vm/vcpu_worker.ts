/**
 * The body of a vCPU Worker: loops on KVM_RUN (a blocking synchronous FFI
 * call) and hands every exit user space must answer to the main thread
 * through the mailbox (vcpu_mailbox.ts), except the virtio-mmio interrupt
 * status read and acknowledge, answered here from the shared status word.
 * Never runs its event loop once the loop has started.
 *
 * @module
 */

import {
  blockAsyncSignals,
  eventfdWrite,
  KVM_EXIT_INTERNAL_ERROR,
  KVM_EXIT_IO,
  KVM_EXIT_IO_OUT,
  KVM_EXIT_MMIO,
  KVM_RUN_STRUCT,
  kvmRun,
  SysError,
  viewAt,
} from "../sys/mod.ts";
import {
  EXIT_KIND,
  MB,
  MMIO_INTERRUPT_ACK,
  MMIO_INTERRUPT_STATUS,
  VCPU_STATE,
  type VcpuInit,
} from "./vcpu_mailbox.ts";

// Signals belong to the main thread.
blockAsyncSignals();

const R = KVM_RUN_STRUCT;

function readLe(u8: Uint8Array, at: number, size: number, box: Int32Array): void {
  let lo = 0, hi = 0;
  for (let i = 0; i < size && i < 4; i++) lo |= u8[at + i] << (8 * i);
  for (let i = 4; i < size; i++) hi |= u8[at + i] << (8 * (i - 4));
  box[MB.DATA_LO] = lo;
  box[MB.DATA_HI] = hi;
}

function writeLe(u8: Uint8Array, at: number, size: number, box: Int32Array): void {
  const lo = box[MB.DATA_LO], hi = box[MB.DATA_HI];
  for (let i = 0; i < size && i < 4; i++) u8[at + i] = (lo >>> (8 * i)) & 0xff;
  for (let i = 4; i < size; i++) u8[at + i] = (hi >>> (8 * (i - 4))) & 0xff;
}

/** Hands the mailbox to the main thread and sleeps until it answers; false: stop. */
function askMain(box: Int32Array, exitFd: number): boolean {
  box[MB.SLOW_EXITS]++;
  Atomics.store(box, MB.STATE, VCPU_STATE.EXIT);
  eventfdWrite(exitFd, 1);
  while (Atomics.load(box, MB.STATE) === VCPU_STATE.EXIT) {
    Atomics.wait(box, MB.STATE, VCPU_STATE.EXIT);
  }
  const resume = Atomics.load(box, MB.STATE) === VCPU_STATE.RESUME;
  Atomics.store(box, MB.STATE, VCPU_STATE.RUNNING);
  return resume;
}

function end(box: Int32Array, exitFd: number, kind: number, reason: number, errno: number): void {
  box[MB.KIND] = kind;
  box[MB.REASON] = reason;
  box[MB.ERRNO] = errno;
  askMain(box, exitFd);
}

function run(init: VcpuInit): void {
  const box = new Int32Array(init.mailbox);
  const isr = new Int32Array(init.isr, 0, 1);
  const buf = viewAt(init.runAddr, init.runSize);
  const u8 = new Uint8Array(buf);
  const dv = new DataView(buf);
  const statusAddr = init.mmioBase + MMIO_INTERRUPT_STATUS;
  const ackAddr = init.mmioBase + MMIO_INTERRUPT_ACK;
  for (;;) {
    let ran: boolean;
    try {
      ran = kvmRun(init.vcpuFd);
    } catch (e) {
      end(box, init.exitFd, EXIT_KIND.ERROR, 0, e instanceof SysError ? e.errno : 0);
      return;
    }
    if (!ran) continue;
    const reason = dv.getUint32(R.exit_reason, true);
    if (reason === KVM_EXIT_MMIO) {
      const addrLo = dv.getUint32(R.mmio_phys_addr, true);
      const addrHi = dv.getUint32(R.mmio_phys_addr + 4, true);
      const size = dv.getUint32(R.mmio_len, true);
      const write = u8[R.mmio_is_write] !== 0;
      if (init.mmioBase !== 0 && addrHi === 0 && size === 4) {
        if (!write && addrLo === statusAddr) {
          box[MB.FAST_EXITS]++;
          dv.setUint32(R.mmio_data, Atomics.load(isr, 0), true);
          continue;
        }
        if (write && addrLo === ackAddr) {
          box[MB.FAST_EXITS]++;
          Atomics.and(isr, 0, ~dv.getUint32(R.mmio_data, true));
          continue;
        }
      }
      box[MB.KIND] = EXIT_KIND.MMIO;
      box[MB.WRITE] = write ? 1 : 0;
      box[MB.ADDR_LO] = addrLo;
      box[MB.ADDR_HI] = addrHi;
      box[MB.SIZE] = Math.min(size, 8);
      if (write) readLe(u8, R.mmio_data, Math.min(size, 8), box);
      if (!askMain(box, init.exitFd)) return;
      if (!write) writeLe(u8, R.mmio_data, Math.min(size, 8), box);
    } else if (reason === KVM_EXIT_IO) {
      const write = u8[R.io_direction] === KVM_EXIT_IO_OUT;
      const size = u8[R.io_size];
      const count = dv.getUint32(R.io_count, true);
      const at = Number(dv.getBigUint64(R.io_data_offset, true));
      // String I/O (rep ins/outs) comes as `count` elements: one exchange each.
      for (let i = 0; i < count; i++) {
        const off = at + i * size;
        if (off + size > init.runSize) break;
        box[MB.KIND] = EXIT_KIND.IO;
        box[MB.WRITE] = write ? 1 : 0;
        box[MB.ADDR_LO] = dv.getUint16(R.io_port, true);
        box[MB.ADDR_HI] = 0;
        box[MB.SIZE] = size;
        if (write) readLe(u8, off, size, box);
        if (!askMain(box, init.exitFd)) return;
        if (!write) writeLe(u8, off, size, box);
      }
    } else {
      const sub = reason === KVM_EXIT_INTERNAL_ERROR ? dv.getUint32(R.internal_suberror, true) : 0;
      end(box, init.exitFd, EXIT_KIND.END, reason, sub);
      return;
    }
  }
}

/** The Worker global scope, as much of it as this module uses. */
const scope = globalThis as unknown as {
  onmessage: ((e: MessageEvent<VcpuInit>) => void) | null;
  postMessage(msg: unknown): void;
};

scope.onmessage = (e) => {
  scope.onmessage = null;
  try {
    run(e.data);
  } finally {
    scope.postMessage({ done: true });
  }
};
