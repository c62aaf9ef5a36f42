/**
 * QEMU's keyval syntax (util/keyval.c), the `a=b,c.d=e` strings of
 * `--blockdev`, `--export`, `--object`, `--chardev` and `--monitor`:
 *
 * - `key=value` pairs separated by `,`; in a value `,,` stands for one `,`;
 * - dotted keys make nested objects (`cache.direct=on` -> `{cache: {direct: "on"}}`);
 * - the first element may omit its key when the option has an implied one
 *   (`--object iothread,id=io0`: `qom-type=iothread`);
 * - the same key twice: the last one wins (as QEMU);
 * - every value is a string: the option's schema (qapi_input.ts) converts.
 *
 * @module
 */

/** A parsed keyval string: strings, nested by dotted keys. */
export interface KeyvalObject {
  [key: string]: string | KeyvalObject;
}

/**
 * A keyval string that cannot be parsed. `message` is QEMU's wording
 * ("Invalid parameter 'a..b'", "Expected '=' after parameter 'x'",
 * "Parameter 'a' used inconsistently").
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { KeyvalError, parseKeyval } from "./keyval.ts";
 * assert.throws(() => parseKeyval("a"), (e) => e instanceof KeyvalError && e.kind === "syntax");
 * ```
 */
export class KeyvalError extends Error {
  readonly kind = "syntax";
  constructor(message: string) {
    super(message);
    this.name = "KeyvalError";
  }
}

/** A key fragment: a QAPI name (letters, digits, `-`, `_`), as keyval.c accepts. */
const FRAGMENT = /^[A-Za-z0-9_-]+$/;

/**
 * Parses a keyval string into nested objects of strings. `impliedKey` names
 * the key of a first element written without `key=` (QEMU's implied key).
 * Throws {@link KeyvalError}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseKeyval } from "./keyval.ts";
 * assert.deepEqual(parseKeyval("driver=file,filename=a,,b,cache.direct=on"), {
 *   driver: "file",
 *   filename: "a,b",
 *   cache: { direct: "on" },
 * });
 * assert.deepEqual(parseKeyval("iothread,id=io0", "qom-type"), { "qom-type": "iothread", id: "io0" });
 * ```
 */
export function parseKeyval(text: string, impliedKey?: string): KeyvalObject {
  const root: KeyvalObject = {};
  let i = 0;
  let first = true;
  while (i < text.length) {
    // The key runs to '=' (keys never contain ',' or '=').
    let end = i;
    while (end < text.length && text[end] !== "=" && text[end] !== ",") end++;
    let key: string;
    if (end >= text.length || text[end] === ",") {
      if (!(first && impliedKey !== undefined)) {
        const k = text.slice(i, end);
        if (k === "") throw new KeyvalError(`Invalid parameter ''`);
        throw new KeyvalError(`Expected '=' after parameter '${k}'`);
      }
      key = impliedKey; // the element is all value, the key is implied
    } else {
      key = text.slice(i, end);
      i = end + 1;
    }
    first = false;
    // The value runs to a single ',' ( ',,' is an escaped comma).
    let value = "";
    while (i < text.length) {
      const c = text[i];
      if (c === ",") {
        if (text[i + 1] === ",") {
          value += ",";
          i += 2;
          continue;
        }
        break;
      }
      value += c;
      i++;
    }
    i++; // skip the separating ','
    put(root, key, value);
  }
  return root;
}

function put(root: KeyvalObject, key: string, value: string): void {
  const parts = key.split(".");
  for (const p of parts) {
    if (!FRAGMENT.test(p)) throw new KeyvalError(`Invalid parameter '${key}'`);
  }
  let obj = root;
  for (let k = 0; k < parts.length - 1; k++) {
    const name = parts[k];
    const next = Object.hasOwn(obj, name) ? obj[name] : undefined;
    if (next === undefined) {
      const child: KeyvalObject = {};
      define(obj, name, child);
      obj = child;
    } else if (typeof next === "string") {
      throw new KeyvalError(`Parameter '${parts.slice(0, k + 1).join(".")}' used inconsistently`);
    } else {
      obj = next;
    }
  }
  const last = parts[parts.length - 1];
  if (Object.hasOwn(obj, last) && typeof obj[last] !== "string") {
    throw new KeyvalError(`Parameter '${key}' used inconsistently`);
  }
  define(obj, last, value);
}

/** Own data property even for `__proto__` (no setter runs). */
function define(obj: KeyvalObject, key: string, value: string | KeyvalObject): void {
  Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
}

/**
 * Writes a nested object of strings back as a keyval string (commas in values
 * doubled): `parseKeyval(formatKeyval(o))` deep-equals `o` for every object
 * whose keys are key fragments and that has no empty nested object.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatKeyval } from "./keyval.ts";
 * assert.equal(formatKeyval({ a: "x,y", b: { c: "1" } }), "a=x,,y,b.c=1");
 * ```
 */
export function formatKeyval(obj: KeyvalObject, prefix = ""): string {
  const out: string[] = [];
  for (const [k, v] of Object.entries(obj)) {
    if (typeof v === "string") out.push(`${prefix}${k}=${v.replaceAll(",", ",,")}`);
    else out.push(formatKeyval(v, `${prefix}${k}.`));
  }
  return out.filter((s) => s !== "").join(",");
}
