/**
 * `--object throttle-group,id=...` / QMP `object-add` (the object of QEMU's
 * block/throttle-groups.c): limits given as `x-iops-total`,
 * `x-bps-read-max`, `x-iops-write-max-length`, `x-iops-size`, ... or as the
 * QAPI struct `limits` (ThrottleLimits: the same names without `x-`), and
 * the group's state in memory every thread maps. `driver=throttle` nodes
 * name the group; an export on such a node passes the state's address to its
 * IOThread, whose throttle filter joins the group. QMP `qom-get` reads
 * `limits` or an `x-` property; `qom-set` changes `limits` while requests
 * run (as QEMU, the `x-` properties are refused once the group exists).
 *
 * @module
 */

import {
  THROTTLE_BUCKETS,
  THROTTLE_GROUP_BYTES,
  type ThrottleConfig,
  throttleConfigInit,
  ThrottleGroup,
  throttleIsValid,
} from "../../block/mod.ts";
import { clockNs, type MappedRegion, mmapAnonymous } from "../../sys/mod.ts";
import { DaemonError, type OptionObject, QapiInput } from "./qapi_input.ts";

/** ThrottleLimits' member names (qapi/block-core.json), the `x-` properties without `x-`. */
export const THROTTLE_LIMIT_NAMES: readonly string[] = [
  ...THROTTLE_BUCKETS.flatMap((b) => [b, `${b}-max`, `${b}-max-length`]),
  "iops-size",
];

const UINT_MAX = 0xffff_ffff;

/**
 * Reads limits named `prefix` + name from `input` into `c`; only those given
 * change. The `x-` properties refuse negative values themselves (QEMU's
 * throttle_group_set); in `limits` they fail throttle_is_valid's range check.
 */
function readLimits(input: QapiInput, prefix: "x-" | "", c: ThrottleConfig): void {
  const read = (name: string): number | undefined => {
    const v = input.int(`${prefix}${name}`);
    if (v !== undefined && v < 0 && prefix === "x-") {
      throw new DaemonError("Property values cannot be negative");
    }
    return v;
  };
  for (const b of THROTTLE_BUCKETS) {
    const avg = read(b), max = read(`${b}-max`), len = read(`${b}-max-length`);
    if (avg !== undefined) c.buckets[b].avg = avg;
    if (max !== undefined) c.buckets[b].max = max;
    if (len !== undefined) {
      if (len > UINT_MAX) {
        // (QEMU's x- setter spells it "therange".)
        throw new DaemonError(
          `${prefix}${b}-max-length value must be in ${prefix ? "therange" : "the range"}` +
            ` [0, ${UINT_MAX}]`,
        );
      }
      c.buckets[b].burstLength = len;
    }
  }
  const size = read("iops-size");
  if (size !== undefined) c.iopsSize = size;
}

function validated(c: ThrottleConfig): ThrottleConfig {
  const err = throttleIsValid(c);
  if (err !== null) throw new DaemonError(err);
  return c;
}

/** A `throttle-group` object as given: its id and limits. */
export interface ThrottleGroupSpec {
  qomType: "throttle-group";
  id: string;
  config: ThrottleConfig;
}

/**
 * Parses a `throttle-group` object (`qom-type` included), checked as QEMU's
 * throttle_group_obj_complete.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseThrottleGroup } from "./throttle_group_object.ts";
 * const g = parseThrottleGroup(
 *   { "qom-type": "throttle-group", id: "tg0", "x-iops-total": "500", limits: { "bps-total": "1048576" } },
 *   true,
 * );
 * assert.equal(g.config.buckets["iops-total"].avg, 500);
 * assert.equal(g.config.buckets["bps-total"].avg, 1048576);
 * assert.throws(
 *   () => parseThrottleGroup({ "qom-type": "throttle-group", id: "t", "x-bps-total-max": 5 }, false),
 *   { message: "bps_max/iops_max require corresponding bps/iops values" },
 * );
 * ```
 */
