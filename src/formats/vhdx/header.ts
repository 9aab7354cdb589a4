/**
 * The fixed part of a VHDX file (MS-VHDX 2.2): the file identifier at 0, the
 * two headers at 64 KiB and 128 KiB (the one with the higher sequence number
 * wins among those whose signature, version and CRC-32C are right) and the
 * region table at 192 KiB (its copy at 256 KiB is used when the first is
 * damaged), which locates the BAT and the metadata region. Everything here is
 * parsed and checked before any other structure is read; 64-bit fields are
 * read as bigint and refused above 2^53. Pure functions over buffers, no state.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';
import { randomUUID } from 'node:crypto';
import { checksumMatches, vhdxChecksum } from './crc32c.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;

export const FILE_SIGNATURE = Buffer.from('vhdxfile', 'latin1');
export const HEADER_OFFSETS = [64 * KiB, 128 * KiB] as const;
export const HEADER_BYTES = 4 * KiB;
export const REGION_TABLE_OFFSETS = [192 * KiB, 256 * KiB] as const;
export const REGION_TABLE_BYTES = 64 * KiB;
/** The header section: file identifier, headers, region tables; nothing else may live here. */
export const HEADER_SECTION_BYTES = 1 * MiB;
/** Per spec, at most 2047 region table entries fit in the 64 KiB table. */
export const MAX_REGION_ENTRIES = 2047;

const HEADER_SIGNATURE = 0x64616568; // "head"
const REGION_SIGNATURE = 0x69676572; // "regi"

/** A GUID in the on-disk (Microsoft, mixed-endian) byte order from its text form. */
export function guid(text: string): Buffer {
  const hex = text.replace(/-/g, '');
  const out = Buffer.from(hex, 'hex');
  out.subarray(0, 4).reverse();
  out.subarray(4, 6).reverse();
  out.subarray(6, 8).reverse();
  return out;
}

/** The text form of an on-disk GUID. */
export function guidText(bytes: Buffer): string {
  const b = Buffer.from(bytes.subarray(0, 16));
  b.subarray(0, 4).reverse();
  b.subarray(4, 6).reverse();
  b.subarray(6, 8).reverse();
  const hex = b.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

export const BAT_REGION = guid('2DC27766-F623-4200-9D64-115E9BFD4A08');
export const METADATA_REGION = guid('8B7CA206-4790-4B9A-B8FE-575F050F886E');

/** A 64-bit little-endian field as a number, refused above 2^53 naming the field. */
export function u64(buffer: Buffer, offset: number, what: string, path: string): number {
  const value = buffer.readBigUInt64LE(offset);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CorruptImageError(`${path}: ${what} is ${value}, above 2^53`);
  }
  return Number(value);
}

export interface VhdxHeader {
  /** Which header (0: at 64 KiB, 1: at 128 KiB). */
  index: number;
  sequenceNumber: bigint;
  fileWriteGuid: Buffer;
  dataWriteGuid: Buffer;
  logGuid: Buffer;
  logVersion: number;
  version: number;
  logLength: number;
  logOffset: number;
}

/** Why header bytes are not a usable header, or the parsed header. */
function parseOneHeader(bytes: Buffer, index: number, path: string): VhdxHeader | string {
  const where = `header ${index + 1} (at ${HEADER_OFFSETS[index]})`;
  const signature = bytes.readUInt32LE(0);
  if (signature !== HEADER_SIGNATURE) return `${where}: signature is 0x${signature.toString(16)}, not "head"`;
  if (!checksumMatches(bytes, 4)) return `${where}: CRC-32C checksum 0x${bytes.readUInt32LE(4).toString(16)} does not match its contents`;
  const version = bytes.readUInt16LE(66);
  if (version !== 1) return `${where}: version is ${version}, only 1 exists`;
  const sequenceNumber = bytes.readBigUInt64LE(8);
  const logVersion = bytes.readUInt16LE(64);
  const logLength = bytes.readUInt32LE(68);
  let logOffset: number;
  try {
    logOffset = u64(bytes, 72, `${where}: log offset`, path);
  } catch (error) {
    return (error as Error).message;
  }
  return {
    index,
    sequenceNumber,
    fileWriteGuid: Buffer.from(bytes.subarray(16, 32)),
    dataWriteGuid: Buffer.from(bytes.subarray(32, 48)),
    logGuid: Buffer.from(bytes.subarray(48, 64)),
    logVersion,
    version,
    logLength,
    logOffset,
  };
}

