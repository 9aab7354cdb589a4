/**
 * Scanning tables of 64-bit entries (QED and qcow2 L1/L2 tables, refcount
 * tables) for the entries that are not zero. Tables are mostly zeros: looking
 * at whole 32-bit words through a typed array is far cheaper than decoding
 * every entry (QED check of 512 tables of 32768 entries: 0.40 s of CPU with a
 * decode of each, 0.10 s with this), and past a few zero entries, long zero
 * stretches are skipped with native compares against zeros (memcmp) in steps
 * of 64 KiB, 4 KiB and 512 bytes (that check: 64 ms of scanning words, about
 * a tenth of it with these). Pure functions, no state but a shared block of
 * zeros nobody writes.
 */

/** Zeros compared against a table; never written. */
const ZEROS = Buffer.alloc(64 * 1024);
/** Compare sizes, largest first. */
const STEPS = [64 * 1024, 4096, 512] as const;
/** Zero entries seen in a row before a compare is tried: a table whose zeros come one or two at a time is not slowed down. */
const ZEROS_BEFORE_SKIP = 8;
/** Entries of a 512-byte step: after a compare stopped, none is tried again before these were looked at one by one. */
const ENTRIES_PER_STEP = 512 / 8;

/**
 * Where the zero bytes of `table` starting at `from` end, below `end`, as far
 * as whole steps see them: every byte of [from, result) is 0, and the 512
 * bytes at the result are not all zero (or fewer than 512 are left).
 */
export function zeroRunEnd(table: Buffer, from: number, end: number): number {
  let at = from;
  for (const step of STEPS) {
    while (end - at >= step && table.compare(ZEROS, 0, step, at, at + step) === 0) at += step;
  }
  return at;
}

/**
 * The 32-bit words of a table, for `nextNonZeroIn` (made once per table: a view per call
 * costs more than the scan of a table whose entries are all in use); undefined when the
 * table is not 4-byte aligned in its buffer.
 */
export function tableWords(table: Buffer): Uint32Array | undefined {
  return table.byteOffset % 4 === 0 ? new Uint32Array(table.buffer, table.byteOffset, table.length >>> 2) : undefined;
}

/** `tableWords`, or the words of a copy when the table is not aligned (then later changes to the table do not show in them). */
export function readableWords(table: Buffer): Uint32Array {
  return tableWords(table) ?? new Uint32Array(Uint8Array.prototype.slice.call(table).buffer, 0, table.length >>> 2);
}

/** The index of the first 64-bit entry at or after `from`, below `entries`, that is not 0; `entries` when there is none. */
export function nextNonZeroEntry(table: Buffer, from: number, entries: number = table.length >>> 3): number {
  return nextNonZeroIn(table, tableWords(table), from, entries);
}

/** `nextNonZeroEntry` with the table's words (`tableWords(table)`) at hand. */
export function nextNonZeroIn(table: Buffer, words: Uint32Array | undefined, from: number, entries: number): number {
  const end = Math.min(entries, table.length >>> 3);
  if (words !== undefined) {
    let zeros = 0;
    let retryAt = from;
    for (let i = from; i < end; ) {
      if ((words[2 * i]! | words[2 * i + 1]!) !== 0) return i;
      i++;
      if (++zeros >= ZEROS_BEFORE_SKIP && i >= retryAt && i < end) {
        i = Math.floor(zeroRunEnd(table, i * 8, end * 8) / 8);
        retryAt = i + ENTRIES_PER_STEP;
      }
    }
    return entries;
  }
  for (let i = from; i < end; i++) if ((table.readUInt32LE(i * 8) | table.readUInt32LE(i * 8 + 4)) !== 0) return i;
  return entries;
}
