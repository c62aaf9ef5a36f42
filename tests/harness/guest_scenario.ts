/**
 * The end-to-end scenario a real Linux guest runs against any vhost-user-blk
 * backend (qemu-storage-daemon now, the dataplane host later): find /dev/vda,
 * report its attributes and negotiated features, switch it to writeback (so
 * FLUSH requests are sent), write a pattern buffered and with O_DIRECT, sync,
 * drop caches, read it back (also with one O_DIRECT reader per vCPU, so every
 * virtqueue is used), discard a range; then check the image file from the host. Image layout (MiB): [0,8) untouched fill, [8,12) buffered
 * pattern with [9,10) discarded, [12,16) O_DIRECT pattern, [16,end) untouched.
 *
 * @module
 */

import { buildInitramfs } from "./initramfs.ts";
import { type GuestMarkers, type GuestResult, parseMarkers, runGuest } from "./qemu_guest.ts";

const MiB = 1 << 20;
/** Smallest image the scenario fits in. */
export const SCENARIO_MIN_IMAGE_SIZE: number = 32 * MiB;
/** Byte every untouched block of a prepared image holds (so a no-op discard is visible). */
export const SCENARIO_FILL_BYTE = 0x5a;
const PATTERN_SIZE = 4 * MiB;
const BUFFERED_AT = 8 * MiB;
const DISCARD_AT = 9 * MiB;
const DISCARD_LEN = MiB;
const DIRECT_AT = 12 * MiB;

/** The guest checks that must each print `E2E-OK <name>`. */
export const SCENARIO_CHECKS: readonly string[] = [
  "vda",
  "size",
  "write-buffered",
  "read-buffered",
  "write-direct",
  "read-direct",
  "read-parallel",
  "discard",
];

/** A scenario run against one backend. */
export interface GuestScenarioOptions {
  /** The backend's vhost-user-blk socket. */
  socket: string;
  /** Disk size the guest must see, bytes. */
  imageSize: number;
  /**
   * The raw image behind the socket, prepared with {@link prepareScenarioImage};
   * when given, its contents are checked after the guest exits.
   */
  imagePath?: string;
  /** Expected /sys/block/vda/serial; unchecked (only reported) when undefined. */
  serial?: string;
  /** vhost-user-blk num-queues (default 1); the guest gets as many vCPUs. */
  numQueues?: number;
  /** Whether the backend must support discard (default true). */
  discard?: boolean;
  /** Guest timeout (default 180 s). */
  timeoutMs?: number;
  /** Receives the guest's console output as it arrives. */
  onOutput?: (text: string) => void;
}

/** The outcome; `failures` is empty when everything passed. */
export interface GuestScenarioResult {
  guest: GuestResult;
  markers: GuestMarkers;
  /** Human-readable reasons the scenario failed (guest and host side). */
  failures: string[];
  /** What the guest read from /sys/block/vda/serial ("" when none). */
  serial: string;
}

/**
 * The 4 MiB test pattern: xorshift32 from a fixed seed, so it never compresses
 * to zeros and every run writes the same bytes.
 *
 * @example
 * ```ts
 * import { scenarioPattern } from "./guest_scenario.ts";
 * const p = scenarioPattern();
 * if (p.length !== 4 << 20 || p[0] === p[1] && p[1] === p[2]) throw new Error("pattern");
 * ```
 */
export function scenarioPattern(): Uint8Array {
  const words = new Uint32Array(PATTERN_SIZE / 4);
  let x = 0x2545f491;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  return new Uint8Array(words.buffer);
}

/**
 * Creates (or overwrites) `path` as a raw image of `size` bytes filled with
 * {@link SCENARIO_FILL_BYTE}.
 *
 * @example
 * ```ts
 * import { prepareScenarioImage, SCENARIO_MIN_IMAGE_SIZE } from "./guest_scenario.ts";
 * const path = Deno.makeTempFileSync({ suffix: ".img" });
 * await prepareScenarioImage(path, SCENARIO_MIN_IMAGE_SIZE);
 * if (Deno.statSync(path).size !== SCENARIO_MIN_IMAGE_SIZE) throw new Error("size");
 * Deno.removeSync(path);
 * ```
 */
export async function prepareScenarioImage(path: string, size: number): Promise<void> {
  if (size < SCENARIO_MIN_IMAGE_SIZE || size % MiB !== 0) {
    throw new RangeError(`scenario image must be a multiple of 1 MiB >= 32 MiB, not ${size}`);
  }
  const chunk = new Uint8Array(MiB).fill(SCENARIO_FILL_BYTE);
  using f = await Deno.open(path, { write: true, create: true, truncate: true });
  for (let off = 0; off < size; off += MiB) {
    let done = 0;
    while (done < MiB) done += await f.write(chunk.subarray(done));
  }
}

