import assert from "node:assert/strict";
import {
  accept4,
  bindUnix,
  close,
  connectUnix,
  eventfd,
  eventfdRead,
  eventfdWrite,
  isOpen,
  listen,
  recvMsg,
  sendMsg,
  SHUT_WR,
  shutdown,
  SOCK_NONBLOCK,
  socketpair,
  socketUnix,
  SysError,
  WOULD_BLOCK,
} from "../../sys/mod.ts";

Deno.test("socketpair: bytes and SCM_RIGHTS fds arrive together; received fds work", () => {
  const [a, b] = socketpair();
  const efd = eventfd();
  const payload = new Uint8Array([1, 2, 3, 4, 5]);
  assert.equal(sendMsg(a, payload, [efd, efd]), 5);
  const buf = new Uint8Array(16);
  const r = recvMsg(b, buf, 4);
  assert.equal(r.n, 5);
  assert.deepEqual([...buf.subarray(0, 5)], [1, 2, 3, 4, 5]);
  assert.equal(r.fds.length, 2);
  assert.ok(!r.ctrunc);
  assert.notEqual(r.fds[0], efd);
  eventfdWrite(r.fds[0], 3); // a new descriptor for the same eventfd
  assert.equal(eventfdRead(efd), 3);
  for (const fd of [...r.fds, efd, a, b]) close(fd);
});

Deno.test("recvMsg: subarray buffers land at their offset; short reads leave the rest queued", () => {
  const [a, b] = socketpair();
  sendMsg(a, new Uint8Array([9, 8, 7, 6]));
  const buf = new Uint8Array(8);
  const r1 = recvMsg(b, buf.subarray(2), 0, 2);
  assert.equal(r1.n, 2);
  assert.deepEqual([...buf], [0, 0, 9, 8, 0, 0, 0, 0]);
  const r2 = recvMsg(b, buf.subarray(4), 0);
  assert.equal(r2.n, 2);
  assert.deepEqual([...buf], [0, 0, 9, 8, 7, 6, 0, 0]);
  close(a);
  close(b);
});

Deno.test("recvMsg: too many fds sets ctrunc and the kernel drops the excess", () => {
  const [a, b] = socketpair();
  const efd = eventfd();
  sendMsg(a, new Uint8Array([1]), [efd, efd, efd, efd]);
  // room for 1 fd is rounded up to 8 bytes of control data: 2 fit
  const r = recvMsg(b, new Uint8Array(4), 1);
  assert.equal(r.n, 1);
  assert.ok(r.ctrunc);
  assert.ok(r.fds.length <= 2);
  for (const fd of [...r.fds, efd, a, b]) close(fd);
});

Deno.test("non-blocking: WOULD_BLOCK on empty recv and on a full send buffer; EOF reads 0", () => {
  const [a, b] = socketpair(SOCK_NONBLOCK);
  assert.equal(recvMsg(b, new Uint8Array(4), 0).n, WOULD_BLOCK);
  const big = new Uint8Array(1 << 20);
  let n = 0;
  for (;;) {
    const s = sendMsg(a, big);
    if (s === WOULD_BLOCK) break;
    n += s;
  }
  assert.ok(n > 0);
  shutdown(a, SHUT_WR);
  let got = 0;
  for (;;) {
    const r = recvMsg(b, big, 0);
    if (r.n === 0) break;
    assert.notEqual(r.n, WOULD_BLOCK);
    got += r.n;
  }
  assert.equal(got, n);
  close(a);
  close(b);
});

Deno.test("listen/accept4/connect over a path; received fds are close-on-exec sockets", () => {
  const dir = Deno.makeTempDirSync();
  const path = `${dir}/s`;
  const l = socketUnix(SOCK_NONBLOCK);
  bindUnix(l, path);
  listen(l);
  assert.equal(accept4(l), WOULD_BLOCK);
  const c = socketUnix();
  connectUnix(c, path);
  const s = accept4(l, SOCK_NONBLOCK);
  assert.ok(s >= 0);
  sendMsg(c, new Uint8Array([42]));
  const r = recvMsg(s, new Uint8Array(1), 0);
  assert.equal(r.n, 1);
  for (const fd of [c, s, l]) close(fd);
  assert.ok(!isOpen(s));
  // nobody listening any more: ECONNREFUSED
  const c2 = socketUnix();
  assert.throws(
    () => connectUnix(c2, path),
    (e) => e instanceof SysError && e.code === "ECONNREFUSED",
  );
  close(c2);
  Deno.removeSync(dir, { recursive: true });
});

Deno.test("a socket path over 107 bytes is a clear ENAMETOOLONG error", () => {
  const fd = socketUnix();
  const long = "/tmp/" + "x".repeat(103); // 108 bytes
  assert.throws(
    () => bindUnix(fd, long),
    (e) => e instanceof SysError && e.code === "ENAMETOOLONG" && e.message.includes("108 bytes"),
  );
  assert.throws(
    () => connectUnix(fd, long),
    (e) => e instanceof SysError && e.code === "ENAMETOOLONG",
  );
  close(fd);
});
