/**
 * Reads one option object the way QEMU's QAPI input visitors do, from either
 * a keyval string (every value a string: `on`/`off`, decimal integers,
 * sizes with suffixes) or JSON (`--blockdev '{"driver": ...}'`, QMP
 * arguments: real JSON types), with QEMU's error messages:
 * "Parameter 'x' is missing", "Parameter 'x' is unexpected",
 * "Parameter 'x' expects integer" (keyval) or "Invalid parameter type for
 * 'x', expected: integer" (JSON), "Parameter 'x' does not accept value 'y'".
 *
 * @module
 */

import type { KeyvalObject } from "./keyval.ts";

/**
 * An option or QMP argument that does not fit its schema, or a request the
 * daemon refuses. `qmpClass` is the QMP error class it is reported with.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { DaemonError } from "./qapi_input.ts";
 * const e = new DaemonError("Parameter 'size' is missing");
 * assert.equal(e.kind, "GenericError");
 * ```
 */
export class DaemonError extends Error {
  readonly kind: "GenericError" | "CommandNotFound" | "DeviceNotFound";
  constructor(
    message: string,
    kind: "GenericError" | "CommandNotFound" | "DeviceNotFound" = "GenericError",
  ) {
    super(message);
    this.name = "DaemonError";
    this.kind = kind;
  }
}

type JsonValue = string | number | boolean | null | JsonValue[] | { [k: string]: JsonValue };

/** What an option object may hold: keyval strings or JSON values. */
export type OptionObject = KeyvalObject | { [k: string]: JsonValue | undefined };

const SIZE_SUFFIX: Record<string, number> = {
  "": 1,
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
};

/**
 * One object being read: take each member with its type, then `end()`
 * refuses whatever was not taken (QEMU's "Parameter 'x' is unexpected").
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { QapiInput } from "./qapi_input.ts";
 * const kv = new QapiInput({ size: "4096", "read-zeroes": "on" }, true);
 * assert.equal(kv.int("size"), 4096);
 * assert.equal(kv.bool("read-zeroes"), true);
 * kv.end();
 * const js = new QapiInput({ size: "4096" }, false);
 * assert.throws(() => js.int("size"), /Invalid parameter type for 'size', expected: integer/);
 * ```
 */
export class QapiInput {
  readonly #obj: Record<string, unknown>;
  readonly #keyval: boolean;
  readonly #prefix: string;
  readonly #taken = new Set<string>();

  /** `keyval`: values are strings from a keyval string (else JSON types). */
  constructor(obj: OptionObject, keyval: boolean, prefix = "") {
    this.#obj = obj as Record<string, unknown>;
    this.#keyval = keyval;
    this.#prefix = prefix;
  }

  /** Whether the member is present. */
  has(key: string): boolean {
    return Object.hasOwn(this.#obj, key) && this.#obj[key] !== undefined;
  }

  #name(key: string): string {
    return this.#prefix + key;
  }

