import assert from "node:assert/strict";
import {
  close,
  Epoll,
  EPOLLHUP,
  EPOLLIN,
  EPOLLOUT,
  eventfd,
  eventfdRead,
  eventfdWrite,
  pipe,
  SysError,
} from "../../sys/mod.ts";

Deno.test("epoll: add/modify/delete, wait reports fd and events", () => {
  const ep = new Epoll(4);
  const a = eventfd(), b = eventfd();
  ep.add(a, EPOLLIN);
  ep.add(b, EPOLLIN);
  assert.equal(ep.wait(0), 0);
  eventfdWrite(b);
  assert.equal(ep.wait(0), 1);
  assert.equal(ep.ready.fd(0), b);
  assert.equal(ep.ready.events(0), EPOLLIN);
  eventfdRead(b);
  ep.modify(a, EPOLLIN | EPOLLOUT);
  assert.equal(ep.wait(0), 1);
  assert.equal(ep.ready.fd(0), a);
  assert.equal(ep.ready.events(0), EPOLLOUT);
  ep.delete(a);
  assert.equal(ep.wait(0), 0);
  assert.throws(() => ep.add(b, EPOLLIN), (e) => e instanceof SysError && e.code === "EEXIST");
  assert.throws(() => ep.delete(a), (e) => e instanceof SysError && e.code === "ENOENT");
  ep.close();
  close(a);
  close(b);
});

Deno.test("epoll: timeout is honoured; hang-up is reported", () => {
  const ep = new Epoll();
  const [r, w] = pipe();
  ep.add(r, EPOLLIN);
  const t0 = performance.now();
  assert.equal(ep.wait(20), 0);
  assert.ok(performance.now() - t0 >= 19);
  close(w);
  assert.equal(ep.wait(0), 1);
  assert.ok(ep.ready.events(0) & EPOLLHUP);
  ep.close();
  close(r);
});

Deno.test("epoll: waitAsync lets the event loop run and fills the buffer", async () => {
  const ep = new Epoll();
  const fd = eventfd();
  ep.add(fd, EPOLLIN);
  let ticked = false;
  setTimeout(() => {
    ticked = true;
    eventfdWrite(fd);
  }, 10);
  const n = await ep.waitAsync(5000);
  assert.ok(ticked);
  assert.equal(n, 1);
  assert.equal(ep.ready.fd(0), fd);
  ep.close();
  close(fd);
});

Deno.test("epoll: one impossible error is a spurious wake-up, a second in a row throws", () => {
  const ep = new Epoll();
  close(ep.fd); // from now on epoll_wait fails with EBADF, which a live fd never does
  assert.equal(ep.wait(0), 0);
  assert.equal(ep.strayErrors, 1);
  assert.throws(() => ep.wait(0), (e: unknown) => e instanceof SysError && e.code === "EBADF");
  assert.equal(ep.strayErrors, 2);
});
