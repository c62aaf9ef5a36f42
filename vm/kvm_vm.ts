/**
 * A minimal KVM machine around the dataplane: RAM from a memfd, the in-kernel
 * 8259/IOAPIC, one vCPU (vcpu.ts) entered in 32-bit protected mode at the
 * guest image's first byte (loaded at 1 MiB), an 8250 UART at COM1, the test
 * ports, and one virtio-blk device on the virtio-mmio transport whose queues
 * run in the dataplane's IOThreads: QueueNotify writes signal the queue's
 * kick eventfd in the kernel (KVM_IOEVENTFD, datamatch on the queue index),
 * and the IOThread's call-fd writes raise the device's GSI in the kernel
 * (KVM_IRQFD). The main thread only sees control-plane exits.
 *
 * @module
 */

import { AioContext, EventNotifier, type IOThread } from "../aio/mod.ts";
import {
  type BlkThreadStats,
  formatStats,
  type HostOptions,
  startBlkIOThreads,
} from "../dataplane/mod.ts";
import {
  close,
  eventfd,
  eventfdWrite,
  KVM_CAP_IOEVENTFD,
  KVM_CAP_IRQCHIP,
  KVM_CAP_IRQFD,
  KVM_CAP_SET_TSS_ADDR,
  KVM_CAP_USER_MEMORY,
  kvmCheckExtension,
  kvmCreateIrqchip,
  kvmCreateVm,
  kvmIoeventfd,
  kvmIrqfd,
  kvmIrqLine,
  kvmSetTssAddr,
  openKvm,
} from "../sys/mod.ts";
import type { VirtioBlkOptions } from "../virtio/mod.ts";
import { GuestRam } from "./guest_ram.ts";
import { Serial8250 } from "./serial.ts";
import { TestDevice } from "./test_device.ts";
import { Vcpu, type VcpuEnd, type VcpuExit } from "./vcpu.ts";
import { VIRTIO_MMIO, VIRTIO_MMIO_SIZE, VirtioMmioDevice } from "./virtio_mmio.ts";
import { VirtioMmioBlk } from "./virtio_mmio_blk.ts";

/** Guest-physical layout and wiring of the machine. */
export const VM_LAYOUT = {
  /** Where the guest image is loaded and entered. */
  loadAddr: 0x100000,
  /** Base of the virtio-mmio window (above RAM, below 4 GiB). */
  virtioMmioBase: 0xd0000000,
  /** GSI of the virtio-mmio device: IRQ 5 of the master 8259. */
  virtioGsi: 5,
  /** Three pages for KVM_SET_TSS_ADDR (Intel real-mode emulation), at the top of 4 GiB. */
  tssAddr: 0xfffbd000,
} as const;

/**
 * What {@link KvmVm.start} needs.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VmOptions } from "./kvm_vm.ts";
 * import { parseHostArgs } from "../dataplane/mod.ts";
 * const o: VmOptions = {
 *   host: parseHostArgs(["--image", "null-co:1M", "--socket", "unused"]),
 *   guest: new Uint8Array([0xf4]), ramSize: 16 << 20, ioeventfd: true, irqfd: true, testFlags: 0,
 * };
 * assert.equal(o.ramSize, 16777216);
 * ```
 */
export interface VmOptions {
  /** Block, IOThread and device options, as the vhost-user host takes them. */
  host: HostOptions;
  /** Flat guest image, loaded at 1 MiB and entered at its first byte. */
  guest: Uint8Array;
  ramSize: number;
  /**
   * QueueNotify through KVM_IOEVENTFD (the default). False traps every
   * notify to the main thread, which writes the kick eventfd (for comparison).
   */
  ioeventfd: boolean;
  /**
   * Used-buffer interrupts through KVM_IRQFD (the default). False: the
   * IOThread raises the GSI itself with KVM_IRQ_LINE (for comparison).
   */
  irqfd: boolean;
  /** What the test ports' FLAGS register reads. */
  testFlags: number;
}

/**
 * How a run ended.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { VmResult } from "./kvm_vm.ts";
 * const r: VmResult = { exitStatus: 0, end: { stopped: true, reason: "x" }, serial: [], threads: [], exits: { fast: 0, slow: 0 }, guestErrors: 0 };
 * assert.equal(r.exitStatus, 0);
 * ```
 */
export interface VmResult {
  /** What the guest wrote to the exit port; null when it never did. */
  exitStatus: number | null;
  end: VcpuEnd;
  /** Every line the guest printed. */
  serial: string[];
  threads: BlkThreadStats[];
  /** vCPU exits answered in the vCPU thread (interrupt status/ack) and on the main thread. */
  exits: { fast: number; slow: number };
  /** Accesses the virtio-mmio device refused or ignored. */
  guestErrors: number;
}

/**
 * Throws unless KVM offers what this machine needs.
 *
 * @example
 * ```ts ignore
 * checkKvmCapabilities(openKvm());
 * ```
 */
