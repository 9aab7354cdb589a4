/**
 * What the power-loss workload and its replay share: the variants (which
 * images are written how), the seeded generator of offsets and write data,
 * and reading an image's dirty / need-check state straight from its header.
 */
import { open } from 'node:fs/promises';

/**
 * The variants per format. `clusterSize` small makes many L2 tables and
 * refcount blocks; `backing` is the backing file's format (none, the same, raw);
 * `close: false` ends the run without closing (the process exits with writes
 * issued and not flushed, need-check / dirty still set); `idle` turns idle
 * clean on (seconds) and pauses now and then so it runs. `zeroAllocated`: before
 * the run, qemu-io fills the first half of the disk and zeroes it again keeping
 * the clusters ("zero, allocated" entries over stale bytes), so the run's
 * writes there rewrite clusters in place and clear their zero flags.
 */
export const VARIANTS = {
  qed: [
    { name: 'qed', clusterSize: 4096, backing: undefined, close: true, idle: 0.3 },
    { name: 'qed-backing', clusterSize: 4096, backing: 'qed', close: false, idle: 0 },
    { name: 'qed-64k-raw-backing', clusterSize: 65536, backing: 'raw', close: true, idle: 0 },
  ],
  qcow2: [
    { name: 'qcow2', clusterSize: 4096, lazy: false, backing: undefined, close: true, idle: 0.3 },
    { name: 'qcow2-lazy', clusterSize: 4096, lazy: true, backing: undefined, close: true, idle: 0.3 },
    { name: 'qcow2-backing', clusterSize: 4096, lazy: false, backing: 'qcow2', close: false, idle: 0 },
    { name: 'qcow2-lazy-backing', clusterSize: 4096, lazy: true, backing: 'qcow2', close: false, idle: 0 },
    { name: 'qcow2-64k-extl2-backing', clusterSize: 65536, lazy: false, extendedL2: true, backing: 'qcow2', close: true, idle: 0 },
    { name: 'qcow2-zero-allocated', clusterSize: 4096, lazy: false, backing: undefined, close: true, idle: 0, zeroAllocated: true },
  ],
};

/** Virtual size of every image (and its backing file). */
export const VIRTUAL_SIZE = 16 << 20;

/** A small seeded generator (mulberry32): numbers in [0, 1) and integers. */
export class Random {
  constructor(seed) {
    this.state = seed >>> 0;
  }

  next() {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** An integer in [low, high]. */
  int(low, high) {
    return low + Math.floor(this.next() * (high - low + 1));
  }

  chance(p) {
    return this.next() < p;
  }
}

/** `length` bytes generated from `seed` (xorshift32): what a write with that seed writes. */
export function seededData(seed, length) {
  const words = new Uint32Array(Math.ceil(length / 4));
  let x = (seed >>> 0) || 0x9e3779b9;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    words[i] = x;
  }
  return Buffer.from(words.buffer, 0, length);
}

/** The bytes a guest op writes: its seeded data, or zeros. */
export function opData(op) {
  return op.kind === 'zero' ? Buffer.alloc(op.length) : seededData(op.seed, op.length);
}

/**
 * The image's own "repair me" state from its header: QED need-check (feature
 * bit 1), qcow2 v3 dirty (incompatible bit 0) and corrupt (bit 1).
 */
export async function headerState(path, format) {
  const handle = await open(path, 'r');
  try {
    const header = Buffer.alloc(80);
    await handle.read(header, 0, header.length, 0);
    if (format === 'qed') return { dirty: (header.readBigUInt64LE(16) & 2n) !== 0n, corrupt: false };
    const version = header.readUInt32BE(4);
    if (version < 3) return { dirty: false, corrupt: false };
    const incompatible = header.readBigUInt64BE(72);
    return { dirty: (incompatible & 1n) !== 0n, corrupt: (incompatible & 2n) !== 0n };
  } finally {
    await handle.close();
  }
}
