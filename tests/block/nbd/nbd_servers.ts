/**
 * Real NBD servers for the nbd driver's tests: qemu-nbd over an image file
 * and nbdkit (memory plugin, delay and error filters), on a Unix socket or
 * a loopback TCP port. Each helper waits until the server accepts
 * connections.
 */
const delay = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A running server process. */
export interface NbdServer {
  proc: Deno.ChildProcess;
  /** Unix socket path, when listening on one. */
  socket?: string;
  /** TCP port, when listening on loopback TCP. */
  port?: number;
  /** SIGKILL and wait. */
  kill(): Promise<void>;
}

/** Whether a program runs (for loud skips). */
export function have(cmd: string): boolean {
  try {
    new Deno.Command(cmd, { args: ["--version"], stdout: "null", stderr: "null" }).outputSync();
    return true;
  } catch {
    return false;
  }
}

/** A free loopback TCP port (bound and released). */
export function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

async function waitReady(
  proc: Deno.ChildProcess,
  where: { socket?: string; port?: number; host?: string },
): Promise<void> {
  let exited = false;
  proc.status.then(() => exited = true);
  for (let i = 0; i < 500; i++) {
    if (exited) throw new Error("the NBD server exited before listening");
    try {
      const c = where.socket
        ? await Deno.connect({ transport: "unix", path: where.socket })
        : await Deno.connect({ hostname: where.host ?? "127.0.0.1", port: where.port! });
      c.close();
      return;
    } catch {
      await delay(10);
    }
  }
  throw new Error("the NBD server did not start listening");
}

function server(
  cmd: string,
  args: string[],
  where: { socket?: string; port?: number; host?: string },
): Promise<NbdServer> {
  const proc = new Deno.Command(cmd, { args, stdout: "null", stderr: "null" }).spawn();
  const s: NbdServer = {
    proc,
    ...where,
    async kill() {
      try {
        proc.kill("SIGKILL");
      } catch { /* already gone */ }
      await proc.status;
    },
  };
  return waitReady(proc, where).then(() => s, async (e) => {
    await s.kill();
    throw e;
  });
}

/**
 * qemu-nbd serving `file` (raw) as export `name`, persistent (-t), shared
 * by up to 8 clients, writeback cache; on `socket` or a TCP `port`.
 */
export function startQemuNbd(
  file: string,
  where: { socket?: string; port?: number },
  opts: { name?: string; readOnly?: boolean; extra?: string[] } = {},
): Promise<NbdServer> {
  const args = ["-f", "raw", "-x", opts.name ?? "disk", "-t", "-e", "8", "--cache=writeback"];
  if (where.socket) args.push("-k", where.socket);
  else args.push("-b", "127.0.0.1", "-p", String(where.port));
  if (opts.readOnly) args.push("-r");
  args.push(...(opts.extra ?? []), file);
  return server("qemu-nbd", args, where);
}

/** nbdkit in the foreground with `args` (plugin, filters, parameters). */
export function startNbdkit(
  where: { socket?: string; port?: number; host?: string },
  args: string[],
): Promise<NbdServer> {
  const a = ["-f", "--exit-with-parent"];
  if (where.socket) a.push("-U", where.socket);
  else a.push("-i", where.host ?? "127.0.0.1", "-p", String(where.port));
  return server("nbdkit", [...a, ...args], where);
}
