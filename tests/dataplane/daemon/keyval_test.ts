// QEMU's keyval syntax: examples from util/keyval.c's rules, and properties
// fast-check checks over arbitrary input: formatting then parsing gives the
// object back, and any string either parses or throws KeyvalError (never
// anything else, never a prototype change).
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  formatKeyval,
  KeyvalError,
  type KeyvalObject,
  parseKeyval,
} from "../../../dataplane/daemon/keyval.ts";

Deno.test("keyval: pairs, escaped commas, dotted keys, implied key, last wins", () => {
  assert.deepEqual(parseKeyval(""), {});
  assert.deepEqual(parseKeyval("a=1,b=x=y"), { a: "1", b: "x=y" });
  assert.deepEqual(parseKeyval("filename=a,,b,,,c=d"), { filename: "a,b,", c: "d" });
  assert.deepEqual(parseKeyval("a.b.c=1,a.b.d=2,a.e=3"), { a: { b: { c: "1", d: "2" }, e: "3" } });
  assert.deepEqual(parseKeyval("socket,id=m", "backend"), { backend: "socket", id: "m" });
  assert.deepEqual(parseKeyval("a=1,a=2"), { a: "2" });
  assert.deepEqual(parseKeyval("a=,b=1,"), { a: "", b: "1" });
});

Deno.test("keyval: malformed strings get QEMU's messages", () => {
  assert.throws(() => parseKeyval("a"), { message: "Expected '=' after parameter 'a'" });
  assert.throws(() => parseKeyval("a=1,b"), { message: "Expected '=' after parameter 'b'" });
  assert.throws(() => parseKeyval("a..b=1"), { message: "Invalid parameter 'a..b'" });
  assert.throws(() => parseKeyval("a b=1"), { message: "Invalid parameter 'a b'" });
  assert.throws(() => parseKeyval("a=1,a.b=2"), { message: "Parameter 'a' used inconsistently" });
  assert.throws(() => parseKeyval("a.b=1,a=2"), { message: "Parameter 'a' used inconsistently" });
  assert.throws(() => parseKeyval(",a=1"), { message: "Invalid parameter ''" });
  // The implied key only for the first element.
  assert.throws(() => parseKeyval("x,socket", "backend"), KeyvalError);
});

Deno.test("keyval: __proto__ is an ordinary key", () => {
  const o = parseKeyval("__proto__.polluted=1");
  assert.equal(({} as Record<string, unknown>).polluted, undefined);
  assert.deepEqual(Object.keys(o), ["__proto__"]);
});

const fragment = fc.stringMatching(/^[A-Za-z0-9_-]{1,6}$/);
const value = fc.string({ maxLength: 12 });
const keyvalObject: fc.Arbitrary<KeyvalObject> = fc.letrec((tie) => ({
  obj: fc.dictionary(fragment, fc.oneof({ depthSize: "small" }, value, tie("nonEmpty")), {
    maxKeys: 4,
    noNullPrototype: true,
  }),
  nonEmpty: fc.dictionary(fragment, fc.oneof({ depthSize: "small" }, value, tie("nonEmpty")), {
    minKeys: 1,
    maxKeys: 3,
    noNullPrototype: true,
  }),
})).obj as fc.Arbitrary<KeyvalObject>;

Deno.test("keyval (fast-check): parse(format(o)) gives o back", () => {
  fc.assert(
    fc.property(keyvalObject, (o) => {
      assert.deepEqual(parseKeyval(formatKeyval(o)), o);
    }),
    { numRuns: 2000 },
  );
});

Deno.test("keyval (fast-check): any string parses or throws KeyvalError", () => {
  const alphabet = fc.constantFrom("a", "b", ".", ",", "=", "_", "-", " ", "1", "é");
  const text = fc.array(alphabet, { maxLength: 24 }).map((a) => a.join(""));
  fc.assert(
    fc.property(fc.oneof(text, fc.string({ maxLength: 40 })), fc.boolean(), (s, implied) => {
      try {
        const o = parseKeyval(s, implied ? "type" : undefined);
        // Whatever parsed formats back to the same object.
        assert.deepEqual(parseKeyval(formatKeyval(o)), o);
      } catch (e) {
        if (!(e instanceof KeyvalError)) throw e;
      }
    }),
    { numRuns: 5000 },
  );
});
