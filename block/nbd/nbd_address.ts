import { NbdError } from "./nbd_error.ts";

/**
 * Where an NBD server listens (QEMU's SocketAddress as `server.*`):
 * `inet` (host and port, default 10809) or `unix` (a socket path).
 *
 * @example
 * ```ts
 * import type { NbdServerAddress } from "./nbd_address.ts";
 * const a: NbdServerAddress = { type: "unix", path: "/tmp/nbd.sock" };
 * ```
 */
export type NbdServerAddress =
  | { type: "inet"; host: string; port: number }
  | { type: "unix"; path: string };

/** The IANA port of NBD. */
export const NBD_DEFAULT_PORT = 10809;

/** An NBD URI's parts: the server and the export name. */
export interface NbdUri {
  server: NbdServerAddress;
  exportName: string;
}

/**
 * Parses an NBD URI as QEMU's block/nbd.c does (nbd_parse_uri):
 * `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`. The
 * export name is the path without its leading slash, percent-decoded; TLS
 * forms (`nbds://`) are refused. Throws {@link NbdError} (kind "address").
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseNbdUri } from "./nbd_address.ts";
 * assert.deepEqual(parseNbdUri("nbd://127.0.0.1:10810/disk0"), {
 *   server: { type: "inet", host: "127.0.0.1", port: 10810 }, exportName: "disk0",
 * });
 * assert.deepEqual(parseNbdUri("nbd+unix:///e?socket=/tmp/s"), {
 *   server: { type: "unix", path: "/tmp/s" }, exportName: "e",
 * });
 * ```
 */
export function parseNbdUri(uri: string): NbdUri {
  const bad = (why: string) => new NbdError("address", `bad NBD URI ${uri}: ${why}`);
  const m = /^(nbd|nbd\+tcp|nbd\+unix|nbds|nbds\+tcp|nbds\+unix):\/\/([^/?#]*)([^?#]*)(\?[^#]*)?$/
    .exec(uri);
  if (!m) throw bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH");
  const [, scheme, authority, path, query] = m;
  if (scheme.startsWith("nbds")) throw bad("TLS (nbds) is not supported");
  let exportName: string;
  try {
    exportName = decodeURIComponent(path.replace(/^\//, ""));
  } catch {
    throw bad("bad percent-encoding in the export name");
  }
  const params = new URLSearchParams(query?.slice(1) ?? "");
  if (scheme === "nbd+unix") {
    if (authority !== "") throw bad("a Unix socket URI has no host");
    const socket = params.get("socket");
    if (!socket) throw bad("missing ?socket=PATH");
    for (const k of params.keys()) if (k !== "socket") throw bad(`unknown parameter ${k}`);
    return { server: { type: "unix", path: socket }, exportName };
  }
  if (query !== undefined) throw bad("a TCP URI takes no parameters");
  const hp = /^(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?$/.exec(authority);
  if (!hp) throw bad("missing or bad host");
  const port = hp[2] === undefined ? NBD_DEFAULT_PORT : Number(hp[2]);
  if (port < 1 || port > 65535) throw bad(`bad port ${hp[2]}`);
  const host = hp[1].startsWith("[") ? hp[1].slice(1, -1) : hp[1];
  return { server: { type: "inet", host, port }, exportName };
}

/**
 * A server address for messages: `host:port` or the socket path.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { describeNbdServer } from "./nbd_address.ts";
 * assert.equal(describeNbdServer({ type: "inet", host: "::1", port: 1 }), "[::1]:1");
 * ```
 */
export function describeNbdServer(a: NbdServerAddress): string {
  if (a.type === "unix") return a.path;
  return a.host.includes(":") ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}
