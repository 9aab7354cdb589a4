/**
 * qcow2 check: what the counting saw of the OFLAG_COPIED bits of the active
 * L1 and L2 entries, so that the OFLAG_COPIED pass (check-copied.ts) can tell
 * that no entry needs its bit changed without reading every L2 table again.
 *
 * The bit must be set exactly where the cluster an entry points to has
 * refcount 1. Per host cluster, two bits record whether some entry with the
 * flag, and some entry without it, points there; every entry the OFLAG_COPIED
 * pass would look at is recorded (the counting sees the tables as they are on
 * disk then, less the entries it drops, which that pass does not see either),
 * so when every recorded cluster agrees with its stored refcount, that pass
 * has nothing to report or fix. Anything else (a disagreement, a cluster past
 * the end of the file, an entry of an image with a data file that lacks the
 * flag) makes the check run that pass in full, which reports it as before.
 *
 * Concurrency: plain data, filled by one counting and read once after it.
 */

/** The stored refcount of a cluster, undefined where it cannot be read (the OFLAG_COPIED pass skips those). */
export type StoredRefcountOf = (cluster: number) => number | undefined;

export class CopiedRecord {
  private readonly withFlag: Uint32Array;
  private readonly withoutFlag: Uint32Array;
  /** Set when something was seen that only the full OFLAG_COPIED pass can judge. */
  needsFullPass = false;

  /** `clusters`: the host clusters of the file; a reference beyond them needs the full pass. */
  constructor(private readonly clusters: number) {
    const words = Math.ceil(clusters / 32);
    this.withFlag = new Uint32Array(words);
    this.withoutFlag = new Uint32Array(words);
  }

  /** An entry that points into host cluster `cluster`, with the flag set or not. */
  note(cluster: number, copied: boolean): void {
    if (!(cluster >= 0 && cluster < this.clusters)) {
      this.needsFullPass = true;
      return;
    }
    const bits = copied ? this.withFlag : this.withoutFlag;
    bits[cluster >>> 5] = bits[cluster >>> 5]! | (1 << (cluster & 31));
  }

  /** True when the full pass is needed, or when some recorded entry disagrees with its cluster's refcount. */
  mayNeedChanges(refcountOf: StoredRefcountOf): boolean {
    if (this.needsFullPass) return true;
    return CopiedRecord.disagrees(this.withFlag, refcountOf, true) || CopiedRecord.disagrees(this.withoutFlag, refcountOf, false);
  }

  private static disagrees(bits: Uint32Array, refcountOf: StoredRefcountOf, copied: boolean): boolean {
    for (let word = 0; word < bits.length; word++) {
      let value = bits[word]!;
      while (value !== 0) {
        const bit = 31 - Math.clz32(value);
        value &= ~(1 << bit);
        const refcount = refcountOf(word * 32 + bit);
        if (refcount !== undefined && (refcount === 1) !== copied) return true;
      }
    }
    return false;
  }
}
