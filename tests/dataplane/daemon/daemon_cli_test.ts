// qemu-storage-daemon's command line, bad ones: the same argv to qsd 7.2 and
// to ours, both exit 1 and print the same message after the program name
// (where we match it word for word), or at least the same shape
// (`PROG: --option value: why`). Then one argv through the real CLI
// (deno task host), for the exit status.
import assert from "node:assert/strict";
import { daemonMain } from "../../../dataplane/daemon/daemon_main.ts";
import { makeScratchDir } from "../../harness/mod.ts";

const QSD = "qemu-storage-daemon";

async function qsdAvailable(): Promise<boolean> {
  try {
    const r = await new Deno.Command(QSD, { args: ["--version"], stdout: "null", stderr: "null" })
      .output();
    return r.success;
  } catch {
    return false;
  }
}

/** Runs qsd with `args`; its exit code and stderr with the program name cut. */
async function runQsd(args: string[]): Promise<{ code: number; message: string }> {
  const r = await new Deno.Command(QSD, { args, stdout: "null", stderr: "piped", stdin: "null" })
    .output();
  const text = new TextDecoder().decode(r.stderr).trim();
  return { code: r.code, message: text.replace(/^\S*qemu-storage-daemon: /, "") };
}

/** Runs our daemon in-process (it fails before serving); its status and message. */
async function runOurs(args: string[]): Promise<{ code: number; message: string }> {
  const lines: string[] = [];
  const orig = console.error;
  console.error = (...a: unknown[]) => lines.push(a.join(" "));
  try {
    const code = await daemonMain(args, "dataplane");
    // The error is the last line (options applied before it may log).
    const last = lines.at(-1) ?? "";
    return { code, message: last.trim().replace(/^dataplane: /, "") };
  } finally {
    console.error = orig;
  }
}

const NULL = "driver=null-co,node-name=a,size=1048576";
const EXPORT = "type=vhost-user-blk,id=e,node-name=a,addr.type=unix,addr.path=";