/**
 * Picks the current header from the two 4 KiB header blocks: the valid one,
 * or of two valid ones the higher sequence number (equal numbers are accepted
 * only when both headers are the same, as Disk2VHD writes them). Then checks
 * the log fields of the chosen header.
 */
export function chooseHeader(first: Buffer, second: Buffer, fileSize: number, path: string): VhdxHeader {
  const parsed = [parseOneHeader(first, 0, path), parseOneHeader(second, 1, path)];
  const valid = parsed.filter((h): h is VhdxHeader => typeof h !== 'string');
  if (valid.length === 0) {
    throw new CorruptImageError(`${path}: no valid VHDX header: ${parsed.join('; ')}`);
  }
  let header = valid[0]!;
  if (valid.length === 2) {
    const [a, b] = valid as [VhdxHeader, VhdxHeader];
    if (a.sequenceNumber === b.sequenceNumber) {
      if (!first.subarray(8, 80).equals(second.subarray(8, 80))) {
        throw new CorruptImageError(`${path}: both VHDX headers have sequence number ${a.sequenceNumber} but differ; which one is current is unknown`);
      }
    } else if (b.sequenceNumber > a.sequenceNumber) {
      header = b;
    }
  }
  checkLogFields(header, fileSize, path);
  return header;
}

function checkLogFields(header: VhdxHeader, fileSize: number, path: string): void {
  const where = `header ${header.index + 1}`;
  if (header.logVersion !== 0) {
    throw new UnsupportedFeatureError(`${path}: ${where}: log version is ${header.logVersion}, only 0 is known`);
  }
  if (header.logLength % MiB !== 0) {
    throw new CorruptImageError(`${path}: ${where}: log length ${header.logLength} is not a multiple of 1 MiB`);
  }
  if (header.logLength > 0) {
    if (header.logOffset < HEADER_SECTION_BYTES || header.logOffset % MiB !== 0) {
      throw new CorruptImageError(`${path}: ${where}: log offset ${header.logOffset} is not a multiple of 1 MiB at or after 1 MiB`);
    }
    if (header.logOffset + header.logLength > fileSize) {
      throw new CorruptImageError(`${path}: ${where}: the log (${header.logLength} bytes at ${header.logOffset}) ends past the end of the file (${fileSize} bytes)`);
    }
  }
}

export interface RegionEntry {
  guid: Buffer;
  fileOffset: number;
  length: number;
  required: boolean;
}

export interface RegionTable {
  bat: RegionEntry;
  metadata: RegionEntry;
}

/** Why a 64 KiB region table is unusable, or its parsed entries. */
function parseOneRegionTable(bytes: Buffer, index: number, fileSize: number, path: string): RegionTable | string {
  const where = `region table ${index + 1} (at ${REGION_TABLE_OFFSETS[index]})`;
  const signature = bytes.readUInt32LE(0);
  if (signature !== REGION_SIGNATURE) return `${where}: signature is 0x${signature.toString(16)}, not "regi"`;
  if (!checksumMatches(bytes, 4)) return `${where}: CRC-32C checksum 0x${bytes.readUInt32LE(4).toString(16)} does not match its contents`;
  const count = bytes.readUInt32LE(8);
  if (count > MAX_REGION_ENTRIES) return `${where}: entry count is ${count}, at most ${MAX_REGION_ENTRIES} fit`;
  let bat: RegionEntry | undefined;
  let metadata: RegionEntry | undefined;
  const seen: RegionEntry[] = [];
  for (let i = 0; i < count; i++) {
    const at = 16 + 32 * i;
    const entry: RegionEntry = {
      guid: Buffer.from(bytes.subarray(at, at + 16)),
      fileOffset: 0,
      length: bytes.readUInt32LE(at + 24),
      required: (bytes.readUInt32LE(at + 28) & 1) !== 0,
    };
    const name = entry.guid.equals(BAT_REGION) ? 'BAT region' : entry.guid.equals(METADATA_REGION) ? 'metadata region' : `region ${guidText(entry.guid)}`;
    const offset = bytes.readBigUInt64LE(at + 16);
    if (offset > BigInt(Number.MAX_SAFE_INTEGER)) return `${where}: ${name} offset ${offset} is above 2^53`;
    entry.fileOffset = Number(offset);
    if (entry.fileOffset < HEADER_SECTION_BYTES || entry.fileOffset % MiB !== 0) {
      return `${where}: ${name} offset ${entry.fileOffset} is not a multiple of 1 MiB at or after 1 MiB`;
    }
    if (entry.length === 0 || entry.length % MiB !== 0) return `${where}: ${name} length ${entry.length} is not a non-zero multiple of 1 MiB`;
    if (entry.fileOffset + entry.length > fileSize) {
      return `${where}: ${name} (${entry.length} bytes at ${entry.fileOffset}) ends past the end of the file (${fileSize} bytes)`;
    }
    const overlap = seen.find((other) => entry.fileOffset < other.fileOffset + other.length && other.fileOffset < entry.fileOffset + entry.length);
    if (overlap) return `${where}: ${name} (${entry.length} bytes at ${entry.fileOffset}) overlaps another region at ${overlap.fileOffset}`;
    seen.push(entry);
    if (entry.guid.equals(BAT_REGION)) {
      if (bat) return `${where}: two BAT regions`;
      bat = entry;
    } else if (entry.guid.equals(METADATA_REGION)) {
      if (metadata) return `${where}: two metadata regions`;
      metadata = entry;
    } else if (entry.required) {
      throw new UnsupportedFeatureError(`${path}: ${where}: required ${name} is not known, so the image cannot be read`);
    }
  }
  if (!bat) return `${where}: no BAT region`;
  if (!metadata) return `${where}: no metadata region`;
  return { bat, metadata };
}

