import type { RbdDriverOptions } from "./rbd_driver.ts";

/**
 * Parses QEMU's legacy rbd filename (block/rbd.c qemu_rbd_parse_filename):
 * `rbd:POOL/[NAMESPACE/]IMAGE[:KEY=VALUE]...`, where `conf=PATH` names the
 * ceph.conf, `id=USER` the client id, and every other pair is a librados
 * configuration option (e.g. `client_mount_timeout=10`); `IMAGE@SNAP` names a
 * snapshot (read-only); `\` escapes a `:`, `/` or `@`. Throws TypeError.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseRbdFilename } from "./rbd_filename.ts";
 * const o = parseRbdFilename("rbd:rbd/vm1:conf=/etc/ceph/ceph.conf:id=admin");
 * assert.deepEqual(o, { pool: "rbd", image: "vm1", conf: "/etc/ceph/ceph.conf", user: "admin" });
 * assert.throws(() => parseRbdFilename("rbd:noimage"), /rbd:POOL/);
 * ```
 */
export function parseRbdFilename(filename: string): RbdDriverOptions {
  if (!filename.startsWith("rbd:")) throw new TypeError(`not an rbd filename: ${filename}`);
  const fields = split(filename.slice(4), ":");
  const path = split(fields[0], "/");
  if ((path.length !== 2 && path.length !== 3) || path.some((p) => p === "")) {
    throw new TypeError(`rbd filename must be rbd:POOL/[NAMESPACE/]IMAGE[:key=value...]`);
  }
  const at = split(path.at(-1)!, "@");
  if (at.length > 2 || at.some((p) => p === "")) {
    throw new TypeError(`rbd filename: bad IMAGE@SNAP in ${filename}`);
  }
  if (path.slice(0, -1).some((p) => split(p, "@").length > 1)) {
    throw new TypeError(`rbd filename: '@' outside the image name in ${filename}`);
  }
  const out: RbdDriverOptions = { pool: unescape(path[0]), image: unescape(at[0]) };
  if (at.length === 2) out.snapshot = unescape(at[1]);
  if (path.length === 3) out.namespace = unescape(path[1]);
  for (const kv of fields.slice(1)) {
    const eq = kv.indexOf("=");
    if (eq <= 0) throw new TypeError(`rbd filename option without value: ${kv}`);
    const key = unescape(kv.slice(0, eq)), value = unescape(kv.slice(eq + 1));
    if (key === "conf") out.conf = value;
    else if (key === "id") out.user = value;
    else (out.confOptions ??= {})[key] = value;
  }
  return out;
}

/** Splits at unescaped `sep`, keeping the escapes for {@link unescape}. */
function split(s: string, sep: string): string[] {
  const out: string[] = [];
  let cur = "";
  for (let i = 0; i < s.length; i++) {
    if (s[i] === "\\" && i + 1 < s.length) {
      cur += s[i] + s[++i];
    } else if (s[i] === sep) {
      out.push(cur);
      cur = "";
    } else cur += s[i];
  }
  out.push(cur);
  return out;
}

function unescape(s: string): string {
  return s.replace(/\\(.)/g, "$1");
}
