/**
 * Issue 12, the real thing: a Linux guest (QEMU TCG, vhost-user-blk-pci with
 * `-chardev socket,...,reconnect=1`) writes and reads back 64 KiB chunks with
 * O_DIRECT from four processes on one queue, while the host (a separate
 * process, with the test-only --test-hold-completions so completions are out
 * of order) is SIGKILLed (once: SIGTERM) and started again on the same
 * socket, many times.
 * QEMU reconnects, hands the inflight region back (SET_INFLIGHT_FD) and the
 * restarted host takes again what was in flight. The guest must log no I/O
 * error, every read-back must match, the workload must finish, and the image
 * must hold the last round of every chunk.
 *
 * The same workload once more with the host alive throughout but breaking
 * a ring every so many requests (the test-only --test-break-ring, as if a
 * chain were malformed, though it is sound): the host closes the
 * connection, QEMU reconnects to the same process, the popped request is
 * taken again from the inflight region, and the disk goes on.
 */

import assert from "node:assert/strict";
import { buildInitramfs, makeScratchDir, runGuest, scenarioPattern } from "../harness/mod.ts";
import { parseMarkers } from "../harness/qemu_guest.ts";
import { HostProcess } from "../robustness/robustness_util.ts";

const MiB = 1 << 20;
const CHUNK = 64 * 1024;
const WORKERS = 4;
const CHUNKS = 8; // per worker
const ROUNDS = 8;
const BASE = 16; // first chunk used (1 MiB in)
const PATTERN_CHUNKS = (4 * MiB) / CHUNK;
const KILLS = 8;
/** --test-break-ring of the second scenario: the guest's workload is ~550 requests. */
const BREAK_EVERY = 100;
/** The kill that is a SIGTERM (a clean stop) instead of a SIGKILL. */
const SIGTERM_AT = 3;

/** Which chunk of /pattern.bin worker chunk `blk` holds after round `r`. */
const source = (blk: number, r: number) => (blk * 7 + r * 13) % PATTERN_CHUNKS;

function guestScript(): string {
  return `
ok() { echo "E2E-OK $*"; }
fail() { echo "E2E-FAIL $*"; }
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
if [ ! -b /dev/vda ]; then fail vda no /dev/vda; exit 1; fi
ok vda
c=0
while [ $c -lt ${PATTERN_CHUNKS} ]; do
  dd if=/pattern.bin bs=64k skip=$c count=1 2>/dev/null | md5sum | cut -d' ' -f1 > /tmp/md5.$c
  c=$((c+1))
done
worker() {
  p=$1; r=0; bad=0
  while [ $r -lt ${ROUNDS} ]; do
    k=0
    while [ $k -lt ${CHUNKS} ]; do
      blk=$((p * ${CHUNKS} + k))
      src=$(( (blk * 7 + r * 13) % ${PATTERN_CHUNKS} ))
      if ! dd if=/pattern.bin of=/dev/vda bs=64k skip=$src seek=$((${BASE} + blk)) count=1 \\
          oflag=direct conv=notrunc 2>/tmp/err.$p; then
        fail "write p$p r$r k$k $(cat /tmp/err.$p)"; bad=1
      fi
      got=$(dd if=/dev/vda bs=64k skip=$((${BASE} + blk)) count=1 iflag=direct 2>/tmp/err.$p \\
        | md5sum | cut -d' ' -f1)
      if [ "$got" != "$(cat /tmp/md5.$src)" ]; then fail "verify p$p r$r k$k"; bad=1; fi
      echo "E2E-PROGRESS"
      k=$((k+1))
    done
    r=$((r+1))
  done
  echo $bad > /tmp/done.$p
}
p=0; pids=""
while [ $p -lt ${WORKERS} ]; do worker $p & pids="$pids $!"; p=$((p+1)); done
wait $pids
bad=0; p=0
while [ $p -lt ${WORKERS} ]; do [ "$(cat /tmp/done.$p)" = 0 ] || bad=1; p=$((p+1)); done
if [ $bad = 0 ]; then ok workload; else fail workload; fi
echo "E2E-INFO uptime=$(cut -d' ' -f1 /proc/uptime)"
`;
}

const NO_QEMU = (() => {
  try {
    new Deno.Command("qemu-system-x86_64", { args: ["--version"], stdout: "null" }).outputSync();
    return null;
  } catch {
    return "qemu-system-x86_64 not found";
  }
})();
if (NO_QEMU) console.warn(`SKIPPING the reconnecting Linux guest test: ${NO_QEMU}`);

for (const scenario of ["kills", "ring breaks"] as const) {
  Deno.test({
    name: scenario === "kills"
      ? `linux guest: host killed ${KILLS} times (one SIGTERM) during O_DIRECT writes from ${WORKERS} processes on one queue`
      : `linux guest: the host breaks a ring every ${BREAK_EVERY} requests during O_DIRECT writes from ${WORKERS} processes: QEMU reconnects, the disk goes on`,
    ignore: NO_QEMU !== null,
    fn: () =>
      reconnectScenario(
        scenario === "kills" ? KILLS : 0,
        scenario === "kills" ? null : BREAK_EVERY,
      ),
  });
}

