import assert from "node:assert/strict";
import { writeCpioNewc } from "./cpio_newc.ts";

async function busybox(args: string[], cwd: string, stdin: Uint8Array): Promise<string> {
  const child = new Deno.Command("busybox", {
    args,
    cwd,
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const w = child.stdin.getWriter();
  await w.write(stdin);
  await w.close();
  const out = await child.output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  return new TextDecoder().decode(out.stdout);
}

Deno.test("cpio newc: busybox cpio extracts what we wrote", async () => {
  const enc = new TextEncoder();
  const odd = new Uint8Array(4097).map((_, i) => (i * 7) & 0xff); // not 4-aligned
  const archive = writeCpioNewc([
    { kind: "dir", path: "bin" },
    { kind: "file", path: "bin/tool", data: enc.encode("#!/bin/sh\n"), mode: 0o755 },
    { kind: "symlink", path: "bin/sh", target: "tool" },
    { kind: "dir", path: "data" },
    { kind: "file", path: "data/abc", data: odd },
    { kind: "file", path: "data/empty", data: new Uint8Array(0) },
  ]);
  const dir = await Deno.makeTempDir();
  try {
    const list = await busybox(["cpio", "-t"], dir, archive);
    assert.deepEqual(list.trim().split("\n"), [
      "bin",
      "bin/tool",
      "bin/sh",
      "data",
      "data/abc",
      "data/empty",
    ]);
    await busybox(["cpio", "-id"], dir, archive);
    assert.deepEqual(await Deno.readFile(`${dir}/data/abc`), odd);
    assert.equal((await Deno.stat(`${dir}/data/empty`)).size, 0);
    assert.equal(await Deno.readLink(`${dir}/bin/sh`), "tool");
    assert.equal((await Deno.stat(`${dir}/bin/tool`)).mode! & 0o777, 0o755);
    assert.equal(await Deno.readTextFile(`${dir}/bin/tool`), "#!/bin/sh\n");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("cpio newc: rejects paths that escape the root", () => {
  assert.throws(
    () => writeCpioNewc([{ kind: "dir", path: "../x" }]),
    RangeError,
  );
});
