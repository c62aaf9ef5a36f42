import assert from "node:assert/strict";
import {
  close,
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  EFD_SEMAPHORE,
  eventfd,
  eventfdRead,
  eventfdWrite,
  SysError,
} from "../../sys/mod.ts";

Deno.test("eventfd: counter adds up, read resets, EAGAIN reads as 0", () => {
  const fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  assert.equal(eventfdRead(fd), 0);
  eventfdWrite(fd);
  eventfdWrite(fd, 41);
  assert.equal(eventfdRead(fd), 42);
  assert.equal(eventfdRead(fd), 0);
  eventfdWrite(fd, 2 ** 40); // above 32 bits
  assert.equal(eventfdRead(fd), 2 ** 40);
  close(fd);
});

Deno.test("eventfd: semaphore mode and errors", () => {
  const fd = eventfd(3, EFD_NONBLOCK | EFD_SEMAPHORE);
  assert.equal(eventfdRead(fd), 1);
  assert.equal(eventfdRead(fd), 1);
  close(fd);
  assert.throws(() => eventfdRead(fd), (e) => e instanceof SysError && e.code === "EBADF");
  assert.throws(() => eventfdWrite(-1), (e) => e instanceof SysError && e.call === "write");
});
