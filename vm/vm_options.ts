/**
 * `deno task vm` options: the vhost-user host's block and device options
 * (dataplane's parseHostArgs, without --socket) plus the machine's own.
 *
 * @module
 */

import {
  HOST_USAGE,
  type HostOptions,
  parseHostArgs,
  parseSize,
  UsageError,
} from "../dataplane/mod.ts";

/**
 * Everything `deno task vm` was asked to do.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseVmArgs } from "./vm_options.ts";
 * const o = parseVmArgs(["--image", "disk.img", "--aio", "io_uring", "--timeout", "30"]);
 * assert.equal(o.host.block.aio, "io_uring");
 * assert.equal(o.timeoutMs, 30000);
 * ```
 */
export interface VmCliOptions {
  host: HostOptions;
  /** Flat guest image; null: build the test guest (tests/vm/guest). */
  guest: string | null;
  ramSize: number;
  timeoutMs: number;
  notify: "ioeventfd" | "trap";
  irq: "irqfd" | "line";
  quick: boolean;
  help: boolean;
}

export const VM_USAGE = `Usage: deno task vm -- --image IMAGE [options]

Boot the test guest (tests/vm/guest: a freestanding 32-bit C program with a
virtio-mmio virtio-blk driver) in a KVM VM whose disk is IMAGE, served by the
dataplane's IOThreads; QueueNotify reaches them through KVM_IOEVENTFD and their
completions reach the guest through KVM_IRQFD. The guest runs its workload and
reports on the serial port; the exit status is the guest's (0: it passed).

Machine options:
  --guest FILE             flat guest image loaded at 1 MiB [build tests/vm/guest]
  --ram SIZE               guest RAM                          [32M]
  --timeout SECONDS        give up (exit 1) after this long   [120]
  --notify MODE            ioeventfd | trap (QueueNotify exits to the main
                           thread, which kicks the queue)     [ioeventfd]
  --irq MODE               irqfd | line (the IOThread raises the GSI with
                           KVM_IRQ_LINE instead)              [irqfd]
  --quick                  short timed loops
Host options (as deno task host, without --socket):
` + HOST_USAGE.split("\n").filter((l) => !/--socket|^Usage|^Serve|^cloud|^$/.test(l)).join("\n");

const VM_FLAGS = new Set(["--guest", "--ram", "--timeout", "--notify", "--irq"]);

/**
 * Parses `deno task vm` arguments; throws {@link UsageError}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseVmArgs } from "./vm_options.ts";
 * assert.throws(() => parseVmArgs(["--image", "x", "--socket", "/s"]), /socket/);
 * ```
 */
export function parseVmArgs(args: string[]): VmCliOptions {
  // `deno task vm -- --image x` passes the `--` through.
  if (args[0] === "--") args = args.slice(1);
  const rest: string[] = [];
  const vm = new Map<string, string>();
  let quick = false;
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    const eq = a.indexOf("=");
    const name = eq > 0 ? a.slice(0, eq) : a;
    if (VM_FLAGS.has(name)) {
      const value = eq > 0 ? a.slice(eq + 1) : args[++i];
      if (value === undefined) throw new UsageError(`${name} needs a value`);
      vm.set(name, value);
    } else if (a === "--quick") quick = true;
    else rest.push(a);
  }
  const host = parseHostArgs(rest, { socket: false });
  const help = host.help;
  const ramSize = parseSize(vm.get("--ram") ?? "32M");
  if (ramSize < 4 << 20 || ramSize > 3 * 2 ** 30 || ramSize % 4096 !== 0) {
    throw new UsageError("--ram must be a multiple of 4K between 4M and 3G");
  }
  const t = vm.get("--timeout") ?? "120";
  if (!/^\d+$/.test(t) || Number(t) < 1 || Number(t) > 86400) {
    throw new UsageError("--timeout takes whole seconds, 1..86400");
  }
  const notify = vm.get("--notify") ?? "ioeventfd";
  if (notify !== "ioeventfd" && notify !== "trap") {
    throw new UsageError(`--notify must be ioeventfd or trap, not '${notify}'`);
  }
  const irq = vm.get("--irq") ?? "irqfd";
  if (irq !== "irqfd" && irq !== "line") {
    throw new UsageError(`--irq must be irqfd or line, not '${irq}'`);
  }
  return {
    host,
    irq,
    guest: vm.get("--guest") ?? null,
    ramSize,
    timeoutMs: Number(t) * 1000,
    notify,
    quick,
    help,
  };
}
