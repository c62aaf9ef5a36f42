/**
 * The qcow2 driver against QEMU: images made by qemu-img and written by
 * qemu-io read back through our driver exactly as `qemu-img convert -O raw`
 * reads them (versions 2 and 3, cluster sizes, zero clusters, discards,
 * extended L2 entries, compressed clusters, backing chains, cache=none).
 */
import { assertMatchesOracle, qemuImg, qemuIo, tempDir } from "./qemu_tools.ts";

/** Writes a mix of patterns, zeroes and discards at awkward offsets. */
function scribble(img: string): void {
  qemuIo(
    img,
    "qcow2",
    "write -P 0xab 0 64k",
    "write -P 0x11 70k 12k",
    "write -P 0x22 1020k 8k",
    "write -P 0x33 2m 1m",
    "write -z 2304k 128k",
    "discard 2560k 64k",
    "write -P 0x44 3m 512",
    "write -P 0x55 4095k 1k",
  );
}

const opts = { sanitizeResources: false, sanitizeOps: false };

Deno.test(
  "qcow2 oracle: v3, 64 KiB clusters, patterns, zero clusters, discards",
  opts,
  async () => {
    const d = tempDir();
    try {
      const img = `${d}/a.qcow2`;
      qemuImg("create", "-q", "-f", "qcow2", img, "4M");
      scribble(img);
      await assertMatchesOracle(img);
      await assertMatchesOracle(img, { cache: "none", aio: "io_uring" });
    } finally {
      Deno.removeSync(d, { recursive: true });
    }
  },
);

Deno.test("qcow2 oracle: v2 (compat=0.10) with 512-byte and 4 KiB clusters", opts, async () => {
  const d = tempDir();
  try {
    for (const cs of ["512", "4096"]) {
      const img = `${d}/v2-${cs}.qcow2`;
      qemuImg("create", "-q", "-f", "qcow2", "-o", `compat=0.10,cluster_size=${cs}`, img, "4M");
      scribble(img);
      await assertMatchesOracle(img, {}, [4096, 700, 12345, 65536]);
    }
  } finally {
    Deno.removeSync(d, { recursive: true });
  }
});

Deno.test("qcow2 oracle: 2 MiB clusters and a small L2 cache", opts, async () => {
  const d = tempDir();
  try {
    const img = `${d}/big.qcow2`;
    qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", img, "8M");
    qemuIo(img, "qcow2", "write -P 0x61 1m 2m", "write -P 0x62 6m 4k");
    await assertMatchesOracle(img, { l2CacheSize: 1 });
    const small = `${d}/small.qcow2`; // 512-byte clusters: 64 entries per L2 table
    qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", small, "2M");
    qemuIo(small, "qcow2", "write -P 0x63 0 2M", "write -z 100k 300k");
    await assertMatchesOracle(small, { l2CacheSize: 1024 });
  } finally {
    Deno.removeSync(d, { recursive: true });
  }
});

Deno.test("qcow2 oracle: extended L2 entries over a backing file", opts, async () => {
  const d = tempDir();
  try {
    const base = `${d}/base.raw`;
    qemuImg("create", "-q", "-f", "raw", base, "4M");
    qemuIo(base, "raw", "write -P 0x77 0 4M");
    const img = `${d}/ext.qcow2`;
    qemuImg(
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "extended_l2=on,cluster_size=64k",
      "-b",
      base,
      "-F",
      "raw",
      img,
      "4M",
    );
    // 2 KiB subclusters: allocate some, zero some, leave others to the backing file.
    qemuIo(
      img,
      "qcow2",
      "write -P 0x01 2k 2k",
      "write -P 0x02 10k 6k",
      "write -z 32k 4k",
      "write -P 0x03 130k 1k",
      "write -z 1m 64k",
      "write -P 0x04 1m 2k",
      "discard 3m 8k",
    );
    await assertMatchesOracle(img, {}, [1024, 4096, 3072, 65536 + 2048, 512]);
  } finally {
    Deno.removeSync(d, { recursive: true });
  }
});

Deno.test("qcow2 oracle: compressed clusters (qemu-img convert -c)", opts, async () => {
  const d = tempDir();
  try {
    const src = `${d}/src.raw`;
    qemuImg("create", "-q", "-f", "raw", src, "3M");
    qemuIo(src, "raw", "write -P 0x5a 0 1m", "write -P 0x00 1m 64k", "write -P 0xa5 1100k 900k");
    // Incompressible data too: random bytes.
    const rnd = new Uint8Array(256 << 10);
    for (let i = 0; i < rnd.length; i += 65536) crypto.getRandomValues(rnd.subarray(i, i + 65536));
    const f = Deno.openSync(src, { write: true });
    f.seekSync(2 << 20, Deno.SeekMode.Start);
    f.writeSync(rnd);
    f.close();
    for (const cs of ["64k", "4k"]) {
      const img = `${d}/c-${cs}.qcow2`;
      qemuImg("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", `cluster_size=${cs}`, src, img);
      await assertMatchesOracle(img);
    }
    // A compressed image written over afterwards: mixed kinds.
    const mixed = `${d}/c-64k.qcow2`;
    qemuIo(mixed, "qcow2", "write -P 0x99 60k 8k", "write -z 512k 64k");
    await assertMatchesOracle(mixed);
  } finally {
    Deno.removeSync(d, { recursive: true });
  }
});

Deno.test(
  "qcow2 oracle: a backing chain qcow2 -> qcow2 -> raw of different sizes",
  opts,
  async () => {
    const d = tempDir();
    try {
      qemuImg("create", "-q", "-f", "raw", `${d}/base.raw`, "1M");
      qemuIo(`${d}/base.raw`, "raw", "write -P 0x10 0 1M");
      // Relative backing names: resolved against the overlay's directory.
      qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", `${d}/mid.qcow2`, "2M");
      qemuIo(`${d}/mid.qcow2`, "qcow2", "write -P 0x20 512k 768k", "write -z 0 4k");
      qemuImg(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        `${d}/top.qcow2`,
        "3M",
      );
      qemuIo(`${d}/top.qcow2`, "qcow2", "write -P 0x30 100k 20k", "write -P 0x31 1900k 300k");
      await assertMatchesOracle(`${d}/top.qcow2`);
      const cwd = Deno.cwd();
      try {
        Deno.chdir("/");
        await assertMatchesOracle(`${d}/top.qcow2`, { cache: "none" });
      } finally {
        Deno.chdir(cwd);
      }
    } finally {
      Deno.removeSync(d, { recursive: true });
    }
  },
);