/** Same message as qsd, word for word (`{}` is replaced by a scratch dir). */
const EXACT: string[][] = [
  ["--foo"],
  ["positional"],
  ["--blockdev", "driver=file"],
  ["--blockdev", "driver=file,filename={}/nonexistent,node-name=a"],
  ["--blockdev", "driver=null-co,node-name=a,bogus=1"],
  ["--blockdev", "driver=nope,node-name=a"],
  ["--blockdev", "driver=null-co,size=1048576"],
  ["--blockdev", "driver=null-co,node-name=a,size=1M"],
  ["--blockdev", "driver=null-co,node-name=a,,b"],
  ["--blockdev", '{"driver":"null-co","node-name":"a","size":"x"}'],
  ["--blockdev", "driver=null-co,node-name=a", "--blockdev", "driver=null-co,node-name=a"],
  ["--blockdev", "driver=null-co,node-name=a,read-zeroes=maybe"],
  ["--object", "iothread,id=a,poll-max-ns=abc"],
  ["--object", "foo,id=a"],
  ["--monitor", "chardev=nope"],
  ["--export", "type=vhost-user-blk,id=e"],
  ["--export", `${EXPORT}{}/e.sock`],
  ["--blockdev", NULL, "--export", `${EXPORT}{}/e.sock,num-queues=0`],
  ["--blockdev", NULL, "--export", `${EXPORT}{}/e.sock,logical-block-size=1000`],
  ["--blockdev", NULL, "--export", `${EXPORT}{}/e.sock,writable=maybe`],
  ["--blockdev", NULL, "--export", `${EXPORT}{}/e.sock,iothread=nope`],
  // Throttle groups: QEMU's throttle_is_valid and property setter messages.
  ["--object", "throttle-group,id=t,x-bps-total-max=5"],
  ["--object", "throttle-group,id=t,x-iops-total=10,x-iops-total-max-length=2"],
  ["--object", "throttle-group,id=t,x-iops-total=-1"],
  ["--object", "throttle-group,id=t,x-iops-total=1000000000000001"],
  ["--object", "throttle-group,id=t,x-bps-total=1,x-bps-read=1"],
  ["--object", "throttle-group,id=t,x-iops-size=4096"],
  ["--object", "throttle-group,id=t,limits.iops-total=10,limits.iops-total-max=5"],
  ["--object", "throttle-group,id=t,limits.iops-total=-1"],
  ["--object", "throttle-group,id=t,x-iops-total=10,x-iops-total-max=20,x-iops-total-max-length=0"],
  [
    "--object",
    "throttle-group,id=t,x-iops-total=1,x-iops-total-max=2,x-iops-total-max-length=4294967296",
  ],
  ["--object", "throttle-group,id=t,x-nope=1"],
  ["--blockdev", NULL, "--blockdev", "driver=throttle,node-name=t0,throttle-group=nope,file=a"],
  ["--blockdev", NULL, "--blockdev", "driver=throttle,node-name=t0,file=a"],
  ["--blockdev", NULL, "--export", `type=nbd,id=e,node-name=a`],
  ["--blockdev", NULL, "--export", `type=nbd,id=e,node-name=b`],
  ["--nbd-server", "addr.type=inet,addr.host=127.0.0.1"],
  ["--nbd-server", "addr.type=unix"],
  ["--nbd-server", "addr.type=unix,addr.path={}/n.sock,foo=1"],
  ["--nbd-server", "addr.type=unix,addr.path={}/n.sock,max-connections=-1"],
  ["--nbd-server", "addr.type=unix,addr.path={}/n.sock,tls-creds=x"],
  [
    "--nbd-server",
    "addr.type=unix,addr.path={}/n.sock",
    "--nbd-server",
    "addr.type=unix,addr.path={}/m.sock",
  ],
  [
    "--blockdev",
    NULL,
    "--nbd-server",
    "addr.type=unix,addr.path={}/n.sock",
    "--export",
    "type=nbd,id=e,node-name=a,bogus=1",
  ],
  [
    "--blockdev",
    NULL,
    "--nbd-server",
    "addr.type=unix,addr.path={}/n.sock",
    "--export",
    "type=nbd,id=e,node-name=a,writable=maybe",
  ],
  [
    "--blockdev",
    NULL,
    "--nbd-server",
    "addr.type=unix,addr.path={}/n.sock",
    "--export",
    "type=nbd,id=e,node-name=a,iothread=nope",
  ],
  [
    "--blockdev",
    NULL,
    "--nbd-server",
    "addr.type=unix,addr.path={}/n.sock",
    "--export",
    "type=nbd,id=e,node-name=a",
    "--export",
    "type=nbd,id=e,node-name=a,name=y",
  ],
  [
    "--blockdev",
    NULL,
    "--nbd-server",
    "addr.type=unix,addr.path={}/n.sock",
    "--export",
    "type=nbd,id=e,node-name=a",
    "--export",
    "type=nbd,id=f,node-name=a",
  ],
  [
    "--blockdev",
    `${NULL},read-only=on`,
    "--nbd-server",
    "addr.type=unix,addr.path={}/n.sock",
    "--export",
    "type=nbd,id=e,node-name=a,writable=on",
  ],
];

/** Same shape only: qsd's JSON parser and chardev code word it their own way. */
const SHAPE: string[][] = [
  ["--blockdev", "{bad"],
  ["--chardev", "socket,id=c"],
];

Deno.test("daemon CLI: bad command lines get qemu-storage-daemon's messages, exit 1", async (t) => {
  if (!await qsdAvailable()) {
    console.warn("SKIPPED: qemu-storage-daemon is not installed (tools/setup.sh --test)");
    return;
  }
  const dir = await makeScratchDir("qsd-cli");
  try {
    for (const tmpl of EXACT) {
      const args = tmpl.map((a) => a.replaceAll("{}", dir));
      await t.step(args.join(" "), async () => {
        const q = await runQsd(args);
        const o = await runOurs(args);
        assert.equal(q.code, 1, q.message);
        assert.equal(o.code, 1, o.message);
        assert.equal(o.message, q.message);
      });
    }
    for (const args of SHAPE) {
      await t.step(`${args.join(" ")} (shape)`, async () => {
        const q = await runQsd(args);
        const o = await runOurs(args);
        assert.equal(q.code, 1);
        assert.equal(o.code, 1);
        const prefix = `${args.slice(-2).join(" ")}: `;
        assert(q.message.startsWith(prefix), q.message);
        assert(o.message.startsWith(prefix), o.message);
      });
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("daemon CLI: deno task host exits 1 with the message on stderr", async () => {
  const main = new URL("../../../dataplane/main.ts", import.meta.url);
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", main.href, "--blockdev", "driver=null-co,node-name=a,bogus=1"],
    stdout: "null",
    stderr: "piped",
  }).output();
  assert.equal(r.code, 1);
  assert.equal(
    new TextDecoder().decode(r.stderr).trim(),
    "dataplane: --blockdev driver=null-co,node-name=a,bogus=1: Parameter 'bogus' is unexpected",
  );
});
