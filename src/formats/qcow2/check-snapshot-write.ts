/**
 * qcow2 check, last part: rewriting the snapshot table after `-r all` found
 * entries to fix (extra data cut to 1024 bytes, incomplete version 3
 * entries), as qemu's qcow2_check_fix_snapshot_table does with
 * qcow2_write_snapshots: every entry is written again with at least the 24
 * bytes of extra data qemu 7.2 writes (vm_state_size_large, disk_size,
 * icount; an entry without them gets the 32-bit VM state size, the current
 * virtual size and "no icount"), then its unknown extra data, id and name.
 *
 * Crash safety, in qemu's order: clusters for the new table are allocated
 * (refcounts written and flushed), the table is written there and flushed;
 * only then does the header point at it (nb_snapshots and snapshots_offset,
 * 12 bytes inside the first sector, one write), flushed; last, the old
 * table's clusters lose their reference. A crash before the header write
 * leaves the old table in force and the new clusters leaked; after it, the
 * new table, and at worst the old clusters leaked. Nothing a snapshot
 * references is touched.
 *
 * Clusters come from refcounts.ts (free clusters reused, else appended, with
 * new refcount blocks as needed), never one the refcount pass counted a
 * reference to: the refcounts are trusted only after that pass repaired them.
 *
 * Concurrency: runs at the end of a check, on an image nobody else writes.
 */
import createDebug from 'debug';
import type { Protocol } from '../../block/types.js';
import type { Qcow2Header } from './header.js';
import { MetadataClusters } from './metadata.js';
import { Refcounts } from './refcounts.js';
import type { RefcountArray } from './check-refs.js';
import { ENTRY_HEADER_BYTES, KNOWN_EXTRA_BYTES, MAX_TABLE_BYTES, SNAPSHOT_POINTER_AT, type SnapshotEntry } from './check-snapshots.js';

const log = createDebug('imgmount:qcow2:check');

const NO_ICOUNT = 0xffffffffffffffffn;

/** Clusters never handed out for the new table: metadata and every cluster the refcount pass found referenced. */
class ReferencedClusters extends MetadataClusters {
  private readonly clusterSize: number;

  constructor(clusterBits: number, private readonly refs: RefcountArray) {
    super(clusterBits);
    this.clusterSize = 2 ** clusterBits;
  }

  override contains(offset: number): boolean {
    return super.contains(offset) || this.refs.get(Math.floor(offset / this.clusterSize)) > 0;
  }
}

/** The entries laid out as qemu writes them; throws when they no longer fit qemu's 64 MiB limit. */
export function serializeSnapshotTable(entries: readonly SnapshotEntry[], virtualSize: number): Buffer {
  let length = 0;
  for (const entry of entries) {
    length = Math.ceil(length / 8) * 8 + ENTRY_HEADER_BYTES + Math.max(KNOWN_EXTRA_BYTES, entry.extraDataSize) + idOf(entry).length + nameOf(entry).length;
  }
  if (length > MAX_TABLE_BYTES) throw new RangeError(`the snapshot table would be ${length} bytes, above ${MAX_TABLE_BYTES}`);
  const table = Buffer.alloc(length);
  let at = 0;
  for (const entry of entries) {
    at = Math.ceil(at / 8) * 8;
    const id = idOf(entry);
    const name = nameOf(entry);
    const extraSize = Math.max(KNOWN_EXTRA_BYTES, entry.extraDataSize);
    const vmStateSize = entry.extraDataSize >= 8 ? entry.extra.readBigUInt64BE(0) : BigInt(entry.vmStateSize32);
    const diskSize = entry.extraDataSize >= 16 ? entry.extra.readBigUInt64BE(8) : BigInt(virtualSize);
    const icount = entry.extraDataSize >= 24 ? entry.extra.readBigUInt64BE(16) : NO_ICOUNT;
    table.writeBigUInt64BE(entry.rawL1Offset, at);
    table.writeUInt32BE(entry.l1Size, at + 8);
    table.writeUInt16BE(id.length, at + 12);
    table.writeUInt16BE(name.length, at + 14);
    table.writeUInt32BE(entry.dateSec, at + 16);
    table.writeUInt32BE(entry.dateNsec, at + 20);
    table.writeBigUInt64BE(entry.vmClockNsec, at + 24);
    // As qemu: a VM state too large for 32 bits is 0 here, for older readers to see a disk-only snapshot.
    table.writeUInt32BE(vmStateSize <= 0xffffffffn ? Number(vmStateSize) : 0, at + 32);
    table.writeUInt32BE(extraSize, at + 36);
    at += ENTRY_HEADER_BYTES;
    table.writeBigUInt64BE(vmStateSize, at);
    table.writeBigUInt64BE(diskSize, at + 8);
    table.writeBigUInt64BE(icount, at + 16);
    if (entry.extraDataSize > KNOWN_EXTRA_BYTES) entry.extra.copy(table, at + KNOWN_EXTRA_BYTES, KNOWN_EXTRA_BYTES, entry.extraDataSize);
    at += extraSize;
    id.copy(table, at);
    at += id.length;
    name.copy(table, at);
    at += name.length;
  }
  return table;
}

