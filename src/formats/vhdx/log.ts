/**
 * The VHDX log (MS-VHDX 2.3): a ring of 4 KiB sectors holding entries, each a
 * header, descriptors (data: one 4 KiB write; zero: a range of zeros) and data
 * sectors, checked by CRC-32C, sequence numbers and the log GUID of the
 * current header. An image whose header names a log GUID may hold an active
 * sequence of entries that must be applied before the file can be read.
 *
 * This module finds that sequence and replays it IN MEMORY: `LogOverlay` is a
 * read-only Protocol over the image file that shows the file as it will be
 * after replay, without writing a byte (a read-write open replays on disk:
 * log-write.ts). The overlay holds no locks: its state is built once at open
 * and never changes.
 */
import { CorruptImageError, ReadOnlyError, UnsupportedFeatureError } from '../../block/errors.js';
import type { Protocol } from '../../block/types.js';
import { checksumMatches } from './crc32c.js';
import { KiB, MiB, type VhdxHeader } from './header.js';

export const LOG_SECTOR = 4 * KiB;
/** Largest log read into memory to search for the active sequence. */
export const MAX_LOG_BYTES = 256 * MiB;

export const ENTRY_SIGNATURE = 0x65676f6c; // "loge"
export const DATA_DESCRIPTOR = 0x63736564; // "desc"
const ZERO_DESCRIPTOR = 0x6f72657a; // "zero"
export const DATA_SECTOR = 0x61746164; // "data"

/** One change the log makes to the file: a 4 KiB sector of data, or zeros over a range. */
export type LogWrite = { offset: number; data: Buffer } | { offset: number; zeroLength: number };

export interface LogEntry {
  /** Where the entry starts in the log. */
  position: number;
  length: number;
  tail: number;
  sequenceNumber: bigint;
  flushedFileOffset: number;
  lastFileOffset: number;
  writes: LogWrite[];
}

/** The entry's bytes, read across the end of the ring. */
function ringSlice(log: Buffer, position: number, length: number): Buffer {
  if (position + length <= log.length) return log.subarray(position, position + length);
  return Buffer.concat([log.subarray(position), log.subarray(0, position + length - log.length)]);
}

function safe(value: bigint): number | undefined {
  return value > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : Number(value);
}

/** The valid entry at `position`, or undefined (any check failing means "no entry here", as the spec reads the ring). */
export function parseEntry(log: Buffer, position: number, logGuid: Buffer, spend: (bytes: number) => void = () => undefined): LogEntry | undefined {
  const head = ringSlice(log, position, 64);
  if (head.readUInt32LE(0) !== ENTRY_SIGNATURE) return undefined;
  const length = head.readUInt32LE(8);
  if (length === 0 || length % LOG_SECTOR !== 0 || length > log.length) return undefined;
  const sequenceNumber = head.readBigUInt64LE(16);
  if (sequenceNumber === 0n) return undefined;
  if (!head.subarray(32, 48).equals(logGuid)) return undefined;
  const count = head.readUInt32LE(24);
  const descriptorSectors = Math.ceil((count + 2) / 128);
  if (descriptorSectors * LOG_SECTOR > length) return undefined;
  spend(length);
  const entry = ringSlice(log, position, length);
  if (!checksumMatches(entry, 4)) return undefined;
  const flushed = safe(head.readBigUInt64LE(48));
  const last = safe(head.readBigUInt64LE(56));
  if (flushed === undefined || last === undefined) return undefined;
  const writes: LogWrite[] = [];
  // Writes stay inside the file as the entry knew it (qemu extends the file to LastFileOffset, rounded up to 1 MiB).
  const fileEnd = Math.max(flushed, Math.ceil(last / MiB) * MiB);
  let dataSector = descriptorSectors;
  for (let i = 0; i < count; i++) {
    const at = 64 + 32 * i;
    const signature = entry.readUInt32LE(at);
    const offset = safe(entry.readBigUInt64LE(at + 16));
    if (offset === undefined || offset % LOG_SECTOR !== 0) return undefined;
    if (entry.readBigUInt64LE(at + 24) !== sequenceNumber) return undefined;
    if (signature === ZERO_DESCRIPTOR) {
      const zeroLength = safe(entry.readBigUInt64LE(at + 8));
      if (zeroLength === undefined || zeroLength % LOG_SECTOR !== 0 || offset + zeroLength > fileEnd) return undefined;
      writes.push({ offset, zeroLength });
    } else if (signature === DATA_DESCRIPTOR) {
      if (offset + LOG_SECTOR > fileEnd) return undefined;
      const sectorAt = dataSector * LOG_SECTOR;
      if (sectorAt + LOG_SECTOR > length) return undefined;
      const sector = entry.subarray(sectorAt, sectorAt + LOG_SECTOR);
      if (sector.readUInt32LE(0) !== DATA_SECTOR) return undefined;
      const sectorSequence = (BigInt(sector.readUInt32LE(4)) << 32n) | BigInt(sector.readUInt32LE(4092));
      if (sectorSequence !== sequenceNumber) return undefined;
      const data = Buffer.alloc(LOG_SECTOR);
      entry.copy(data, 0, at + 8, at + 16); // leading bytes
      sector.copy(data, 8, 8, 4092);
      entry.copy(data, 4092, at + 4, at + 8); // trailing bytes
      writes.push({ offset, data });
      dataSector += 1;
    } else {
      return undefined;
    }
  }
  return { position, length, tail: head.readUInt32LE(12), sequenceNumber, flushedFileOffset: flushed, lastFileOffset: last, writes };
}

