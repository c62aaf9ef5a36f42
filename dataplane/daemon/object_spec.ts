/**
 * `--object` / QMP `object-add`: the `qom-type`s the daemon creates,
 * dispatched to their own parsers (iothread_object.ts, throttle_group.ts).
 *
 * @module
 */

import { type IOThreadSpec, parseObject } from "./iothread_object.ts";
import type { OptionObject } from "./qapi_input.ts";
import { parseThrottleGroup, type ThrottleGroupSpec } from "./throttle_group.ts";

/** A parsed `--object`: an IOThread (the default) or a throttle group. */
export type ObjectSpec =
  | (IOThreadSpec & { qomType?: "iothread" })
  | (ThrottleGroupSpec & { qomType: "throttle-group" });

/**
 * Parses an `--object` / `object-add` object by its `qom-type`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseObjectSpec } from "./object_spec.ts";
 * assert.equal(parseObjectSpec({ "qom-type": "throttle-group", id: "tg0" }, true).qomType, "throttle-group");
 * assert.equal(parseObjectSpec({ "qom-type": "iothread", id: "io0" }, true).qomType, "iothread");
 * assert.throws(() => parseObjectSpec({ "qom-type": "foo", id: "x" }, true),
 *   { message: "Parameter 'qom-type' does not accept value 'foo'" });
 * ```
 */
export function parseObjectSpec(obj: OptionObject, keyval: boolean): ObjectSpec {
  if ((obj as Record<string, unknown>)["qom-type"] === "throttle-group") {
    return { qomType: "throttle-group", ...parseThrottleGroup(obj, keyval) };
  }
  return { qomType: "iothread", ...parseObject(obj, keyval) };
}
