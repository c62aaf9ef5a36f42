import assert from "node:assert/strict";
import {
  addressOf,
  blkGetSize64,
  blkSszGet,
  close,
  copyMemory,
  ENOTTY,
  EXT4_SUPER_MAGIC,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  fallocate,
  fdatasync,
  fillMemory,
  fsFilesystemType,
  fstat,
  mmapAnonymous,
  O_CREAT,
  O_DIRECT,
  O_RDONLY,
  O_RDWR,
  open,
  pread,
  preadAt,
  preadv,
  preadvAt,
  pwrite,
  pwriteAt,
  pwritev,
  pwritevAt,
  statx,
  STATX_DIOALIGN,
  SysError,
  TMPFS_MAGIC,
  unlink,
} from "../../sys/mod.ts";
import { IoVector } from "../../block/mod.ts";
import { directDir } from "../block/helpers.ts";

function tempPath(): string {
  return `${directDir()}/sys-file-${crypto.randomUUID()}`;
}

Deno.test("open/pwrite/pread/fstat/fdatasync/unlink round trip", () => {
  const p = tempPath();
  const fd = open(p, O_RDWR | O_CREAT, 0o600);
  const data = new Uint8Array([1, 2, 3, 4, 5]);
  assert.equal(pwrite(fd, data, 100), 5);
  fdatasync(fd);
  const st = fstat(fd);
  assert.equal(st.size, 105);
  assert.ok(st.isRegularFile && !st.isBlockDevice);
  const out = new Uint8Array(5);
  assert.equal(pread(fd, out, 100), 5);
  assert.deepEqual(out, data);
  assert.equal(pread(fd, out, 1000), 0);
  close(fd);
  unlink(p);
  assert.throws(() => open(p, O_RDONLY), (e) => e instanceof SysError && e.code === "ENOENT");
});

Deno.test("raw-address and vectored forms", () => {
  const p = tempPath();
  const fd = open(p, O_RDWR | O_CREAT);
  const a = new Uint8Array([9, 8, 7]);
  assert.equal(pwriteAt(fd, addressOf(a), 3, 0), 3);
  const q = IoVector.fromBuffers([new Uint8Array([1, 1]), new Uint8Array([2, 2, 2])]);
  assert.equal(pwritev(fd, q.iov, q.niov, 3), 5);
  assert.equal(pwritevAt(fd, q.iovAddr, q.niov, 8), 5);
  const all = new Uint8Array(13);
  assert.equal(preadAt(fd, addressOf(all), 13, 0), 13);
  assert.deepEqual([...all], [9, 8, 7, 1, 1, 2, 2, 2, 1, 1, 2, 2, 2]);
  const x = new Uint8Array(1), y = new Uint8Array(2);
  const r = IoVector.fromBuffers([x, y]);
  assert.equal(preadv(fd, r.iov, r.niov, 2), 3);
  assert.deepEqual([x[0], y[0], y[1]], [7, 1, 1]);
  assert.equal(preadvAt(fd, r.iovAddr, r.niov, 10), 3);
  assert.deepEqual([x[0], y[0], y[1]], [2, 2, 2]);
  close(fd);
  unlink(p);
});

Deno.test("fallocate: preallocate, punch a hole, zero a range", () => {
  const p = tempPath();
  const fd = open(p, O_RDWR | O_CREAT);
  fallocate(fd, 0, 0, 1 << 20);
  const st = fstat(fd);
  assert.equal(st.size, 1 << 20);
  assert.ok(st.blocks * 512 >= 1 << 20);
  pwrite(fd, new Uint8Array(65536).fill(0xaa), 0);
  fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 32768);
  fallocate(fd, FALLOC_FL_ZERO_RANGE, 32768, 16384);
  const out = new Uint8Array(65536);
  pread(fd, out, 0);
  assert.ok(out.subarray(0, 49152).every((b) => b === 0));
  assert.ok(out.subarray(49152).every((b) => b === 0xaa));
  assert.equal(fstat(fd).size, 1 << 20);
  close(fd);
  unlink(p);
});

Deno.test("statx reports the O_DIRECT alignment; O_DIRECT I/O honours it", () => {
  const p = tempPath();
  const fd = open(p, O_RDWR | O_CREAT | O_DIRECT);
  const m0 = mmapAnonymous(65536);
  assert.equal(pwriteAt(fd, m0.addr, 65536, 0), 65536); // written extents (not unwritten)
  m0.unmap();
  const st = statx(fd);
  assert.equal(st.size, 65536);
  if (st.mask & STATX_DIOALIGN) {
    assert.ok(st.dioOffsetAlign >= 512 && st.dioOffsetAlign <= 4096, `${st.dioOffsetAlign}`);
    assert.ok(st.dioMemAlign >= 1);
  }
  const m = mmapAnonymous(8192);
  assert.equal(preadAt(fd, m.addr, 4096, 4096), 4096);
  // an offset or buffer that is not aligned is refused by the kernel
  const einval = (e: unknown) => e instanceof SysError && e.code === "EINVAL";
  assert.throws(() => preadAt(fd, m.addr, 4096, 1), einval);
  assert.throws(() => preadAt(fd, m.addr + 1, 4096, 0), einval);
  m.unmap();
  close(fd);
  unlink(p);
});

Deno.test("block-device ioctls fail with ENOTTY on a regular file", () => {
  const p = tempPath();
  const fd = open(p, O_RDWR | O_CREAT);
  assert.throws(() => blkGetSize64(fd), (e) => e instanceof SysError && e.errno === ENOTTY);
  assert.throws(() => blkSszGet(fd), (e) => e instanceof SysError && e.errno === ENOTTY);
  close(fd);
  unlink(p);
});

Deno.test("fsFilesystemType tells tmpfs from the test directory's filesystem", () => {
  const t = fsFilesystemType(directDir());
  assert.notEqual(t, TMPFS_MAGIC);
  assert.equal(t, EXT4_SUPER_MAGIC); // this machine: ext4 root
  try {
    assert.equal(fsFilesystemType("/dev/shm"), TMPFS_MAGIC);
  } catch (e) {
    if (!(e instanceof SysError)) throw e; // no /dev/shm here
  }
});

Deno.test("copyMemory and fillMemory work on raw addresses", () => {
  const a = new Uint8Array([1, 2, 3, 4]), b = new Uint8Array(4);
  copyMemory(addressOf(b), addressOf(a), 4);
  assert.deepEqual(b, a);
  fillMemory(addressOf(b) + 1, 0xff, 2);
  assert.deepEqual([...b], [1, 255, 255, 4]);
  fillMemory(addressOf(b), 0, 0);
  assert.equal(b[0], 1);
});
