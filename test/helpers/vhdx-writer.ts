/**
 * A VHDX writer for tests, written from the specification (MS-VHDX), for what
 * qemu 7.2 cannot make: differencing images (parent locator, partially
 * present blocks with sector bitmaps), 4096-byte logical sectors, every block
 * state, and images whose log holds entries still to be replayed. It shares
 * no code with src/formats/vhdx (its own CRC-32C use and its own layout).
 *
 * Layout: identifier, headers, region tables in the first MiB; the log at
 * 1 MiB; the metadata region at 1 MiB + log size; the BAT after it; then
 * payload blocks and sector bitmaps in the order they are listed.
 */
import { crc32c } from '@node-rs/crc32';
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';

const KiB = 1024;
const MiB = 1024 * KiB;

export const STATE = { NOT_PRESENT: 0, UNDEFINED: 1, ZERO: 2, UNMAPPED: 3, FULLY_PRESENT: 6, PARTIALLY_PRESENT: 7 } as const;

export interface BlockSpec {
  state: number;
  /** The block's bytes in the file (FULLY/PARTIALLY_PRESENT); shorter is zero-padded. */
  data?: Buffer;
  /** PARTIALLY_PRESENT: which logical sectors of the block are in this file. */
  present?: (sector: number) => boolean;
  /** Put the block's BAT entry in the log only: on disk it stays NOT_PRESENT. */
  logged?: boolean;
}

export interface ParentSpec {
  /** The parent's DataWriteGuid as text. */
  linkage: string;
  relativePath?: string;
  absoluteWin32Path?: string;
  volumePath?: string;
}

export interface LogSpec {
  /** Where the first entry starts in the log (a multiple of 4096), so a sequence can wrap around its end. */
  start?: number;
  /** How many entries the logged sectors are spread over. */
  entries?: number;
  /** A stale valid-looking entry of an older sequence placed at this log offset (must be replayed never). */
  staleAt?: number;
  /** Zeros a log entry writes over part of a present block: [block, offset in block, length], 4 KiB aligned. */
  zero?: [number, number, number];
}

export interface VhdxSpec {
  virtualSize: number;
  blockSize: number;
  logicalSectorSize?: 512 | 4096;
  physicalSectorSize?: 512 | 4096;
  fixed?: boolean;
  parent?: ParentSpec;
  blocks: Map<number, BlockSpec>;
  log?: LogSpec;
  logSize?: number;
}

export interface WrittenVhdx {
  dataWriteGuid: string;
  /** File offset of each allocated payload block. */
  blockOffsets: Map<number, number>;
  /** The file's bytes as they are after the log is replayed, with an empty log (a clean image qemu reads). */
  replayed: Buffer;
}

/** GUID text to on-disk bytes. */
export function guidBytes(text: string): Buffer {
  const b = Buffer.from(text.replace(/[-{}]/g, ''), 'hex');
  b.subarray(0, 4).reverse();
  b.subarray(4, 6).reverse();
  b.subarray(6, 8).reverse();
  return b;
}

