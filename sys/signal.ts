/**
 * Per-thread signal masks (pthread_sigmask). Signals belong to the main thread:
 * an IOThread or thread-pool Worker blocks the asynchronous ones, so the
 * process's SIGINT/SIGTERM/SIGUSR1 handlers (which Deno runs on its own
 * threads anyway) never interrupt a data-path thread's system calls.
 *
 * @module
 */

import { libc } from "./libc.ts";
import { check, SysError } from "./sys_error.ts";

/** Hang-up. */
export const SIGHUP = 1;
/** Interrupt (Ctrl-C). */
export const SIGINT = 2;
/** Quit. */
export const SIGQUIT = 3;
/** User signal 1 (the host's state dump). */
export const SIGUSR1 = 10;
/** User signal 2. */
export const SIGUSR2 = 12;
/** Write to a pipe with no reader. */
export const SIGPIPE = 13;
/** Timer. */
export const SIGALRM = 14;
/** Termination. */
export const SIGTERM = 15;
/** Child stopped or exited. */
export const SIGCHLD = 17;
/** File size limit exceeded (a blocked one makes the write fail with EFBIG). */
export const SIGXFSZ = 25;
/** Window size change. */
export const SIGWINCH = 28;

const SIG_BLOCK = 0;
/** glibc's sigset_t: 1024 bits. */
const SIGSET_BYTES = 128;

/**
 * The signals {@link blockAsyncSignals} blocks: every one that is sent to the
 * process rather than raised by the thread's own fault. Synchronous ones
 * (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS) must stay deliverable, and
 * glibc keeps its own internal signals (SIGCANCEL, SIGSETXID) out of any mask.
 */
export const ASYNC_SIGNALS: readonly number[] = [
  SIGHUP,
  SIGINT,
  SIGQUIT,
  SIGUSR1,
  SIGUSR2,
  SIGPIPE,
  SIGALRM,
  SIGTERM,
  SIGCHLD,
  18, // SIGCONT
  20, // SIGTSTP
  21, // SIGTTIN
  22, // SIGTTOU
  23, // SIGURG
  24, // SIGXCPU
  SIGXFSZ,
  26, // SIGVTALRM
  SIGWINCH,
  29, // SIGIO
  30, // SIGPWR
];

function sigset(signals: readonly number[]): Uint8Array {
  const set = new Uint8Array(SIGSET_BYTES);
  for (const s of signals) set[(s - 1) >> 3] |= 1 << ((s - 1) & 7);
  return set;
}

/**
 * Blocks {@link ASYNC_SIGNALS} on the calling thread (pthread_sigmask
 * SIG_BLOCK). A process-directed signal then goes to a thread that does not
 * block it; one raised for this thread (SIGXFSZ from a write past
 * RLIMIT_FSIZE) stays pending and the call fails with an errno instead.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { blockAsyncSignals, blockedSignals, SIGTERM } from "./signal.ts";
 * const worker = `
 *   import { blockAsyncSignals, blockedSignals } from "${new URL("./signal.ts", import.meta.url)}";
 *   blockAsyncSignals();
 *   self.postMessage(blockedSignals());`;
 * const w = new Worker(`data:application/typescript,${encodeURIComponent(worker)}`, {
 *   type: "module",
 * });
 * const blocked = await new Promise<number[]>((r) => (w.onmessage = (e) => r(e.data)));
 * w.terminate();
 * assert.ok(blocked.includes(SIGTERM));
 * assert.ok(!blockedSignals().includes(SIGTERM)); // this thread is untouched
 * void blockAsyncSignals;
 * ```
 */
export function blockAsyncSignals(): void {
  const r = libc.pthread_sigmask(SIG_BLOCK, sigset(ASYNC_SIGNALS), null);
  if (r !== 0) throw new SysError("pthread_sigmask", r);
}

/**
 * The signals (1..64) the calling thread blocks.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { blockedSignals } from "./signal.ts";
 * assert.ok(Array.isArray(blockedSignals()));
 * ```
 */
export function blockedSignals(): number[] {
  const old = new Uint8Array(SIGSET_BYTES);
  const r = libc.pthread_sigmask(SIG_BLOCK, new Uint8Array(SIGSET_BYTES), old);
  if (r !== 0) throw new SysError("pthread_sigmask", r);
  const out: number[] = [];
  for (let s = 1; s <= 64; s++) if (old[(s - 1) >> 3] & (1 << ((s - 1) & 7))) out.push(s);
  return out;
}

const SYS_TGKILL = 234n;

/**
 * The calling thread's kernel thread id (gettid).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { threadId } from "./signal.ts";
 * const [, , tid] = Deno.readLinkSync("/proc/thread-self").split("/"); // "<pid>/task/<tid>"
 * assert.equal(threadId(), Number(tid));
 * ```
 */
export function threadId(): number {
  return libc.gettid();
}

/**
 * tgkill(2): sends `signal` to thread `tid` of this process (a thread-directed
 * signal: it waits, pending, while that thread blocks it).
 *
 * @example
 * ```ts
 * import { threadKill, threadId } from "./signal.ts";
 * threadKill(threadId(), 0); // signal 0: only checks that the thread exists
 * ```
 */
export function threadKill(tid: number, signal: number): void {
  check(
    "tgkill",
    libc.syscall(SYS_TGKILL, BigInt(Deno.pid), BigInt(tid), BigInt(signal), 0n, 0n, 0n),
  );
}
