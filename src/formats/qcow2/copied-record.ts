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

/** The stored refcounts, block by block. */
export interface RefcountBlocks {
  /** Counts per block: a multiple of 32. */
  readonly perBlock: number;
  /** The block holding `cluster`'s count: null for none (count 0), undefined for one that cannot be read (the OFLAG_COPIED pass skips its clusters). */
  block(cluster: number): Buffer | null | undefined;
  /** Count `index` of a block. */
  countIn(block: Buffer, index: number): number;
  /** True when counts [index, index + count) of a block are all 1. */
  allOne(block: Buffer, index: number, count: number): boolean;
}

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
  mayNeedChanges(stored: RefcountBlocks): boolean {
    if (this.needsFullPass) return true;
    return CopiedRecord.disagrees(this.withFlag, stored, true) || CopiedRecord.disagrees(this.withoutFlag, stored, false);
  }

  private static disagrees(bits: Uint32Array, stored: RefcountBlocks, copied: boolean): boolean {
    const { perBlock } = stored;
    for (let word = 0; word < bits.length; word++) {
      let value = bits[word]!;
      if (value === 0) continue;
      // The 32 clusters of a word share a block (perBlock is a multiple of 32).
      const first = word * 32;
      const block = stored.block(first);
      if (block === undefined) continue;
      if (block === null) {
        // Every count is 0: only an entry with the flag disagrees.
        if (copied) return true;
        continue;
      }
      const index = first % perBlock;
      if (copied && value === 0xffffffff) {
        // A run of clusters all with the flag (a fully allocated stretch): their counts checked at once.
        let words = 1;
        while (word + words < bits.length && bits[word + words] === 0xffffffff && (index + 32 * words) % perBlock !== 0) words++;
        if (!stored.allOne(block, index, 32 * words)) return true;
        word += words - 1;
        continue;
      }
      while (value !== 0) {
        const bit = 31 - Math.clz32(value);
        value &= ~(1 << bit);
        if ((stored.countIn(block, index + bit) === 1) !== copied) return true;
      }
    }
    return false;
  }
}
