/**
 * The QED consistency check, after the invariants in the specification:
 * every L1/L2/data offset aligned and inside the file with room for a whole
 * table, each cluster referenced at most once, unreferenced clusters are
 * leaks. With repair:
 * - an invalid offset is cleared (that guest range becomes unallocated; its
 *   data could not be read anyway);
 * - a cluster or table referenced twice is copied to a new cluster at the end
 *   of the file, so both references keep their bytes and a later write to one
 *   no longer changes the other; as for allocating writes, the copy is
 *   flushed before the table that points to it is rewritten;
 * - leaked clusters at the end of the file are truncated away (leaks in the
 *   middle cannot be reused by QED and are only reported);
 * - when no corruption is left, QED_F_NEED_CHECK is cleared.
 * A repair of leaks only (`fix: 'leaks'`, qemu-img check -r leaks) does the
 * truncation and nothing else.
 *
 * Messages are whole lines as qemu-img prints them ("ERROR ...", or
 * "Repairing ..." for what is repaired).
 */
import type { CheckOptions, CheckResult, Protocol } from '../../block/types.js';
import { nextNonZeroIn, tableWords } from '../../block/table-scan.js';
import { Geometry, getEntry, setEntry, ZERO_CLUSTER, type Table } from './geometry.js';
import { QED_F_NEED_CHECK, type QedHeader } from './header.js';
import { readTable, writeHeader } from './tables.js';

/** Tracks which clusters of the file are referenced. */
class ClusterMap {
  private used: Uint8Array;
  constructor(clusters: number) {
    this.used = new Uint8Array(clusters);
  }
  /** Marks [first, first + count) used; false if any was already used. */
  claim(first: number, count: number): boolean {
    this.grow(first + count);
    let fresh = true;
    for (let i = first; i < first + count; i++) {
      if (this.used[i]) fresh = false;
      this.used[i] = 1;
    }
    return fresh;
  }
  isUsed(index: number): boolean {
    return index < this.used.length && this.used[index] === 1;
  }
  get length(): number {
    return this.used.length;
  }
  private grow(size: number): void {
    if (size <= this.used.length) return;
    const bigger = new Uint8Array(Math.max(size, this.used.length * 2));
    bigger.set(this.used);
    this.used = bigger;
  }
}