/** qemu keeps ids and names as C strings: what follows a NUL is not written back. */
function idOf(entry: SnapshotEntry): Buffer {
  return upToNul(entry.idBytes);
}

function nameOf(entry: SnapshotEntry): Buffer {
  return upToNul(entry.nameBytes);
}

function upToNul(bytes: Buffer): Buffer {
  const end = bytes.indexOf(0);
  return end < 0 ? bytes : bytes.subarray(0, end);
}

export interface OldTable {
  offset: number;
  size: number;
  /** The refcount pass counted a reference to each of its clusters (false: it lies too far past the end of the file). */
  counted: boolean;
}

/**
 * Writes `entries` as the new snapshot table and points the header at it
 * (see the ordering above); returns the new table's offset.
 */
export async function rewriteSnapshotTable(
  file: Protocol, header: Qcow2Header, entries: readonly SnapshotEntry[], old: OldTable, refs: RefcountArray,
): Promise<number> {
  const { clusterSize, clusterBits } = header;
  const table = serializeSnapshotTable(entries, header.size);
  const never = new ReferencedClusters(clusterBits, refs);
  never.addRange(old.offset, old.size);
  const refcounts = await Refcounts.load(
    file,
    { clusterBits, refcountOrder: header.refcountOrder, tableOffset: header.refcountTableOffset, tableClusters: header.refcountTableClusters },
    await file.size(),
    never,
    false,
  );
  let offset = 0;
  if (table.length > 0) {
    offset = await refcounts.allocate(Math.ceil(table.length / clusterSize));
    await refcounts.barrier();
    await file.write(offset, table);
    await file.flush();
  }
  const pointer = Buffer.alloc(12);
  pointer.writeUInt32BE(entries.length, 0);
  pointer.writeBigUInt64BE(BigInt(offset), 4);
  await file.write(SNAPSHOT_POINTER_AT, pointer);
  await file.flush();
  log('%s: snapshot table rewritten at %d (%d entries, %d bytes)', file.path, offset, entries.length, table.length);
  if (old.counted && old.size > 0) {
    // Each cluster of the old table holds one reference from it (the refcount pass made the counts match);
    // one shared with other metadata in a damaged image keeps the others'.
    const first = Math.floor(old.offset / clusterSize);
    const last = Math.floor((old.offset + old.size - 1) / clusterSize);
    for (let cluster = first; cluster <= last; cluster++) {
      if ((await refcounts.get(cluster * clusterSize)) > 0) await refcounts.decrement(cluster * clusterSize, 1);
    }
    await refcounts.barrier();
  }
  return offset;
}
