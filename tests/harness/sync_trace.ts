/**
 * An oracle for "did a sync reach the kernel": the fdatasync/fsync system
 * calls and IORING_OP_FSYNC submissions of one process, seen from outside it
 * through a private ftrace instance (tracefs). A test cannot see a missing
 * flush by killing the process (the page cache survives `kill -9`), and a
 * counter inside the process would only repeat what the code believes it did;
 * the kernel's tracepoints (`syscalls:sys_enter_fdatasync`,
 * `syscalls:sys_enter_fsync`, `io_uring:io_uring_submit_req` filtered on the
 * FSYNC opcode, whose SQE strace cannot decode) record what was asked of it.
 *
 * Timestamps use the instance's `mono` clock, CLOCK_MONOTONIC, the clock of
 * `clockNs()`, so a test can tell which events fall between a request's
 * submission and its completion. Events are filtered to the process's
 * threads with `set_event_pid` plus `event-fork` (threads started later, such
 * as thread-pool workers, are followed), so other processes syncing at the
 * same time do not count.
 *
 * Needs root and tracefs; {@link syncTraceUnavailable} says why not.
 *
 * @module
 */

/** IORING_OP_FSYNC (include/uapi/linux/io_uring.h). */
const IORING_OP_FSYNC = 3;
const TRACEFS_DIRS = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
const EVENTS = [
  "syscalls/sys_enter_fdatasync",
  "syscalls/sys_enter_fsync",
  "io_uring/io_uring_submit_req",
];

/** What asked the kernel to sync. */
export type SyncKind = "fdatasync" | "fsync" | "io_uring fsync";

/** One sync request as the kernel saw it. */
export interface SyncEvent {
  /** CLOCK_MONOTONIC in ns (microsecond resolution). */
  ns: number;
  /** Thread id of the caller (the submitter, for io_uring). */
  tid: number;
  kind: SyncKind;
}

let tracefs: string | null | undefined;

/** The tracefs mount point, mounting it at /sys/kernel/tracing if needed; null if impossible. */
function tracefsRoot(): string | null {
  if (tracefs !== undefined) return tracefs;
  const have = () => TRACEFS_DIRS.find((d) => exists(`${d}/instances`)) ?? null;
  tracefs = have();
  if (tracefs === null) {
    try {
      new Deno.Command("mount", {
        args: ["-t", "tracefs", "nodev", TRACEFS_DIRS[0]],
        stdout: "null",
        stderr: "null",
      }).outputSync();
    } catch { /* no mount(8): reported below */ }
    tracefs = have();
  }
  return tracefs;
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Why sync tracing cannot work here (not root, no tracefs, a tracepoint
 * missing), or null when it can. Tests skip with this reason, loudly.
 */
export function syncTraceUnavailable(): string | null {
  if (Deno.uid() !== 0) return "sync tracing needs root (tracefs instances)";
  const root = tracefsRoot();
  if (root === null) return "no tracefs (mount -t tracefs nodev /sys/kernel/tracing failed)";
  for (const e of EVENTS) {
    if (!exists(`${root}/events/${e}`)) return `tracepoint ${e} missing in ${root}`;
  }
  return null;
}

let instances = 0;

/**
 * A private ftrace instance recording the sync requests of one process.
 *
 * @example
 * ```ts ignore
 * const t = SyncTrace.start(child.pid);
 * // ... drive the child ...
 * const syncs = t.events().filter((e) => e.ns > before);
 * t.close();
 * ```
 */
export class SyncTrace {
  readonly #dir: string;
  #closed = false;

  private constructor(dir: string) {
    this.#dir = dir;
  }

  /** Starts tracing every current and future thread of process `pid`. */
  static start(pid: number): SyncTrace {
    const why = syncTraceUnavailable();
    if (why !== null) throw new Error(why);
    const dir = `${tracefsRoot()}/instances/dataplane-sync-${Deno.pid}-${instances++}`;
    Deno.mkdirSync(dir);
    const t = new SyncTrace(dir);
    try {
      t.#write("trace_clock", "mono");
      t.#write("buffer_size_kb", "1024");
      t.#write("options/event-fork", "1");
      t.#followThreads(pid);
      t.#write("events/io_uring/io_uring_submit_req/filter", `opcode == ${IORING_OP_FSYNC}`);
      for (const e of EVENTS) t.#write(`events/${e}/enable`, "1");
      // A thread started between listing and enabling event-fork is added now.
      t.#followThreads(pid);
    } catch (e) {
      t.close();
      throw e;
    }
    return t;
  }

  /** Every sync request recorded so far, oldest first. */
  events(): SyncEvent[] {
    const out: SyncEvent[] = [];
    const re =
      /-(\d+)\s+\[\d+\]\s+\S+\s+(\d+)\.(\d{6}): (sys_fdatasync|sys_fsync|io_uring_submit_req)\b/;
    for (const line of Deno.readTextFileSync(`${this.#dir}/trace`).split("\n")) {
      const m = re.exec(line);
      if (!m) continue;
      const kind: SyncKind = m[4] === "sys_fdatasync"
        ? "fdatasync"
        : m[4] === "sys_fsync"
        ? "fsync"
        : "io_uring fsync";
      out.push({ ns: Number(m[2]) * 1e9 + Number(m[3]) * 1e3, tid: Number(m[1]), kind });
    }
    return out;
  }

  /** Events with `from <= ns <= to`. */
  between(from: number, to: number): SyncEvent[] {
    return this.events().filter((e) => e.ns >= from && e.ns <= to);
  }

  /** Disables the events and removes the instance. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const e of EVENTS) {
      try {
        this.#write(`events/${e}/enable`, "0");
      } catch { /* removing the instance below disables it anyway */ }
    }
    try {
      Deno.removeSync(this.#dir);
    } catch { /* best effort: an instance left behind only costs its buffer */ }
  }

  #write(file: string, value: string, append = false): void {
    Deno.writeTextFileSync(`${this.#dir}/${file}`, `${value}\n`, { append });
  }

  /** Adds every thread of `pid` to set_event_pid until no new one appears. */
  #followThreads(pid: number): void {
    const seen = new Set<number>();
    for (;;) {
      const tids = [...Deno.readDirSync(`/proc/${pid}/task`)].map((e) => Number(e.name))
        .filter((t) => !seen.has(t));
      if (tids.length === 0) return;
      for (const t of tids) seen.add(t);
      this.#write("set_event_pid", tids.join(" "), true);
    }
  }
}
