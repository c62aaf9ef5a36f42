import assert from "node:assert/strict";
import {
  checkScenarioImage,
  SCENARIO_FILL_BYTE,
  SCENARIO_MIN_IMAGE_SIZE,
  scenarioPattern,
} from "./guest_scenario.ts";

const MiB = 1 << 20;
const SIZE = SCENARIO_MIN_IMAGE_SIZE;

/** The image a correct backend leaves behind (layout from guest_scenario.ts). */
function goodImage(discarded: boolean): Uint8Array {
  const img = new Uint8Array(SIZE).fill(SCENARIO_FILL_BYTE);
  const p = scenarioPattern();
  img.set(p, 8 * MiB);
  img.set(p, 12 * MiB);
  if (discarded) img.fill(0, 9 * MiB, 10 * MiB);
  return img;
}

Deno.test("scenario image check: a correct image passes", () => {
  assert.deepEqual(checkScenarioImage(goodImage(true), SIZE, true), []);
  assert.deepEqual(checkScenarioImage(goodImage(false), SIZE, false), []);
});

Deno.test("scenario image check: an ignored discard is caught", () => {
  const f = checkScenarioImage(goodImage(false), SIZE, true);
  assert.equal(f.length, 1);
  assert.match(f[0], /discarded range differs at byte 9437184 /);
});

Deno.test("scenario image check: stray writes and lost writes are caught", () => {
  const stray = goodImage(true);
  stray[SIZE - 1] = 0;
  assert.match(checkScenarioImage(stray, SIZE, true).join(), /untouched tail differs at byte/);
  const lost = goodImage(true);
  lost.fill(SCENARIO_FILL_BYTE, 12 * MiB + 4096, 12 * MiB + 8192);
  assert.match(
    checkScenarioImage(lost, SIZE, true).join(),
    /direct pattern differs at byte 12587008/,
  );
  assert.match(
    checkScenarioImage(new Uint8Array(MiB), SIZE, true).join(),
    /image is 1048576 bytes/,
  );
});

Deno.test("scenario pattern is deterministic and not repetitive", () => {
  const a = scenarioPattern();
  const b = scenarioPattern();
  assert.deepEqual(a, b);
  assert.notDeepEqual(a.subarray(0, 4096), a.subarray(4096, 8192));
});
