/**
 * Boots a real Linux guest in QEMU (TCG, no KVM needed) with an initramfs from
 * {@link ./initramfs.ts} and vhost-user-blk disks, collects its serial console
 * and enforces a timeout. Guest memory is a shared memfd, which vhost-user
 * backends need to map it. Guest scripts report with marker lines that
 * {@link parseMarkers} reads: `E2E-OK <name>`, `E2E-FAIL <name> [detail]`,
 * `E2E-INFO <key>=<value>`, and `E2E-EXIT <status>` printed by /init.
 *
 * @module
 */

import { findKernel, type KernelImage } from "./kernel_image.ts";

/** One vhost-user-blk disk: QEMU connects to `socket` as the vhost-user frontend. */
export interface VhostUserBlkDisk {
  /** Unix socket the backend listens on. */
  socket: string;
  /** `num-queues` of vhost-user-blk-pci (default 1). */
  numQueues?: number;
  /** `queue-size` of vhost-user-blk-pci (default QEMU's, 128). */
  queueSize?: number;
  /**
   * Seconds between reconnection attempts when the back-end goes away
   * (`-chardev socket,...,reconnect=N`); default none: QEMU stops using the disk.
   */
  reconnect?: number;
}

/** How to run a guest. */
export interface GuestOptions {
  /** Initramfs path (gzip'd newc cpio). */
  initrd: string;
  /** Kernel; default {@link findKernel}(). */
  kernel?: KernelImage;
  /** vhost-user-blk disks, in order (first is /dev/vda). */
  disks?: readonly VhostUserBlkDisk[];
  /** Guest RAM in MiB (default 512). */
  memoryMiB?: number;
  /** vCPUs (default 1). The guest uses min(num-queues, vCPUs) queues. */
  smp?: number;
  /** Kill QEMU after this long (default 120 s: TCG on a busy 2-core host is slow). */
  timeoutMs?: number;
  /** Extra kernel command line. */
  append?: string;
  /** qemu-system-x86_64 binary (default from PATH). */
  qemu?: string;
  /** Called with each chunk of console output as it arrives (e.g. to tee it). */
  onOutput?: (text: string) => void;
}

/** What a guest run produced. */
export interface GuestResult {
  /** Serial console output with "\r\n" turned into "\n". */
  output: string;
  /** QEMU's stderr. */
  stderr: string;
  /** QEMU's exit code (null when killed by a signal). */
  code: number | null;
  /** True if the timeout killed QEMU. */
  timedOut: boolean;
  /** Wall time from spawn to QEMU's exit, ms. */
  elapsedMs: number;
  /** Wall time from spawn to the `E2E-BOOT` line, ms (NaN if never seen). */
  bootMs: number;
}

/** The marker lines of a guest's output. */
export interface GuestMarkers {
  ok: string[];
  fail: string[];
  info: Map<string, string>;
  /** Exit status of /test.sh, or null if the guest never got there. */
  exit: number | null;
}

/**
 * Extracts marker lines from console output. A marker may follow kernel log
 * text on the same line, so it is matched anywhere in the line.
 *
 * @example
 * ```ts
 * import { parseMarkers } from "./qemu_guest.ts";
 * const m = parseMarkers("E2E-INFO size=8\r\nE2E-OK write\n[ 1.0] x E2E-FAIL read bad\nE2E-EXIT 1\r\n");
 * if (m.ok.join() !== "write" || m.fail.join() !== "read bad" || m.exit !== 1) throw new Error();
 * if (m.info.get("size") !== "8") throw new Error();
 * ```
 */
export function parseMarkers(output: string): GuestMarkers {
  const m: GuestMarkers = { ok: [], fail: [], info: new Map(), exit: null };
  for (const line of output.split(/\r*\n/)) {
    const hit = /E2E-(OK|FAIL|INFO|EXIT) ?([^\r]*)/.exec(line);
    if (hit === null) continue;
    const rest = hit[2].trim();
    switch (hit[1]) {
      case "OK":
        m.ok.push(rest);
        break;
      case "FAIL":
        m.fail.push(rest);
        break;
      case "INFO": {
        const eq = rest.indexOf("=");
        if (eq > 0) m.info.set(rest.slice(0, eq), rest.slice(eq + 1));
        break;
      }
      case "EXIT":
        m.exit = Number.parseInt(rest, 10);
        break;
    }
  }
  return m;
}