export async function checkQed(file: Protocol, header: QedHeader, options: CheckOptions): Promise<CheckResult> {
  const geometry = new Geometry(header);
  const { clusterSize, tableBytes, entries } = geometry;
  const fileSize = await file.size();
  const fileEnd = Math.floor(fileSize / clusterSize) * clusterSize;
  const fileClusters = fileEnd / clusterSize;
  const result: CheckResult = { corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [] };
  const fixErrors = options.repair && (options.fix ?? 'all') === 'all';
  const clustersPerTable = header.tableSize;
  const map = new ClusterMap(fileClusters);
  map.claim(0, header.headerSize);
  map.claim(header.l1TableOffset / clusterSize, clustersPerTable);
  // Copies go past a partial last cluster (a truncated file), never over it.
  const firstCopyOffset = Math.ceil(fileSize / clusterSize) * clusterSize;
  let allocationEnd = firstCopyOffset;
  let allocatedDataClusters = 0;
  // As for allocating writes: whatever a table is about to point to (a copied cluster
  // or table) is flushed before that table is written, so a crash in between loses nothing.
  let unflushed = false;
  const durable = async (): Promise<void> => {
    if (!unflushed) return;
    await file.flush();
    unflushed = false;
  };

  const copyToEnd = async (from: number, bytes: number): Promise<number> => {
    const content = Buffer.alloc(bytes);
    await file.read(from, content);
    const to = allocationEnd;
    allocationEnd += bytes;
    await file.write(to, content);
    unflushed = true;
    map.claim(to / clusterSize, bytes / clusterSize);
    return to;
  };
  const corruption = (message: string): void => {
    result.corruptions += 1;
    result.messages.push(`${fixErrors ? 'Repairing' : 'ERROR'} ${message}`);
  };

  const l1 = await readTable(file, header.l1TableOffset, tableBytes);
  let l1Changed = false;
  // One buffer for every L2 table, read one at a time (a zeroed buffer per table cost a fifth of a 512-table check).
  const l2: Table = Buffer.allocUnsafeSlow(tableBytes);
  const l2Words = tableWords(l2);
  const l1Words = tableWords(l1);
  for (let l1Index = 0; l1Index < entries; l1Index++) {
    options.progress?.(l1Index, entries);
    if (l1Words !== undefined && (l1Words[2 * l1Index]! | l1Words[2 * l1Index + 1]!) === 0) continue;
    let l2Offset = getEntry(l1, l1Index);
    if (l2Offset === 0) continue;
    if (!geometry.isValidTableOffset(l2Offset, fileEnd)) {
      corruption(`L1 entry ${l1Index}: L2 table offset ${describe(l2Offset)} is misaligned or outside the file`);
      if (fixErrors) {
        setEntry(l1, l1Index, 0);
        l1Changed = true;
        result.corruptionsFixed += 1;
      }
      continue;
    }
    if (!map.claim(l2Offset / clusterSize, clustersPerTable)) {
      corruption(`L1 entry ${l1Index}: L2 table at ${l2Offset} overlaps a cluster that is already in use`);
      if (fixErrors) {
        l2Offset = await copyToEnd(l2Offset, tableBytes);
        setEntry(l1, l1Index, l2Offset);
        l1Changed = true;
        result.corruptionsFixed += 1;
      }
    }
    await file.read(l2Offset, l2);
    let l2Changed = false;
    for (let l2Index = nextNonZeroIn(l2, l2Words, 0, entries); l2Index < entries; l2Index = nextNonZeroIn(l2, l2Words, l2Index + 1, entries)) {
      const dataOffset = getEntry(l2, l2Index);
      if (dataOffset === 0 || dataOffset === ZERO_CLUSTER) continue;
      const guest = l1Index * geometry.l2Span + l2Index * clusterSize;
      if (!geometry.isValidClusterOffset(dataOffset, fileEnd)) {
        corruption(`guest offset ${guest}: data cluster offset ${describe(dataOffset)} is misaligned or outside the file`);
        if (fixErrors) {
          setEntry(l2, l2Index, 0);
          l2Changed = true;
          result.corruptionsFixed += 1;
        }
        continue;
      }
      allocatedDataClusters += 1;
      if (!map.claim(dataOffset / clusterSize, 1)) {
        corruption(`guest offset ${guest}: data cluster at ${dataOffset} is referenced more than once`);
        if (fixErrors) {
          setEntry(l2, l2Index, await copyToEnd(dataOffset, clusterSize));
          l2Changed = true;
          result.corruptionsFixed += 1;
        }
      }
    }
    if (l2Changed) {
      await durable();
      await file.write(l2Offset, l2);
      unflushed = true; // the L1 table may point to this table (a copy)
    }
  }
  options.progress?.(entries, entries);
  if (l1Changed) {
    await durable();
    await file.write(header.l1TableOffset, l1);
  }

  let lastUsed = -1;
  for (let i = 0; i < map.length; i++) if (map.isUsed(i)) lastUsed = i;
  for (let i = 0; i < fileClusters; i++) {
    if (!map.isUsed(i)) {
      result.leaks += 1;
      if (result.leaks <= 20) result.messages.push(`${options.repair ? 'Repairing' : 'ERROR'} cluster at ${i * clusterSize} is leaked (referenced by no table)`);
    }
  }
  if (result.leaks > 20) result.messages.push(`${options.repair ? 'Repairing' : 'ERROR'} ... ${result.leaks - 20} more leaked clusters`);
  const imageEndOffset = (lastUsed + 1) * clusterSize;
  const copied = allocationEnd !== firstCopyOffset;
  if (options.repair && result.leaks > 0 && imageEndOffset < fileEnd && !copied) {
    result.leaksFixed = (fileEnd - imageEndOffset) / clusterSize;
    await file.truncate(imageEndOffset);
  }
  if (options.repair && result.corruptions === result.corruptionsFixed && header.features & QED_F_NEED_CHECK) {
    await file.flush();
    await writeHeader(file, { ...header, features: header.features & ~QED_F_NEED_CHECK });
  }
  // qemu-img reports no image end offset for QED; neither do we.
  result.totalClusters = Math.ceil(header.imageSize / clusterSize);
  result.allocatedClusters = allocatedDataClusters;
  return result;
}

function describe(offset: number): string {
  return offset === -1 ? 'above 2^53' : String(offset);
}
