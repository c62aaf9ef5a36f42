/**
 * ext4 on a qcow2 disk served by our host, written by a Linux guest (TCG)
 * over two queues on two IOThreads (one owner of the metadata, one
 * forwarding its allocating writes).
 *
 * The guest's initramfs has busybox, whose mke2fs makes ext2 only, so the
 * file system is made on the host: `mke2fs -t ext4` into a raw image, then
 * `qemu-img convert -O qcow2` (only the clusters mke2fs wrote are
 * allocated; everything the guest writes later allocates). The guest loads
 * the kernel's ext4 module, mounts the disk (with online discard), copies
 * files of known content from its initramfs, writes and deletes a scratch
 * file (discards), runs fstrim, unmounts, mounts again and compares
 * checksums. Then, on the host: `qemu-img check` is clean without leaks,
 * `e2fsck -fn` of the image converted to raw finds nothing, and `debugfs`
 * reads every file back byte for byte.
 */

import assert from "node:assert/strict";
import { formatStats, VhostUserBlkHost } from "../../dataplane/host.ts";
import { parseHostArgs } from "../../dataplane/host_options.ts";
import { buildInitramfs, VIRTIO_BLK_MODULES } from "../harness/initramfs.ts";
import { parseMarkers, runGuest } from "../harness/qemu_guest.ts";
import { makeScratchDir } from "../harness/scratch_dir.ts";
import { assertCheckClean, qemuImg, run } from "../block/qcow2/qemu_tools.ts";

const SIZES = [1000, 4096, 37 * 1024 + 5, 300 * 1024, 1 << 20, 2560 * 1024];

function fileData(i: number, len: number): Uint8Array {
  const out = new Uint8Array(len);
  let x = (i + 1) * 0x9e3779b1 >>> 0;
  for (let j = 0; j < len; j++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[j] = x & 0xff;
  }
  return out;
}

const GUEST_SCRIPT = `
mkdir -p /mnt
mount -t ext4 -o discard /dev/vda /mnt || { echo "E2E-FAIL mount"; exit 1; }
echo "E2E-OK mount"
mkdir /mnt/dir
for f in /data/*; do cp "$f" /mnt/dir/ || echo "E2E-FAIL copy $f"; done
dd if=/dev/urandom of=/mnt/scratch bs=65536 count=48 2>/dev/null || echo "E2E-FAIL scratch"
sync
rm /mnt/scratch
sync
if fstrim /mnt; then echo "E2E-OK fstrim"; else echo "E2E-FAIL fstrim"; fi
(cd /data && md5sum * > /tmp/want)
umount /mnt || echo "E2E-FAIL umount"
mount -t ext4 /dev/vda /mnt || { echo "E2E-FAIL remount"; exit 1; }
(cd /mnt/dir && md5sum * > /tmp/got)
if cmp /tmp/want /tmp/got; then echo "E2E-OK verify"; else echo "E2E-FAIL verify"; cat /tmp/got; fi
umount /mnt && echo "E2E-OK umount"
`;

Deno.test("linux guest: ext4 on a qcow2 served over two IOThreads, fsck clean", async () => {
  const dir = await makeScratchDir("e2e-ext4-qcow2");
  const raw = `${dir}/fs.raw`, image = `${dir}/disk.qcow2`, socket = `${dir}/vhost.sock`;
  const size = 64 << 20;
  const f = await Deno.open(raw, { create: true, write: true });
  await f.truncate(size);
  f.close();
  run("mke2fs", ["-q", "-F", "-t", "ext4", "-E", "nodiscard", raw]);
  qemuImg("convert", "-f", "raw", "-O", "qcow2", raw, image);
  Deno.removeSync(raw);
  const files = SIZES.map((len, i) => ({ path: `/data/f${i}`, data: fileData(i, len) }));
  const initrd = await buildInitramfs({
    script: GUEST_SCRIPT,
    files,
    modules: [...VIRTIO_BLK_MODULES, "crc32c_generic", "ext4"],
  });
  const logs: string[] = [];
  const host = await VhostUserBlkHost.start(
    parseHostArgs([
      "--image",
      image,
      "--format",
      "qcow2",
      "--socket",
      socket,
      "--cache",
      "none",
      "--aio",
      "io_uring",
      "--queues",
      "2",
      "--iothreads",
      "2",
    ]),
    (line) => logs.push(line),
  );
  let stopped = false;
  try {
    const guest = await runGuest({
      initrd,
      disks: [{ socket, numQueues: 2 }],
      smp: 2,
      timeoutMs: 120_000,
    });
    const stats = await host.stop();
    stopped = true;
    console.log(`ext4 guest on qcow2: boot ${guest.bootMs.toFixed(0)} ms\n${formatStats(stats)}`);
    const m = parseMarkers(guest.output);
    const context = `\n--- guest console ---\n${guest.output}\n--- host log ---\n${
      logs.join("\n")
    }`;
    assert.deepEqual(m.fail, [], `guest failures${context}`);
    assert.deepEqual(m.ok, ["mount", "fstrim", "verify", "umount"], `guest markers${context}`);
    assert.equal(m.exit, 0, `guest exit${context}`);
    const queues = stats.threads.flatMap((t) => t.queues);
    assert.equal(queues.reduce((n, q) => n + q.errors, 0), 0, "no request failed");
    assert(queues.every((q) => q.writes > 0), "both queues wrote");
    assert.equal(assertCheckClean(image).leaks, 0);
    const out = `${dir}/out.raw`;
    qemuImg("convert", "-f", "qcow2", "-O", "raw", image, out);
    run("e2fsck", ["-f", "-n", out]); // exit 0: clean
    for (let i = 0; i < files.length; i++) {
      const got = new Deno.Command("debugfs", {
        args: ["-R", `cat /dir/f${i}`, out],
        stdout: "piped",
        stderr: "null",
      }).outputSync().stdout;
      assert.deepEqual(got, files[i].data, `/dir/f${i} as debugfs reads it`);
    }
  } finally {
    if (!stopped) await host.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
