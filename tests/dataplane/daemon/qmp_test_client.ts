/**
 * A small QMP client for tests: connects to a monitor socket, reads the
 * greeting, sends commands one line each and returns each reply, keeping
 * the events that arrive in between.
 *
 * @module
 */

/** One reply or event as received. */
export type QmpMessage = Record<string, unknown>;

/** A connected QMP client. Always {@link QmpTestClient.close} it. */
export class QmpTestClient {
  readonly greeting: QmpMessage;
  readonly events: QmpMessage[] = [];
  readonly #conn: Deno.UnixConn;
  readonly #reader: ReadableStreamDefaultReader<Uint8Array>;
  readonly #dec = new TextDecoder();
  #buf = "";

  private constructor(conn: Deno.UnixConn, greeting: QmpMessage, buf: string) {
    this.#conn = conn;
    this.#reader = conn.readable.getReader();
    this.greeting = greeting;
    this.#buf = buf;
  }

  /** Connects and reads the greeting; with `negotiate`, also runs qmp_capabilities. */
  static async connect(path: string, negotiate = true): Promise<QmpTestClient> {
    const conn = await Deno.connect({ transport: "unix", path });
    const dec = new TextDecoder();
    let buf = "";
    const chunk = new Uint8Array(65536);
    while (!buf.includes("\n")) {
      const n = await conn.read(chunk);
      if (n === null) throw new Error("QMP: closed before the greeting");
      buf += dec.decode(chunk.subarray(0, n), { stream: true });
    }
    const nl = buf.indexOf("\n");
    const c = new QmpTestClient(conn, JSON.parse(buf.slice(0, nl)), buf.slice(nl + 1));
    if (negotiate) {
      const r = await c.execute("qmp_capabilities");
      if (!("return" in r)) throw new Error(`QMP: ${JSON.stringify(r)}`);
    }
    return c;
  }

  /** The next message (reply or event); null at end of stream. */
  async next(): Promise<QmpMessage | null> {
    while (!this.#buf.includes("\n")) {
      const r = await this.#reader.read();
      if (r.done) return null;
      this.#buf += this.#dec.decode(r.value, { stream: true });
    }
    const nl = this.#buf.indexOf("\n");
    const line = this.#buf.slice(0, nl);
    this.#buf = this.#buf.slice(nl + 1);
    return JSON.parse(line);
  }

  /** Sends raw bytes (a line, garbage, half a line). */
  async sendRaw(text: string | Uint8Array): Promise<void> {
    const bytes = typeof text === "string" ? new TextEncoder().encode(text) : text;
    for (let off = 0; off < bytes.length;) off += await this.#conn.write(bytes.subarray(off));
  }

  /** The next reply (events before it go to `events`). */
  async reply(): Promise<QmpMessage> {
    for (;;) {
      const m = await this.next();
      if (m === null) throw new Error("QMP: connection closed");
      if ("event" in m) this.events.push(m);
      else return m;
    }
  }

  /** Runs a command; returns its whole reply (`return` or `error`). */
  async execute(name: string, args?: Record<string, unknown>, id?: unknown): Promise<QmpMessage> {
    const msg: QmpMessage = { execute: name };
    if (args !== undefined) msg.arguments = args;
    if (id !== undefined) msg.id = id;
    await this.sendRaw(JSON.stringify(msg) + "\n");
    return await this.reply();
  }

  close(): void {
    try {
      this.#reader.releaseLock();
      this.#conn.close();
    } catch { /* closed */ }
  }
}
