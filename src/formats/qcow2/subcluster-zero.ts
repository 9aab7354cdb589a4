/**
 * What zeroing a range does to one cluster of an image with extended L2
 * entries, as qemu's qcow2_subcluster_zeroize does it (block/qcow2-cluster.c
 * zero_in_l2_slice, zero_l2_subclusters): a pure plan, carried out by
 * writable.ts under its allocation lock.
 *
 * - A whole cluster: the entry loses its host cluster (which is freed) and
 *   every zero bit is set, as qemu's zero_in_l2_slice with unmap.
 * - Whole subclusters of a cluster that is not compressed: their zero bits are
 *   set and their allocation bits cleared; the host cluster stays. When every
 *   subcluster is then zero the host cluster is freed too (the same entry as
 *   a whole-cluster zero; qemu keeps the host cluster then).
 * - The parts of subclusters the range does not cover whole, and any part of
 *   a compressed cluster (qemu: "We cannot partially zeroize compressed
 *   clusters"), are written as zeros, unless they already read as zeros.
 *
 * Concurrency: none here (pure).
 */
import { classify, Kind, L2E_COMPRESSED_HIGH, offsetBits, type Geometry } from './geometry.js';

/** Every subcluster of a cluster (one bit each). */
export const ALL_SUBCLUSTERS = 0xffffffff;

export interface SubclusterZeroTarget {
  clusterStart: number;
  /** Guest range [from, to) inside the cluster. */
  from: number;
  to: number;
  high: number;
  low: number;
  zeroBits: number;
  allocBits: number;
}

export interface SubclusterZeroPlan {
  /** The entry becomes "no host cluster, every subcluster zero"; a host cluster it had loses its reference. */
  free: boolean;
  /** New bitmap halves when the entry keeps its host cluster (undefined: the bitmap does not change). */
  bits: { zeroBits: number; allocBits: number } | undefined;
  /** Guest ranges [from, to) to write zeros to. */
  writes: [number, number][];
}

/**
 * Plans the zeroing of [target.from, target.to). `zerosBefore` says whether a subcluster
 * of a kind reads as zeros already; `invalid` builds the error for an impossible bitmap.
 */
export function planSubclusterZero(g: Geometry, target: SubclusterZeroTarget, zerosBefore: (kind: Kind) => boolean, invalid: (sub: number) => Error): SubclusterZeroPlan {
  const { clusterSize, subclusterSize, subclustersPerCluster } = g;
  const { clusterStart, from, to, high, low, zeroBits, allocBits } = target;
  const kindOf = (sub: number): Kind => {
    const kind = classify(g, high, low, zeroBits, allocBits, sub);
    if (kind === Kind.Invalid) throw invalid(sub);
    return kind;
  };
  for (let sub = 0; sub < subclustersPerCluster; sub++) kindOf(sub);
  if (from === clusterStart && to === clusterStart + clusterSize) return { free: true, bits: undefined, writes: [] };
  if (high & L2E_COMPRESSED_HIGH) return { free: false, bits: undefined, writes: [[from, to]] };

  const firstWhole = Math.ceil((from - clusterStart) / subclusterSize);
  const endWhole = Math.floor((to - clusterStart) / subclusterSize);
  const writes: [number, number][] = [];
  const partial = (start: number, end: number): void => {
    if (start < end && !zerosBefore(kindOf(Math.floor((start - clusterStart) / subclusterSize)))) writes.push([start, end]);
  };
  if (firstWhole >= endWhole) {
    // No whole subcluster: the range lies in one subcluster, or across the border of two.
    const border = clusterStart + Math.floor((to - clusterStart) / subclusterSize) * subclusterSize;
    if (border > from && border < to) {
      partial(from, border);
      partial(border, to);
    } else {
      partial(from, to);
    }
    return { free: false, bits: undefined, writes };
  }
  partial(from, clusterStart + firstWhole * subclusterSize);
  partial(clusterStart + endWhole * subclusterSize, to);
  const count = endWhole - firstWhole;
  const mask = count >= 32 ? ALL_SUBCLUSTERS : (((1 << count) - 1) << firstWhole) >>> 0;
  const newZero = (zeroBits | mask) >>> 0;
  const newAlloc = (allocBits & ~mask) >>> 0;
  if (newZero === ALL_SUBCLUSTERS && offsetBits(high, low) > 0) return { free: true, bits: undefined, writes };
  if (newZero === zeroBits >>> 0 && newAlloc === allocBits >>> 0) return { free: false, bits: undefined, writes };
  return { free: false, bits: { zeroBits: newZero, allocBits: newAlloc }, writes };
}
