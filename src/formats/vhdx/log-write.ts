/**
 * Writing the VHDX log (MS-VHDX 2.3): building one log entry of 4 KiB data
 * sectors (each split into a data descriptor holding its first 8 and last 4
 * bytes and a data sector holding the rest, both stamped with the entry's
 * sequence number, the whole entry checksummed with CRC-32C), and replaying
 * an active sequence ON DISK at a read-write open: every data and zero
 * descriptor applied to the file in order, the file extended to what the
 * entries say it was, then flushed. Clearing the log GUID afterwards is the
 * caller's (writer.ts), once this returned. Pure functions and one function
 * over a Protocol that the caller owns exclusively (the open, before the
 * image is shared).
 */
import { flushToDisk } from '../../block/events.js';
import type { Protocol } from '../../block/types.js';
import { vhdxChecksum } from './crc32c.js';
import { MiB } from './header.js';
import { DATA_DESCRIPTOR, DATA_SECTOR, ENTRY_SIGNATURE, LOG_SECTOR, type LogEntry } from './log.js';

export interface NewLogEntry {
  sequenceNumber: bigint;
  /** Offset in the log of the oldest entry still to be replayed (the new entry's own when all older ones are applied). */
  tail: number;
  logGuid: Buffer;
  flushedFileOffset: number;
  lastFileOffset: number;
  /** 4 KiB sectors of the file to write, each at a 4 KiB aligned file offset. */
  sectors: ReadonlyArray<{ offset: number; data: Buffer }>;
}

/** The bytes of a log entry with data descriptors for `entry.sectors`. */
export function logEntryBytes(entry: NewLogEntry): Buffer {
  const count = entry.sectors.length;
  const descriptorSectors = Math.ceil((count + 2) / 128);
  const bytes = Buffer.alloc((descriptorSectors + count) * LOG_SECTOR);
  bytes.writeUInt32LE(ENTRY_SIGNATURE, 0);
  bytes.writeUInt32LE(bytes.length, 8);
  bytes.writeUInt32LE(entry.tail, 12);
  bytes.writeBigUInt64LE(entry.sequenceNumber, 16);
  bytes.writeUInt32LE(count, 24);
  entry.logGuid.copy(bytes, 32);
  bytes.writeBigUInt64LE(BigInt(entry.flushedFileOffset), 48);
  bytes.writeBigUInt64LE(BigInt(entry.lastFileOffset), 56);
  entry.sectors.forEach((sector, i) => {
    if (sector.data.length !== LOG_SECTOR || sector.offset % LOG_SECTOR !== 0) {
      throw new Error(`log entry sector ${i}: ${sector.data.length} bytes at ${sector.offset}, not one aligned 4 KiB sector`);
    }
    const at = 64 + 32 * i;
    bytes.writeUInt32LE(DATA_DESCRIPTOR, at);
    sector.data.copy(bytes, at + 4, 4092, 4096); // trailing bytes
    sector.data.copy(bytes, at + 8, 0, 8); // leading bytes
    bytes.writeBigUInt64LE(BigInt(sector.offset), at + 16);
    bytes.writeBigUInt64LE(entry.sequenceNumber, at + 24);
    const data = (descriptorSectors + i) * LOG_SECTOR;
    bytes.writeUInt32LE(DATA_SECTOR, data);
    bytes.writeUInt32LE(Number(entry.sequenceNumber >> 32n), data + 4);
    sector.data.copy(bytes, data + 8, 8, 4092);
    bytes.writeUInt32LE(Number(entry.sequenceNumber & 0xffffffffn), data + 4092);
  });
  bytes.writeUInt32LE(vhdxChecksum(bytes, 4), 4);
  return bytes;
}

/** Zeros are written in pieces of at most this many bytes. */
const ZERO_CHUNK = MiB;

/**
 * Applies the active sequence to the file: extends it to the length the
 * entries name (LastFileOffset rounded up to 1 MiB, as qemu), writes every
 * descriptor in order, and flushes. Returns the file's new size. Replaying
 * twice writes the same bytes (a crash during the replay replays again).
 */
export async function replayOnDisk(file: Protocol, entries: readonly LogEntry[], fileSize: number): Promise<number> {
  const last = entries.reduce((max, entry) => Math.max(max, entry.lastFileOffset), 0);
  const end = entries.flatMap((entry) => entry.writes).reduce((max, w) => Math.max(max, w.offset + ('data' in w ? w.data.length : w.zeroLength)), 0);
  const length = Math.max(fileSize, Math.ceil(last / MiB) * MiB, end);
  if (length > fileSize) await file.truncate(length);
  for (const entry of entries) {
    for (const write of entry.writes) {
      if ('data' in write) {
        await file.write(write.offset, write.data);
      } else {
        for (let at = 0; at < write.zeroLength; at += ZERO_CHUNK) {
          await file.write(write.offset + at, Buffer.alloc(Math.min(ZERO_CHUNK, write.zeroLength - at)));
        }
      }
    }
  }
  await flushToDisk(file);
  return length;
}
