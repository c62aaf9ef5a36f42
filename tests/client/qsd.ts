/**
 * Test helper: runs qemu-storage-daemon with a vhost-user-blk export, the
 * reference back-end the built-in client is validated against.
 *
 * @module
 */

/** Where tools/setup.sh --test installs it (Debian qemu-system-common). */
export const QSD_BINARY = "/usr/bin/qemu-storage-daemon";

/** A running qemu-storage-daemon. */
export interface Qsd {
  /** The vhost-user socket path. */
  sock: string;
  /** The child process. */
  proc: Deno.ChildProcess;
  /** Terminates it and waits; returns its stderr. */
  stop(): Promise<string>;
}

/**
 * Throws a clear error when the binary is missing: a test that needs the
 * reference must fail, not pass silently.
 */
export function requireQsd(): void {
  try {
    Deno.statSync(QSD_BINARY);
  } catch {
    throw new Error(
      `${QSD_BINARY} is missing: install QEMU with tools/setup.sh --test (Debian: qemu-system-common)`,
    );
  }
}

/**
 * Starts qemu-storage-daemon exporting `blockdevs` (the last node is named
 * "disk") as vhost-user-blk on `sock`, and waits until the socket exists.
 */
export async function startQsd(
  sock: string,
  blockdevs: string[],
  opts: { numQueues?: number; writable?: boolean } = {},
): Promise<Qsd> {
  requireQsd();
  const args: string[] = [];
  for (const b of blockdevs) args.push("--blockdev", b);
  args.push(
    "--export",
    `type=vhost-user-blk,id=e,node-name=disk,addr.type=unix,addr.path=${sock},` +
      `writable=${opts.writable === false ? "off" : "on"},num-queues=${opts.numQueues ?? 1}`,
  );
  const proc = new Deno.Command(QSD_BINARY, { args, stdout: "null", stderr: "piped" }).spawn();
  const stderrP = new Response(proc.stderr).text();
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      if (Deno.statSync(sock).isSocket) break;
    } catch { /* not yet */ }
    if (Date.now() > deadline) {
      try {
        proc.kill("SIGKILL");
      } catch { /* exited */ }
      await proc.status;
      throw new Error(`qemu-storage-daemon did not create ${sock}: ${await stderrP}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  let stopped = false;
  return {
    sock,
    proc,
    async stop() {
      if (!stopped) {
        stopped = true;
        try {
          proc.kill("SIGTERM");
        } catch { /* already exited */ }
        await proc.status;
      }
      return await stderrP;
    },
  };
}