  #get(key: string, required: boolean): unknown {
    this.#taken.add(key);
    if (!this.has(key)) {
      if (required) throw new DaemonError(`Parameter '${this.#name(key)}' is missing`);
      return undefined;
    }
    return this.#obj[key];
  }

  #badType(key: string, type: string): DaemonError {
    return new DaemonError(`Invalid parameter type for '${this.#name(key)}', expected: ${type}`);
  }

  /** A string member. */
  str(key: string): string | undefined;
  str(key: string, required: true): string;
  str(key: string, required = false): string | undefined {
    const v = this.#get(key, required);
    if (v === undefined) return undefined;
    if (typeof v !== "string") throw this.#badType(key, "string");
    return v;
  }

  /** A string member that must be one of `values`. */
  enum<T extends string>(key: string, values: readonly T[]): T | undefined;
  enum<T extends string>(key: string, values: readonly T[], required: true): T;
  enum<T extends string>(key: string, values: readonly T[], required = false): T | undefined {
    const v = required ? this.str(key, true) : this.str(key);
    if (v === undefined) return undefined;
    if (!(values as readonly string[]).includes(v)) {
      throw new DaemonError(`Parameter '${this.#name(key)}' does not accept value '${v}'`);
    }
    return v as T;
  }

  /** A boolean member (`on`/`off`, also `yes`/`no`/`true`/`false` in keyval, as QEMU). */
  bool(key: string): boolean | undefined {
    const v = this.#get(key, false);
    if (v === undefined) return undefined;
    if (this.#keyval && typeof v === "string") {
      if (v === "on" || v === "yes" || v === "true" || v === "y") return true;
      if (v === "off" || v === "no" || v === "false" || v === "n") return false;
      throw new DaemonError(`Parameter '${this.#name(key)}' expects 'on' or 'off'`);
    }
    if (typeof v !== "boolean") throw this.#badType(key, "boolean");
    return v;
  }

  /** An integer member in [min, max]. */
  int(key: string, min?: number, max?: number): number | undefined;
  int(key: string, min: number, max: number, required: true): number;
  int(
    key: string,
    min = Number.MIN_SAFE_INTEGER,
    max = Number.MAX_SAFE_INTEGER,
    required = false,
  ): number | undefined {
    const v = this.#get(key, required);
    if (v === undefined) return undefined;
    let n: number;
    if (this.#keyval && typeof v === "string") {
      if (!/^-?\d+$/.test(v) || !Number.isSafeInteger(Number(v))) {
        throw new DaemonError(`Parameter '${this.#name(key)}' expects integer`);
      }
      n = Number(v);
    } else {
      if (typeof v !== "number" || !Number.isSafeInteger(v)) throw this.#badType(key, "integer");
      n = v;
    }
    if (n < min || n > max) {
      throw new DaemonError(`Parameter '${this.#name(key)}' must be in range [${min}, ${max}]`);
    }
    return n;
  }

  /** A size member: a byte count, with a k/M/G/T/P/E suffix in keyval form (QEMU's size type). */
  size(key: string): number | undefined {
    const v = this.#get(key, false);
    if (v === undefined) return undefined;
    if (this.#keyval && typeof v === "string") {
      const m = /^(\d+)([bkmgtpe]?)$/i.exec(v);
      const n = m ? Number(m[1]) * SIZE_SUFFIX[m[2].toLowerCase()] : NaN;
      if (!Number.isSafeInteger(n)) {
        throw new DaemonError(
          `Parameter '${this.#name(key)}' expects a non-negative number below 2^53` +
            ` (optional suffix k, M, G, T, P or E)`,
        );
      }
      return n;
    }
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) {
      throw this.#badType(key, "size");
    }
    return v;
  }

  /** A nested object member, read with the same rules. */
  object(key: string): QapiInput | undefined {
    const v = this.#get(key, false);
    if (v === undefined) return undefined;
    if (typeof v !== "object" || v === null || Array.isArray(v)) throw this.#badType(key, "object");
    return new QapiInput(v as OptionObject, this.#keyval, `${this.#name(key)}.`);
  }

  /** A member that is either a string (a reference) or a nested object. */
  refOrObject(key: string): string | QapiInput | undefined {
    if (this.has(key) && typeof this.#obj[key] === "string") return this.str(key);
    return this.object(key);
  }

  /** The member's raw value (not type-checked), marked as taken. */
  raw(key: string): unknown {
    return this.#get(key, false);
  }

  /** The whole object, every member marked taken (handed on to another reader). */
  rest(): OptionObject {
    for (const k of Object.keys(this.#obj)) this.#taken.add(k);
    return this.#obj as OptionObject;
  }

  /** Refuses every member not taken. */
  end(): void {
    for (const k of Object.keys(this.#obj)) {
      if (!this.#taken.has(k) && this.#obj[k] !== undefined) {
        throw new DaemonError(`Parameter '${this.#name(k)}' is unexpected`);
      }
    }
  }
}
