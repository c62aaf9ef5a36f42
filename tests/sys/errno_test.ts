import assert from "node:assert/strict";
import { close, EBADF, ECANCELED, errnoName, retOrErrno, SysError } from "../../sys/mod.ts";

Deno.test("errno: close(-1) throws SysError EBADF from close", () => {
  assert.throws(() => close(-1), (e: unknown) => {
    assert.ok(e instanceof SysError);
    assert.equal(e.errno, 9);
    assert.equal(e.errno, EBADF);
    assert.equal(e.code, "EBADF");
    assert.equal(e.call, "close");
    assert.match(e.message, /^close: EBADF \(errno 9\)/);
    return true;
  });
});

Deno.test("errno: names and retOrErrno", () => {
  assert.equal(errnoName(ECANCELED), "ECANCELED");
  assert.equal(errnoName(4242), "E4242");
  assert.equal(retOrErrno(5), 5);
});
