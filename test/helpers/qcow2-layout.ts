/**
 * Reading and patching qcow2 images in tests, from the specification (not
 * from our driver): big-endian header fields, where the L2 entry of a guest
 * offset lives, and the raw 64-bit L1/L2 entries.
 */

export const QCOW2 = {
  version: 4,
  backingFileOffset: 8,
  backingFileSize: 16,
  clusterBits: 20,
  size: 24,
  cryptMethod: 32,
  l1Size: 36,
  l1TableOffset: 40,
  refcountTableOffset: 48,
  refcountTableClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64,
  incompatibleFeatures: 72,
  compatibleFeatures: 80,
  autoclearFeatures: 88,
  refcountOrder: 96,
  headerLength: 100,
  compressionType: 104,
} as const;

/** Reads `length` bytes at `offset` of a file; writes bytes at an offset (the shared helpers, under the names used here). */
export { readBytes as readAt, patchBytes as writeAt } from './qemu.js';
import { readBytes as readAt, patchBytes as writeAt } from './qemu.js';

export async function readBE64(path: string, offset: number): Promise<bigint> {
  return (await readAt(path, offset, 8)).readBigUInt64BE(0);
}

export async function writeBE64(path: string, offset: number, value: bigint): Promise<void> {
  const bytes = Buffer.alloc(8);
  bytes.writeBigUInt64BE(value);
  await writeAt(path, offset, bytes);
}

export async function readBE32(path: string, offset: number): Promise<number> {
  return (await readAt(path, offset, 4)).readUInt32BE(0);
}

export async function writeBE32(path: string, offset: number, value: number): Promise<void> {
  const bytes = Buffer.alloc(4);
  bytes.writeUInt32BE(value);
  await writeAt(path, offset, bytes);
}

const OFFSET_MASK = 0x00fffffffffffe00n;

/** Where the L1 entry, the L2 table and the L2 entry for `guestOffset` are (standard 8-byte L2 entries unless `extendedL2`). */
export async function l2EntryLocation(
  path: string,
  guestOffset: number,
  extendedL2 = false,
): Promise<{ clusterSize: number; l1EntryOffset: number; l2Offset: number; l2EntryOffset: number }> {
  const clusterSize = 2 ** (await readBE32(path, QCOW2.clusterBits));
  const entryBytes = extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / entryBytes;
  const l1Index = Math.floor(guestOffset / (l2Entries * clusterSize));
  const l2Index = Math.floor(guestOffset / clusterSize) % l2Entries;
  const l1EntryOffset = Number(await readBE64(path, QCOW2.l1TableOffset)) + l1Index * 8;
  const l2Offset = Number((await readBE64(path, l1EntryOffset)) & OFFSET_MASK);
  if (l2Offset === 0) throw new Error(`guest offset ${guestOffset} has no L2 table`);
  return { clusterSize, l1EntryOffset, l2Offset, l2EntryOffset: l2Offset + l2Index * entryBytes };
}