/**
 * The QEMU command line for `opts` (without the binary).
 *
 * @example
 * ```ts
 * import { qemuArgs } from "./qemu_guest.ts";
 * const kernel = { vmlinuz: "/k", release: "x", modulesDir: "/m" };
 * const args = qemuArgs({ initrd: "/i", kernel, disks: [{ socket: "/s", numQueues: 2 }] });
 * if (!args.join(" ").includes("vhost-user-blk-pci,chardev=vub0,num-queues=2")) {
 *   throw new Error(args.join(" "));
 * }
 * ```
 */
export function qemuArgs(opts: GuestOptions): string[] {
  const kernel = opts.kernel ?? findKernel();
  const mem = opts.memoryMiB ?? 512;
  const args = [
    "-accel",
    "tcg",
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-no-reboot",
    "-m",
    `${mem}M`,
    "-smp",
    String(opts.smp ?? 1),
    "-object",
    `memory-backend-memfd,id=mem,size=${mem}M,share=on`,
    "-machine",
    "q35,memory-backend=mem",
    "-serial",
    "stdio",
    "-monitor",
    "none",
    "-kernel",
    kernel.vmlinuz,
    "-initrd",
    opts.initrd,
    "-append",
    `console=ttyS0 panic=-1 quiet rdinit=/init ${opts.append ?? ""}`.trim(),
  ];
  (opts.disks ?? []).forEach((d, i) => {
    let dev = `vhost-user-blk-pci,chardev=vub${i},num-queues=${d.numQueues ?? 1}`;
    if (d.queueSize !== undefined) dev += `,queue-size=${d.queueSize}`;
    const chardev = `socket,id=vub${i},path=${d.socket}` +
      (d.reconnect !== undefined ? `,reconnect=${d.reconnect}` : "");
    args.push("-chardev", chardev, "-device", dev);
  });
  return args;
}

async function drain(
  stream: ReadableStream<Uint8Array>,
  onText: (text: string) => void,
): Promise<void> {
  const dec = new TextDecoder();
  for await (const chunk of stream) onText(dec.decode(chunk, { stream: true }));
  onText(dec.decode());
}

/**
 * Boots the guest and resolves when QEMU exits (the guest powers off at the
 * end of /init) or the timeout kills it. Never throws for a guest failure:
 * callers inspect {@link GuestResult} and {@link parseMarkers}.
 *
 * @example
 * ```ts ignore
 * import { buildInitramfs } from "./initramfs.ts";
 * import { parseMarkers, runGuest } from "./qemu_guest.ts";
 * const initrd = await buildInitramfs({ script: "echo E2E-OK hello\n" });
 * const r = await runGuest({ initrd });
 * console.log(parseMarkers(r.output).ok); // ["hello"]
 * ```
 */
export async function runGuest(opts: GuestOptions): Promise<GuestResult> {
  const start = performance.now();
  const child = new Deno.Command(opts.qemu ?? "qemu-system-x86_64", {
    args: qemuArgs(opts),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let output = "";
  let stderr = "";
  let bootMs = NaN;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      child.kill("SIGKILL");
    } catch { /* already gone */ }
  }, opts.timeoutMs ?? 120_000);
  try {
    await Promise.all([
      drain(child.stdout, (text) => {
        output += text;
        if (Number.isNaN(bootMs) && output.includes("E2E-BOOT")) {
          bootMs = performance.now() - start;
        }
        opts.onOutput?.(text);
      }),
      drain(child.stderr, (t) => stderr += t),
    ]);
    const status = await child.status;
    return {
      output: output.replace(/\r+\n/g, "\n"), // a "\r\n" may be split across chunks
      stderr,
      code: status.signal === null ? status.code : null,
      timedOut,
      elapsedMs: performance.now() - start,
      bootMs,
    };
  } finally {
    clearTimeout(timer);
  }
}
