/**
 * The host's test ports, for guests that report to the host rather than to
 * a human: an exit port (as QEMU's isa-debug-exit, but the value written is
 * the status), a clock the guest calibrates its TSC with, and flags telling
 * the guest what the host expects of it.
 *
 * @module
 */

import { clockNs } from "../sys/mod.ts";

/** Ports (each a 32-bit register). */
export const TEST_PORT = {
  /** Write: the guest is done; the value is its exit status (0 = passed). */
  EXIT: 0x501,
  /** Read: host CLOCK_MONOTONIC ns, low half; latches the high half. */
  CLOCK_LO: 0x504,
  /** Read: the latched high half. */
  CLOCK_HI: 0x508,
  /** Read: TEST_F_* flags. */
  FLAGS: 0x50c,
} as const;

/** Data is not stored (null driver): the guest skips content checks. */
export const TEST_F_NO_VERIFY = 1;
/** Fewer timed requests (CI): the guest's timed loops are short. */
export const TEST_F_QUICK = 2;

/**
 * The test ports of one VM.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { TEST_PORT, TestDevice } from "./test_device.ts";
 * const t = new TestDevice(3);
 * assert.equal(t.read(TEST_PORT.FLAGS), 3);
 * assert.equal(t.write(TEST_PORT.EXIT, 0), false); // the guest is done
 * assert.equal(t.exitStatus, 0);
 * ```
 */
export class TestDevice {
  readonly flags: number;
  /** What the guest wrote to the exit port, or null. */
  exitStatus: number | null = null;
  #latchedHi = 0;

  constructor(flags: number) {
    this.flags = flags;
  }

  owns(port: number): boolean {
    return port === TEST_PORT.EXIT || port === TEST_PORT.CLOCK_LO || port === TEST_PORT.CLOCK_HI ||
      port === TEST_PORT.FLAGS;
  }

  read(port: number): number {
    switch (port) {
      case TEST_PORT.CLOCK_LO: {
        const ns = BigInt(Math.round(clockNs()));
        this.#latchedHi = Number(ns >> 32n);
        return Number(ns & 0xffffffffn);
      }
      case TEST_PORT.CLOCK_HI:
        return this.#latchedHi;
      case TEST_PORT.FLAGS:
        return this.flags;
      default:
        return 0;
    }
  }

  /** A port write; false when the guest asked to stop. */
  write(port: number, value: number): boolean {
    if (port !== TEST_PORT.EXIT) return true;
    this.exitStatus = value >>> 0;
    return false;
  }
}
