/**
 * One vCPU: its KVM fd, its mapped kvm_run, and the Worker that loops on
 * KVM_RUN (vcpu_worker.ts). Exits that need user space arrive on the main
 * thread's AioContext (the mailbox eventfd) and go to the handler the VM
 * gave; the vCPU waits, paused, until the handler (possibly async) answers,
 * so a register write is complete, queue start and all, before the guest's
 * next instruction.
 *
 * @module
 */

import { type AioContext, EventNotifier } from "../aio/mod.ts";
import {
  close,
  KVM_EXIT_FAIL_ENTRY,
  KVM_EXIT_HLT,
  KVM_EXIT_INTERNAL_ERROR,
  KVM_EXIT_SHUTDOWN,
  KVM_EXIT_SYSTEM_EVENT,
  kvmCreateVcpu,
  kvmGetRegs,
  kvmGetSregs,
  kvmGetVcpuMmapSize,
  kvmMapRun,
  type KvmSegment,
  kvmSetRegs,
  kvmSetSregs,
  type MappedRegion,
} from "../sys/mod.ts";
import { EXIT_KIND, MB, VCPU_STATE, type VcpuInit } from "./vcpu_mailbox.ts";

// A string literal in `new URL(...)` so the bundler finds the module.
const VCPU_WORKER = new URL("./vcpu_worker.ts", import.meta.url).href;

/**
 * A port or MMIO access the guest made, for the exit handler. For a read the
 * handler sets `data`; `size` bytes of it reach the guest.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VcpuExit } from "./vcpu.ts";
 * const e: VcpuExit = { kind: "io", write: true, addr: 0x3f8, size: 1, data: 65n };
 * assert.equal(String.fromCharCode(Number(e.data)), "A");
 * ```
 */
export interface VcpuExit {
  kind: "io" | "mmio";
  write: boolean;
  addr: number;
  size: number;
  data: bigint;
}

/** Answers one exit; false stops the vCPU (the guest is done). */
export type VcpuExitHandler = (exit: VcpuExit) => boolean | Promise<boolean>;

/**
 * Why a vCPU's run loop ended.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VcpuEnd } from "./vcpu.ts";
 * const e: VcpuEnd = { stopped: true, reason: "stopped by the host" };
 * assert.ok(e.stopped);
 * ```
 */
export interface VcpuEnd {
  /** True when the handler stopped it (the guest finished); false on a guest or KVM failure. */
  stopped: boolean;
  reason: string;
}

const EXIT_NAMES: Record<number, string> = {
  [KVM_EXIT_HLT]: "HLT (no interrupt can wake the vCPU)",
  [KVM_EXIT_SHUTDOWN]: "shutdown (triple fault)",
  [KVM_EXIT_FAIL_ENTRY]: "VM entry failed",
  [KVM_EXIT_INTERNAL_ERROR]: "KVM internal error",
  [KVM_EXIT_SYSTEM_EVENT]: "system event",
};

/**
 * Flat 32-bit protected mode without paging: code selector 0x08 and data
 * selector 0x10, base 0, limit 4 GiB, CR0.PE set. The guest loads its own
 * GDT with the same selectors before it takes an interrupt.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { flatSegment } from "./vcpu.ts";
 * assert.equal(flatSegment(0x08, 11).db, 1);
 * ```
 */
export function flatSegment(selector: number, type: number): KvmSegment {
  return {
    base: 0n,
    limit: 0xffffffff,
    selector,
    type,
    present: 1,
    dpl: 0,
    db: 1,
    s: 1,
    l: 0,
    g: 1,
    avl: 0,
    unusable: 0,
  };
}

/**
 * A vCPU with its run loop in a Worker.
 *
 * @example
 * ```ts ignore
 * const vcpu = Vcpu.create(kvm, vm, { ctx, isr, mmioBase, handler });
 * vcpu.enterProtectedMode(0x100000);
 * vcpu.start();
 * console.log(await vcpu.ended);
 * ```
 */
export class Vcpu {
  readonly fd: number;
  readonly #run: MappedRegion;
  readonly #box: Int32Array;
  readonly #mailbox: SharedArrayBuffer;
  readonly #exitNotifier: EventNotifier;
  readonly #ctx: AioContext;
  readonly #handler: VcpuExitHandler;
  readonly #isr: SharedArrayBuffer;
  readonly #mmioBase: number;
  readonly #exit: VcpuExit = { kind: "io", write: false, addr: 0, size: 0, data: 0n };
  readonly #ended = Promise.withResolvers<VcpuEnd>();
  #worker: Worker | null = null;
  #handling = false;
  #done = false;

