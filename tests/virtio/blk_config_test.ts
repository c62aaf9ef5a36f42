import assert from "node:assert/strict";
import {
  blkIdBytes,
  blkRequestLimits,
  encodeVirtioBlkConfig,
  featureBit,
  hasFeature,
  VIRTIO_BLK_CONFIG,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_GEOMETRY,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_SIZE_MAX,
  VIRTIO_BLK_F_TOPOLOGY,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
  virtioBlkFeatures,
  type VirtioBlkOptions,
} from "../../virtio/mod.ts";

const hasGcc = (() => {
  try {
    return new Deno.Command("gcc", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
})();

const FULL: VirtioBlkOptions = {
  capacity: 0x123456789ab,
  sizeMax: 0x10000,
  segMax: 254,
  geometry: { cylinders: 0x1234, heads: 16, sectors: 63 },
  blkSize: 4096,
  topology: { physicalBlockExp: 3, alignmentOffset: 1, minIoSize: 0x201, optIoSize: 0x30405 },
  writeback: true,
  numQueues: 4,
  discard: { maxSectors: 0x3fffff, maxSeg: 1, sectorAlignment: 8 },
  writeZeroes: { maxSectors: 0x1fffff, maxSeg: 3, mayUnmap: true },
};

// Fills struct virtio_blk_config with FULL's values and prints its bytes and
// every field offset, so both the layout and the encoding are checked against
// the kernel's header.
const C_SOURCE = `
#include <stdio.h>
#include <stddef.h>
#include <string.h>
#include <linux/virtio_blk.h>
#define OFF(f) printf("%s %zu\\n", #f, offsetof(struct virtio_blk_config, f))
int main(void) {
  struct virtio_blk_config c;
  memset(&c, 0, sizeof c);
  c.capacity = 0x123456789abULL; c.size_max = 0x10000; c.seg_max = 254;
  c.geometry.cylinders = 0x1234; c.geometry.heads = 16; c.geometry.sectors = 63;
  c.blk_size = 4096; c.physical_block_exp = 3; c.alignment_offset = 1;
  c.min_io_size = 0x201; c.opt_io_size = 0x30405; c.wce = 1; c.num_queues = 4;
  c.max_discard_sectors = 0x3fffff; c.max_discard_seg = 1; c.discard_sector_alignment = 8;
  c.max_write_zeroes_sectors = 0x1fffff; c.max_write_zeroes_seg = 3; c.write_zeroes_may_unmap = 1;
  printf("bytes ");
  for (size_t i = 0; i < offsetof(struct virtio_blk_config, max_secure_erase_sectors); i++)
    printf("%02x", ((unsigned char *)&c)[i]);
  printf("\\n");
  printf("size %zu\\n", offsetof(struct virtio_blk_config, max_secure_erase_sectors));
  OFF(capacity); OFF(size_max); OFF(seg_max);
  printf("geometry_cylinders %zu\\n", offsetof(struct virtio_blk_config, geometry.cylinders));
  printf("geometry_heads %zu\\n", offsetof(struct virtio_blk_config, geometry.heads));
  printf("geometry_sectors %zu\\n", offsetof(struct virtio_blk_config, geometry.sectors));
  OFF(blk_size); OFF(physical_block_exp); OFF(alignment_offset); OFF(min_io_size);
  OFF(opt_io_size); printf("writeback %zu\\n", offsetof(struct virtio_blk_config, wce));
  OFF(num_queues); OFF(max_discard_sectors); OFF(max_discard_seg); OFF(discard_sector_alignment);
  OFF(max_write_zeroes_sectors); OFF(max_write_zeroes_seg); OFF(write_zeroes_may_unmap);
  return 0;
}
`;

Deno.test({
  name: "virtio_blk_config layout and encoding match <linux/virtio_blk.h>",
  ignore: !hasGcc,
  fn() {
    const dir = Deno.makeTempDirSync({ prefix: "virtio_blk_cfg" });
    try {
      Deno.writeTextFileSync(`${dir}/cfg.c`, C_SOURCE);
      const cc = new Deno.Command("gcc", { args: ["-o", `${dir}/cfg`, `${dir}/cfg.c`] })
        .outputSync();
      assert.ok(cc.success, new TextDecoder().decode(cc.stderr));
      const out = new Deno.Command(`${dir}/cfg`).outputSync();
      assert.ok(out.success);
      const lines = new TextDecoder().decode(out.stdout).trim().split("\n");
      const fields: Record<string, string> = {};
      for (const l of lines) {
        const [k, v] = l.split(" ");
        fields[k] = v;
      }
      const offsets = Object.fromEntries(
        Object.entries(fields).filter(([k]) => k !== "bytes").map(([k, v]) => [k, Number(v)]),
      );
      assert.deepEqual(offsets, { ...VIRTIO_BLK_CONFIG });
      const ours = [...encodeVirtioBlkConfig(FULL)].map((b) => b.toString(16).padStart(2, "0"))
        .join("");
      assert.equal(ours, fields.bytes);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

Deno.test("features follow the options", () => {
  const base = virtioBlkFeatures({ capacity: 8 });
  for (const b of [VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX]) {
    assert.ok(hasFeature(base, b), `bit ${b}`);
  }
  assert.ok(hasFeature(base, VIRTIO_BLK_F_SEG_MAX) && hasFeature(base, VIRTIO_BLK_F_FLUSH));
  for (
    const b of [
      VIRTIO_BLK_F_RO,
      VIRTIO_BLK_F_SIZE_MAX,
      VIRTIO_BLK_F_GEOMETRY,
      VIRTIO_BLK_F_BLK_SIZE,
      VIRTIO_BLK_F_TOPOLOGY,
      VIRTIO_BLK_F_CONFIG_WCE,
      VIRTIO_BLK_F_MQ,
      VIRTIO_BLK_F_DISCARD,
      VIRTIO_BLK_F_WRITE_ZEROES,
    ]
  ) {
    assert.ok(!hasFeature(base, b), `bit ${b} not offered by default`);
    assert.ok(hasFeature(virtioBlkFeatures({ ...FULL, readOnly: true }), b), `bit ${b} offered`);
  }
  const bare = virtioBlkFeatures({
    capacity: 8,
    flush: false,
    ring: { eventIdx: false, indirectDesc: false },
  });
  assert.equal(bare, featureBit(VIRTIO_F_VERSION_1) | featureBit(VIRTIO_BLK_F_SEG_MAX));
});

Deno.test("config encoding: absent options are zero, out-of-range values are refused", () => {
  const b = encodeVirtioBlkConfig({ capacity: 2048 });
  const dv = new DataView(b.buffer);
  assert.equal(b.length, 60);
  assert.equal(dv.getBigUint64(0, true), 2048n);
  assert.equal(dv.getUint32(VIRTIO_BLK_CONFIG.seg_max, true), 126);
  assert.equal(dv.getUint16(VIRTIO_BLK_CONFIG.num_queues, true), 1);
  assert.ok(b.subarray(VIRTIO_BLK_CONFIG.max_discard_sectors).every((x) => x === 0));
  assert.throws(() => encodeVirtioBlkConfig({ capacity: -1 }), RangeError);
  assert.throws(() => encodeVirtioBlkConfig({ capacity: 8, numQueues: 65536 }), RangeError);
  assert.throws(
    () =>
      encodeVirtioBlkConfig({ capacity: 8, geometry: { cylinders: 1, heads: 256, sectors: 1 } }),
    RangeError,
  );
  assert.throws(() => blkRequestLimits({ capacity: 8, blkSize: 1000 }), RangeError);
  assert.throws(
    () =>
      blkRequestLimits({
        capacity: 8,
        discard: { maxSeg: 1e6, maxSectors: 1, sectorAlignment: 1 },
      }),
    RangeError,
  );
});

Deno.test("GET_ID bytes: NUL-terminated only when shorter than 20", () => {
  const short = blkIdBytes("serial-1");
  assert.equal(short.length, 20);
  assert.equal(new TextDecoder().decode(short.subarray(0, 8)), "serial-1");
  assert.ok(short.subarray(8).every((x) => x === 0));
  const exact = blkIdBytes("abcdefghijklmnopqrst");
  assert.equal(new TextDecoder().decode(exact), "abcdefghijklmnopqrst");
  const long = blkIdBytes("abcdefghijklmnopqrstuvwxyz");
  assert.equal(new TextDecoder().decode(long), "abcdefghijklmnopqrst");
});