export function checkKvmCapabilities(kvmFd: number): void {
  const need: [number, string][] = [
    [KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"],
    [KVM_CAP_SET_TSS_ADDR, "KVM_CAP_SET_TSS_ADDR"],
    [KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"],
    [KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD"],
    [KVM_CAP_IRQFD, "KVM_CAP_IRQFD"],
  ];
  const missing = need.filter(([c]) => kvmCheckExtension(kvmFd, c) <= 0).map(([, n]) => n);
  if (missing.length > 0) throw new Error(`KVM lacks ${missing.join(", ")}`);
}

/**
 * A running (or ready) machine.
 *
 * @example
 * ```ts ignore
 * const vm = await KvmVm.start(opts, console.error);
 * const result = await vm.run();
 * await vm.close();
 * ```
 */
export class KvmVm {
  readonly device: VirtioBlkOptions;
  readonly virtio: VirtioMmioDevice;
  readonly #kvm: number;
  readonly #vm: number;
  readonly #ram: GuestRam;
  readonly #ctx: AioContext;
  readonly #threads: IOThread[];
  readonly #kickFds: number[];
  readonly #callFd: number;
  readonly #broken: EventNotifier;
  readonly #serial: Serial8250;
  readonly #test: TestDevice;
  readonly #vcpu: Vcpu;
  readonly #log: (line: string) => void;
  #unhandled = 0;
  #running = true;
  readonly #loop: Promise<void>;

  private constructor(p: {
    kvm: number;
    vm: number;
    ram: GuestRam;
    ctx: AioContext;
    threads: IOThread[];
    device: VirtioBlkOptions;
    kickFds: number[];
    callFd: number;
    broken: EventNotifier;
    isr: SharedArrayBuffer;
    options: VmOptions;
    log: (line: string) => void;
  }) {
    this.#kvm = p.kvm;
    this.#vm = p.vm;
    this.#ram = p.ram;
    this.#ctx = p.ctx;
    this.#threads = p.threads;
    this.device = p.device;
    this.#kickFds = p.kickFds;
    this.#callFd = p.callFd;
    this.#broken = p.broken;
    this.#log = p.log;
    this.#serial = new Serial8250((line) => p.log(`guest: ${line}`));
    this.#test = new TestDevice(p.options.testFlags);
    const backend = new VirtioMmioBlk({
      device: p.device,
      iothreads: p.threads,
      kickFds: p.kickFds,
      callFd: p.callFd,
      queueNumMax: p.options.host.queueSize,
      log: p.log,
    });
    this.virtio = new VirtioMmioDevice(backend, {
      isr: new Int32Array(p.isr, 0, 1),
      raiseIrq: p.options.irqfd ? () => eventfdWrite(p.callFd, 1) : () => {
        kvmIrqLine(p.vm, VM_LAYOUT.virtioGsi, 1);
        kvmIrqLine(p.vm, VM_LAYOUT.virtioGsi, 0);
      },
      log: p.log,
    });
    p.ctx.setEventNotifier(p.broken, () => void this.#onRingBroken());
    this.#vcpu = Vcpu.create(p.kvm, p.vm, {
      ctx: p.ctx,
      isr: p.isr,
      mmioBase: VM_LAYOUT.virtioMmioBase,
      handler: (x) => this.#onExit(x),
    });
    this.#vcpu.enterProtectedMode(VM_LAYOUT.loadAddr);
    this.#loop = (async () => {
      while (this.#running) await p.ctx.pollAsync();
    })();
  }

  /**
   * Builds the machine: KVM VM with irqchip and RAM, the guest loaded, the
   * IOThreads started on the image with the RAM installed, one ioeventfd per
   * queue and the device's irqfd. Throws (after cleaning up) when KVM lacks
   * something or the image cannot be opened.
   */
  static async start(options: VmOptions, log: (line: string) => void = () => {}): Promise<KvmVm> {
    const cleanup: (() => void | Promise<void>)[] = [];
    try {
      const kvm = openKvm();
      cleanup.push(() => close(kvm));
      checkKvmCapabilities(kvm);
      const vm = kvmCreateVm(kvm);
      cleanup.push(() => close(vm));
      kvmSetTssAddr(vm, VM_LAYOUT.tssAddr);
      kvmCreateIrqchip(vm);
      const ram = GuestRam.create(options.ramSize, vm);
      cleanup.push(() => ram.close());
      ram.load(VM_LAYOUT.loadAddr, options.guest);

      const ctx = new AioContext();
      cleanup.push(() => ctx.close());
      const broken = new EventNotifier();
      cleanup.push(() => broken.close());
      const isr = new SharedArrayBuffer(4);
      const irqLine = options.irqfd ? undefined : { vmFd: vm, gsi: VM_LAYOUT.virtioGsi };
      const { threads, device } = await startBlkIOThreads(options.host, broken.fd, {
        isr,
        irqLine,
      });
      cleanup.push(async () => {
        for (const t of threads) {
          await t.call("blkClose").catch(() => {});
          await t.stop();
        }
      });
      for (const t of threads) await t.call("blkSetMemory", { regions: ram.regions() });

      const numQueues = device.numQueues ?? 1;
      const kickFds: number[] = [];
      cleanup.push(() => kickFds.forEach((fd) => close(fd)));
      for (let i = 0; i < numQueues; i++) {
        const fd = eventfd();
        kickFds.push(fd);
        if (options.ioeventfd) {
          kvmIoeventfd(vm, {
            addr: VM_LAYOUT.virtioMmioBase + VIRTIO_MMIO.QUEUE_NOTIFY,
            len: 4,
            fd,
            datamatch: i,
          });
        }
      }
      const callFd = eventfd();
      cleanup.push(() => close(callFd));
      if (options.irqfd) kvmIrqfd(vm, callFd, VM_LAYOUT.virtioGsi);
      return new KvmVm({
        kvm,
        vm,
        ram,
        ctx,
        threads,
        device,
        kickFds,
        callFd,
        broken,
        isr,
        options,
        log,
      });
    } catch (e) {
      for (const f of cleanup.reverse()) {
        try {
          await f();
        } catch { /* best effort */ }
      }
      throw e;
    }
  }

  /**
   * Resolves with the first IOThread failure (its event loop died: a bug);
   * its queues are dead, so the CLI logs it and ends the process.
   */
  get failed(): Promise<Error> {
    return Promise.race(this.#threads.map((t) => t.failed));
  }

  /** Runs the guest until it writes the exit port or fails; then the counters. */
  async run(): Promise<VmResult> {
    this.#vcpu.start();
    const end = await this.#vcpu.ended;
    this.#serial.flush();
    return await this.snapshot(end);
  }

  /** The counters now (`end` says why the run ended, or that it has not). */
  async snapshot(end: VcpuEnd): Promise<VmResult> {
    const threads: BlkThreadStats[] = [];
    for (const t of this.#threads) threads.push(await t.call<BlkThreadStats>("blkStats"));
    return {
      exitStatus: this.#test.exitStatus,
      end,
      serial: this.#serial.lines,
      threads,
      exits: this.#vcpu.exitCounts,
      guestErrors: this.virtio.guestErrors,
    };
  }

  /** The counters as the host prints them. */
  static formatResult(r: VmResult): string {
    return formatStats({ connections: 1, threads: r.threads }) +
      `\n  vCPU exits: ${r.exits.fast} answered in the vCPU thread, ${r.exits.slow} by the main thread` +
      `, ${r.guestErrors} virtio-mmio guest errors`;
  }

  #onExit(x: VcpuExit): boolean | Promise<boolean> {
    if (x.kind === "io") {
      if (this.#serial.owns(x.addr)) {
        if (x.write) this.#serial.write(x.addr, Number(x.data));
        else x.data = BigInt(this.#serial.read(x.addr));
        return true;
      }
      if (this.#test.owns(x.addr)) {
        if (x.write) return this.#test.write(x.addr, Number(x.data & 0xffffffffn));
        x.data = BigInt(this.#test.read(x.addr));
        return true;
      }
    } else {
      const off = x.addr - VM_LAYOUT.virtioMmioBase;
      if (off >= 0 && off < VIRTIO_MMIO_SIZE) {
        if (!x.write) {
          x.data = this.virtio.read(off, x.size);
          return true;
        }
        return this.virtio.write(off, x.size, x.data).then(() => true);
      }
    }
    // Nothing there: reads float high, writes go nowhere (a PC's open bus).
    if (this.#unhandled++ < 20) {
      this.#log(
        `unhandled ${x.kind} ${x.write ? "write" : "read"} of ${x.size} bytes at 0x${
          x.addr.toString(16)
        }`,
      );
    }
    if (!x.write) x.data = (1n << BigInt(8 * x.size)) - 1n;
    return true;
  }

  /** A ring broke in its IOThread (virtio_error): the device needs a reset. */
  async #onRingBroken(): Promise<void> {
    this.#broken.testAndClear();
    const reasons: string[] = [];
    for (const t of this.#threads) {
      try {
        for (const b of await t.call<{ index: number; reason: string }[]>("blkBrokenQueues")) {
          reasons.push(`queue ${b.index}: ${b.reason}`);
        }
      } catch {
        return; // stopping
      }
    }
    if (reasons.length > 0) await this.virtio.deviceError(`ring broken (${reasons.join("; ")})`);
  }

  /**
   * Stops the device's queues (after their requests in flight), closes the
   * image, stops the IOThreads and releases KVM. Call after {@link run}
   * resolved: a vCPU still running guest code cannot be stopped (KVM_RUN
   * only returns on an exit), so a caller giving up on a guest ends the
   * process instead.
   */
  async close(): Promise<void> {
    await this.virtio.reset();
    for (const t of this.#threads) {
      await t.call("blkDrain").catch(() => {});
      await t.call("blkClose").catch(() => {});
      await t.stop();
    }
    this.#ctx.setEventNotifier(this.#broken, null);
    this.#broken.close();
    this.#vcpu.close();
    this.#running = false;
    this.#ctx.close();
    await this.#loop;
    // Closing the VM fd drops its ioeventfd and irqfd bindings.
    close(this.#vm);
    for (const fd of this.#kickFds) close(fd);
    close(this.#callFd);
    this.#ram.close();
    close(this.#kvm);
  }
}
