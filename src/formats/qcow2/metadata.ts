/**
 * Where a qcow2 image keeps its metadata: the header cluster, the L1 tables
 * (the active one and the snapshots'), the refcount table and its blocks, the
 * L2 tables of the L1 table in use, and the snapshot table. A data or
 * compressed cluster that points into any of these is corrupt: reading it
 * would hand the image's own metadata to the guest as data.
 *
 * Built at open from tables that were validated; a writable image adds the
 * tables it allocates and removes the ones it frees (main thread only).
 */
import { nextNonZeroEntry } from '../../block/table-scan.js';
import type { Protocol } from '../../block/types.js';
import { offsetBits, wordAt } from './geometry.js';

export class MetadataClusters {
  private readonly clusters = new Set<number>();

  constructor(private readonly clusterBits: number) {}

  /** Marks [offset, offset + bytes) as metadata. */
  addRange(offset: number, bytes: number): void {
    if (bytes <= 0) return;
    const first = Math.floor(offset / 2 ** this.clusterBits);
    const last = Math.floor((offset + bytes - 1) / 2 ** this.clusterBits);
    for (let cluster = first; cluster <= last; cluster++) this.clusters.add(cluster);
  }

  /** Forgets [offset, offset + bytes) (a freed table). */
  removeRange(offset: number, bytes: number): void {
    if (bytes <= 0) return;
    const first = Math.floor(offset / 2 ** this.clusterBits);
    const last = Math.floor((offset + bytes - 1) / 2 ** this.clusterBits);
    for (let cluster = first; cluster <= last; cluster++) this.clusters.delete(cluster);
  }

  /** Marks every valid, non-zero table offset listed in `table` (L1 -> L2 tables, refcount table -> blocks). */
  addTablesListedIn(table: Buffer, entries: number, clusterSize: number): void {
    for (let index = nextNonZeroEntry(table, 0, entries); index < entries; index = nextNonZeroEntry(table, index + 1, entries)) {
      const [high, low] = wordAt(table, index * 8);
      const offset = offsetBits(high, low);
      if (offset > 0 && offset % clusterSize === 0) this.addRange(offset, clusterSize);
    }
  }

  /** True when the cluster holding host byte `offset` is metadata. */
  contains(offset: number): boolean {
    return this.clusters.has(Math.floor(offset / 2 ** this.clusterBits));
  }
}

/** Reads a table of `entries` 64-bit words. */
export async function readWords(file: Protocol, offset: number, entries: number): Promise<Buffer> {
  const table = Buffer.alloc(entries * 8);
  await file.read(offset, table);
  return table;
}
