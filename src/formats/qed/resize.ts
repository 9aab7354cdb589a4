/**
 * Resizing a QED image, on a file the caller has opened read-write under the
 * image's write lock (nothing else touches the image meanwhile; no lock
 * here, every step in order).
 *
 * The L1 table has a fixed size (table_size clusters), so an image can grow
 * up to entries^2 * cluster_size bytes (entries = table_size * cluster_size /
 * 8) and not one byte past it; growing only rewrites image_size in the header
 * (one 64-byte write, atomic on disk).
 *
 * Shrinking, which qemu 7.2 refuses for QED: QED has no refcounts, and
 * qemu-img check counts every cluster of the file that no L1 or L2 entry
 * names as leaked, over the whole tables (past image_size too). So the
 * clusters past the new end are not simply unlinked:
 * - clusters still in use (the header, the L1 table, the tables and data
 *   clusters of the kept range) fix where the file must go on to, `liveEnd`;
 * - a dropped reference (an L2 entry past the new end, or an L1 entry of a
 *   table wholly past it) to a cluster at or past `liveEnd` is cleared, and
 *   the file is cut at `liveEnd`;
 * - a dropped reference below `liveEnd` stays, and its data cluster is
 *   punched (the space is freed, it reads as zeros if the image grows
 *   again): clearing it would leave a leak in the middle of the file. A table
 *   wholly past the end that still names such a cluster stays too, which may
 *   push `liveEnd` further (computed until it settles).
 * Nothing is moved. need-check is set (and flushed) with the new image_size
 * before the tables change and cleared once they are flushed, so a crash in
 * between leaves an image that the next read-write open checks and repairs.
 *
 * An image whose need-check bit is set is checked and repaired first, as a
 * read-write open does, with a notice.
 */
import createDebug from 'debug';
import { CorruptImageError, InvalidArgumentError } from '../../block/errors.js';
import type { Protocol, ResizeOptions } from '../../block/types.js';
import { checkQed } from './check.js';
import { Geometry, getEntry, setEntry, ZERO_CLUSTER, type Table } from './geometry.js';
import { HEADER_BYTES, maxImageSize, parseHeader, QED_F_NEED_CHECK, type QedHeader } from './header.js';
import { readTable, writeHeader } from './tables.js';

const log = createDebug('imgmount:qed:resize');

async function readHeader(file: Protocol): Promise<QedHeader> {
  const bytes = Buffer.alloc(HEADER_BYTES);
  await file.read(0, bytes);
  return parseHeader(bytes, await file.size(), file.path);
}

export async function resizeQed(file: Protocol, newSize: number, options: ResizeOptions): Promise<void> {
  let header = await readHeader(file);
  if (header.features & QED_F_NEED_CHECK) {
    const result = await checkQed(file, header, { repair: true });
    await file.flush();
    options.notice(
      `${file.path}: was not closed cleanly (need-check set); checked and repaired before resizing ` +
        `(${result.corruptionsFixed} corruption(s) repaired, ${result.leaksFixed} of ${result.leaks} leaked cluster(s) reclaimed)`,
    );
    header = await readHeader(file);
    if (header.features & QED_F_NEED_CHECK) throw new CorruptImageError(`${file.path}: its repair left corruptions; see imgmount check`);
  }
  if (newSize % 512 !== 0) throw new InvalidArgumentError(`${file.path}: the new size ${newSize} is not a multiple of 512, which QED needs`);
  const largest = maxImageSize(header);
  if (newSize > largest) {
    throw new InvalidArgumentError(
      `${file.path}: the new size ${newSize} is larger than ${largest}, the most a QED image with cluster_size ${header.clusterSize} and table_size ${header.tableSize} can address`,
    );
  }
  if (newSize < header.imageSize) await shrink(file, header, newSize);
  else {
    await writeHeader(file, { ...header, imageSize: newSize });
    await file.flush();
  }
  log('%s: resized from %d to %d', file.path, header.imageSize, newSize);
}

interface L2Table {
  l1Index: number;
  offset: number;
  table: Table;
  /** Wholly past the new end. */
  dropped: boolean;
  /** Stays linked (always, for a table that holds kept clusters). */
  kept: boolean;
  /** Indexes of the entries past the new end that name a cluster. */
  droppedEntries: number[];
  /** Set once an entry was changed. */
  changed: boolean;
}

