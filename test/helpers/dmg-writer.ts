/**
 * A DMG (UDIF) writer for the tests, built from the format's description
 * (the koly trailer, the XML property list's resource-fork / blkx entries and
 * their base64 mish blocks), not from the reader in src/formats/dmg: nothing
 * on Linux creates DMGs, so the tests make them here and check them against
 * dmg2img and qemu-img.
 *
 * The layout it writes, as hdiutil does: the data fork (every chunk's stored
 * bytes, in order) from `dataForkOffset`, then the XML property list, then the
 * 512-byte trailer. Each partition is one blkx entry (one mish block) whose
 * chunks follow each other; its sectors follow the previous partition's
 * unless `firstSector` says otherwise. Chunk offsets are written relative to
 * the data fork with a mish data offset of 0, and each partition ends with a
 * terminator chunk whose offset is the end of its data (dmg2img, which
 * ignores the mish data offset, needs both).
 *
 * Compression: zlib by node:zlib, bzip2 by the bzip2 command (Debian's
 * bzip2), ADC by the small greedy encoder below (literal, short and long
 * copy phrases, from the same description the reader was written from).
 */
import { execFileSync } from 'node:child_process';
import { deflateSync } from 'node:zlib';
import { seededRandom } from './random.js';

export const SECTOR = 512;

export type DmgChunkSpec =
  | { type: 'zero' | 'ignore'; sectors: number }
  | { type: 'raw' | 'zlib' | 'bzip2' | 'adc'; data: Buffer }
  | { type: 'comment' };

export interface DmgPartitionSpec {
  name: string;
  chunks: DmgChunkSpec[];
  /** The partition's first sector; default: right after the previous one. */
  firstSector?: number;
}

export interface DmgOptions {
  /** Bytes before the data fork (zeros); default 0. */
  dataForkOffset?: number;
  /** Virtual size in sectors; default: the end of the last partition. */
  sectorCount?: number;
  /** Changes a partition's mish block (decoded) before it is base64-encoded. */
  mutateMish?: (partition: number, mish: Buffer) => void;
  /** Replaces the XML property list. */
  mutateXml?: (xml: string) => string;
  /**
   * Also write the chunk tables as a binary resource fork (after the XML), or
   * ('only') instead of the XML property list, as UDIF images before it had.
   */
  resourceFork?: 'both' | 'only';
  /** Changes the resource fork before it is written. */
  mutateResourceFork?: (fork: Buffer) => void;
}

/** Where each chunk went, for the tests' expectations. */
export interface WrittenChunk {
  type: DmgChunkSpec['type'];
  guestOffset: number;
  guestLength: number;
  /** Absolute offset of its stored bytes in the image file. */
  hostOffset: number;
  hostLength: number;
}

export interface WrittenDmg {
  image: Buffer;
  /** The guest content: what a reader must show (zeros where no chunk is). */
  content: Buffer;
  chunks: WrittenChunk[];
  xmlOffset: number;
  xmlLength: number;
  forkOffset: number;
  forkLength: number;
  trailerOffset: number;
}

const TYPE_CODES: Record<DmgChunkSpec['type'], number> = {
  zero: 0x00000000,
  raw: 0x00000001,
  ignore: 0x00000002,
  adc: 0x80000004,
  zlib: 0x80000005,
  bzip2: 0x80000006,
  comment: 0x7ffffffe,
};
const TERMINATOR = 0xffffffff;

function sectorsOf(chunk: DmgChunkSpec): number {
  if (chunk.type === 'comment') return 0;
  if (!('data' in chunk)) return chunk.sectors;
  if (chunk.data.length % SECTOR !== 0) throw new Error(`a ${chunk.type} chunk's data must be whole sectors, not ${chunk.data.length} bytes`);
  return chunk.data.length / SECTOR;
}

function stored(chunk: DmgChunkSpec): Buffer {
  switch (chunk.type) {
    case 'raw':
      return chunk.data;
    case 'zlib':
      return deflateSync(chunk.data);
    case 'bzip2':
      return execFileSync('bzip2', ['-c', '-9'], { input: chunk.data, maxBuffer: 256 * 1024 * 1024 });
    case 'adc':
      return encodeAdc(chunk.data);
    default:
      return Buffer.alloc(0);
  }
}

