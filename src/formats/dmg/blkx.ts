/**
 * The chunk table of a DMG: the XML property list's resource-fork / blkx
 * entries, each a base64 "mish" block (BLKXTable) listing chunks. Parsing and
 * validation into one table sorted by guest sector, with qemu's bounds
 * (block/dmg.c) and more: every chunk inside the virtual disk and its bytes
 * inside the file before the trailer, no two chunks overlapping, raw chunks
 * as long as the sectors they cover. Pure functions over bytes already read;
 * no I/O, no state.
 *
 * mish block (big-endian): 0 "mish", 4 version, 8 first sector (u64),
 * 0x10 sector count (u64), 0x18 data offset (u64), 0x20 buffers needed,
 * 0x24 block descriptors, 0x28 reserved (24), 0x40 checksum (136),
 * 0xc8 chunk count (u32), 0xcc chunks of 40 bytes: type (u32), comment (u32),
 * sector (u64), sector count (u64), compressed offset (u64), compressed length (u64).
 * A chunk's sectors count from the block's first sector; its bytes from the
 * data fork offset + the block's data offset.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';
import { parsePlistXml } from './plist.js';
import { SECTOR_BYTES, type Trailer } from './trailer.js';

export const CHUNK_ZERO = 0x00000000;
export const CHUNK_RAW = 0x00000001;
export const CHUNK_IGNORE = 0x00000002;
export const CHUNK_ADC = 0x80000004;
export const CHUNK_ZLIB = 0x80000005;
export const CHUNK_BZIP2 = 0x80000006;
export const CHUNK_LZFSE = 0x80000007;
export const CHUNK_LZMA = 0x80000008;
export const CHUNK_COMMENT = 0x7ffffffe;
export const CHUNK_TERMINATOR = 0xffffffff;

/** qemu's caps (DMG_LENGTHS_MAX, DMG_SECTORCOUNTS_MAX): 64 MiB stored, 64 MiB decoded for chunks that are not zeros. */
export const MAX_CHUNK_BYTES = 64 * 1024 * 1024;
export const MAX_CHUNK_SECTORS = MAX_CHUNK_BYTES / SECTOR_BYTES;

const MISH_MAGIC = 0x6d697368;
const MISH_HEADER_BYTES = 0xcc;
const CHUNK_ENTRY_BYTES = 40;

export type ChunkKind = 'zero' | 'raw' | 'adc' | 'zlib' | 'bzip2';

export interface Chunk {
  kind: ChunkKind;
  /** Guest byte range [guestStart, guestStart + guestLength). */
  guestStart: number;
  guestLength: number;
  /** Where the stored bytes are (raw and compressed chunks). */
  hostOffset: number;
  hostLength: number;
  /** "blkx entry 2 chunk 5": names the chunk in messages. */
  where: string;
}

const NAMES: Record<number, string> = {
  [CHUNK_ZERO]: 'zero (UDZE)',
  [CHUNK_RAW]: 'raw (UDRW)',
  [CHUNK_IGNORE]: 'ignore (UDIG)',
  [CHUNK_ADC]: 'ADC (UDCO)',
  [CHUNK_ZLIB]: 'zlib (UDZO)',
  [CHUNK_BZIP2]: 'bzip2 (UDBZ)',
  [CHUNK_LZFSE]: 'lzfse (ULFO)',
  [CHUNK_LZMA]: 'lzma (ULMO)',
};

const KINDS: Record<number, ChunkKind> = {
  [CHUNK_ZERO]: 'zero',
  [CHUNK_IGNORE]: 'zero',
  [CHUNK_RAW]: 'raw',
  [CHUNK_ADC]: 'adc',
  [CHUNK_ZLIB]: 'zlib',
  [CHUNK_BZIP2]: 'bzip2',
};

/** The name of a chunk type for messages: 'zlib (UDZO)', or its number. */
export function chunkTypeName(type: number): string {
  return NAMES[type] ?? `0x${type.toString(16).padStart(8, '0')}`;
}

function fail(path: string, message: string): never {
  throw new CorruptImageError(`${path}: DMG ${message}`);
}

/** The blkx entries' mish blocks of the XML property list `xml`, in order, with their names. */
export function blkxBlocks(xml: Buffer, path: string): { name: string; data: Buffer }[] {
  let root: unknown;
  try {
    root = parsePlistXml(xml.toString('utf8'));
  } catch (error) {
    fail(path, `XML property list does not parse (${(error as Error).message.split('\n')[0]})`);
  }
  const fork = isDict(root) ? root['resource-fork'] : undefined;
  const blkx = isDict(fork) ? fork['blkx'] : undefined;
  if (!Array.isArray(blkx)) fail(path, 'XML property list has no resource-fork / blkx array: there is no chunk table');
  if (blkx.length === 0) fail(path, 'XML property list has an empty blkx array: there is no chunk table');
  return blkx.map((entry: unknown, i) => {
    const data = isDict(entry) ? entry['Data'] : undefined;
    if (!Buffer.isBuffer(data)) fail(path, `blkx entry ${i} has no Data`);
    const name = isDict(entry) && typeof entry['Name'] === 'string' ? entry['Name'] : '';
    return { name, data };
  });
}

