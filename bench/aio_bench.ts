/**
 * aio/ benchmarks: `./deno bench -A bench/aio_bench.ts`.
 *
 * - bottom half schedule + dispatch, eventfd handler dispatch (one thread);
 * - cross-thread round trip main <-> IOThread: over eventfds with both sides
 *   asleep in epoll_wait (pollMaxNs 0), and over shared memory + aioNotify
 *   with adaptive busy polling; the eventfd case is compared with a C
 *   pthread ping-pong (bench/c/eventfd_pingpong.c, built here with gcc);
 * - thread-pool submit-to-completion (4 KiB preadv from a cached file).
 *
 * @module
 */

import { AioContext, aioNotify, EventNotifier, IOThread, ThreadPool } from "../aio/mod.ts";
import { addressOf, close, O_CREAT, O_RDWR, open, pwrite, unlink } from "../sys/mod.ts";

const PINGPONG = new URL("./aio_pingpong.ts", import.meta.url).href;

// ---- one thread -----------------------------------------------------------

const local = new AioContext();
let bhRuns = 0;
const bh = local.bhNew(() => bhRuns++);
const bh100 = Array.from({ length: 100 }, () => local.bhNew(() => bhRuns++));
const evn = new EventNotifier();
local.setEventNotifier(evn, () => evn.testAndClear());

Deno.bench("BH schedule + poll(false)", { group: "local", baseline: true }, () => {
  bh.schedule();
  local.poll(false);
});

Deno.bench("100 BHs schedule + one poll(false) (per 100)", { group: "local" }, () => {
  for (let i = 0; i < 100; i++) bh100[i].schedule();
  local.poll(false);
});

Deno.bench("eventfd set + handler dispatch (poll(true))", { group: "local" }, () => {
  evn.set();
  local.poll(true);
});

// ---- cross-thread round trips --------------------------------------------

/** One IOThread and one main-side context with the given poll-max-ns, both echoing. */
async function pair(name: string, pollMaxNs: number) {
  const seqBuf = new SharedArrayBuffer(8);
  const seq = new Int32Array(seqBuf);
  const main = new AioContext({ pollMaxNs });
  const io = await IOThread.start({
    name,
    modules: [PINGPONG],
    pollMaxNs,
    data: { seq: seqBuf, main: main.notifyHandle },
  });
  const ping = new EventNotifier(), pong = new EventNotifier();
  let pongs = 0;
  main.setEventNotifier(pong, () => {
    if (pong.testAndClear()) pongs++;
  });
  await io.call("echoEventfd", { ping: ping.fd, pong: pong.fd });
  await io.call("echoShared");
  const dummy = new EventNotifier();
  let acks = 0;
  main.setEventNotifier(
    dummy,
    () => dummy.testAndClear(),
    () => acks < Atomics.load(seq, 1),
    () => acks = Atomics.load(seq, 1),
  );
  const ioView = new Int32Array(io.notifyHandle.state);
  return {
    io,
    main,
    /** ping over an eventfd, wait for the pong eventfd. */
    eventfd(): void {
      const want = pongs + 1;
      ping.set();
      while (pongs < want) main.poll(true);
    },
    /** ping in shared memory + aioNotify, the echo answers the same way. */
    shared(): void {
      const v = Atomics.load(seq, 0) + 1;
      Atomics.store(seq, 0, v);
      aioNotify(io.notifyHandle, ioView);
      while (acks < v) main.poll(true);
    },
  };
}

function timeIt(fn: () => void, n: number): number {
  for (let i = 0; i < n / 10; i++) fn(); // warm up
  const t0 = performance.now();
  for (let i = 0; i < n; i++) fn();
  return (performance.now() - t0) * 1e6 / n;
}

