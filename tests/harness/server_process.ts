/**
 * A server run as a child process by tests and benchmarks (qemu-storage-daemon,
 * our host via `deno run dataplane/main.ts`): stdin and stdout closed, stderr
 * always drained into a string (a full pipe would block the server's logging),
 * and a stop that escalates to SIGKILL.
 *
 * @module
 */

/** Where to run a {@link ServerProcess}. */
export interface ServerProcessOptions {
  /** Working directory (default: this process's). */
  cwd?: string;
}

/**
 * A spawned server with its stderr collected. Always {@link ServerProcess.stop}
 * it (also on test failure).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ServerProcess } from "./server_process.ts";
 * const p = new ServerProcess("sh", ["-c", "echo hello >&2; exec sleep 60"]);
 * const status = await p.stop("SIGTERM", 5_000);
 * assert.equal(status.signal, "SIGTERM");
 * assert(p.exited);
 * ```
 */
export class ServerProcess {
  /** Process id of the child. */
  readonly pid: number;
  /** Resolves with the exit status once the child has exited. */
  readonly status: Promise<Deno.CommandStatus>;
  #child: Deno.ChildProcess;
  #stderr = "";
  #drained: Promise<void>;
  #exited = false;

  /**
   * Spawns `command args`. Throws what `Deno.Command.spawn` throws
   * (`Deno.errors.NotFound` if the binary is missing).
   */
  constructor(command: string | URL, args: string[], opts: ServerProcessOptions = {}) {
    const child = new Deno.Command(command, {
      args,
      cwd: opts.cwd,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.#child = child;
    this.pid = child.pid;
    const dec = new TextDecoder();
    this.#drained = (async () => {
      for await (const c of child.stderr) this.#stderr += dec.decode(c, { stream: true });
    })();
    this.status = child.status.then((s) => {
      this.#exited = true;
      return s;
    });
  }

  /** Everything the child wrote to stderr so far. */
  get stderr(): string {
    return this.#stderr;
  }

  /** True once the child has exited. */
  get exited(): boolean {
    return this.#exited;
  }

  /** Sends `signal`; does nothing if the child is already gone. */
  kill(signal: Deno.Signal): void {
    try {
      this.#child.kill(signal);
    } catch { /* already gone */ }
  }

  /**
   * Polls until `path` is a socket (true), or the child exits or `timeoutMs`
   * passes first (false).
   */
  async waitForSocket(path: string, timeoutMs: number): Promise<boolean> {
    const deadline = performance.now() + timeoutMs;
    while (true) {
      try {
        if ((await Deno.lstat(path)).isSocket) return true;
      } catch { /* not yet */ }
      if (this.#exited || performance.now() > deadline) return false;
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  /**
   * Sends `signal` (unless the child has exited), then SIGKILL if it has not
   * exited within `timeoutMs`; resolves with the exit status once stderr is
   * drained. Safe to call twice.
   */
  async stop(signal: Deno.Signal = "SIGTERM", timeoutMs = 10_000): Promise<Deno.CommandStatus> {
    if (!this.#exited) this.kill(signal);
    const timer = setTimeout(() => this.kill("SIGKILL"), timeoutMs);
    try {
      const status = await this.status;
      await this.#drained;
      return status;
    } finally {
      clearTimeout(timer);
    }
  }
}
