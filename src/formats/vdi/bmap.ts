/**
 * The VDI block map: one little-endian 32-bit entry per guest block, the
 * index of the block in the data area (host offset offset_data + index *
 * block_size), or one of two markers that both read as zeros:
 * 0xffffffff (never allocated) and 0xfffffffe (discarded, "zero-filled").
 *
 * Owns loading the map (whole sectors, so a rewritten sector keeps the bytes
 * past the last entry), the validity rule every reader and the check apply,
 * and the write-through of changed entries: whole 512-byte sectors, the
 * in-memory copy changed only after the disk write succeeded. Callers
 * serialize writers (the image's allocation lock); readers read the in-memory
 * copy without a lock and see each entry before or after a change.
 */
import type { Protocol } from '../../block/types.js';
import { announce } from '../../block/events.js';
import { bmapBytes, SECTOR_SIZE, type VdiHeader } from './header.js';

export const VDI_UNALLOCATED = 0xffffffff;
export const VDI_DISCARDED = 0xfffffffe;

export function isAllocated(entry: number): boolean {
  return entry < VDI_DISCARDED;
}

export class BlockMap {
  private constructor(
    /** The map's sectors as stored (entries past blocks_in_image, if any, are never used). */
    private readonly bytes: Buffer,
    readonly blocks: number,
  ) {}

  static async load(file: Protocol, header: VdiHeader): Promise<BlockMap> {
    const bytes = Buffer.alloc(bmapBytes(header.blocksInImage));
    await file.read(header.offsetBmap, bytes);
    return new BlockMap(bytes, header.blocksInImage);
  }

  get(block: number): number {
    return this.bytes.readUInt32LE(block * 4);
  }

  /**
   * Writes new values for entries [first, first + values.length) as whole
   * sectors at `offsetBmap`, then applies them in memory.
   */
  async update(file: Protocol, offsetBmap: number, first: number, values: readonly number[]): Promise<void> {
    const start = Math.floor((first * 4) / SECTOR_SIZE) * SECTOR_SIZE;
    const end = Math.ceil(((first + values.length) * 4) / SECTOR_SIZE) * SECTOR_SIZE;
    const sectors = Buffer.from(this.bytes.subarray(start, end));
    values.forEach((value, i) => sectors.writeUInt32LE(value, (first + i) * 4 - start));
    announce(file, 'l2_update');
    await file.write(offsetBmap + start, sectors);
    sectors.copy(this.bytes, start);
  }
}

/** Where block `index` of the data area starts in the file. */
export function blockOffset(header: VdiHeader, index: number): number {
  return header.offsetData + index * header.blockSize;
}

/**
 * Guest bytes of block `block` that the disk uses: a whole block, less for
 * the last one when disk_size is not a multiple of block_size (its stored
 * block may be cut to that), 0 past disk_size.
 */
export function usedBytes(header: VdiHeader, block: number): number {
  return Math.max(0, Math.min(header.blockSize, header.diskSize - block * header.blockSize));
}

/**
 * Why the allocated entry `entry` of guest block `block` cannot be used, or
 * undefined when it can: an index past blocks_in_image (qemu-img check's
 * rule), or the block's used bytes not wholly inside the first `validEnd`
 * bytes of the file (qemu would read zeros there, not the image's bytes).
 */
export function entryProblem(header: VdiHeader, block: number, entry: number, validEnd: number): string | undefined {
  if (entry >= header.blocksInImage) return `index ${entry} is not below blocks_in_image ${header.blocksInImage}`;
  const start = blockOffset(header, entry);
  const end = start + usedBytes(header, block);
  if (end > validEnd) return `index ${entry} puts the block's bytes at ${start}..${end} past the end of the ${validEnd}-byte file`;
  return undefined;
}
