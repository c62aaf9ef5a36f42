/**
 * `--object throttle-group,id=...` / QMP `object-add` (QEMU's
 * block/throttle-groups.c object): the limits (`x-iops-total`,
 * `x-bps-read-max`, `x-iops-write-max-length`, `x-iops-size`, ... or the
 * `limits` object with the same names without `x-`), and the group's
 * bucket state in memory every thread of the process maps. `driver=throttle`
 * nodes name the group; every export on such a node passes the state's
 * address to its IOThread, whose throttle filter shares it. QMP `qom-set` /
 * `qom-get` change and read the limits while requests run.
 *
 * @module
 */

import {
  noThrottle,
  THROTTLE_BUCKETS,
  THROTTLE_STATE_BYTES,
  type ThrottleConfig,
  throttleConfigError,
  ThrottleState,
} from "../../block/mod.ts";
import { clockNs, type MappedRegion, mmapAnonymous } from "../../sys/mod.ts";
import { DaemonError, type OptionObject, QapiInput } from "./qapi_input.ts";

/** The limit names (without `x-`), as ThrottleLimits in QEMU's qapi/block-core.json. */
export const THROTTLE_LIMIT_NAMES: readonly string[] = [
  ...THROTTLE_BUCKETS.flatMap((b) => [b, `${b}-max`, `${b}-max-length`]),
  "iops-size",
];

/** Reads limits from `input` (names with `prefix`) into `c`, changing only those given. */
function readLimits(input: QapiInput, prefix: string, c: ThrottleConfig): void {
  for (const b of THROTTLE_BUCKETS) {
    const avg = input.int(`${prefix}${b}`, Number.MIN_SAFE_INTEGER);
    const max = input.int(`${prefix}${b}-max`, Number.MIN_SAFE_INTEGER);
    const len = input.int(`${prefix}${b}-max-length`, Number.MIN_SAFE_INTEGER);
    if (avg !== undefined) c.buckets[b].avg = avg;
    if (max !== undefined) c.buckets[b].max = max;
    if (len !== undefined) c.buckets[b].burstLength = len;
  }
  const size = input.int(`${prefix}iops-size`, Number.MIN_SAFE_INTEGER);
  if (size !== undefined) c.iopsSize = size;
}

function check(c: ThrottleConfig): ThrottleConfig {
  for (const b of THROTTLE_BUCKETS) {
    const k = c.buckets[b];
    if (k.avg < 0 || k.max < 0) {
      throw new DaemonError("bps/iops/max values must be within [0, 1000000000000000]");
    }
  }
  const err = throttleConfigError(c);
  if (err !== null) throw new DaemonError(err);
  return c;
}

/** A `throttle-group` object as given: its id and limits. */
export interface ThrottleGroupSpec {
  id: string;
  config: ThrottleConfig;
}

/**
 * Parses a `throttle-group` object (`qom-type` included).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseThrottleGroup } from "./throttle_group.ts";
 * const g = parseThrottleGroup({ "qom-type": "throttle-group", id: "tg0", "x-iops-total": "500" }, true);
 * assert.equal(g.config.buckets["iops-total"].avg, 500);
 * ```
 */
export function parseThrottleGroup(obj: OptionObject, keyval: boolean): ThrottleGroupSpec {
  const input = new QapiInput(obj, keyval);
  input.enum("qom-type", ["throttle-group"] as const, true);
  const id = input.str("id", true);
  const config = noThrottle();
  readLimits(input, "x-", config);
  const limits = input.object("limits");
  if (limits) {
    readLimits(limits, "", config);
    limits.end();
  }
  input.end();
  return { id, config: check(config) };
}

/**
 * A running throttle group.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { noThrottle } from "../../block/mod.ts";
 * import { ThrottleGroupObject } from "./throttle_group.ts";
 * const g = new ThrottleGroupObject({ id: "tg0", config: noThrottle() });
 * g.set("x-iops-total", 300);
 * assert.equal(g.get("x-iops-total"), 300);
 * assert.throws(() => g.set("x-iops-total-max", 100), /cannot be lower/);
 * g.close();
 * ```
 */
export class ThrottleGroupObject {
  readonly id: string;
  /** Nodes (`driver=throttle`) naming the group. */
  readonly users = new Set<string>();
  readonly #region: MappedRegion;
  readonly #state: ThrottleState;

  constructor(spec: ThrottleGroupSpec) {
    this.id = spec.id;
    this.#region = mmapAnonymous(THROTTLE_STATE_BYTES);
    this.#state = new ThrottleState(this.#region.buffer);
    this.#state.configure(spec.config, clockNs());
  }

  /** Address of the shared state, for the IOThreads' throttle filters. */
  get addr(): number {
    return this.#region.addr;
  }

  /** The limits in force. */
  get config(): ThrottleConfig {
    return this.#state.config();
  }

  /**
   * QMP qom-set: `x-<limit>` (a number) or `limits` (an object of limits,
   * the others unchanged). The buckets empty, as QEMU's throttle_config.
   */
  set(property: string, value: unknown): void {
    const c = this.#state.config();
    if (property === "limits") {
      if (typeof value !== "object" || value === null || Array.isArray(value)) {
        throw new DaemonError("Invalid parameter type for 'limits', expected: object");
      }
      const input = new QapiInput(value as OptionObject, false, "limits.");
      readLimits(input, "", c);
      input.end();
    } else if (property.startsWith("x-") && THROTTLE_LIMIT_NAMES.includes(property.slice(2))) {
      readLimits(new QapiInput({ [property]: value } as OptionObject, false), "x-", c);
    } else {
      throw new DaemonError(`Property 'throttle-group.${property}' not found`);
    }
    this.#state.configure(check(c), clockNs());
  }

  /** QMP qom-get: `limits` or `x-<limit>`. */
  get(property: string): unknown {
    const limits = limitsObject(this.#state.config());
    if (property === "limits") return limits;
    if (property.startsWith("x-") && property.slice(2) in limits) return limits[property.slice(2)];
    throw new DaemonError(`Property 'throttle-group.${property}' not found`);
  }

  /** Unmaps the state (no export may use it any more). */
  close(): void {
    this.#region.unmap();
  }
}

/**
 * The limits as QEMU's ThrottleLimits object.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { noThrottle } from "../../block/mod.ts";
 * import { limitsObject } from "./throttle_group.ts";
 * assert.equal(limitsObject(noThrottle())["iops-total-max-length"], 1);
 * ```
 */
export function limitsObject(c: ThrottleConfig): Record<string, number> {
  const out: Record<string, number> = {};
  for (const b of THROTTLE_BUCKETS) {
    out[b] = c.buckets[b].avg;
    out[`${b}-max`] = c.buckets[b].max;
    out[`${b}-max-length`] = c.buckets[b].burstLength;
  }
  out["iops-size"] = c.iopsSize;
  return out;
}