/**
 * The active sequence: of the runs of consecutive valid entries (each
 * following the previous one in the ring with the next sequence number), the
 * one ending with the highest sequence number, replayed from the entry its
 * last entry's tail names. Empty when the log holds no valid entry. (qemu
 * 7.2 compares runs by their FIRST entry's sequence number and so replays
 * only the last entry of a multi-entry sequence; it never writes one itself.)
 */
export function activeSequence(log: Buffer, logGuid: Buffer, path: string): LogEntry[] {
  // Each position is parsed once. Real entries do not overlap, so the bytes checksummed stay near the
  // log's size; a hostile log of overlapping long entries would make the search quadratic: refused.
  const parsed = new Map<number, LogEntry | undefined>();
  let budget = 4 * log.length;
  const entryAt = (position: number): LogEntry | undefined => {
    if (parsed.has(position)) return parsed.get(position);
    const entry = parseEntry(log, position, logGuid, (bytes) => {
      budget -= bytes;
      if (budget < 0) throw new CorruptImageError(`${path}: the log holds overlapping entries whose checksums would need to be computed over more than 4 times its ${log.length} bytes`);
    });
    parsed.set(position, entry);
    return entry;
  };
  let best: LogEntry[] = [];
  for (let start = 0; start < log.length; start += LOG_SECTOR) {
    const first = entryAt(start);
    if (!first) continue;
    const run = [first];
    for (let position = (start + first.length) % log.length; run.length * LOG_SECTOR <= log.length; ) {
      const next = entryAt(position);
      const previous = run[run.length - 1]!;
      if (!next || next.sequenceNumber !== previous.sequenceNumber + 1n || position === start) break;
      run.push(next);
      position = (position + next.length) % log.length;
    }
    const last = run[run.length - 1]!.sequenceNumber;
    const bestLast = best[best.length - 1]?.sequenceNumber;
    // A run that starts inside a longer one ends with the same entry: keep the longer one.
    if (bestLast === undefined || last > bestLast || (last === bestLast && run.length > best.length)) best = run;
  }
  if (best.length === 0) return best;
  const last = best[best.length - 1]!;
  const from = best.findIndex((entry) => entry.position === last.tail);
  if (from < 0) {
    throw new CorruptImageError(`${path}: the log's last entry (sequence ${last.sequenceNumber}) names tail ${last.tail}, which is not an entry of its sequence`);
  }
  return best.slice(from);
}

/** Reads the log the header names and returns the entries to replay (none when the log is empty). */
export async function readLog(file: Protocol, header: VhdxHeader, fileSize: number, path: string): Promise<LogEntry[]> {
  if (header.logGuid.equals(Buffer.alloc(16)) || header.logLength === 0) return [];
  if (header.logLength > MAX_LOG_BYTES) {
    throw new UnsupportedFeatureError(`${path}: the log to replay is ${header.logLength} bytes, more than the ${MAX_LOG_BYTES} this program reads`);
  }
  const log = Buffer.alloc(header.logLength);
  await file.read(header.logOffset, log);
  const entries = activeSequence(log, header.logGuid, path);
  for (const entry of entries) {
    if (entry.flushedFileOffset > fileSize) {
      throw new CorruptImageError(
        `${path}: log entry ${entry.sequenceNumber} says the file was at least ${entry.flushedFileOffset} bytes long, but it is ${fileSize}: the file was truncated`,
      );
    }
  }
  return entries;
}

/** A read-only view of the image file with the log's writes applied in memory. */
export class LogOverlay implements Protocol {
  readonly readOnly = true;
  private readonly writes: LogWrite[];
  private readonly start: number;
  private readonly end: number;
  private readonly length: number;

  constructor(private readonly file: Protocol, entries: readonly LogEntry[], fileSize: number) {
    this.writes = entries.flatMap((entry) => entry.writes);
    this.start = this.writes.reduce((min, w) => Math.min(min, w.offset), Number.MAX_SAFE_INTEGER);
    this.end = this.writes.reduce((max, w) => Math.max(max, w.offset + ('data' in w ? w.data.length : w.zeroLength)), 0);
    const last = entries.reduce((max, entry) => Math.max(max, entry.lastFileOffset), 0);
    this.length = Math.max(fileSize, Math.ceil(last / MiB) * MiB, this.end);
  }

  get path(): string {
    return this.file.path;
  }

  get changes(): number {
    return this.writes.length;
  }

  async read(offset: number, buffer: Buffer): Promise<void> {
    await this.file.read(offset, buffer);
    const end = offset + buffer.length;
    if (end <= this.start || offset >= this.end) return;
    for (const write of this.writes) {
      const writeEnd = write.offset + ('data' in write ? write.data.length : write.zeroLength);
      const from = Math.max(offset, write.offset);
      const to = Math.min(end, writeEnd);
      if (from >= to) continue;
      if ('data' in write) write.data.copy(buffer, from - offset, from - write.offset, to - write.offset);
      else buffer.fill(0, from - offset, to - offset);
    }
  }

  async write(): Promise<void> {
    throw new ReadOnlyError(`${this.path}: the VHDX log is replayed in memory only; the image is read-only`);
  }

  async truncate(): Promise<void> {
    throw new ReadOnlyError(`${this.path}: the VHDX log is replayed in memory only; the image is read-only`);
  }

  async flush(): Promise<void> {}

  async size(): Promise<number> {
    return this.length;
  }

  allocatedSize(): Promise<number> {
    return this.file.allocatedSize();
  }

  /** The image closes the file itself; the overlay owns nothing. */
  async close(): Promise<void> {}
}