/** The region table: the first copy, or the second when the first is damaged. */
export function parseRegionTables(first: Buffer, second: Buffer, fileSize: number, path: string): RegionTable {
  const one = parseOneRegionTable(first, 0, fileSize, path);
  if (typeof one !== 'string') return one;
  const two = parseOneRegionTable(second, 1, fileSize, path);
  if (typeof two !== 'string') return two;
  throw new CorruptImageError(`${path}: no valid VHDX region table: ${one}; ${two}`);
}

/** Checks that the log does not overlap the BAT or metadata regions. */
export function checkLayout(header: VhdxHeader, regions: RegionTable, path: string): void {
  if (header.logLength === 0) return;
  for (const [name, region] of [['BAT region', regions.bat], ['metadata region', regions.metadata]] as const) {
    if (header.logOffset < region.fileOffset + region.length && region.fileOffset < header.logOffset + header.logLength) {
      throw new CorruptImageError(`${path}: the log (${header.logLength} bytes at ${header.logOffset}) overlaps the ${name} (${region.length} bytes at ${region.fileOffset})`);
    }
  }
}

/** The 4 KiB on-disk form of `header` (signature, CRC-32C, fields; the rest zeros). */
export function serializeHeader(header: VhdxHeader): Buffer {
  const bytes = Buffer.alloc(HEADER_BYTES);
  bytes.writeUInt32LE(HEADER_SIGNATURE, 0);
  bytes.writeBigUInt64LE(header.sequenceNumber, 8);
  header.fileWriteGuid.copy(bytes, 16);
  header.dataWriteGuid.copy(bytes, 32);
  header.logGuid.copy(bytes, 48);
  bytes.writeUInt16LE(header.logVersion, 64);
  bytes.writeUInt16LE(header.version, 66);
  bytes.writeUInt32LE(header.logLength, 68);
  bytes.writeBigUInt64LE(BigInt(header.logOffset), 72);
  bytes.writeUInt32LE(vhdxChecksum(bytes, 4), 4);
  return bytes;
}

/** A random GUID in on-disk byte order (version 4: the byte order does not matter for randomness). */
export function newGuid(): Buffer {
  return guid(randomUUID());
}

/** The 64 KiB region table naming the BAT and the metadata region (both marked required, as the specification says). */
export function serializeRegionTable(bat: { fileOffset: number; length: number }, metadata: { fileOffset: number; length: number }): Buffer {
  const bytes = Buffer.alloc(REGION_TABLE_BYTES);
  bytes.writeUInt32LE(REGION_SIGNATURE, 0);
  bytes.writeUInt32LE(2, 8);
  [[BAT_REGION, bat], [METADATA_REGION, metadata]].forEach(([id, region], i) => {
    const at = 16 + 32 * i;
    (id as Buffer).copy(bytes, at);
    const { fileOffset, length } = region as { fileOffset: number; length: number };
    bytes.writeBigUInt64LE(BigInt(fileOffset), at + 16);
    bytes.writeUInt32LE(length, at + 24);
    bytes.writeUInt32LE(1, at + 28);
  });
  bytes.writeUInt32LE(vhdxChecksum(bytes, 4), 4);
  return bytes;
}
