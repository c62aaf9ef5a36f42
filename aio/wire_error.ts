import { SysError } from "../sys/mod.ts";

/**
 * An error as it crosses an {@link IOThread} channel (JSON): its class name,
 * message, stack and own JSON-safe fields (`kind`, `errno`, `call`, ...).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { WireError } from "./wire_error.ts";
 * const w: WireError = { name: "Error", message: "boom", fields: {} };
 * assert.equal(w.name, "Error");
 * ```
 */
export interface WireError {
  name: string;
  message: string;
  stack?: string;
  fields: Record<string, string | number | boolean | null>;
}

/** A class whose instances {@link decodeError} may rebuild. */
export type ErrorClass = abstract new (...args: never[]) => Error;

const classes = new Map<string, ErrorClass>();

/**
 * Lets errors named `name` arrive from an IOThread as instances of `cls`
 * (instanceof holds, fields restored). Each layer registers its error
 * classes once, at import of the module that defines them or of its mod.ts.
 * The constructor is not run: the prototype is `cls.prototype` and the own
 * fields are copied from the wire.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeError, encodeError, registerErrorClass } from "./wire_error.ts";
 * class MyError extends Error { kind = "Bad"; override name = "MyError"; }
 * registerErrorClass("MyError", MyError);
 * const e = decodeError(encodeError(new MyError("x")));
 * assert(e instanceof MyError);
 * assert.equal(e.kind, "Bad");
 * ```
 */
export function registerErrorClass(name: string, cls: ErrorClass): void {
  classes.set(name, cls);
}

registerErrorClass("SysError", SysError);

/**
 * Encodes a thrown value for the channel. Fields that are not strings,
 * finite numbers, booleans or null are left out.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeError } from "./wire_error.ts";
 * assert.equal(encodeError("oops").message, "oops");
 * ```
 */
export function encodeError(e: unknown): WireError {
  if (!(e instanceof Error)) return { name: "Error", message: String(e), fields: {} };
  const fields: WireError["fields"] = {};
  for (const [k, v] of Object.entries(e)) {
    if (k === "name" || k === "message" || k === "stack") continue;
    if (
      typeof v === "string" || typeof v === "boolean" || v === null ||
      (typeof v === "number" && Number.isFinite(v))
    ) fields[k] = v;
  }
  return { name: e.name, message: e.message, stack: e.stack, fields };
}

/**
 * Rebuilds an error from the channel: an instance of the registered class of
 * its name, or a plain Error whose message starts with the name (`Foo: ...`)
 * when the class is unknown here. The stack is the thread's.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeError } from "./wire_error.ts";
 * const e = decodeError({ name: "Odd", message: "x", fields: {} });
 * assert.equal(e.message, "Odd: x");
 * ```
 */
export function decodeError(w: WireError): Error {
  const cls = classes.get(w.name);
  let e: Error;
  if (cls) {
    e = Object.create(cls.prototype) as Error;
    for (const [k, v] of Object.entries(w.fields)) {
      Object.defineProperty(e, k, {
        value: v,
        writable: true,
        enumerable: true,
        configurable: true,
      });
    }
    Object.defineProperty(e, "message", { value: w.message, writable: true, configurable: true });
    if (e.name !== w.name) {
      Object.defineProperty(e, "name", { value: w.name, writable: true, configurable: true });
    }
  } else if (w.name === "Error") {
    e = new Error(w.message);
  } else {
    e = new Error(`${w.name}: ${w.message}`);
  }
  if (w.stack !== undefined) {
    Object.defineProperty(e, "stack", { value: w.stack, writable: true, configurable: true });
  }
  return e;
}