/** Builds a DMG of `partitions`. */
export function buildDmg(partitions: readonly DmgPartitionSpec[], options: DmgOptions = {}): WrittenDmg {
  const dataForkOffset = options.dataForkOffset ?? 0;
  const parts: Buffer[] = [Buffer.alloc(dataForkOffset)];
  let dataEnd = 0; // relative to the data fork
  let nextSector = 0;
  const written: WrittenChunk[] = [];
  const mishes: Buffer[] = [];
  for (const [p, partition] of partitions.entries()) {
    const first = partition.firstSector ?? nextSector;
    const entries: Buffer[] = [];
    let sector = 0;
    for (const chunk of partition.chunks) {
      const bytes = stored(chunk);
      const sectors = sectorsOf(chunk);
      const entry = Buffer.alloc(40);
      entry.writeUInt32BE(TYPE_CODES[chunk.type], 0);
      entry.writeBigUInt64BE(BigInt(sector), 8);
      entry.writeBigUInt64BE(BigInt(sectors), 16);
      entry.writeBigUInt64BE(BigInt(dataEnd), 24);
      entry.writeBigUInt64BE(BigInt(bytes.length), 32);
      entries.push(entry);
      written.push({ type: chunk.type, guestOffset: (first + sector) * SECTOR, guestLength: sectors * SECTOR, hostOffset: dataForkOffset + dataEnd, hostLength: bytes.length });
      parts.push(bytes);
      dataEnd += bytes.length;
      sector += sectors;
    }
    const terminator = Buffer.alloc(40);
    terminator.writeUInt32BE(TERMINATOR, 0);
    terminator.writeBigUInt64BE(BigInt(sector), 8);
    terminator.writeBigUInt64BE(BigInt(dataEnd), 24);
    entries.push(terminator);
    const mish = Buffer.alloc(0xcc + 40 * entries.length);
    mish.write('mish', 0, 'latin1');
    mish.writeUInt32BE(1, 4); // version
    mish.writeBigUInt64BE(BigInt(first), 8);
    mish.writeBigUInt64BE(BigInt(sector), 0x10);
    mish.writeBigUInt64BE(0n, 0x18); // data offset
    mish.writeUInt32BE(0x208, 0x20); // buffers needed
    mish.writeUInt32BE(p, 0x24); // block descriptor
    mish.writeUInt32BE(entries.length, 0xc8);
    Buffer.concat(entries).copy(mish, 0xcc);
    options.mutateMish?.(p, mish);
    mishes.push(mish);
    nextSector = first + sector;
  }
  const sectorCount = options.sectorCount ?? nextSector;
  const content = Buffer.alloc(sectorCount * SECTOR);
  let c = 0;
  for (const partition of partitions) {
    for (const chunk of partition.chunks) {
      const at = written[c++]!.guestOffset;
      if ('data' in chunk) chunk.data.copy(content, at);
    }
  }
  let xml = plistXml(partitions.map((partition, i) => ({ name: partition.name, mish: mishes[i]! })));
  if (options.mutateXml) xml = options.mutateXml(xml);
  const xmlBytes = options.resourceFork === 'only' ? Buffer.alloc(0) : Buffer.from(xml, 'utf8');
  const xmlOffset = dataForkOffset + dataEnd;
  const fork = options.resourceFork ? resourceFork(mishes) : Buffer.alloc(0);
  options.mutateResourceFork?.(fork);
  const forkOffset = xmlOffset + xmlBytes.length;
  const trailerOffset = forkOffset + fork.length;
  const koly = Buffer.alloc(512);
  koly.write('koly', 0, 'latin1');
  koly.writeUInt32BE(4, 0x04); // version
  koly.writeUInt32BE(512, 0x08); // header size
  koly.writeUInt32BE(1, 0x0c); // flags: flattened
  koly.writeBigUInt64BE(BigInt(dataForkOffset), 0x18);
  koly.writeBigUInt64BE(BigInt(dataEnd), 0x20);
  if (fork.length > 0) {
    koly.writeBigUInt64BE(BigInt(forkOffset), 0x28);
    koly.writeBigUInt64BE(BigInt(fork.length), 0x30);
  }
  koly.writeUInt32BE(1, 0x38); // segment number
  koly.writeUInt32BE(1, 0x3c); // segment count
  if (xmlBytes.length > 0) {
    koly.writeBigUInt64BE(BigInt(xmlOffset), 0xd8);
    koly.writeBigUInt64BE(BigInt(xmlBytes.length), 0xe0);
  }
  koly.writeUInt32BE(1, 0x1e8); // image variant: device
  koly.writeBigUInt64BE(BigInt(sectorCount), 0x1ec);
  const image = Buffer.concat([...parts, xmlBytes, fork, koly]);
  return { image, content, chunks: written, xmlOffset, xmlLength: xmlBytes.length, forkOffset, forkLength: fork.length, trailerOffset };
}

/**
 * A classic resource fork holding the mish blocks as its resources: the
 * 16-byte header (data offset, map offset, data length, map length) in a
 * 256-byte header area, the data (each resource: a 32-bit length, then its
 * bytes), then a minimal resource map (its header only: no types listed,
 * which the readers of DMGs never look at).
 */
function resourceFork(mishes: readonly Buffer[]): Buffer {
  const data = Buffer.concat(mishes.flatMap((mish) => [u32(mish.length), mish]));
  const map = Buffer.alloc(30);
  map.writeUInt16BE(28, 24); // offset of the type list
  map.writeUInt16BE(30, 26); // offset of the name list
  map.writeUInt16BE(0xffff, 28); // number of types - 1: none
  const header = Buffer.alloc(256);
  header.writeUInt32BE(256, 0);
  header.writeUInt32BE(256 + data.length, 4);
  header.writeUInt32BE(data.length, 8);
  header.writeUInt32BE(map.length, 12);
  header.copy(map, 0, 0, 16);
  return Buffer.concat([header, data, map]);
}