async function shrink(file: Protocol, header: QedHeader, newSize: number): Promise<void> {
  const geometry = new Geometry(header);
  const { clusterSize, tableBytes, entries, l2Span } = geometry;
  const fileSize = await file.size();
  const fileEnd = Math.floor(fileSize / clusterSize) * clusterSize;
  const firstDropped = Math.ceil(newSize / clusterSize) * clusterSize;
  const keptTables = Math.ceil(newSize / l2Span);
  const l1 = await readTable(file, header.l1TableOffset, tableBytes);

  // 1. Read every table and find where the clusters still in use end.
  let liveEnd = Math.max(geometry.headerBytes, header.l1TableOffset + tableBytes);
  const tables: L2Table[] = [];
  for (let l1Index = 0; l1Index < entries; l1Index++) {
    const offset = getEntry(l1, l1Index);
    if (offset === 0) continue;
    if (!geometry.isValidTableOffset(offset, fileEnd)) {
      throw new CorruptImageError(`${file.path}: L1 entry ${l1Index} points to ${offset}, which is not a table inside the file; repair it first (imgmount check -r)`);
    }
    const dropped = l1Index >= keptTables;
    const table: L2Table = { l1Index, offset, table: await readTable(file, offset, tableBytes), dropped, kept: !dropped, droppedEntries: [], changed: false };
    for (let l2Index = 0; l2Index < entries; l2Index++) {
      const entry = getEntry(table.table, l2Index);
      if (entry === 0) continue;
      const guest = l1Index * l2Span + l2Index * clusterSize;
      if (guest >= firstDropped && entry === ZERO_CLUSTER) {
        setEntry(table.table, l2Index, 0);
        table.changed = true;
        continue;
      }
      if (entry === ZERO_CLUSTER) continue;
      if (!geometry.isValidClusterOffset(entry, fileEnd)) {
        throw new CorruptImageError(`${file.path}: the L2 entry of guest offset ${guest} points to ${entry}, which is not a cluster inside the file; repair it first (imgmount check -r)`);
      }
      if (guest >= firstDropped) table.droppedEntries.push(l2Index);
      else liveEnd = Math.max(liveEnd, entry + clusterSize);
    }
    if (table.kept) liveEnd = Math.max(liveEnd, offset + tableBytes);
    tables.push(table);
  }
  // A dropped table below liveEnd, or naming a cluster below it, must stay linked; that may move liveEnd.
  for (let settled = false; !settled; ) {
    settled = true;
    for (const table of tables) {
      if (table.kept) continue;
      const namesLive = table.droppedEntries.some((index) => getEntry(table.table, index) < liveEnd);
      if (table.offset < liveEnd || namesLive) {
        table.kept = true;
        liveEnd = Math.max(liveEnd, table.offset + tableBytes);
        settled = false;
      }
    }
  }

  // 2. need-check and the new size first, durable before any table changes.
  await writeHeader(file, { ...header, imageSize: newSize, features: header.features | QED_F_NEED_CHECK });
  await file.flush();

  // 3. Entries past liveEnd are cleared; the clusters below it that the guest no longer sees are punched.
  const punch: number[] = [];
  for (const table of tables) {
    if (!table.kept) continue;
    for (const index of table.droppedEntries) {
      const entry = getEntry(table.table, index);
      if (entry >= liveEnd) {
        setEntry(table.table, index, 0);
        table.changed = true;
      } else {
        punch.push(entry);
      }
    }
    if (table.changed) await file.write(table.offset, table.table);
  }
  let l1Changed = false;
  for (const table of tables) {
    if (table.kept) continue;
    setEntry(l1, table.l1Index, 0);
    l1Changed = true;
  }
  await file.flush();
  if (l1Changed) {
    await file.write(header.l1TableOffset, l1);
    await file.flush();
  }
  for (const offset of punch) {
    if (file.punchHole) await file.punchHole(offset, clusterSize);
    else await file.write(offset, Buffer.alloc(clusterSize));
  }
  if (liveEnd < fileSize) {
    await file.truncate(liveEnd);
    log('%s: file cut from %d to %d bytes', file.path, fileSize, liveEnd);
  }
  await file.flush();

  // 4. Consistent again.
  await writeHeader(file, { ...header, imageSize: newSize });
  await file.flush();
}
