import assert from "node:assert/strict";
import {
  AddressError,
  AF_INET,
  AF_INET6,
  close,
  connectSockaddr,
  EINVAL,
  recvInto,
  resolveTcp,
  sendIov,
  setTcpNoDelay,
  SOCK_NONBLOCK,
  sockaddrInet,
  socketError,
  socketStream,
  SysError,
  WOULD_BLOCK,
} from "../../sys/mod.ts";
import { addressOf } from "../../sys/mod.ts";

Deno.test("sockaddrInet: IPv4 and IPv6 numeric forms, bad ones refused", () => {
  const a = sockaddrInet("10.1.2.3", 443);
  assert.deepEqual([...a.sockaddr.subarray(0, 8)], [2, 0, 1, 0xbb, 10, 1, 2, 3]);
  const b = sockaddrInet("::1", 80);
  assert.equal(b.family, AF_INET6);
  assert.equal(b.sockaddr[8 + 15], 1);
  assert.equal(b.sockaddr.subarray(8, 23).every((x) => x === 0), true);
  const c = sockaddrInet("[fe80::1:2]", 1);
  assert.equal(c.sockaddr[8], 0xfe);
  assert.equal(c.sockaddr[8 + 13], 1);
  assert.equal(c.sockaddr[8 + 15], 2);
  for (const bad of ["1.2.3.256", "1.2.3", "::1::", "1:2:3:4:5:6:7:8:9", "host", ""]) {
    assert.throws(() => sockaddrInet(bad, 1), (e) => e instanceof SysError && e.errno === EINVAL);
  }
  assert.throws(() => sockaddrInet("1.2.3.4", 70000), SysError);
});

Deno.test("resolveTcp: localhost resolves; an unknown name is an AddressError", () => {
  const addrs = resolveTcp("localhost", 10809);
  assert.ok(addrs.length > 0);
  assert.ok(addrs.every((a) => a.family === AF_INET || a.family === AF_INET6));
  assert.throws(() => resolveTcp("no-such-host.invalid", 1), AddressError);
});

Deno.test("TCP: non-blocking connect, TCP_NODELAY, gathered send, receive", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const fd = socketStream(AF_INET, SOCK_NONBLOCK);
  try {
    const accepted = listener.accept();
    const done = connectSockaddr(fd, sockaddrInet("127.0.0.1", port).sockaddr);
    const conn = await accepted;
    if (!done) {
      // Loopback connects at once or very soon: wait until SO_ERROR settles.
      for (let i = 0; i < 100 && socketError(fd) !== 0; i++) {
        await new Promise((r) => setTimeout(r, 1));
      }
    }
    assert.equal(socketError(fd), 0);
    setTcpNoDelay(fd);
    const a = new TextEncoder().encode("hello, "), b = new TextEncoder().encode("nbd");
    const iov = new BigUint64Array([
      BigInt(addressOf(a)),
      BigInt(a.length),
      BigInt(addressOf(b)),
      BigInt(b.length),
    ]);
    assert.equal(sendIov(fd, addressOf(iov), 2), 10);
    const got = new Uint8Array(10);
    let n = 0;
    while (n < 10) n += (await conn.read(got.subarray(n)))!;
    assert.equal(new TextDecoder().decode(got), "hello, nbd");
    const buf = new Uint8Array(16);
    assert.equal(recvInto(fd, buf, 0, 16), WOULD_BLOCK);
    await conn.write(new Uint8Array([7, 8]));
    let r = WOULD_BLOCK;
    for (let i = 0; i < 1000 && r === WOULD_BLOCK; i++) {
      r = recvInto(fd, buf, 4, 12);
      if (r === WOULD_BLOCK) await new Promise((res) => setTimeout(res, 1));
    }
    assert.equal(r, 2);
    assert.deepEqual([...buf.subarray(4, 6)], [7, 8]);
    conn.close();
    for (let i = 0; i < 1000; i++) {
      r = recvInto(fd, buf, 0, 16);
      if (r !== WOULD_BLOCK) break;
      await new Promise((res) => setTimeout(res, 1));
    }
    assert.equal(r, 0, "end of stream after the peer closed");
  } finally {
    close(fd);
    listener.close();
  }
});

Deno.test("TCP: connect to a closed port is ECONNREFUSED (blocking) or a SO_ERROR (non-blocking)", async () => {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  const fd = socketStream(AF_INET);
  assert.throws(
    () => connectSockaddr(fd, sockaddrInet("127.0.0.1", port).sockaddr),
    /ECONNREFUSED/,
  );
  close(fd);
  const nb = socketStream(AF_INET, SOCK_NONBLOCK);
  try {
    let err = 0;
    try {
      if (!connectSockaddr(nb, sockaddrInet("127.0.0.1", port).sockaddr)) {
        for (let i = 0; i < 100 && (err = socketError(nb)) === 0; i++) {
          await new Promise((r) => setTimeout(r, 1));
        }
      }
    } catch (e) {
      assert.ok(e instanceof SysError);
      err = e.errno;
    }
    assert.equal(err, 111);
  } finally {
    close(nb);
  }
});
