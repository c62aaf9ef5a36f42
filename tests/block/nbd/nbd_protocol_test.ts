import assert from "node:assert/strict";
import {
  encodeNbdOptionHeader,
  encodeNbdOptionReplyHeader,
  encodeNbdRequest,
  encodeNbdSimpleReply,
  encodeNbdStructuredReplyHeader,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_WRITE,
  NBD_OPT_GO,
  NBD_REP_ERR_UNSUP,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_ERROR,
} from "../../../block/mod.ts";

const hex = (b: Uint8Array) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

Deno.test("NBD headers are laid out big-endian as the protocol document gives them", () => {
  const req = new Uint8Array(28);
  encodeNbdRequest(req, 0, {
    flags: NBD_CMD_FLAG_FUA,
    type: NBD_CMD_WRITE,
    cookie: 0x0102030405060708n,
    offset: 0x1000n,
    length: 512,
  });
  assert.equal(
    hex(req),
    "25609513" + "0001" + "0001" + "0102030405060708" + "0000000000001000" + "00000200",
  );

  const simple = new Uint8Array(16);
  encodeNbdSimpleReply(simple, 0, { error: 5, cookie: 1n });
  assert.equal(hex(simple), "67446698" + "00000005" + "0000000000000001");

  const chunk = new Uint8Array(20);
  encodeNbdStructuredReplyHeader(chunk, 0, {
    flags: NBD_REPLY_FLAG_DONE,
    type: NBD_REPLY_TYPE_ERROR,
    cookie: 2n,
    length: 6,
  });
  assert.equal(hex(chunk), "668e33ef" + "0001" + "8001" + "0000000000000002" + "00000006");

  const opt = new Uint8Array(16);
  encodeNbdOptionHeader(opt, 0, { option: NBD_OPT_GO, length: 4 });
  assert.equal(hex(opt), "49484156454f5054" + "00000007" + "00000004");

  const rep = new Uint8Array(20);
  encodeNbdOptionReplyHeader(rep, 0, { option: NBD_OPT_GO, type: NBD_REP_ERR_UNSUP, length: 0 });
  assert.equal(hex(rep), "0003e889045565a9" + "00000007" + "80000001" + "00000000");
});

Deno.test("NBD header codecs refuse a buffer too short for the header", () => {
  assert.throws(() =>
    encodeNbdRequest(new Uint8Array(27), 0, {
      flags: 0,
      type: 0,
      cookie: 0n,
      offset: 0n,
      length: 0,
    }), RangeError);
});
