/**
 * Writing a differencing VHD: guest bytes go into this image's blocks and the
 * block's sector bitmap gets the bits of exactly the sectors written (a set
 * bit reads this image, a clear one the parent). Writes are byte-granular, the
 * bitmap is per sector: the untouched bytes of a partly written sector that
 * this image does not own yet are copied up from the parent (never zeros); a
 * sector it owns gets only the bytes written.
 *
 * - Unallocated block: allocated as in a dynamic disk (image.ts allocateBlock:
 *   footer at the new end, data, bitmap with only the written sectors' bits,
 *   fdatasync, BAT entry), so a crash leaves the block wholly old or wholly new.
 * - Allocated block: the sector-aligned data is written, and when it claims
 *   sectors the bitmap did not have, fdatasync, then the changed bitmap
 *   sectors. A crash before the bitmap reaches the disk reads the parent for
 *   those sectors (old bytes), never unwritten data.
 * - Zeroing writes zeros (they must hide the parent's bytes), except where the
 *   parent reads as zeros already; discard is not offered: freeing a sector
 *   would show the parent's bytes again.
 *
 * Concurrency: a write whose every sector this image owns already goes
 * straight to the file, unlocked (bits are never cleared and a block never
 * moves, so what it mapped stays true). Any other write runs under the
 * image's `allocationLock` (bitmap updates are read-modify-write), one block
 * at a time; it writes the bytes of owned sectors exactly (never a whole
 * sector read back, which would undo a concurrent unlocked write into the
 * same sector) and whole sectors only where it claims them. Readers never
 * take the lock (image.ts swaps in a new bitmap only once it is on disk).
 */
import createDebug from 'debug';
import { constants as osConstants } from 'node:os';
import { BlockError } from '../../block/errors.js';
import { announce, flushToDisk } from '../../block/events.js';
import { settleAll } from '../../block/settle.js';
import { UNALLOCATED } from './dynamic-header.js';
import { SECTOR } from './footer.js';
import type { VpcImage } from './image.js';

const log = createDebug('imgmount:vpc');

/** Largest piece of zeros written at once by zeroDifferencing. */
const ZERO_PIECE = 1024 * 1024;

function hasBit(bitmap: Buffer | undefined, sector: number): boolean {
  return bitmap !== undefined && (bitmap[sector >> 3]! & (0x80 >> (sector & 7))) !== 0;
}

export async function writeDifferencing(image: VpcImage, offset: number, data: Buffer): Promise<void> {
  image.assertOpen();
  if (data.length === 0) return;
  const runs = await image.map(offset, data.length);
  if (runs.every((run) => run.kind === 'data')) {
    await settleAll(
      runs.map((run) => {
        announce(image.file, 'write_aio');
        return image.file.write(run.hostOffset, data.subarray(run.guestOffset - offset, run.guestOffset - offset + run.length));
      }),
    );
    return;
  }
  const { blockSize } = image.dynamic!.header;
  await image.allocationLock.runExclusive(async () => {
    image.assertOpen();
    const end = offset + data.length;
    for (let pos = offset; pos < end; ) {
      const index = Math.floor(pos / blockSize);
      const blockEnd = Math.min(end, (index + 1) * blockSize);
      await writeInBlock(image, index, pos, data.subarray(pos - offset, blockEnd - offset));
      pos = blockEnd;
    }
  });
}

/**
 * Zeroing: zeros are written (and their sectors owned), so the parent's bytes
 * no longer show; a range still read from the parent that reads as zeros there
 * already (a sparse parent, past its end) is left alone, allocating nothing.
 */
