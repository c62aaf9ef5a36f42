import assert from "node:assert/strict";
import { QemuStorageDaemon } from "./qsd.ts";
import { makeScratchDir } from "./scratch_dir.ts";

Deno.test("qsd: serves a file export and stops cleanly (twice)", async () => {
  const dir = await makeScratchDir("qsd");
  try {
    const image = `${dir}/d.img`;
    await Deno.writeFile(image, new Uint8Array(1 << 20));
    const qsd = await QemuStorageDaemon.start({
      socket: `${dir}/s.sock`,
      blockdev: { driver: "file", filename: image, aio: "io_uring" },
      iothread: true,
      numQueues: 2,
    });
    assert.ok((await Deno.lstat(`${dir}/s.sock`)).isSocket);
    assert.equal(qsd.exited, false);
    const status = await qsd.stop();
    assert.equal(status.code, 0, qsd.stderr);
    await qsd.stop();
    await assert.rejects(Deno.lstat(`${dir}/s.sock`), Deno.errors.NotFound);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("qsd: a missing image fails start with qsd's own error", async () => {
  const dir = await makeScratchDir("qsd");
  try {
    await assert.rejects(
      QemuStorageDaemon.start({
        socket: `${dir}/s.sock`,
        blockdev: { driver: "file", filename: `${dir}/missing.img` },
      }),
      /did not create .*s\.sock: .*missing\.img/s,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("qsd: aio=native without O_DIRECT is refused before spawning", async () => {
  await assert.rejects(
    () =>
      QemuStorageDaemon.start({
        socket: "/nonexistent/s.sock",
        blockdev: { driver: "file", filename: "/x", aio: "native", cacheDirect: false },
      }),
    RangeError,
  );
});

Deno.test("qsd: a missing binary fails start with the install hint", async () => {
  await assert.rejects(
    () =>
      QemuStorageDaemon.start({
        socket: "/nonexistent/s.sock",
        blockdev: { driver: "null-co", size: 1 << 20 },
        binary: "/nonexistent/qemu-storage-daemon",
      }),
    /qemu-storage-daemon is missing: install QEMU/,
  );
});