export function randomGuid(): string {
  const h = randomBytes(16).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Stores CRC-32C of `buf` (checksum field zeroed) at `at`. */
export function sealChecksum(buf: Buffer, at: number): void {
  buf.writeUInt32LE(0, at);
  buf.writeUInt32LE(crc32c(buf) >>> 0, at);
}

const GUIDS = {
  bat: '2DC27766-F623-4200-9D64-115E9BFD4A08',
  metadata: '8B7CA206-4790-4B9A-B8FE-575F050F886E',
  fileParameters: 'CAA16737-FA36-4D43-B3B6-33F0AA44E76B',
  virtualDiskSize: '2FA54224-CD1B-4876-B211-5DBED83BF4B8',
  page83: 'BECA12AB-B2E6-4523-93EF-C309E000C746',
  logicalSector: '8141BF1D-A96F-4709-BA47-F233A8FAAB5F',
  physicalSector: 'CDA348C7-445D-4471-9CC9-E9885251C556',
  parentLocator: 'A8D35F2D-B30B-454D-ABF7-D3D84834AB0C',
  vhdxParentType: 'B04AEFB7-D19E-4A81-B789-25B8E9445913',
};

export const LAYOUT = { header1: 64 * KiB, header2: 128 * KiB, region1: 192 * KiB, region2: 256 * KiB, log: MiB };

function header(seq: bigint, dataWriteGuid: string, logGuid: Buffer, logSize: number): Buffer {
  const h = Buffer.alloc(4 * KiB);
  h.write('head', 0, 'latin1');
  h.writeBigUInt64LE(seq, 8);
  guidBytes(randomGuid()).copy(h, 16);
  guidBytes(dataWriteGuid).copy(h, 32);
  logGuid.copy(h, 48);
  h.writeUInt16LE(0, 64);
  h.writeUInt16LE(1, 66);
  h.writeUInt32LE(logSize, 68);
  h.writeBigUInt64LE(BigInt(LAYOUT.log), 72);
  sealChecksum(h, 4);
  return h;
}

function parentLocator(parent: ParentSpec): Buffer {
  const pairs: Array<[string, string]> = [['parent_linkage', `{${parent.linkage}}`]];
  if (parent.relativePath !== undefined) pairs.push(['relative_path', parent.relativePath]);
  if (parent.volumePath !== undefined) pairs.push(['volume_path', parent.volumePath]);
  if (parent.absoluteWin32Path !== undefined) pairs.push(['absolute_win32_path', parent.absoluteWin32Path]);
  const strings: Buffer[] = [];
  const table = Buffer.alloc(20 + 12 * pairs.length);
  guidBytes(GUIDS.vhdxParentType).copy(table, 0);
  table.writeUInt16LE(pairs.length, 18);
  let at = table.length;
  pairs.forEach(([key, value], i) => {
    const k = Buffer.from(key, 'utf16le');
    const v = Buffer.from(value, 'utf16le');
    table.writeUInt32LE(at, 20 + 12 * i);
    table.writeUInt32LE(at + k.length, 24 + 12 * i);
    table.writeUInt16LE(k.length, 28 + 12 * i);
    table.writeUInt16LE(v.length, 30 + 12 * i);
    strings.push(k, v);
    at += k.length + v.length;
  });
  return Buffer.concat([table, ...strings]);
}

/** One log entry of 4 KiB data writes (and zero ranges) with sequence `seq`. */
export function logEntry(
  seq: bigint, logGuid: Buffer, tail: number, fileSize: number,
  writes: Array<{ offset: number; data: Buffer }>, zeros: Array<{ offset: number; length: number }> = [],
): Buffer {
  const count = writes.length + zeros.length;
  const descSectors = Math.ceil((count + 2) / 128);
  const entry = Buffer.alloc((descSectors + writes.length) * 4 * KiB);
  entry.write('loge', 0, 'latin1');
  entry.writeUInt32LE(entry.length, 8);
  entry.writeUInt32LE(tail, 12);
  entry.writeBigUInt64LE(seq, 16);
  entry.writeUInt32LE(count, 24);
  logGuid.copy(entry, 32);
  entry.writeBigUInt64LE(BigInt(fileSize), 48);
  entry.writeBigUInt64LE(BigInt(fileSize), 56);
  let d = 64;
  for (const zero of zeros) {
    entry.write('zero', d, 'latin1');
    entry.writeBigUInt64LE(BigInt(zero.length), d + 8);
    entry.writeBigUInt64LE(BigInt(zero.offset), d + 16);
    entry.writeBigUInt64LE(seq, d + 24);
    d += 32;
  }
  writes.forEach((write, i) => {
    entry.write('desc', d, 'latin1');
    write.data.copy(entry, d + 4, 4092, 4096);
    write.data.copy(entry, d + 8, 0, 8);
    entry.writeBigUInt64LE(BigInt(write.offset), d + 16);
    entry.writeBigUInt64LE(seq, d + 24);
    d += 32;
    const s = (descSectors + i) * 4 * KiB;
    entry.write('data', s, 'latin1');
    entry.writeUInt32LE(Number(seq >> 32n), s + 4);
    write.data.copy(entry, s + 8, 8, 4092);
    entry.writeUInt32LE(Number(seq & 0xffffffffn), s + 4092);
  });
  sealChecksum(entry, 4);
  return entry;
}

/** Writes the image described by `spec` to `path`. */
export async function writeVhdx(path: string, spec: VhdxSpec): Promise<WrittenVhdx> {
  const sector = spec.logicalSectorSize ?? 512;
  const { blockSize, virtualSize } = spec;
  const logSize = spec.logSize ?? MiB;
  const chunkRatio = ((1 << 23) * sector) / blockSize;
  const payloadBlocks = Math.ceil(virtualSize / blockSize);
  const bitmapBlocks = Math.ceil(payloadBlocks / chunkRatio);
  const batEntries = spec.parent ? bitmapBlocks * (chunkRatio + 1) : payloadBlocks + Math.floor((payloadBlocks - 1) / chunkRatio);
  const metadataOffset = LAYOUT.log + logSize;
  const batOffset = metadataOffset + MiB;
  const batLength = Math.ceil((batEntries * 8) / MiB) * MiB;
  let next = batOffset + batLength;
  const dataWriteGuid = randomGuid();

  const parts: Array<{ offset: number; data: Buffer }> = [];
  const identifier = Buffer.alloc(64 * KiB);
  identifier.write('vhdxfile', 0, 'latin1');
  identifier.write('imgmount test writer', 8, 'utf16le');
  parts.push({ offset: 0, data: identifier });

  const regions = Buffer.alloc(64 * KiB);
  regions.write('regi', 0, 'latin1');
  regions.writeUInt32LE(2, 8);
  guidBytes(GUIDS.bat).copy(regions, 16);
  regions.writeBigUInt64LE(BigInt(batOffset), 32);
  regions.writeUInt32LE(batLength, 40);
  regions.writeUInt32LE(1, 44);
  guidBytes(GUIDS.metadata).copy(regions, 48);
  regions.writeBigUInt64LE(BigInt(metadataOffset), 64);
  regions.writeUInt32LE(MiB, 72);
  regions.writeUInt32LE(1, 76);
  sealChecksum(regions, 4);
  parts.push({ offset: LAYOUT.region1, data: regions }, { offset: LAYOUT.region2, data: Buffer.from(regions) });

  const metadata = Buffer.alloc(MiB);
  metadata.write('metadata', 0, 'latin1');
  const items: Array<[string, Buffer, number]> = [];
  const u32 = (v: number) => { const b = Buffer.alloc(4); b.writeUInt32LE(v); return b; };
  const params = Buffer.alloc(8);
  params.writeUInt32LE(blockSize, 0);
  params.writeUInt32LE((spec.fixed ? 1 : 0) | (spec.parent ? 2 : 0), 4);
  const size = Buffer.alloc(8);
  size.writeBigUInt64LE(BigInt(virtualSize));
  items.push([GUIDS.fileParameters, params, 4], [GUIDS.virtualDiskSize, size, 6], [GUIDS.page83, guidBytes(randomGuid()), 6]);
  items.push([GUIDS.logicalSector, u32(sector), 6], [GUIDS.physicalSector, u32(spec.physicalSectorSize ?? 4096), 6]);
  if (spec.parent) items.push([GUIDS.parentLocator, parentLocator(spec.parent), 4]);
  metadata.writeUInt16LE(items.length, 10);
  let itemAt = 64 * KiB;
  items.forEach(([id, data, flags], i) => {
    guidBytes(id).copy(metadata, 32 + 32 * i);
    metadata.writeUInt32LE(itemAt, 48 + 32 * i);
    metadata.writeUInt32LE(data.length, 52 + 32 * i);
    metadata.writeUInt32LE(flags, 56 + 32 * i);
    data.copy(metadata, itemAt);
    itemAt += Math.ceil(data.length / 4096) * 4096;
  });
  parts.push({ offset: metadataOffset, data: metadata });

  const bat = Buffer.alloc(batLength);
  const batBefore = Buffer.alloc(batLength);
  const blockOffsets = new Map<number, number>();
  const bitmaps = new Map<number, { offset: number; data: Buffer }>();
  for (const [block, b] of [...spec.blocks].sort((x, y) => x[0] - y[0])) {
    let entry = BigInt(b.state);
    if (b.state === STATE.FULLY_PRESENT || b.state === STATE.PARTIALLY_PRESENT) {
      const offset = next;
      next += blockSize;
      blockOffsets.set(block, offset);
      entry |= BigInt(offset);
      const data = Buffer.alloc(blockSize);
      b.data?.copy(data);
      parts.push({ offset, data });
      if (b.state === STATE.PARTIALLY_PRESENT) {
        const chunk = Math.floor(block / chunkRatio);
        let bitmap = bitmaps.get(chunk);
        if (!bitmap) {
          bitmap = { offset: next, data: Buffer.alloc(MiB) };
          next += MiB;
          bitmaps.set(chunk, bitmap);
          parts.push(bitmap);
          const sbEntry = BigInt(bitmap.offset) | 6n;
          bat.writeBigUInt64LE(sbEntry, 8 * (chunk * (chunkRatio + 1) + chunkRatio));
          batBefore.writeBigUInt64LE(sbEntry, 8 * (chunk * (chunkRatio + 1) + chunkRatio));
        }
        const sectorsPerBlock = blockSize / sector;
        for (let s = 0; s < sectorsPerBlock; s++) {
          if (!b.present!(s)) continue;
          const bit = (block % chunkRatio) * sectorsPerBlock + s;
          bitmap.data[bit >> 3]! |= 1 << (bit & 7);
        }
      }
    }
    const index = block + Math.floor(block / chunkRatio);
    bat.writeBigUInt64LE(entry, 8 * index);
    if (!b.logged) batBefore.writeBigUInt64LE(entry, 8 * index);
  }
  const fileSize = next;
  const file = Buffer.alloc(fileSize);
  for (const part of parts) part.data.copy(file, part.offset);
  bat.copy(file, batOffset);
  const replayed = Buffer.from(file);

  let logGuid = Buffer.alloc(16);
  if (spec.log) {
    logGuid = guidBytes(randomGuid());
    batBefore.copy(file, batOffset);
    const writes: Array<{ offset: number; data: Buffer }> = [];
    for (let at = 0; at < batLength; at += 4096) {
      if (!bat.subarray(at, at + 4096).equals(batBefore.subarray(at, at + 4096))) writes.push({ offset: batOffset + at, data: Buffer.from(bat.subarray(at, at + 4096)) });
    }
    const zeros: Array<{ offset: number; length: number }> = [];
    if (spec.log.zero) {
      const [block, within, length] = spec.log.zero;
      const offset = blockOffsets.get(block)! + within;
      zeros.push({ offset, length });
      replayed.fill(0, offset, offset + length);
    }
    const count = Math.max(1, spec.log.entries ?? 1);
    const per = Math.ceil(writes.length / count);
    const start = spec.log.start ?? 0;
    let position = start;
    const log = Buffer.alloc(logSize);
    const put = (entry: Buffer, at: number) => {
      for (let i = 0; i < entry.length; i++) log[(at + i) % logSize] = entry[i]!;
    };
    if (spec.log.staleAt !== undefined) {
      // An older sequence with the same log GUID: zeros over block data it must never be applied.
      const junk = Buffer.alloc(4096, 0x5a);
      put(logEntry(1n, logGuid, spec.log.staleAt, fileSize, [{ offset: batOffset, data: junk }]), spec.log.staleAt);
    }
    for (let i = 0; i < count; i++) {
      const entry = logEntry(BigInt(100 + i), logGuid, start, fileSize, writes.slice(i * per, (i + 1) * per), i === count - 1 ? zeros : []);
      put(entry, position);
      position = (position + entry.length) % logSize;
    }
    log.copy(file, LAYOUT.log);
  }
  header(1n, dataWriteGuid, logGuid, logSize).copy(file, LAYOUT.header1);
  header(2n, dataWriteGuid, logGuid, logSize).copy(file, LAYOUT.header2);
  header(1n, dataWriteGuid, Buffer.alloc(16), logSize).copy(replayed, LAYOUT.header1);
  header(2n, dataWriteGuid, Buffer.alloc(16), logSize).copy(replayed, LAYOUT.header2);
  await writeFile(path, file);
  return { dataWriteGuid, blockOffsets, replayed };
}

/** The DataWriteGuid of the current header of a VHDX file (made by anyone): the parent_linkage a child needs. */
export function currentDataWriteGuid(file: Buffer): string {
  const pick = [LAYOUT.header1, LAYOUT.header2]
    .map((at) => file.subarray(at, at + 4096))
    .filter((h) => h.toString('latin1', 0, 4) === 'head')
    .sort((a, b) => (b.readBigUInt64LE(8) > a.readBigUInt64LE(8) ? 1 : -1))[0]!;
  const g = Buffer.from(pick.subarray(32, 48));
  g.subarray(0, 4).reverse();
  g.subarray(4, 6).reverse();
  g.subarray(6, 8).reverse();
  const h = g.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
