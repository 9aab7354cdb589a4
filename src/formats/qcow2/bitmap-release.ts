/**
 * Dropping a qcow2 image's persistent dirty bitmaps once they are no longer
 * valid: a writer that does not keep them up to date clears the bitmaps
 * autoclear bit (the caller does that first, durably), after which no program
 * may trust them and qemu-img check would count their clusters as leaked. So
 * the bitmaps header extension is taken out of the header cluster (the other
 * extensions keep their order), flushed, and then the bitmap directory, the
 * bitmap tables and their data clusters lose their reference.
 *
 * A crash at any point leaves at most leaked clusters: with the bit clear the
 * extension is ignored, and references are dropped only after it is gone.
 * A bitmap table or data cluster that points somewhere impossible is left
 * alone (logged), never freed.
 *
 * Concurrency: called once, from the read-write open, before any write.
 */
import createDebug from 'debug';
import type { Protocol } from '../../block/types.js';
import { EXT_BITMAPS, EXT_END, type BitmapsExtension } from './extensions.js';
import { offsetBits, wordAt } from './geometry.js';
import type { Qcow2Header } from './header.js';
import type { Refcounts } from './refcounts.js';

const log = createDebug('imgmount:qcow2');


export async function dropBitmaps(file: Protocol, header: Qcow2Header, bitmaps: BitmapsExtension, refcounts: Refcounts, fileSize: number): Promise<void> {
  const { clusterSize } = header;
  // Gather what the bitmaps use before the directory is unreachable.
  const ranges: [number, number][] = [];
  const valid = (offset: number, bytes: number): boolean => offset > 0 && offset % clusterSize === 0 && offset + bytes <= fileSize;
  if (valid(bitmaps.directoryOffset, bitmaps.directorySize) && bitmaps.directorySize > 0) {
    const directory = Buffer.alloc(bitmaps.directorySize);
    await file.read(bitmaps.directoryOffset, directory);
    ranges.push([bitmaps.directoryOffset, bitmaps.directorySize]);
    let at = 0;
    for (let index = 0; index < bitmaps.count && at + 24 <= directory.length; index++) {
      const tableOffset = Number(directory.readBigUInt64BE(at));
      const tableEntries = directory.readUInt32BE(at + 8);
      const nameSize = directory.readUInt16BE(at + 18);
      const extraSize = directory.readUInt32BE(at + 20);
      at = Math.ceil((at + 24 + extraSize + nameSize) / 8) * 8;
      if (!valid(tableOffset, tableEntries * 8)) {
        if (tableEntries > 0) log('%s: bitmap %d has a table at %d that is not a cluster of the file; left alone', file.path, index, tableOffset);
        continue;
      }
      const table = Buffer.alloc(tableEntries * 8);
      await file.read(tableOffset, table);
      ranges.push([tableOffset, table.length]);
      for (let entry = 0; entry < tableEntries; entry++) {
        const [high, low] = wordAt(table, entry * 8);
        const data = offsetBits(high, low);
        if (data === 0) continue; // all zeros or all ones: no cluster
        if (valid(data, clusterSize)) ranges.push([data, clusterSize]);
        else log('%s: bitmap %d entry %d points to %d; left alone', file.path, index, entry, data);
      }
    }
  }

  await removeExtension(file, header, EXT_BITMAPS);
  await file.flush();
  for (const [offset, bytes] of ranges) {
    try {
      await refcounts.decrement(offset, bytes);
    } catch (error) {
      log('%s: could not free bitmap clusters at %d: %s', file.path, offset, (error as Error).message);
    }
  }
  log('%s: bitmaps extension removed, %d range(s) freed', file.path, ranges.length);
}

/** Rewrites the header extension area without extensions of `type`. */
async function removeExtension(file: Protocol, header: Qcow2Header, type: number): Promise<void> {
  const first = Buffer.alloc(header.clusterSize);
  await file.read(0, first);
  const end = header.backingFileOffset > header.headerLength ? Math.min(header.backingFileOffset, first.length) : first.length;
  const kept: Buffer[] = [];
  let at = header.headerLength;
  while (at + 8 <= end) {
    const extType = first.readUInt32BE(at);
    const length = first.readUInt32BE(at + 4);
    if (extType === EXT_END) break;
    const next = at + 8 + Math.ceil(length / 8) * 8;
    if (next > end) break;
    if (extType !== type) kept.push(first.subarray(at, next));
    at = next;
  }
  // Old area: [headerLength, at + 8) (the end marker included, when it fits).
  const oldEnd = Math.min(end, at + 8);
  const area = Buffer.alloc(oldEnd - header.headerLength);
  Buffer.concat(kept).copy(area);
  await file.write(header.headerLength, area);
}
