/**
 * The block allocation table (BAT) of a dynamic or differencing VHD: reading
 * it (its size already bounded by parseDynamicHeader), checking every
 * allocated entry against the file and the metadata, and where the next block
 * goes. Pure checks over the loaded table; the only I/O is the table read.
 *
 * Each entry is the sector number of a block's sector bitmap, which the
 * block's data follows; 0xffffffff means not allocated.
 *
 * Concurrency: called only while opening, before the image is shared; the
 * table is then owned by image.ts (changed under its allocation lock).
 */
import { CorruptImageError } from '../../block/errors.js';
import type { Protocol } from '../../block/types.js';
import { isPathLocator, overlaps, UNALLOCATED, type DynamicHeader } from './dynamic-header.js';
import { FOOTER_BYTES, FOOTER_COOKIE, SECTOR } from './footer.js';

export async function readBat(file: Protocol, header: DynamicHeader): Promise<Uint32Array> {
  const bytes = Buffer.alloc(header.maxTableEntries * 4);
  await file.read(header.tableOffset, bytes);
  const bat = new Uint32Array(header.maxTableEntries);
  for (let i = 0; i < bat.length; i++) bat[i] = bytes.readUInt32BE(i * 4);
  return bat;
}

/**
 * The metadata areas a block must not overlap, in file order: the footer copy at 0, the dynamic
 * header, the BAT and, for a differencing disk, the data of its path locators (its parent's name:
 * a write to a block lying on it would overwrite it). Other locators' fields are not checked at
 * open, so their data is not an area here.
 */
export function metadataAreas(header: DynamicHeader, headerOffset: number, headerBytes: number, differencing: boolean): Array<[number, number, string]> {
  const areas: Array<[number, number, string]> = [
    [0, FOOTER_BYTES, 'the footer copy at offset 0'],
    [headerOffset, headerBytes, `the dynamic header at ${headerOffset}`],
    [header.tableOffset, header.maxTableEntries * 4, `the BAT at ${header.tableOffset}`],
  ];
  if (differencing) {
    header.locators.forEach((locator, i) => {
      if (isPathLocator(locator.platform) && locator.dataLength > 0) {
        areas.push([locator.dataOffset, locator.dataLength, `parent locator ${i}'s data at ${locator.dataOffset}`]);
      }
    });
  }
  return areas.sort(([a], [b]) => a - b);
}

/**
 * Checks each allocated entry: its bitmap and block lie inside the file (qemu
 * refuses a truncated image the same way) and on no metadata. Returns the end
 * of the last block, 0 when none is allocated.
 */
export function checkBat(bat: Uint32Array, header: DynamicHeader, areas: Array<[number, number, string]>, fileSize: number, path: string): number {
  const blockBytes = header.bitmapBytes + header.blockSize;
  let end = 0;
  for (let i = 0; i < bat.length; i++) {
    const entry = bat[i]!;
    if (entry === UNALLOCATED) continue;
    const start = entry * SECTOR;
    if (start + blockBytes > fileSize) {
      throw new CorruptImageError(
        `${path}: VHD BAT entry ${i} puts block ${i} (bitmap and data, ${blockBytes} bytes) at ${start}, past the end of the ${fileSize}-byte file (truncated image?)`,
      );
    }
    for (const [at, length, what] of areas) {
      if (overlaps(start, blockBytes, at, length)) {
        throw new CorruptImageError(`${path}: VHD BAT entry ${i} puts block ${i} at ${start}, on ${what}`);
      }
    }
    end = Math.max(end, start + blockBytes);
  }
  return end;
}

/**
 * Where the next block is allocated: past the metadata and every block, and
 * past everything in the file but its trailing footer (which the new block's
 * bitmap overwrites), rounded up to a sector. Nothing else is ever overwritten.
 */
export function firstFreeOffset(areas: Array<[number, number, string]>, blocksEnd: number, fileSize: number, tail: Buffer): number {
  const footerAtEnd = fileSize >= FOOTER_BYTES && tail.length >= FOOTER_BYTES && tail.subarray(tail.length - FOOTER_BYTES, tail.length - FOOTER_BYTES + 8).equals(FOOTER_COOKIE);
  const used = Math.max(blocksEnd, footerAtEnd ? fileSize - FOOTER_BYTES : fileSize, ...areas.map(([at, length]) => at + length));
  return Math.ceil(used / SECTOR) * SECTOR;
}