function u32(value: number): Buffer {
  const out = Buffer.alloc(4);
  out.writeUInt32BE(value);
  return out;
}

function escape(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/** The property list as hdiutil lays it out: Attributes, CFName, Data, ID, Name per blkx entry (dmg2img looks for Name after Data). */
function plistXml(entries: readonly { name: string; mish: Buffer }[]): string {
  const lines = [
    '<?xml version="1.0" encoding="UTF-8"?>',
    '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">',
    '<plist version="1.0">',
    '<dict>',
    '\t<key>resource-fork</key>',
    '\t<dict>',
    '\t\t<key>blkx</key>',
    '\t\t<array>',
  ];
  for (const [i, entry] of entries.entries()) {
    const base64 = entry.mish.toString('base64').match(/.{1,52}/g) ?? [];
    lines.push(
      '\t\t\t<dict>',
      '\t\t\t\t<key>Attributes</key>',
      '\t\t\t\t<string>0x0050</string>',
      '\t\t\t\t<key>CFName</key>',
      `\t\t\t\t<string>${escape(entry.name)}</string>`,
      '\t\t\t\t<key>Data</key>',
      '\t\t\t\t<data>',
      ...base64.map((line) => `\t\t\t\t${line}`),
      '\t\t\t\t</data>',
      '\t\t\t\t<key>ID</key>',
      `\t\t\t\t<string>${i - 1}</string>`,
      '\t\t\t\t<key>Name</key>',
      `\t\t\t\t<string>${escape(entry.name)}</string>`,
      '\t\t\t</dict>',
    );
  }
  lines.push('\t\t</array>', '\t</dict>', '</dict>', '</plist>', '');
  return lines.join('\n');
}

/**
 * A greedy ADC encoder: at each position the longest earlier match (at least
 * 3 bytes, within 65536 bytes back) found through a hash of the next 3 bytes
 * becomes a copy phrase (short when length <= 18 and distance <= 1024, long
 * otherwise, up to 67 bytes); other bytes gather into literal phrases of up
 * to 128 bytes.
 */
export function encodeAdc(data: Buffer): Buffer {
  const out: number[] = [];
  const last = new Map<number, number[]>();
  let literal: number[] = [];
  const flush = () => {
    for (let i = 0; i < literal.length; i += 128) {
      const part = literal.slice(i, i + 128);
      out.push(0x80 | (part.length - 1), ...part);
    }
    literal = [];
  };
  const hash = (at: number) => (data[at]! << 16) | (data[at + 1]! << 8) | data[at + 2]!;
  let pos = 0;
  while (pos < data.length) {
    let bestLength = 0;
    let bestDistance = 0;
    if (pos + 3 <= data.length) {
      const candidates = last.get(hash(pos)) ?? [];
      for (let k = candidates.length - 1; k >= 0 && k >= candidates.length - 16; k--) {
        const from = candidates[k]!;
        const distance = pos - from;
        if (distance > 65536) break;
        let length = 0;
        while (length < 67 && pos + length < data.length && data[from + length] === data[pos + length]) length++;
        if (length > bestLength) {
          bestLength = length;
          bestDistance = distance;
        }
      }
    }
    const d = bestDistance - 1;
    // a short copy takes 3..18 bytes from up to 1024 back, a long one 4..67 bytes from up to 65536 back
    const usable = (bestLength >= 3 && d < 1024) || bestLength >= 4;
    const step = usable ? bestLength : 1;
    if (usable) {
      flush();
      if (bestLength <= 18 && d < 1024) out.push(((bestLength - 3) << 2) | (d >> 8), d & 0xff);
      else out.push(0x40 | (bestLength - 4), d >> 8, d & 0xff);
    } else {
      literal.push(data[pos]!);
    }
    for (let i = pos; i < pos + step && i + 3 <= data.length; i++) {
      const key = hash(i);
      const list = last.get(key);
      if (list) {
        list.push(i);
        if (list.length > 64) list.splice(0, list.length - 16);
      } else last.set(key, [i]);
    }
    pos += step;
  }
  flush();
  return Buffer.from(out);
}

const TEXT = Buffer.from('UDIF chunk text: the quick brown fox jumps over the lazy dog, 0123456789.\n', 'latin1');

/** Seeded content that compresses partly: runs (512 B .. 64 KiB) of random bytes, text, zeros, and text with random bytes sprinkled in. */
export function sampleContent(size: number, seed: number): Buffer {
  const random = seededRandom(seed);
  const out = Buffer.alloc(size);
  for (let offset = 0; offset < size; ) {
    const kind = random.int(0, 3);
    const length = Math.min(size - offset, random.int(512, 64 * 1024));
    const part = out.subarray(offset, offset + length);
    if (kind === 0) random.fill(part);
    else if (kind !== 2) {
      for (let i = 0; i < length; i++) part[i] = TEXT[(offset + i) % TEXT.length]!;
      if (kind === 3) for (let i = random.int(0, 63); i < length; i += random.int(1, 200)) part[i] = random.int(0, 255);
    }
    offset += length;
  }
  return out;
}