export async function zeroDifferencing(image: VpcImage, offset: number, length: number): Promise<void> {
  image.assertOpen();
  const zeros = Buffer.alloc(Math.min(length, ZERO_PIECE));
  for (const run of await image.map(offset, length)) {
    const runEnd = run.guestOffset + run.length;
    for (let pos = run.guestOffset; pos < runEnd; pos += zeros.length) {
      const piece = zeros.subarray(0, Math.min(zeros.length, runEnd - pos));
      if (run.kind === 'backing' && image.readBacking) {
        const below = Buffer.alloc(piece.length);
        await image.readBacking(pos, below);
        if (below.equals(piece)) continue;
      }
      await writeDifferencing(image, pos, piece);
    }
  }
}

/** Writes `part` at guest offset `pos`, all inside block `index`. Under the allocation lock. */
async function writeInBlock(image: VpcImage, index: number, pos: number, part: Buffer): Promise<void> {
  const { file } = image;
  const dynamic = image.dynamic!;
  const { blockSize, bitmapBytes } = dynamic.header;
  const blockStart = index * blockSize;
  const first = Math.floor((pos - blockStart) / SECTOR);
  const partEnd = pos + part.length - blockStart;
  const last = Math.ceil(partEnd / SECTOR); // exclusive
  const alignedStart = blockStart + first * SECTOR;
  const buffer = Buffer.alloc((last - first) * SECTOR);
  const entry = dynamic.bat[index]!;
  const old = entry === UNALLOCATED ? undefined : await image.bitmap(entry);
  const dataBase = entry * SECTOR + bitmapBytes;

  // A partly written sector that this write claims keeps the parent's other bytes (an owned one is written byte-exact).
  const fill = async (sector: number): Promise<void> => {
    const piece = buffer.subarray((sector - first) * SECTOR, (sector - first + 1) * SECTOR);
    if (!image.readBacking) throw new BlockError(`${file.path}: cannot write part of a sector of a differencing VHD without its parent open`, osConstants.errno.EIO);
    await image.readBacking(blockStart + sector * SECTOR, piece);
  };
  const headPartial = pos > alignedStart;
  const tailPartial = partEnd % SECTOR !== 0;
  if (headPartial && !hasBit(old, first)) await fill(first);
  if (tailPartial && !hasBit(old, last - 1) && (last - 1 !== first || !headPartial)) await fill(last - 1);
  part.copy(buffer, pos - alignedStart);

  const bitmap = old ? Buffer.from(old) : Buffer.alloc(bitmapBytes);
  let claimed = 0;
  for (let sector = first; sector < last; sector++) {
    if (hasBit(bitmap, sector)) continue;
    bitmap[sector >> 3]! |= 0x80 >> (sector & 7);
    claimed++;
  }
  if (entry === UNALLOCATED) {
    await image.allocateBlock(index, first * SECTOR, buffer, bitmap);
    return;
  }
  // Runs of owned sectors get exactly the bytes written; runs of claimed sectors whole sectors.
  const writes: Array<Promise<void>> = [];
  for (let sector = first; sector < last; ) {
    const owned = hasBit(old, sector);
    let end = sector + 1;
    while (end < last && hasBit(old, end) === owned) end++;
    const from = owned ? Math.max(pos, blockStart + sector * SECTOR) : blockStart + sector * SECTOR;
    const to = owned ? Math.min(blockStart + partEnd, blockStart + end * SECTOR) : blockStart + end * SECTOR;
    announce(file, 'write_aio');
    writes.push(file.write(dataBase + (from - blockStart), buffer.subarray(from - alignedStart, to - alignedStart)));
    sector = end;
  }
  await settleAll(writes);
  if (claimed === 0) return;
  // The newly claimed sectors must be on disk before the bitmap points at them.
  await flushToDisk(file);
  const from = Math.floor((first >> 3) / SECTOR) * SECTOR;
  const to = (Math.floor(((last - 1) >> 3) / SECTOR) + 1) * SECTOR;
  announce(file, 'l2_update');
  await file.write(entry * SECTOR + from, bitmap.subarray(from, to));
  image.setBitmap(entry, bitmap);
  log('%s: block %d claims %d more sectors from %d', file.path, index, claimed, first);
}