async function reconnectScenario(killCount: number, breakEvery: number | null): Promise<void> {
  const dir = await makeScratchDir("e2e-reconnect");
  const image = `${dir}/disk.img`;
  const socket = `${dir}/vhost.sock`;
  const size = 32 * MiB;
  const f = await Deno.open(image, { create: true, write: true });
  await f.truncate(size);
  f.close();
  const args = [
    "--image",
    image,
    "--socket",
    socket,
    "--cache",
    "none",
    "--aio",
    "native",
    "--test-hold-completions",
    "4:200",
    ...(breakEvery === null ? [] : ["--test-break-ring", String(breakEvery)]),
  ];
  const hostLogs: string[] = [];
  let host = new HostProcess(args);
  let guestDone = false;
  try {
    await host.ready();
    const pattern = scenarioPattern();
    const initrd = await buildInitramfs({
      script: guestScript(),
      files: [{ path: "/pattern.bin", data: pattern }],
    });
    const t0 = performance.now();
    // Chunks written and verified so far (the guest prints a line for each).
    let progress = 0;
    const guest = runGuest({
      initrd,
      disks: [{ socket, numQueues: 1, reconnect: 1 }],
      timeoutMs: 150_000,
      onOutput: (t) => progress += t.split("E2E-PROGRESS").length - 1,
    }).finally(() => guestDone = true);
    let kills = 0;
    let seed = 0x1234;
    const rand = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
    while (kills < killCount && !guestDone) {
      // Kill once the guest's workload makes progress on this host (so
      // never during the guest's probe or QEMU's vhost set-up: QEMU 7.2
      // can lose its reconnect handler when the back-end dies there,
      // fixed upstream in 9.1 by "vhost-user: fix lost reconnect"), a
      // little later.
      const before = progress;
      const going = await waitFor(() =>
        (/queue 0: started/.test(host.stderr) && progress >= before + 2) || guestDone
      );
      if (!going || guestDone) break;
      await new Promise((r) => setTimeout(r, 200 + rand() * 600));
      if (guestDone) break;
      // One clean restart among the crashes: SIGTERM lets in-flight
      // requests finish and closes the connection first.
      const sig = kills === SIGTERM_AT ? "SIGTERM" : "SIGKILL";
      const st = await host.stop(sig, 15_000);
      assert.equal(st.signal, sig === "SIGTERM" ? null : "SIGKILL", host.stderr);
      hostLogs.push(host.stderr);
      kills++;
      host = new HostProcess(args);
      await host.ready();
    }
    const r = await guest;
    await host.stopCleanly();
    hostLogs.push(host.stderr);
    const markers = parseMarkers(r.output);
    const all = hostLogs.join("\n");
    const resubmitted = [...all.matchAll(/(\d+) request\(s\) resubmitted/g)]
      .reduce((n, m) => n + Number(m[1]), 0);
    const breaks = all.match(/injected ring break\): closing the connection/g)?.length ?? 0;
    console.log(
      `guest: ${kills} kills, ${breaks} ring breaks, ${
        (performance.now() - t0).toFixed(0)
      } ms, uptime ${markers.info.get("uptime")} s, ${resubmitted} requests resubmitted`,
    );
    // Every host's log, its start and end (a stuck reconnect shows where it began).
    const cut = (l: string) =>
      l.length < 3000 ? l : `${l.slice(0, 1500)}\n[...]\n${l.slice(-1500)}`;
    const tail = `\n--- guest console ---\n${r.output.slice(-4000)}\n--- host logs ---\n${
      hostLogs.map(cut).join("\n=====\n")
    }`;
    assert.equal(r.timedOut, false, `guest timed out${tail}`);
    assert.deepEqual(markers.fail, [], `guest failures${tail}`);
    assert.ok(markers.ok.includes("workload"), `workload did not finish${tail}`);
    assert.doesNotMatch(r.output, /I\/O error|blk_update_request|critical medium/, tail);
    assert.equal(kills, killCount, "the guest finished before every kill was done");
    if (breakEvery !== null) {
      assert.ok(breaks >= 3, `only ${breaks} ring breaks${tail}`);
      assert.ok(resubmitted >= breaks, `fewer resubmissions than breaks${tail}`);
    }
    assert.ok(/inflight tracking/.test(all), `QEMU did not use the inflight region${tail}`);
    // The image holds the last round of every chunk.
    const img = await Deno.readFile(image);
    for (let blk = 0; blk < WORKERS * CHUNKS; blk++) {
      const at = (BASE + blk) * CHUNK;
      const src = source(blk, ROUNDS - 1) * CHUNK;
      const same = img.subarray(at, at + CHUNK).every((b, i) => b === pattern[src + i]);
      assert.ok(same, `chunk ${blk} is not its last round`);
    }
  } finally {
    await host.stop("SIGKILL", 5000);
    await Deno.remove(dir, { recursive: true });
  }
}

async function waitFor(cond: () => boolean, ms = 60_000): Promise<boolean> {
  const deadline = performance.now() + ms;
  while (!cond()) {
    if (performance.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 20));
  }
  return true;
}