/** The guest side: a busybox ash script printing E2E markers. */
function guestScript(): string {
  const mb = (n: number) => n / MiB;
  return `
ok() { echo "E2E-OK $*"; }
fail() { echo "E2E-FAIL $*"; }
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
if [ ! -b /dev/vda ]; then fail vda no /dev/vda; exit 1; fi
ok vda
q=/sys/block/vda/queue
echo "E2E-INFO size_bytes=$(( $(cat /sys/block/vda/size) * 512 ))"
echo "E2E-INFO serial=$(cat /sys/block/vda/serial 2>/dev/null)"
echo "E2E-INFO queues=$(ls /sys/block/vda/mq | wc -l)"
echo "E2E-INFO logical_block_size=$(cat $q/logical_block_size)"
echo "E2E-INFO discard_max_bytes=$(cat $q/discard_max_bytes)"
echo "E2E-INFO write_zeroes_max_bytes=$(cat $q/write_zeroes_max_bytes)"
echo "E2E-INFO write_cache=$(cat $q/write_cache)"
echo "E2E-INFO read_only=$(cat /sys/block/vda/ro)"
echo "E2E-INFO features=$(cat /sys/block/vda/device/features)"
# With VIRTIO_BLK_F_CONFIG_WCE the guest can switch the device to writeback
# (a config-space write); then sync and O_DIRECT writes are followed by FLUSHes.
if [ -w /sys/block/vda/cache_type ]; then
  echo "write back" > /sys/block/vda/cache_type 2>/dev/null
  echo "E2E-INFO cache_type=$(cat /sys/block/vda/cache_type)"
fi
want=$(md5sum < /pattern.bin | cut -d' ' -f1)
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; blockdev --flushbufs /dev/vda; }

if dd if=/pattern.bin of=/dev/vda bs=1M seek=${mb(BUFFERED_AT)} conv=notrunc,fsync 2>/tmp/err
then ok write-buffered; else fail write-buffered "$(cat /tmp/err)"; fi
drop
got=$(dd if=/dev/vda bs=1M skip=${mb(BUFFERED_AT)} count=${
    mb(PATTERN_SIZE)
  } 2>/dev/null | md5sum | cut -d' ' -f1)
if [ "$got" = "$want" ]; then ok read-buffered; else fail read-buffered "$got != $want"; fi

if dd if=/pattern.bin of=/dev/vda bs=1M seek=${mb(DIRECT_AT)} oflag=direct conv=notrunc 2>/tmp/err
then ok write-direct; else fail write-direct "$(cat /tmp/err)"; fi
got=$(dd if=/dev/vda bs=1M skip=${mb(DIRECT_AT)} count=${
    mb(PATTERN_SIZE)
  } iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
if [ "$got" = "$want" ]; then ok read-direct; else fail read-direct "$got != $want"; fi

# One O_DIRECT reader pinned to each vCPU, so each uses its CPU's virtqueue.
n=$(nproc); c=0; pids=""
while [ $c -lt $n ]; do
  (taskset $((1 << c)) dd if=/dev/vda bs=64k skip=$((${mb(DIRECT_AT)} * 16)) count=64 iflag=direct \
    2>/dev/null | md5sum | cut -d' ' -f1 > /tmp/par.$c) &
  pids="$pids $!"; c=$((c+1))
done
wait $pids
bad=0; c=0
while [ $c -lt $n ]; do [ "$(cat /tmp/par.$c)" = "$want" ] || bad=$((bad+1)); c=$((c+1)); done
if [ $bad = 0 ]; then ok read-parallel; else fail read-parallel "$bad of $n readers differ"; fi

if [ "$(cat $q/discard_max_bytes)" = 0 ]; then
  echo "E2E-INFO discard=unsupported"
elif blkdiscard -o ${DISCARD_AT} -l ${DISCARD_LEN} /dev/vda 2>/tmp/err; then
  ok discard
else
  fail discard "$(cat /tmp/err)"
fi
drop
echo "E2E-INFO uptime=$(cut -d' ' -f1 /proc/uptime)"
`;
}

function firstMismatch(
  image: Uint8Array,
  at: number,
  expect: (i: number) => number,
  len: number,
): number {
  for (let i = 0; i < len; i++) {
    if (image[at + i] !== expect(i)) return at + i;
  }
  return -1;
}

/**
 * The host-side check: what the image must hold after the scenario ran (see
 * the module comment for the layout). Returns failure strings, empty when the
 * image is right. `discard` says whether the discarded range must read as zeros
 * (true) or still hold the pattern (false: the backend does not support discard).
 *
 * @example
 * ```ts
 * import { checkScenarioImage, SCENARIO_FILL_BYTE } from "./guest_scenario.ts";
 * const untouched = new Uint8Array(32 << 20).fill(SCENARIO_FILL_BYTE);
 * const failures = checkScenarioImage(untouched, 32 << 20, true);
 * if (!failures.some((f) => f.includes("buffered pattern"))) throw new Error(failures.join());
 * ```
 */
