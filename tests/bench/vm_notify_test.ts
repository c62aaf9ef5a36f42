/** bench/vm_notify.ts: the guest's perf lines are read as they are printed. */
import assert from "node:assert/strict";
import { parsePerf } from "../../bench/vm_notify.ts";

Deno.test("vm_notify: parsePerf reads the interrupt-mode QD1 latency and QD32 IOPS", () => {
  const log = [
    "06:26:37.916 vm: guest: perf interrupt qd1: 300 requests, 319723 ns per request, 3127 IOPS, 8 cycles per request, 300 interrupts",
    "06:26:38.337 vm: guest: perf interrupt qd32: 3000 requests, 130822 ns per request, 7643 IOPS, 3 cycles per request, 509 interrupts",
    "06:26:38.401 vm: guest: perf polling qd1: 300 requests, 142297 ns per request, 7027 IOPS, 3 cycles per request, 0 interrupts",
  ].join("\n");
  assert.deepEqual(parsePerf(log), { qd1Ns: 319723, qd32Iops: 7643 });
  assert.equal(parsePerf("guest: FAIL"), null);
});
