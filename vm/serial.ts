/**
 * A 16550/8250 UART at the PC's COM1 (ports 0x3f8-0x3ff), as much of it as a
 * guest printing text needs: writes to the transmit register become log
 * lines, the line status register always says "transmitter empty", every
 * other register reads as 0 and ignores writes. No interrupts, no input.
 *
 * @module
 */

/** COM1's base port. */
export const SERIAL_COM1 = 0x3f8;
const LSR = 5;
/** LSR: transmit holding register empty, transmitter empty. */
const LSR_THRE_TEMT = 0x60;
/** A guest that never sends a newline still gets its output logged. */
const MAX_LINE = 1024;

/**
 * The UART; `onLine` gets each line the guest prints (without the newline).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Serial8250, SERIAL_COM1 } from "./serial.ts";
 * const lines: string[] = [];
 * const s = new Serial8250((l) => lines.push(l));
 * for (const c of "hi\n") s.write(SERIAL_COM1, c.charCodeAt(0));
 * assert.deepEqual(lines, ["hi"]);
 * assert.equal(s.read(SERIAL_COM1 + 5), 0x60);
 * ```
 */
export class Serial8250 {
  readonly base: number;
  readonly #onLine: (line: string) => void;
  #line: number[] = [];
  /** Every line printed so far (kept for the caller's verdict). */
  readonly lines: string[] = [];

  constructor(onLine: (line: string) => void, base = SERIAL_COM1) {
    this.#onLine = onLine;
    this.base = base;
  }

  /** Whether `port` is one of the UART's eight. */
  owns(port: number): boolean {
    return port >= this.base && port < this.base + 8;
  }

  read(port: number): number {
    return port - this.base === LSR ? LSR_THRE_TEMT : 0;
  }

  write(port: number, value: number): void {
    if (port !== this.base) return; // THR only (DLAB is never set by our guests)
    const c = value & 0xff;
    if (c === 0x0a) this.flush();
    else if (c !== 0x0d) {
      this.#line.push(c);
      if (this.#line.length >= MAX_LINE) this.flush();
    }
  }

  /** Logs what is buffered as a line. */
  flush(): void {
    if (this.#line.length === 0) return;
    const text = String.fromCharCode(...this.#line.map((c) => (c >= 0x20 && c < 0x7f ? c : 0x3f)));
    this.#line = [];
    this.lines.push(text);
    this.#onLine(text);
  }
}