  private constructor(
    fd: number,
    run: MappedRegion,
    ctx: AioContext,
    opts: { isr: SharedArrayBuffer; mmioBase: number; handler: VcpuExitHandler },
  ) {
    this.fd = fd;
    this.#run = run;
    this.#ctx = ctx;
    this.#handler = opts.handler;
    this.#isr = opts.isr;
    this.#mmioBase = opts.mmioBase;
    this.#mailbox = new SharedArrayBuffer(MB.WORDS * 4);
    this.#box = new Int32Array(this.#mailbox);
    this.#exitNotifier = new EventNotifier();
    ctx.setEventNotifier(this.#exitNotifier, () => this.#onExit());
  }

  /** KVM_CREATE_VCPU and its kvm_run mapping; exits go to `opts.handler` on `opts.ctx`. */
  static create(
    kvmFd: number,
    vmFd: number,
    opts: {
      id?: number;
      ctx: AioContext;
      isr: SharedArrayBuffer;
      mmioBase: number;
      handler: VcpuExitHandler;
    },
  ): Vcpu {
    const fd = kvmCreateVcpu(vmFd, opts.id ?? 0);
    try {
      return new Vcpu(fd, kvmMapRun(fd, kvmGetVcpuMmapSize(kvmFd)), opts.ctx, opts);
    } catch (e) {
      close(fd);
      throw e;
    }
  }

  /** Resolves once the run loop has ended (the handler stopped it, or the guest failed). */
  get ended(): Promise<VcpuEnd> {
    return this.#ended.promise;
  }

  /** Exits answered in the vCPU thread, and exits that went to the main thread. */
  get exitCounts(): { fast: number; slow: number } {
    return {
      fast: Atomics.load(this.#box, MB.FAST_EXITS),
      slow: Atomics.load(this.#box, MB.SLOW_EXITS),
    };
  }

  /** Sets flat 32-bit protected mode, EIP = `entry`, ESP = `stack`, interrupts off. */
  enterProtectedMode(entry: number, stack = 0): void {
    const s = kvmGetSregs(this.fd);
    s.cs = flatSegment(0x08, 11); // execute/read, accessed
    for (const k of ["ds", "es", "fs", "gs", "ss"] as const) s[k] = flatSegment(0x10, 3);
    s.cr0 |= 1n; // PE
    kvmSetSregs(this.fd, s);
    kvmSetRegs(this.fd, {
      ...kvmGetRegs(this.fd),
      rip: BigInt(entry),
      rsp: BigInt(stack),
      rflags: 2n,
    });
  }

  /** Starts the run loop in its Worker. */
  start(): void {
    if (this.#worker !== null) throw new Error("vCPU already started");
    const w = new Worker(VCPU_WORKER, { type: "module", name: `vcpu${this.fd}` });
    this.#worker = w;
    w.onerror = (e) => {
      e.preventDefault();
      this.#finish({ stopped: false, reason: `vCPU thread died: ${e.message}` });
    };
    const init: VcpuInit = {
      vcpuFd: this.fd,
      runAddr: this.#run.addr,
      runSize: this.#run.length,
      exitFd: this.#exitNotifier.fd,
      mailbox: this.#mailbox,
      isr: this.#isr,
      mmioBase: this.#mmioBase,
    };
    w.postMessage(init);
  }

  #finish(end: VcpuEnd): void {
    if (this.#done) return;
    this.#done = true;
    this.#ended.resolve(end);
  }

  #reply(state: number): void {
    Atomics.store(this.#box, MB.STATE, state);
    Atomics.notify(this.#box, MB.STATE);
  }

  #onExit(): void {
    this.#exitNotifier.testAndClear();
    if (this.#handling || Atomics.load(this.#box, MB.STATE) !== VCPU_STATE.EXIT) return;
    const box = this.#box;
    const kind = box[MB.KIND];
    if (kind === EXIT_KIND.END || kind === EXIT_KIND.ERROR) {
      const why = kind === EXIT_KIND.ERROR
        ? `KVM_RUN failed (errno ${box[MB.ERRNO]})`
        : `${EXIT_NAMES[box[MB.REASON]] ?? `exit reason ${box[MB.REASON]}`}` +
          (box[MB.REASON] === KVM_EXIT_INTERNAL_ERROR ? ` (suberror ${box[MB.ERRNO]})` : "");
      let where = "";
      try {
        // The vCPU thread waits in the mailbox, outside KVM_RUN: its registers can be read.
        where = ` at eip 0x${kvmGetRegs(this.fd).rip.toString(16)}`;
      } catch { /* no registers: say nothing about them */ }
      this.#reply(VCPU_STATE.STOP);
      this.#finish({ stopped: false, reason: why + where });
      return;
    }
    const x = this.#exit;
    x.kind = kind === EXIT_KIND.IO ? "io" : "mmio";
    x.write = box[MB.WRITE] !== 0;
    x.addr = (box[MB.ADDR_LO] >>> 0) + (box[MB.ADDR_HI] >>> 0) * 2 ** 32;
    x.size = box[MB.SIZE];
    x.data = x.write ? BigInt(box[MB.DATA_LO] >>> 0) | (BigInt(box[MB.DATA_HI] >>> 0) << 32n) : 0n;
    const answer = (go: boolean) => {
      this.#handling = false;
      if (!x.write) {
        const v = BigInt.asUintN(64, x.data);
        box[MB.DATA_LO] = Number(v & 0xffffffffn) | 0;
        box[MB.DATA_HI] = Number(v >> 32n) | 0;
      }
      this.#reply(go ? VCPU_STATE.RESUME : VCPU_STATE.STOP);
      if (!go) this.#finish({ stopped: true, reason: "stopped by the host" });
    };
    this.#handling = true;
    let r: boolean | Promise<boolean>;
    try {
      r = this.#handler(x);
    } catch (e) {
      answer(false);
      this.#finish({ stopped: false, reason: `exit handler failed: ${(e as Error).stack}` });
      return;
    }
    if (typeof r === "boolean") {
      answer(r);
      return;
    }
    r.then(answer, (e) => {
      answer(false);
      this.#finish({ stopped: false, reason: `exit handler failed: ${(e as Error).stack}` });
    });
  }

  /**
   * Releases the vCPU once its loop has ended. A vCPU still running guest
   * code cannot be stopped from here (KVM_RUN only returns on an exit): the
   * caller ends the process instead, which is what the CLI does on --timeout.
   */
  close(): void {
    if (this.#worker !== null && this.#done) {
      this.#worker.terminate();
      this.#worker = null;
    }
    this.#ctx.setEventNotifier(this.#exitNotifier, null);
    this.#exitNotifier.close();
    if (this.#worker === null) {
      this.#run.unmap();
      close(this.fd);
    }
  }
}
