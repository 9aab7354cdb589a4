/**
 * When a qcow2 host cluster freed while the image is open may be handed out
 * again (refcounts.ts asks; writable.ts reports requests and flushes).
 *
 * A freed cluster is quarantined until both hold:
 * - durable: the refcount decrement that freed it was written and a flush of
 *   the file began after that write and ended (the L2/L1/header change that
 *   dropped the reference was written before the decrement, so it is durable
 *   too). Otherwise a crash could leave the old entry on disk next to the new
 *   owner's entry: two references to one cluster, which qemu-img check calls
 *   corruption, or the old guest offset showing another offset's data;
 * - no request that began before the free is still in flight: a read (or an
 *   in-place write or punch) that looked up the old entry must never meet the
 *   new owner's bytes. Requests are counted per epoch (`RequestEpochs`); each
 *   free starts a new epoch, and the cluster waits until no request of an
 *   older epoch remains. Requests never wait for this; allocation only skips
 *   clusters still quarantined and takes them later.
 *
 * Concurrency: `RequestEpochs.begin`/`end` run on any request, without a lock
 * (synchronous counter updates). Everything in `Quarantine` runs under the
 * image's allocation lock, except `flushStarting`/`flushed`, which only
 * compare sequence numbers: a flush covers what was written before it began.
 */

/** In-flight requests (reads, in-place writes, zeroing) counted by the epoch they began in. */
export class RequestEpochs {
  private epoch = 0;
  /** Requests in flight that began in the current epoch (the hot path: a field, no map). */
  private current = 0;
  /** Requests in flight that began in earlier epochs, by epoch (empty but for frees during requests). */
  private readonly older = new Map<number, number>();

  /** A request begins: returns its token for `end`. */
  begin(): number {
    this.current++;
    return this.epoch;
  }

  end(epoch: number): void {
    if (epoch === this.epoch) {
      this.current--;
      return;
    }
    const left = (this.older.get(epoch) ?? 1) - 1;
    if (left === 0) this.older.delete(epoch);
    else this.older.set(epoch, left);
  }

  /** Starts a new epoch (a cluster is freed) and returns it. */
  advance(): number {
    if (this.current > 0) this.older.set(this.epoch, this.current);
    this.current = 0;
    return ++this.epoch;
  }

  /** The oldest epoch a request in flight began in; Infinity when none is in flight. */
  oldest(): number {
    let oldest = this.current > 0 ? this.epoch : Infinity;
    for (const epoch of this.older.keys()) if (epoch < oldest) oldest = epoch;
    return oldest;
  }
}

interface Freed {
  cluster: number;
  /** The epoch the free started: requests of older epochs may still use the cluster. */
  epoch: number;
  /** Write sequence number of the refcount write that carried the decrement (0: not written yet). */
  seq: number;
}

export class Quarantine {
  private readonly held = new Set<number>();
  /** Decrement in memory only. */
  private unwritten: Freed[] = [];
  /** Decrement written, waiting for a flush that began after `seq`. */
  private readonly written: Freed[] = [];
  /** Durable, waiting for older requests to finish. */
  private readonly durable: Freed[] = [];
  private seq = 0;

  constructor(private readonly epochs: RequestEpochs | undefined) {}

  /** True while `cluster` may not be handed out. */
  has(cluster: number): boolean {
    return this.held.has(cluster);
  }

  get size(): number {
    return this.held.size;
  }

  /** `cluster` just got refcount 0 (in memory). */
  freed(cluster: number): void {
    this.held.add(cluster);
    this.unwritten.push({ cluster, epoch: this.epochs?.advance() ?? 0, seq: 0 });
  }

  /** Every refcount change made so far has been written to the file (not flushed). */
  allWritten(): void {
    if (this.unwritten.length === 0) return;
    const seq = ++this.seq;
    for (const freed of this.unwritten) freed.seq = seq;
    this.written.push(...this.unwritten);
    this.unwritten = [];
  }

  /** A flush of the file begins: returns what it covers, for `flushed`. */
  flushStarting(): number {
    return this.seq;
  }

  /** A flush that began at `covered` ended. (Each list is in the order of the frees: seq and epoch only grow.) */
  flushed(covered: number): void {
    let count = 0;
    while (count < this.written.length && this.written[count]!.seq <= covered) count++;
    if (count === 0) return;
    this.durable.push(...this.written.splice(0, count));
  }

  /** True when some cluster is durable and may be reclaimable now. */
  get anyDurable(): boolean {
    return this.durable.length > 0;
  }

  /** Removes and returns the clusters that are durable and that no older request can still reach. */
  takeReclaimable(): number[] {
    if (this.durable.length === 0) return [];
    const oldest = this.epochs?.oldest() ?? Infinity;
    let count = 0;
    while (count < this.durable.length && this.durable[count]!.epoch <= oldest) count++;
    const taken = this.durable.splice(0, count).map((freed) => freed.cluster);
    for (const cluster of taken) this.held.delete(cluster);
    return taken;
  }
}
