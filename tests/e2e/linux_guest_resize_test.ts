/**
 * Live resize end to end (issue 15, 4): a Debian Linux kernel in QEMU (TCG)
 * uses a vhost-user-blk disk exported by the daemon; once the guest has
 * reported the disk's size, QMP `block_resize` doubles the image and the
 * guest sees the new size in /sys/block/vda/size without a reboot: the
 * daemon sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the back-end request
 * channel QEMU set up (SET_BACKEND_REQ_FD, REPLY_ACK), QEMU re-reads the
 * config and raises the config interrupt. Then it shrinks it back.
 */

import assert from "node:assert/strict";
import { StorageDaemon } from "../../dataplane/daemon/storage_daemon.ts";
import { buildInitramfs } from "../harness/initramfs.ts";
import { parseMarkers, runGuest } from "../harness/qemu_guest.ts";
import { makeScratchDir } from "../harness/scratch_dir.ts";
import { QmpTestClient } from "../dataplane/daemon/qmp_test_client.ts";

const MiB = 1 << 20;

/** Prints the size, then each new one, until it has seen `changes` changes (or 90 s). */
const SCRIPT = `
last=$(cat /sys/block/vda/size)
echo "E2E-INFO size0=$last"
n=0
i=0
while [ $n -lt 2 ] && [ $i -lt 900 ]; do
  s=$(cat /sys/block/vda/size)
  if [ "$s" != "$last" ]; then
    n=$((n+1))
    echo "E2E-INFO size$n=$s"
    last=$s
  fi
  usleep 100000
  i=$((i+1))
done
echo "E2E-OK done"
`;

Deno.test("linux guest: block_resize over QMP reaches /sys/block/vda/size live", async () => {
  const dir = await makeScratchDir("e2e-resize");
  const image = `${dir}/disk.img`;
  Deno.writeFileSync(image, new Uint8Array(0));
  Deno.truncateSync(image, 32 * MiB);
  const logs: string[] = [];
  const d = new StorageDaemon((l) => logs.push(l));
  let qmp: QmpTestClient | null = null;
  try {
    d.chardevAdd({ id: "m0", path: `${dir}/qmp.sock`, wait: false });
    await d.monitorAdd("m0", false);
    d.blockdevAdd({ driver: "file", "node-name": "f0", filename: image }, false);
    await d.exportAdd({
      id: "e0",
      nodeName: "f0",
      addr: { type: "unix", path: `${dir}/vhost.sock` },
      writable: true,
      writethrough: false,
      numQueues: 1,
      logicalBlockSize: 512,
    });
    qmp = await QmpTestClient.connect(`${dir}/qmp.sock`);
    const client = qmp;
    const initrd = await buildInitramfs({ script: SCRIPT });
    const replies: unknown[] = [];
    let seen = "";
    let step = 0;
    const guest = await runGuest({
      initrd,
      disks: [{ socket: `${dir}/vhost.sock` }],
      timeoutMs: 180_000,
      onOutput: (text) => {
        seen += text;
        // Resize once the guest has the old size, shrink once it has the new one.
        if (step === 0 && seen.includes("size0=")) {
          step = 1;
          void client.execute("block_resize", { "node-name": "f0", size: 64 * MiB })
            .then((r) => replies.push(r));
        } else if (step === 1 && seen.includes("size1=")) {
          step = 2;
          void client.execute("block_resize", { "node-name": "f0", size: 48 * MiB })
            .then((r) => replies.push(r));
        }
      },
    });
    const m = parseMarkers(guest.output);
    const why = `\n--- guest ---\n${guest.output}\n--- daemon ---\n${logs.join("\n")}`;
    assert.equal(m.info.get("size0"), String(32 * MiB / 512), why);
    assert.equal(m.info.get("size1"), String(64 * MiB / 512), why);
    assert.equal(m.info.get("size2"), String(48 * MiB / 512), why);
    assert.deepEqual(replies, [{ return: {} }, { return: {} }]);
    assert(logs.some((l) => /config change to the front-end: acked/.test(l)), why);
  } finally {
    qmp?.close();
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
