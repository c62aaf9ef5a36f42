/**
 * `deno task vm`: the test guest (tests/vm/guest) boots under KVM on a file
 * image and runs its workload (GET_ID, pattern, FLUSH, DISCARD, WRITE_ZEROES,
 * reads past the end, timed loops with interrupts and polling) with each I/O
 * engine; the host's exit status is the guest's verdict. Skipped, loudly,
 * where /dev/kvm is missing.
 */
import assert from "node:assert/strict";
import { makeScratchDir } from "../harness/mod.ts";
import { buildGuest, DEFAULT_GUEST_DIR } from "../../vm/mod.ts";

const MAIN = new URL("../../vm/main.ts", import.meta.url).pathname;

export const KVM_MISSING = (() => {
  try {
    Deno.statSync("/dev/kvm");
    return null;
  } catch (e) {
    const why = `/dev/kvm: ${(e as Error).message}`;
    console.warn(`SKIP: the KVM tests need /dev/kvm (${why})`);
    return why;
  }
})();

/** Runs `vm/main.ts` with `args`; returns the exit code and stderr. */
export async function runVm(args: string[]): Promise<{ code: number; log: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--no-check", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: out.code, log: new TextDecoder().decode(out.stderr) };
}

async function withImage(fn: (image: string) => Promise<void>): Promise<void> {
  const dir = await makeScratchDir("vm-cli");
  try {
    const image = `${dir}/disk.img`;
    const f = await Deno.open(image, { create: true, write: true });
    await f.truncate(8 << 20);
    f.close();
    await fn(image);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

// aio=native needs O_DIRECT (cache=none), as in QEMU; the scratch directory is not tmpfs.
for (const [aio, cache] of [["threads", "writeback"], ["native", "none"], ["io_uring", "none"]]) {
  Deno.test({
    name: `vm: the guest's workload passes on a file image with aio=${aio}, cache=${cache}`,
    ignore: KVM_MISSING !== null,
    async fn() {
      await withImage(async (image) => {
        const r = await runVm([
          ...["--image", image, "--aio", aio, "--cache", cache, "--quick", "--timeout", "90"],
        ]);
        assert.equal(r.code, 0, r.log);
        assert.match(r.log, /guest: PASS: 0 failure\(s\)/);
        assert.match(r.log, /guest: ok pattern read back/);
        assert.match(r.log, /guest: ok a read at the capacity fails/);
        assert.match(r.log, /guest: perf interrupt qd32: 3000 requests/);
        // The guest's interrupt handler reads and acknowledges the interrupt
        // status in the vCPU thread; the kicks never reach the main thread.
        assert.match(r.log, /vCPU exits: [1-9]\d* answered in the vCPU thread/);
        assert.match(r.log, /0 virtio-mmio guest errors/);
      });
    },
  });
}

Deno.test({
  name: "vm: --read-only: the guest sees VIRTIO_BLK_F_RO and its writes fail",
  ignore: KVM_MISSING !== null,
  async fn() {
    await withImage(async (image) => {
      const r = await runVm(["--image", image, "--read-only", "--quick", "--iothreads", "1"]);
      assert.equal(r.code, 0, r.log);
      assert.match(r.log, /guest: ok writes fail on a read-only disk/);
      assert.match(r.log, /guest: PASS/);
    });
  },
});

Deno.test({
  name: "vm: with QueueNotify trapped to the main thread (--notify trap) the workload passes too",
  ignore: KVM_MISSING !== null,
  async fn() {
    const r = await runVm(["--image", "null-co:8M", "--notify", "trap", "--quick"]);
    assert.equal(r.code, 0, r.log);
    assert.match(r.log, /guest: PASS/);
  },
});

Deno.test({
  name:
    "vm: with the IOThread raising the GSI by KVM_IRQ_LINE (--irq line) the workload passes too",
  ignore: KVM_MISSING !== null,
  async fn() {
    const r = await runVm(["--image", "null-co:8M", "--irq", "line", "--quick"]);
    assert.equal(r.code, 0, r.log);
    assert.match(r.log, /guest: ok interrupts arrived/);
    assert.match(r.log, /guest: PASS/);
  },
});

Deno.test("vm: usage errors exit 2 with a message", async () => {
  for (
    const [args, re] of [
      [["--socket", "/x", "--image", "null-co:1M"], /--socket is not an option/],
      [["--image", "null-co:1M", "--notify", "maybe"], /--notify must be/],
      [["--image", "null-co:1M", "--irq", "msi"], /--irq must be/],
      [["--image", "null-co:1M", "--ram", "1K"], /--ram must be/],
      [["--image", "null-co:1M", "--timeout"], /--timeout needs a value/],
    ] as const
  ) {
    const r = await runVm([...args]);
    assert.equal(r.code, 2, r.log);
    assert.match(r.log, re);
  }
});

Deno.test({
  name: "vm: a guest that is not a program fails the run with the reason (exit 1)",
  ignore: KVM_MISSING !== null,
  async fn() {
    const dir = await makeScratchDir("vm-bad");
    try {
      // ud2: an invalid opcode with no IDT -> the vCPU cannot go on.
      await Deno.writeFile(`${dir}/bad.bin`, new Uint8Array([0x0f, 0x0b]));
      const r = await runVm([
        "--image",
        "null-co:1M",
        "--guest",
        `${dir}/bad.bin`,
        "--timeout",
        "20",
      ]);
      assert.equal(r.code, 1, r.log);
      assert.match(r.log, /guest failed: |timeout/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "vm: a hostile guest (tests/vm/guest/hostile.c) meets ignored writes and NEEDS_RESET; the host survives",
  ignore: KVM_MISSING !== null,
  async fn() {
    await withImage(async (image) => {
      const guest = `${image}.guest`;
      await Deno.writeFile(
        guest,
        await buildGuest(DEFAULT_GUEST_DIR, ["runtime.c", "virtio_blk.c", "hostile.c"]),
      );
      const r = await runVm(["--image", image, "--guest", guest, "--timeout", "60"]);
      assert.equal(r.code, 0, r.log);
      for (
        const line of [
          "ok FEATURES_OK refused without VERSION_1",
          "ok DRIVER_OK without FEATURES_OK: NEEDS_RESET",
          "ok a descriptor table outside RAM: NEEDS_RESET",
          "ok notifies on absent or stopped queues are ignored",
          "ok reset with 32 requests in flight",
          "ok a descriptor loop: NEEDS_RESET",
          "ok a read after the reset",
          "PASS: 0 failure(s)",
        ]
      ) assert.ok(r.log.includes(`guest: ${line}`), `${line}\n${r.log}`);
      assert.match(r.log, /device needs reset: ring broken \(queue 0: descriptor chain: Loop/);
    });
  },
});

Deno.test({
  name: "vm: a guest that spins for ever is given up on at --timeout (exit 1, the counters logged)",
  ignore: KVM_MISSING !== null,
  async fn() {
    const dir = await makeScratchDir("vm-spin");
    try {
      await Deno.writeFile(`${dir}/spin.bin`, new Uint8Array([0xeb, 0xfe])); // jmp $
      const t0 = Date.now();
      const r = await runVm([
        "--image",
        "null-co:1M",
        "--guest",
        `${dir}/spin.bin`,
        "--timeout",
        "2",
      ]);
      assert.equal(r.code, 1, r.log);
      assert.match(r.log, /timeout: the guest did not finish in 2 s/);
      assert.match(r.log, /vCPU exits: /);
      assert.ok(Date.now() - t0 < 30_000);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