export function parseThrottleGroup(obj: OptionObject, keyval: boolean): ThrottleGroupSpec {
  const input = new QapiInput(obj, keyval);
  input.enum("qom-type", ["throttle-group"] as const, true);
  const id = input.str("id", true);
  if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(id)) {
    throw new DaemonError(`Parameter 'id' expects an identifier`);
  }
  const config = throttleConfigInit();
  readLimits(input, "x-", config);
  const limits = input.object("limits");
  if (limits) {
    readLimits(limits, "", config);
    limits.end();
  }
  input.end();
  return { qomType: "throttle-group", id, config: validated(config) };
}

/**
 * A live throttle group: its shared state (mapped until {@link close}) and
 * the nodes naming it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseThrottleGroup, ThrottleGroupObject } from "./throttle_group_object.ts";
 * const g = new ThrottleGroupObject(
 *   parseThrottleGroup({ "qom-type": "throttle-group", id: "tg0", "x-iops-total": 100 }, false),
 * );
 * g.set("limits", { "iops-total": 200, "iops-total-max": 400 });
 * assert.equal(g.get("x-iops-total"), 200);
 * assert.equal((g.get("limits") as Record<string, number>)["iops-total-max"], 400);
 * assert.throws(() => g.set("x-iops-total", 5), /cannot be set after initialization/);
 * g.close();
 * ```
 */
export class ThrottleGroupObject {
  readonly id: string;
  /** Nodes (`driver=throttle`) naming the group. */
  readonly users = new Set<string>();
  readonly #region: MappedRegion;
  readonly #group: ThrottleGroup;

  constructor(spec: ThrottleGroupSpec) {
    this.id = spec.id;
    this.#region = mmapAnonymous(THROTTLE_GROUP_BYTES);
    this.#group = new ThrottleGroup(this.#region.buffer);
    this.#group.init(spec.config, clockNs());
  }

  /** Address of the shared state, for the IOThreads' throttle filters. */
  get addr(): number {
    return this.#region.addr;
  }

  /** The limits in force. */
  get config(): ThrottleConfig {
    return this.#group.getConfig();
  }

  /**
   * QMP qom-set (throttle_group_set_limits): `limits` takes any subset of
   * ThrottleLimits, the others unchanged; the buckets empty. The `x-`
   * properties are refused once the group exists, as QEMU.
   */
  set(property: string, value: unknown): void {
    if (property.startsWith("x-") && THROTTLE_LIMIT_NAMES.includes(property.slice(2))) {
      throw new DaemonError("Property cannot be set after initialization");
    }
    if (property !== "limits") {
      throw new DaemonError(`Property 'throttle-group.${property}' not found`);
    }
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      throw new DaemonError("Invalid parameter type for 'limits', expected: object");
    }
    const c = this.#group.getConfig();
    const input = new QapiInput(value as OptionObject, false, "limits.");
    readLimits(input, "", c);
    input.end();
    this.#group.config(validated(c), clockNs());
  }

  /** QMP qom-get: `limits` (the whole ThrottleLimits) or one `x-` property. */
  get(property: string): unknown {
    const limits = limitsObject(this.#group.getConfig());
    if (property === "limits") return limits;
    if (property.startsWith("x-") && Object.hasOwn(limits, property.slice(2))) {
      return limits[property.slice(2)];
    }
    throw new DaemonError(`Property 'throttle-group.${property}' not found`);
  }

  /** Unmaps the state: no IOThread may use it any more. */
  close(): void {
    this.#region.unmap();
  }
}

/**
 * The limits as QEMU's ThrottleLimits object (throttle_config_to_limits).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { throttleConfigInit } from "../../block/mod.ts";
 * import { limitsObject } from "./throttle_group_object.ts";
 * assert.equal(limitsObject(throttleConfigInit())["iops-total-max-length"], 1);
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