export function checkScenarioImage(image: Uint8Array, size: number, discard: boolean): string[] {
  const pattern = scenarioPattern();
  const failures: string[] = [];
  const region = (name: string, at: number, len: number, expect: (i: number) => number) => {
    const bad = firstMismatch(image, at, expect, len);
    if (bad >= 0) {
      failures.push(`host: ${name} differs at byte ${bad} (0x${image[bad].toString(16)})`);
    }
  };
  if (image.length !== size) return [`host: image is ${image.length} bytes, not ${size}`];
  const fill = () => SCENARIO_FILL_BYTE;
  region("untouched head", 0, BUFFERED_AT, fill);
  const d0 = DISCARD_AT - BUFFERED_AT;
  region("buffered pattern", BUFFERED_AT, d0, (i) => pattern[i]);
  if (discard) region("discarded range", DISCARD_AT, DISCARD_LEN, () => 0);
  else region("buffered pattern", DISCARD_AT, DISCARD_LEN, (i) => pattern[d0 + i]);
  const d1 = d0 + DISCARD_LEN;
  region(
    "buffered pattern tail",
    DISCARD_AT + DISCARD_LEN,
    PATTERN_SIZE - d1,
    (i) => pattern[d1 + i],
  );
  region("direct pattern", DIRECT_AT, PATTERN_SIZE, (i) => pattern[i]);
  const tail = DIRECT_AT + PATTERN_SIZE;
  region("untouched tail", tail, size - tail, fill);
  return failures;
}

/**
 * Boots a Linux guest on `opts.socket`, runs the scenario and checks the
 * image. Never throws for a scenario failure; assert that `failures` is empty
 * and print `guest.output` when it is not.
 *
 * @example
 * ```ts ignore
 * import { prepareScenarioImage, runGuestScenario } from "./guest_scenario.ts";
 * await prepareScenarioImage("/var/tmp/disk.img", 64 << 20);
 * // ... start a vhost-user-blk backend serving /var/tmp/disk.img on /tmp/vhost.sock ...
 * const r = await runGuestScenario({
 *   socket: "/tmp/vhost.sock",
 *   imagePath: "/var/tmp/disk.img",
 *   imageSize: 64 << 20,
 * });
 * if (r.failures.length > 0) throw new Error(r.failures.join("\n") + "\n" + r.guest.output);
 * ```
 */
export async function runGuestScenario(opts: GuestScenarioOptions): Promise<GuestScenarioResult> {
  const pattern = scenarioPattern();
  const discard = opts.discard ?? true;
  const numQueues = opts.numQueues ?? 1;
  const initrd = await buildInitramfs({
    script: guestScript(),
    files: [{ path: "/pattern.bin", data: pattern }],
  });
  const guest = await runGuest({
    initrd,
    disks: [{ socket: opts.socket, numQueues }],
    smp: numQueues,
    timeoutMs: opts.timeoutMs ?? 180_000,
    onOutput: opts.onOutput,
  });
  const markers = parseMarkers(guest.output);
  const failures: string[] = [];
  if (guest.timedOut) failures.push(`guest timed out after ${guest.elapsedMs.toFixed(0)} ms`);
  if (guest.code !== 0) failures.push(`qemu exited with ${guest.code}: ${guest.stderr.trim()}`);
  for (const f of markers.fail) failures.push(`guest: ${f}`);
  const size = Number(markers.info.get("size_bytes"));
  if (size === opts.imageSize) markers.ok.push("size");
  else failures.push(`guest: size ${size} != ${opts.imageSize}`);
  for (const c of SCENARIO_CHECKS) {
    if (c === "discard" && !discard) continue;
    if (!markers.ok.includes(c) && !markers.fail.some((f) => f.startsWith(c))) {
      failures.push(`guest: no result for ${c}`);
    }
  }
  if (markers.exit !== 0) failures.push(`guest: test script exit ${markers.exit}`);
  const serial = markers.info.get("serial") ?? "";
  if (opts.serial !== undefined && serial !== opts.serial) {
    failures.push(`guest: serial ${JSON.stringify(serial)} != ${JSON.stringify(opts.serial)}`);
  }
  const queues = Number(markers.info.get("queues"));
  if (queues !== numQueues) failures.push(`guest: ${queues} queues, expected ${numQueues}`);
  if (opts.imagePath !== undefined && !guest.timedOut) {
    failures.push(
      ...checkScenarioImage(await Deno.readFile(opts.imagePath), opts.imageSize, discard),
    );
  }
  return { guest, markers, failures, serial };
}
