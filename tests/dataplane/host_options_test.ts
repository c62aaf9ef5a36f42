import assert from "node:assert/strict";
import { deviceModel } from "../../dataplane/host.ts";
import { parseHostArgs, parseSize, UsageError } from "../../dataplane/host_options.ts";

Deno.test("host options: file image with every flag", () => {
  const o = parseHostArgs([
    "--image=/tmp/d.img",
    "--socket=/tmp/s.sock",
    "--cache=none",
    "--aio=io_uring",
    "--read-only",
    "--serial=abc",
    "--queues=4",
    "--iothreads=2",
    "--logical-block-size=4096",
    "--poll-max-ns=0",
    "--aio-max-batch=16",
    "--socket-mode=0660",
    "--discard=ignore",
  ]);
  assert.equal(o.block.driver, "file");
  assert.equal(o.block.filename, "/tmp/d.img");
  assert.equal(o.block.cache, "none");
  assert.equal(o.block.aio, "io_uring");
  assert.equal(o.block.readOnly, true);
  assert.equal(o.block.discard, "ignore");
  assert.equal(o.serial, "abc");
  assert.equal(o.queues, 4);
  assert.equal(o.iothreads, 2);
  assert.equal(o.logicalBlockSize, 4096);
  assert.equal(o.pollMaxNs, 0);
  assert.equal(o.aioMaxBatch, 16);
  assert.equal(o.socketMode, 0o660);
});

Deno.test("host options: null-co size and defaults", () => {
  const o = parseHostArgs(["--image", "null-aio:512M", "--socket", "s"]);
  assert.equal(o.block.driver, "null-aio");
  assert.equal(o.block.size, 512 * 1024 * 1024);
  assert.equal(o.block.cache, "writeback");
  assert.equal(o.block.aio, "threads");
  assert.equal(o.queues, 1);
  assert.equal(o.socketMode, 0o600);
  assert.equal(o.iothreads, 1);
  assert.equal(o.queueSize, 1024, "QEMU's VIRTQUEUE_MAX_SIZE: front-ends ask for 512-1024");
  assert.equal(o.aioMaxBatch, 4);
  for (const bad of ["0", "1025", "x"]) {
    assert.throws(
      () => parseHostArgs(["--image", "null-co:1M", "--socket", "s", "--aio-max-batch", bad]),
      UsageError,
    );
  }
});

Deno.test("host options: seg_max is queue size - 2, never above IOV_MAX - 2", () => {
  const info = { length: 1 << 20, requestAlignment: 1, memAlignment: 1, readOnly: false };
  const segMax = (size: string) =>
    deviceModel(
      parseHostArgs(["--image", "null-co:1M", "--socket", "s", "--queue-size", size]),
      info,
    ).segMax;
  assert.equal(segMax("128"), 126);
  assert.equal(segMax("1024"), 1022);
  assert.equal(segMax("2048"), 1022);
  assert.equal(segMax("32768"), 1022);
  assert.equal(segMax("2"), 1);
});

Deno.test("host options: iothreads never exceed queues", () => {
  assert.equal(parseHostArgs(["--image=null-co:1G", "--socket=s", "--iothreads=4"]).iothreads, 1);
});

Deno.test("host options: bad flags are clear usage errors", () => {
  const bad: [string[], RegExp][] = [
    [["--socket=s"], /--image is required/],
    [["--image=x"], /--socket is required/],
    [["--image=x", "--socket=s", "--cache=fast"], /--cache must be one of none, writeback, unsafe/],
    [["--image=x", "--socket=s", "--aio=posix"], /--aio must be one of/],
    [["--image=x", "--socket=s", "--queues=0"], /--queues must be between 1 and 64/],
    [["--image=x", "--socket=s", "--queues=two"], /--queues takes a whole number/],
    [["--image=x", "--socket=s", "--queue-size=100"], /power of two/],
    [["--image=x", "--socket=s", "--logical-block-size=1024"], /512 or 4096/],
    [["--image=x", "--socket=s", "--serial=123456789012345678901"], /at most 20 bytes/],
    [["--image=null-co:1000", "--socket=s"], /multiple of 512/],
    [["--image=null-co:lots", "--socket=s"], /bad size/],
    [["--image=x", "--socket=s", "--bogus"], /Unknown option '--bogus'/],
    [["--image=x", "--socket=s", "extra"], /positional/],
    [["--image=x", "--socket=s", "--socket-mode=rw"], /octal/],
  ];
  for (const [args, re] of bad) {
    assert.throws(() => parseHostArgs(args), (e: unknown) => {
      assert.ok(e instanceof UsageError, `${args.join(" ")}: ${e}`);
      assert.match(e.message, re);
      return true;
    });
  }
});

Deno.test("host options: --help needs nothing else", () => {
  assert.equal(parseHostArgs(["--help"]).help, true);
  assert.equal(parseHostArgs(["-h"]).help, true);
});

Deno.test("parseSize: units", () => {
  assert.equal(parseSize("4096"), 4096);
  assert.equal(parseSize("4K"), 4096);
  assert.equal(parseSize("2MiB"), 2 << 20);
  assert.equal(parseSize("1g"), 1 << 30);
  assert.throws(() => parseSize("1.5G"), UsageError);
});

Deno.test("host options: --test-hold-completions EVERY:MS (tests only)", () => {
  const base = ["--image", "null-co:1M", "--socket", "/tmp/s"];
  assert.equal(parseHostArgs(base).testHoldCompletions, undefined);
  assert.deepEqual(
    parseHostArgs([...base, "--test-hold-completions", "4:300"]).testHoldCompletions,
    { every: 4, ms: 300 },
  );
  for (const bad of ["4", "0:10", "4:-1", "x:1", "4:60001", "4:1:2"]) {
    assert.throws(
      () => parseHostArgs([...base, "--test-hold-completions", bad]),
      UsageError,
      bad,
    );
  }
});

Deno.test("host options: --test-break-ring EVERY (tests only)", () => {
  const base = ["--image", "null-co:1M", "--socket", "/tmp/s"];
  assert.equal(parseHostArgs(base).testBreakRing, undefined);
  assert.equal(parseHostArgs([...base, "--test-break-ring", "100"]).testBreakRing, 100);
  for (const bad of ["0", "-1", "x", "1.5", "1000001", ""]) {
    assert.throws(() => parseHostArgs([...base, "--test-break-ring", bad]), UsageError, bad);
  }
});
