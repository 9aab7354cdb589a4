/**
 * qcow2 address arithmetic and table entries: guest offset -> L1 index / L2
 * index / subcluster, and the decoding of L1 and L2 entries (standard,
 * compressed, extended with subcluster bitmaps) into what a cluster is, the
 * way qemu's qcow2_get_subcluster_type classifies it. Entries are big-endian
 * 64-bit words read as two 32-bit halves (the hot path avoids bigint).
 */
import type { Qcow2Header } from './header.js';
import { INCOMPAT_DATA_FILE, INCOMPAT_EXTENDED_L2 } from './header.js';

/** A cluster's (or subcluster's) state, after qemu's QCow2SubclusterType. */
export const enum Kind {
  /** Not allocated here: the backing file (or zeros). */
  Unallocated,
  /** Reads as zeros. */
  Zero,
  /** Stored as is at a host offset. */
  Normal,
  /** Compressed; the whole cluster. */
  Compressed,
  /** An entry no valid image has (both bitmap bits set, a subcluster allocated in an unallocated cluster...). */
  Invalid,
}

/** The 64-bit word at `index` of a big-endian table, as [high, low] 32-bit halves. */
export function wordAt(table: Buffer, byteOffset: number): [number, number] {
  return [table.readUInt32BE(byteOffset), table.readUInt32BE(byteOffset + 4)];
}

/** Bits 9-55 of an entry (the host offset of a table or standard cluster); -1 above 2^53. */
export function offsetBits(high: number, low: number): number {
  const top = high & 0x00ffffff;
  if (top >= 0x200000) return -1;
  return top * 0x100000000 + ((low & 0xfffffe00) >>> 0);
}

export class Geometry {
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly extendedL2: boolean;
  readonly hasDataFile: boolean;
  /** Bytes per L2 entry (8, or 16 with extended L2 entries). */
  readonly l2EntryBytes: number;
  readonly l2Entries: number;
  /** Guest bytes covered by one L2 table. */
  readonly l2Span: number;
  /** Bytes per subcluster (the cluster size without extended L2 entries). */
  readonly subclusterSize: number;
  readonly subclustersPerCluster: number;
  /** Compressed descriptors: host offset in bits [0, compressedShift), sector count above. */
  private readonly compressedShift: bigint;
  private readonly compressedSectorMask: bigint;
  private readonly compressedOffsetMask: bigint;

  constructor(header: Qcow2Header) {
    this.clusterBits = header.clusterBits;
    this.clusterSize = header.clusterSize;
    this.extendedL2 = (header.incompatibleFeatures & INCOMPAT_EXTENDED_L2) !== 0n;
    this.hasDataFile = (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
    this.l2EntryBytes = this.extendedL2 ? 16 : 8;
    this.l2Entries = this.clusterSize / this.l2EntryBytes;
    this.l2Span = this.l2Entries * this.clusterSize;
    this.subclustersPerCluster = this.extendedL2 ? 32 : 1;
    this.subclusterSize = this.clusterSize / this.subclustersPerCluster;
    this.compressedShift = BigInt(62 - (this.clusterBits - 8));
    this.compressedSectorMask = (1n << BigInt(this.clusterBits - 8)) - 1n;
    this.compressedOffsetMask = (1n << this.compressedShift) - 1n;
  }

  /** L1 entries needed to cover `size` guest bytes. */
  l1EntriesFor(size: number): number {
    return Math.ceil(size / this.l2Span);
  }

  l1Index(offset: number): number {
    return Math.floor(offset / this.l2Span);
  }

  l2Index(offset: number): number {
    return Math.floor((offset % this.l2Span) / this.clusterSize);
  }

  clusterStart(offset: number): number {
    return offset - (offset % this.clusterSize);
  }

  /** Host offset and byte length of a compressed cluster's data, from its L2 entry. */
  compressedExtent(high: number, low: number): { hostOffset: number; length: number } {
    const entry = (BigInt(high) << 32n) | BigInt(low);
    const hostOffset = Number(entry & this.compressedOffsetMask);
    const sectors = Number((entry >> this.compressedShift) & this.compressedSectorMask) + 1;
    return { hostOffset, length: sectors * 512 - (hostOffset % 512) };
  }
}

export const L2E_COPIED_HIGH = 0x80000000;
export const L2E_COMPRESSED_HIGH = 0x40000000;
export const L2E_ZERO_LOW = 0x1;

/**
 * Classifies subcluster `sub` of the L2 entry whose standard descriptor is
 * (high, low) and whose subcluster bitmap (extended L2 only) is
 * (zeroBits, allocBits).
 */
export function classify(geometry: Geometry, high: number, low: number, zeroBits: number, allocBits: number, sub: number): Kind {
  if (high & L2E_COMPRESSED_HIGH) return Kind.Compressed;
  const offset = offsetBits(high, low);
  const allocated = offset !== 0 || (geometry.hasDataFile && (high & L2E_COPIED_HIGH) !== 0);
  if (!geometry.extendedL2) {
    if (low & L2E_ZERO_LOW) return Kind.Zero;
    return allocated ? Kind.Normal : Kind.Unallocated;
  }
  const alloc = (allocBits >>> sub) & 1;
  const zero = (zeroBits >>> sub) & 1;
  if (alloc && zero) return Kind.Invalid;
  if (zero) return Kind.Zero;
  if (alloc) return allocated ? Kind.Normal : Kind.Invalid;
  return Kind.Unallocated;
}
