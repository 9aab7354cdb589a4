/**
 * qcow2 check, part 3: writing a whole new refcount structure from counted
 * references, when the old one cannot hold the repair (a cluster with no
 * refcount block, a damaged refcount table or block).
 *
 * Crash safety: the new refcount blocks and table are written past the
 * current end of the image, where nothing points, and flushed; only then is
 * the header pointed at them (refcount_table_offset and
 * refcount_table_clusters, 12 bytes inside the first sector, one write), and
 * flushed again. A crash before the header write leaves the old structure in
 * force (the new clusters lie past its end, unreferenced); after it, the new
 * one. The old structure's clusters are then leaks, which the caller repairs
 * in the new structure.
 *
 * Concurrency: runs inside a check, on an image nobody else writes.
 */
import type { Protocol } from '../../block/types.js';
import type { Qcow2Header } from './header.js';
import { refcountsPerBlock, setRefcount } from './refcount-entries.js';
import type { RefcountArray } from './check-refs.js';

export interface NewRefcountStructure {
  tableOffset: number;
  tableClusters: number;
  table: Buffer;
}

/** Blocks (by index) that hold a non-zero count, new structure at [start, start + count) included. */
function usedBlocks(refs: RefcountArray, perBlock: number, start: number, count: number): number[] {
  const total = Math.max(refs.length, start + count);
  const blocks: number[] = [];
  for (let block = 0; block * perBlock < total; block++) {
    const first = block * perBlock;
    const last = Math.min(first + perBlock, total);
    let used = first < start + count && last > start;
    for (let cluster = first; !used && cluster < last && cluster < refs.length; cluster++) used = refs.get(cluster) !== 0;
    if (used) blocks.push(block);
  }
  return blocks;
}

/**
 * Writes refcount blocks holding `refs` and a refcount table for them past
 * the end of the file, then points the header at them. `refs` gains the new
 * clusters (count 1 each).
 */
export async function writeRefcountStructure(file: Protocol, header: Qcow2Header, refs: RefcountArray): Promise<NewRefcountStructure> {
  const { clusterSize, refcountOrder } = header;
  const perBlock = refcountsPerBlock(clusterSize, refcountOrder);
  const start = Math.max(refs.length, Math.ceil((await file.size()) / clusterSize));
  // The structure's own clusters need counts too: grow until blocks and table cover themselves.
  // A fixed point: block count and table size only grow, so this ends.
  let blockCount = 0;
  let tableClusters = 1;
  let blocks: number[];
  for (;;) {
    blocks = usedBlocks(refs, perBlock, start, blockCount + tableClusters);
    const needed = Math.ceil(((blocks[blocks.length - 1]! + 1) * 8) / clusterSize);
    if (blocks.length === blockCount && needed <= tableClusters) break;
    blockCount = blocks.length;
    tableClusters = Math.max(needed, tableClusters);
  }
  for (let cluster = start; cluster < start + blockCount + tableClusters; cluster++) refs.set(cluster, 1);
  const tableOffset = (start + blockCount) * clusterSize;
  const blockBytes = Buffer.alloc(blockCount * clusterSize);
  const table = Buffer.alloc(tableClusters * clusterSize);
  blocks.forEach((block, position) => {
    const bytes = blockBytes.subarray(position * clusterSize, (position + 1) * clusterSize);
    const first = block * perBlock;
    const last = Math.min(first + perBlock, refs.length);
    for (let cluster = first; cluster < last; cluster++) {
      const count = refs.get(cluster);
      if (count !== 0) setRefcount(bytes, cluster - first, refcountOrder, count);
    }
    table.writeBigUInt64BE(BigInt((start + position) * clusterSize), block * 8);
  });
  if (blockCount > 0) await file.write(start * clusterSize, blockBytes);
  await file.write(tableOffset, table);
  await file.flush();
  const pointer = Buffer.alloc(12);
  pointer.writeBigUInt64BE(BigInt(tableOffset), 0);
  pointer.writeUInt32BE(tableClusters, 8);
  await file.write(48, pointer);
  await file.flush();
  return { tableOffset, tableClusters, table };
}