function isDict(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && !Buffer.isBuffer(value);
}

/**
 * The chunk table of the blkx `blocks`, sorted by guest offset, comments,
 * terminators and empty chunks left out. Refuses (naming the entry, chunk,
 * field, value and the allowed range) whatever could make a read show bytes
 * that are not the image's.
 */
export function chunkTable(blocks: readonly { name: string; data: Buffer }[], trailer: Trailer, path: string): Chunk[] {
  const chunks: Chunk[] = [];
  const sectors = BigInt(trailer.sectorCount);
  const fileEnd = BigInt(trailer.trailerOffset);
  for (const [b, block] of blocks.entries()) {
    const { data } = block;
    const entry = `blkx entry ${b}${block.name ? ` (${JSON.stringify(block.name)})` : ''}`;
    if (data.length < MISH_HEADER_BYTES) fail(path, `${entry}: its Data is ${data.length} bytes, a mish block needs at least ${MISH_HEADER_BYTES}`);
    const magic = data.readUInt32BE(0);
    if (magic !== MISH_MAGIC) fail(path, `${entry}: its Data starts with ${data.subarray(0, 4).toString('hex')}, not 6d697368 ("mish")`);
    const firstSector = data.readBigUInt64BE(0x08);
    const dataOffset = data.readBigUInt64BE(0x18);
    const count = data.readUInt32BE(0xc8);
    const room = Math.floor((data.length - MISH_HEADER_BYTES) / CHUNK_ENTRY_BYTES);
    if (count > room) fail(path, `${entry}: chunk count ${count} does not fit in its ${data.length}-byte mish block (at most ${room})`);
    for (let i = 0; i < count; i++) {
      const at = MISH_HEADER_BYTES + i * CHUNK_ENTRY_BYTES;
      const type = data.readUInt32BE(at);
      if (type === CHUNK_COMMENT || type === CHUNK_TERMINATOR) continue;
      const where = `${entry} chunk ${i}`;
      const kind = KINDS[type];
      if (kind === undefined) {
        const why = type === CHUNK_LZFSE || type === CHUNK_LZMA ? ': no maintained decoder for it is available here' : '';
        throw new UnsupportedFeatureError(`${path}: DMG ${where} has chunk type ${chunkTypeName(type)}, which is not supported${why}`);
      }
      const sector = firstSector + data.readBigUInt64BE(at + 0x08);
      const sectorCount = data.readBigUInt64BE(at + 0x10);
      const offset = BigInt(trailer.dataForkOffset) + dataOffset + data.readBigUInt64BE(at + 0x18);
      const length = data.readBigUInt64BE(at + 0x20);
      if (kind !== 'zero' && sectorCount > BigInt(MAX_CHUNK_SECTORS)) {
        fail(path, `${where} (${chunkTypeName(type)}): sector count ${sectorCount} is above the limit ${MAX_CHUNK_SECTORS} (64 MiB)`);
      }
      if (length > BigInt(MAX_CHUNK_BYTES)) fail(path, `${where} (${chunkTypeName(type)}): stored length ${length} is above the limit ${MAX_CHUNK_BYTES} (64 MiB)`);
      if (sector + sectorCount > sectors) {
        fail(path, `${where} (${chunkTypeName(type)}): sectors [${sector}, ${sector + sectorCount}) are outside the virtual disk of ${sectors} sectors`);
      }
      if (sectorCount === 0n) continue;
      if (kind !== 'zero' && offset + length > fileEnd) {
        fail(path, `${where} (${chunkTypeName(type)}): its bytes [${offset}, ${offset + length}) are not inside the file before the trailer at ${fileEnd}`);
      }
      if (kind === 'raw' && length < sectorCount * BigInt(SECTOR_BYTES)) {
        fail(path, `${where} (${chunkTypeName(type)}): stored length ${length} is shorter than its ${sectorCount} sectors (${sectorCount * BigInt(SECTOR_BYTES)} bytes)`);
      }
      if (kind !== 'zero' && length === 0n) fail(path, `${where} (${chunkTypeName(type)}): stored length is 0 for ${sectorCount} sectors`);
      chunks.push({
        kind,
        guestStart: Number(sector) * SECTOR_BYTES,
        guestLength: Number(sectorCount) * SECTOR_BYTES,
        hostOffset: kind === 'zero' ? 0 : Number(offset),
        hostLength: kind === 'zero' ? 0 : Number(length),
        where,
      });
    }
  }
  chunks.sort((a, b) => a.guestStart - b.guestStart);
  for (let i = 1; i < chunks.length; i++) {
    const before = chunks[i - 1]!;
    const chunk = chunks[i]!;
    if (chunk.guestStart < before.guestStart + before.guestLength) {
      fail(
        path,
        `${chunk.where} (sectors from ${chunk.guestStart / SECTOR_BYTES}) overlaps ${before.where} (sectors [${before.guestStart / SECTOR_BYTES}, ${(before.guestStart + before.guestLength) / SECTOR_BYTES}))`,
      );
    }
  }
  return chunks;
}