async function cRoundTripNs(n: number): Promise<number | undefined> {
  const dir = Deno.makeTempDirSync({ prefix: "aio-bench-" });
  try {
    const src = new URL("./c/eventfd_pingpong.c", import.meta.url).pathname;
    const exe = `${dir}/eventfd_pingpong`;
    const cc = await new Deno.Command("gcc", { args: ["-O2", "-pthread", "-o", exe, src] })
      .output();
    if (!cc.success) {
      console.log(`gcc failed: ${new TextDecoder().decode(cc.stderr)}`);
      return undefined;
    }
    const out = await new Deno.Command(exe, { args: [String(n)] }).output();
    const m = /ns_per_round_trip (\d+)/.exec(new TextDecoder().decode(out.stdout));
    return m ? Number(m[1]) : undefined;
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

const blocking = await pair("bench-blocking", 0);
const polling = await pair("bench-polling", 32768);
console.log(
  `IOThread startup (Worker + module import): ${blocking.io.startupMs.toFixed(1)} ms, ` +
    `${polling.io.startupMs.toFixed(1)} ms`,
);

const N = 20000;
const tsEventfd = timeIt(blocking.eventfd, N);
const cNs = await cRoundTripNs(N);
console.log(
  `cross-thread eventfd round trip, both sides asleep in epoll_wait: ` +
    `TypeScript ${tsEventfd.toFixed(0)} ns, C ${cNs ?? "n/a"} ns` +
    (cNs ? `, TypeScript/C = ${(tsEventfd / cNs).toFixed(2)}` : ""),
);
const w0 = blocking.main.stats.blockingWaits;
console.log(
  `cross-thread shared memory + aioNotify, no polling: ${
    timeIt(blocking.shared, N).toFixed(0)
  } ns` +
    ` (${((blocking.main.stats.blockingWaits - w0) / (1.1 * N)).toFixed(2)} sleeps/trip)`,
);
const p0 = polling.main.stats.blockingWaits;
console.log(
  `cross-thread shared memory + aioNotify, adaptive polling both sides: ` +
    `${timeIt(polling.shared, N).toFixed(0)} ns (main pollNs ${polling.main.pollNs}, ` +
    `${((polling.main.stats.blockingWaits - p0) / (1.1 * N)).toFixed(2)} sleeps/trip)`,
);

Deno.bench("eventfd ping-pong, both asleep (pollMaxNs 0)", {
  group: "cross-thread",
  baseline: true,
}, () => blocking.eventfd());
Deno.bench(
  "shared memory + aioNotify, pollMaxNs 0",
  { group: "cross-thread" },
  () => blocking.shared(),
);
Deno.bench(
  "shared memory + aioNotify, adaptive polling",
  { group: "cross-thread" },
  () => polling.shared(),
);
Deno.bench(
  "eventfd ping-pong, adaptive polling (cannot poll an fd)",
  { group: "cross-thread" },
  () => polling.eventfd(),
);

// ---- thread pool -----------------------------------------------------------

const tpCtx = new AioContext();
const pool = new ThreadPool(tpCtx, { maxThreads: 4 });
const path = Deno.makeTempFileSync({ prefix: "aio-bench-" });
const fd = open(path, O_RDWR | O_CREAT, 0o600);
pwrite(fd, new Uint8Array(1 << 20).fill(1), 0);
const buf = new Uint8Array(4096);
// Memory handed to other threads by address lives in an explicit ArrayBuffer.
const iov = new BigUint64Array(new ArrayBuffer(16));
iov.set([BigInt(addressOf(buf)), 4096n]);
const iovAddr = addressOf(iov);
// Only addresses reach the workers: keep the JS objects reachable, or the GC
// frees them under the workers' feet (module-level consts that no closure uses
// are not kept alive).
const keepAlive: unknown[] = [buf, iov];
let tpDone = 0;
const tpCb = (r: number) => {
  if (r !== 4096 || buf[4095] !== 1) throw new Error(`preadv returned ${r}`);
  tpDone++;
};
function poolRead(): void {
  const want = tpDone + 1;
  pool.submitPreadv(fd, iovAddr, 1, 0, tpCb);
  while (tpDone < want) tpCtx.poll(true);
}
poolRead(); // spawns the first worker
console.log(
  `thread-pool preadv 4 KiB submit-to-completion: ${timeIt(poolRead, 5000).toFixed(0)} ns`,
);

Deno.bench("thread-pool preadv 4 KiB submit -> callback", { group: "thread-pool" }, () => {
  poolRead();
});

let queued = 0;
const qCb = () => queued++;
Deno.bench("thread-pool 32 x preadv 4 KiB in flight (per 32)", { group: "thread-pool" }, () => {
  const want = queued + 32;
  for (let i = 0; i < 32; i++) pool.submitPreadv(fd, iovAddr, 1, (i & 255) * 4096, qCb);
  while (queued < want) tpCtx.poll(true);
});

globalThis.addEventListener("unload", () => {
  keepAlive.length = 0;
  close(fd);
  unlink(path);
});
