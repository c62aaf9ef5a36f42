/**
 * `--object` / QMP `object-add`: the `qom-type`s the daemon creates,
 * dispatched to their own parsers (iothread_object.ts,
 * throttle_group_object.ts).
 *
 * @module
 */

import { type IOThreadSpec, parseObject } from "./iothread_object.ts";
import type { OptionObject } from "./qapi_input.ts";
import { parseThrottleGroup, type ThrottleGroupSpec } from "./throttle_group_object.ts";

/** A parsed `--object`: an IOThread or a throttle group. */
export type ObjectSpec = (IOThreadSpec & { qomType?: "iothread" }) | ThrottleGroupSpec;

/**
 * Parses an `--object` / `object-add` object by its `qom-type`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseObjectSpec } from "./object_spec.ts";
 * assert.equal(parseObjectSpec({ "qom-type": "throttle-group", id: "tg0" }, true).qomType, "throttle-group");
 * assert.equal(parseObjectSpec({ "qom-type": "iothread", id: "io0" }, true).qomType, undefined);
 * ```
 */
export function parseObjectSpec(obj: OptionObject, keyval: boolean): ObjectSpec {
  if ((obj as Record<string, unknown>)["qom-type"] === "throttle-group") {
    return parseThrottleGroup(obj, keyval);
  }
  return parseObject(obj, keyval);
}
