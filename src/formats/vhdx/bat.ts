/**
 * The block allocation table (MS-VHDX 2.5): geometry (blocks, chunk ratio,
 * where payload and sector bitmap entries interleave), entry decoding, and
 * the checks every referenced block passes before its offset is used (inside
 * the file, 1 MiB aligned, on none of the header section, log, BAT or
 * metadata region: CVE-2014-0148's lesson). Pure functions and a small class
 * with no mutable state after construction.
 */
import { CorruptImageError } from '../../block/errors.js';
import { HEADER_SECTION_BYTES, MiB, type RegionTable, type VhdxHeader } from './header.js';
import type { VhdxMetadata } from './metadata.js';

export const NOT_PRESENT = 0;
export const UNDEFINED = 1;
export const ZERO = 2;
export const UNMAPPED = 3;
/** UNMAPPED as the 0.95 draft of the specification numbered it; qemu reads it as UNMAPPED too. */
export const UNMAPPED_V095 = 5;
export const FULLY_PRESENT = 6;
export const PARTIALLY_PRESENT = 7;
/** A sector bitmap block entry that points to a bitmap. */
export const SB_BLOCK_PRESENT = 6;

export const STATE_NAMES: Record<number, string> = {
  0: 'NOT_PRESENT', 1: 'UNDEFINED', 2: 'ZERO', 3: 'UNMAPPED', 5: 'UNMAPPED (0.95)', 6: 'FULLY_PRESENT', 7: 'PARTIALLY_PRESENT',
};

/** Bits of logical sectors one sector bitmap block covers: 2^23 (1 MiB of bits). */
const SECTORS_PER_BITMAP = 1 << 23;
export const BITMAP_BYTES = MiB;

export class BatGeometry {
  readonly blockSize: number;
  readonly sectorSize: number;
  readonly sectorsPerBlock: number;
  /** Payload blocks per sector bitmap block. */
  readonly chunkRatio: number;
  readonly payloadBlocks: number;
  readonly entries: number;

  constructor(metadata: VhdxMetadata, regions: RegionTable, path: string) {
    this.blockSize = metadata.blockSize;
    this.sectorSize = metadata.logicalSectorSize;
    this.sectorsPerBlock = this.blockSize / this.sectorSize;
    this.chunkRatio = (SECTORS_PER_BITMAP * this.sectorSize) / this.blockSize;
    this.payloadBlocks = Math.ceil(metadata.virtualSize / this.blockSize);
    const bitmapBlocks = Math.ceil(this.payloadBlocks / this.chunkRatio);
    this.entries = metadata.hasParent
      ? bitmapBlocks * (this.chunkRatio + 1)
      : this.payloadBlocks + Math.floor((this.payloadBlocks - 1) / this.chunkRatio);
    if (this.entries * 8 > regions.bat.length) {
      throw new CorruptImageError(
        `${path}: the BAT region holds ${regions.bat.length / 8} entries, but ${this.entries} are needed for ${metadata.virtualSize} bytes in blocks of ${this.blockSize}`,
      );
    }
  }

  /** Index in the BAT of payload block `block`. */
  payloadEntry(block: number): number {
    return block + Math.floor(block / this.chunkRatio);
  }

  /** Index in the BAT of the sector bitmap block covering payload block `block`. */
  bitmapEntry(block: number): number {
    const chunk = Math.floor(block / this.chunkRatio);
    return chunk * (this.chunkRatio + 1) + this.chunkRatio;
  }

  /** First bit, in its sector bitmap block, of payload block `block`'s sectors. */
  bitmapFirstBit(block: number): number {
    return (block % this.chunkRatio) * this.sectorsPerBlock;
  }
}

/** A BAT entry's state (bits 0-2) and file offset (bits 20-63, in MiB). */
export function decodeEntry(entry: bigint): { state: number; offset: number | undefined } {
  const state = Number(entry & 7n);
  const offset = (entry >> 20n) << 20n;
  return { state, offset: offset > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : Number(offset) };
}

/** Ranges of the file no block may use. */
export function reservedRanges(header: VhdxHeader, regions: RegionTable): Array<{ name: string; start: number; end: number }> {
  const ranges = [
    { name: 'the header section', start: 0, end: HEADER_SECTION_BYTES },
    { name: 'the BAT region', start: regions.bat.fileOffset, end: regions.bat.fileOffset + regions.bat.length },
    { name: 'the metadata region', start: regions.metadata.fileOffset, end: regions.metadata.fileOffset + regions.metadata.length },
  ];
  if (header.logLength > 0) ranges.push({ name: 'the log', start: header.logOffset, end: header.logOffset + header.logLength });
  return ranges;
}

/** Why `length` bytes at `offset` cannot be a block of this file, or undefined when they can. */
export function blockProblem(
  offset: number | undefined,
  length: number,
  fileSize: number,
  reserved: ReadonlyArray<{ name: string; start: number; end: number }>,
): string | undefined {
  if (offset === undefined) return 'an offset above 2^53';
  if (offset + length > fileSize) return `offset ${offset}, whose ${length} bytes end past the end of the file (${fileSize} bytes)`;
  const hit = reserved.find((range) => offset < range.end && range.start < offset + length);
  if (hit) return `offset ${offset}, on ${hit.name}`;
  return undefined;
}
