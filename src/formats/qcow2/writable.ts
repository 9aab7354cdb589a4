/**
 * A qcow2 image opened read-write: guest writes, zeroing and discard on top
 * of the reader in image.ts, with host clusters from refcounts.ts.
 *
 * What a write does to each cluster it touches:
 * - a standard cluster with the COPIED flag (refcount 1) in an L2 table with
 *   the COPIED flag: written in place, with no lock and no metadata change;
 * - a zero cluster that keeps its host cluster (v3 "zero, allocated"): the
 *   cluster is rewritten in place (zeros around the new data), then the zero
 *   flag is cleared;
 * - anything else (unallocated, zero, compressed, or shared with an internal
 *   snapshot): a new cluster is allocated and written whole, the untouched
 *   part copied from what the guest saw there before (the backing file, zeros,
 *   the decompressed or shared cluster), then the L2 entry points to it, then
 *   the old cluster loses a reference. Neighbouring clusters are allocated
 *   together and written with one write.
 * An L2 table that is missing, or shared with a snapshot, is first allocated
 * (a copy of the shared one), flushed, and linked from the L1 table.
 *
 * Ordering on disk: data and refcounts, a flush, then the L2 entry, then (for
 * a new table) the L1 entry; references are dropped only after the entry that
 * held them is on disk. The flush is shared: new L2 entries are set in memory
 * at once (reads use them; the table stays pinned) and written together after
 * the next fdatasync, as qemu's L2 cache waits for its refcount cache
 * (link-persister.ts: when, and how allocating writes go on during it).
 * With lazy refcounts the dirty bit is set and flushed before the first
 * change, entries are written at once, and the bit is cleared on a clean
 * close, and after a while without writes (markClean, idle clean: refcounts
 * written and flushed first), until the next change.
 *
 * Zeroing and discard punch the host range of clusters written in place
 * (their entries stay, so nothing is freed that a concurrent in-place write
 * could still reach); other clusters become zero clusters (v3) or are
 * overwritten with zeros (v2), so the range always reads as zeros afterwards.
 *
 * External data file (qemu's has_data_file): guest data lives in the data
 * file at host offset = guest offset, as qemu allocates it (no refcounts for
 * data clusters, which the qcow2 file does not hold); every allocated entry
 * carries COPIED, and a write is in place or links the cluster at its guest
 * offset. The data file is flushed before an entry that links it is written.
 * With data_file_raw, zeroing and discard also zero the data file's range, so
 * it stays a raw image of the guest disk. open() refuses (read-only) an image
 * whose entries do not map 1:1: a new cluster could land on another's data.
 *
 * Damaged metadata met while writing sets the corrupt bit (v3); from then on
 * writes fail with EIO and reads go on.
 *
 * Clusters freed while the image is open are handed out again once their
 * decrement and the change that freed them are durable and every request
 * (read, write, zero) that began before the free has finished: reads are
 * counted through `beginRead`/`endRead` (the generic layer calls them around
 * map() and the reads it leads to), writes and zeroing here (quarantine.ts).
 *
 * Concurrency: in-place writes run concurrently and without a lock; every
 * metadata change (allocation, zero flags, the dirty bit) runs under
 * `allocationLock`, which looks the range up again once held.
 */
import { announce, flushToDisk } from '../../block/events.js';
import { Mutex } from 'async-mutex';
import { constants as osConstants } from 'node:os';
import createDebug from 'debug';
import { BlockError, CorruptImageError } from '../../block/errors.js';
import { settleAll } from '../../block/settle.js';
import type { BackingReader, OpenOptions, Protocol } from '../../block/types.js';
import type { TableHandle } from '../../cache/table-cache.js';
import { classify, Kind, L2E_COMPRESSED_HIGH, L2E_COPIED_HIGH, L2E_ZERO_LOW, offsetBits, wordAt } from './geometry.js';
import { AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from './header.js';
import { Qcow2Image, type Qcow2Parts } from './image.js';
import { LinkPersister } from './link-persister.js';
import { Refcounts } from './refcounts.js';
import { RequestEpochs } from './quarantine.js';
import { dropBitmaps } from './bitmap-release.js';
import { CompressedWriter } from './compressed-write.js';
import { ALL_SUBCLUSTERS, planSubclusterZero, type SubclusterZeroTarget } from './subcluster-zero.js';

const log = createDebug('imgmount:qcow2');

/** Header field offsets (v3) this module rewrites. */
const INCOMPATIBLE_AT = 72;
const AUTOCLEAR_AT = 88;

/**
 * One cluster's share of a request, with its L2 entry as it was looked up: the
 * guest range inside the cluster, the entry's words and, with extended L2, the
 * subcluster bitmap's zero and allocation halves (0 otherwise), as subcluster-zero.ts takes them.
 */
interface Slot extends SubclusterZeroTarget {
  l1Index: number;
  l2Index: number;
  /** The L2 table is this image's alone (COPIED in the L1 entry). */
  tableOwned: boolean;
}

/** An L2 entry to store: the standard descriptor, and with extended L2 the bitmap (zero half, allocation half). */
type Entry = [high: number, low: number] | [high: number, low: number, zeroBits: number, allocBits: number];

const enum Action {
  /** Written where it is. */
  InPlace,
  /** Rewritten whole where it is (a zero cluster that kept its host cluster), then the zero flag goes. */
  Rewrite,
  /** A new cluster. */
  Allocate,
}

export class WritableQcow2Image extends Qcow2Image {
  private readonly allocationLock = new Mutex();
  private readBacking: BackingReader | undefined;
  private readonly lazy: boolean;
  private readonly notify: (line: string) => void;
  /** Set when this process set the dirty bit (lazy refcounts); cleared on a clean close and by an idle clean. */
  private dirtyMarked = false;
  /** Set once damaged metadata was met while writing: writes fail from then on. */
  private brokenBy: string | undefined;
  /** L2 entries set in memory whose disk write waits for the next flush of the file (without lazy refcounts). */
  private readonly links: LinkPersister;
  /** Compressed writes (compressed-write.ts), made on the first one. */
  private compressed: CompressedWriter | undefined;

  private constructor(
    parts: Qcow2Parts,
    private readonly refcounts: Refcounts,
    /** Requests in flight, for the quarantine of freed clusters. */
    private readonly epochs: RequestEpochs,
  ) {
    super(parts);
    refcounts.deferWrites = true;
    this.links = new LinkPersister(
      {
        lock: this.allocationLock,
        refcounts,
        flushData: () => this.flushData(),
        writeEntries: (offset, bytes) => {
          announce(this.file, 'l2_update');
          return this.file.write(offset, bytes);
        },
        isClosed: () => this.closed,
        path: this.file.path,
      },
      this.geometry.l2EntryBytes,
    );
    this.lazy = this.header.version === 3 && (this.header.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
    this.notify = parts.notice ?? ((line: string) => log(line));
  }

  /** Where guest data clusters live: the external data file, or the image file itself. */
  private get data(): Protocol {
    return this.dataFile ?? this.file;
  }

  /** Whether the entry points at a host cluster (with a data file, host offset 0 counts when COPIED is set). */
  private hasHost(high: number, low: number): boolean {
    return offsetBits(high, low) > 0 || (this.dataFile !== undefined && (high & L2E_COPIED_HIGH) !== 0 && (high & L2E_COMPRESSED_HIGH) === 0);
  }

  /** Makes guest data durable: the data file too when there is one. */
  private async flushData(): Promise<void> {
    if (this.dataFile) await flushToDisk(this.dataFile);
    await this.refcounts.flushed(() => flushToDisk(this.file));
  }

  /** A read begins (the generic layer, before map()): clusters freed from now on wait until it ends. */
  beginRead(): number {
    return this.epochs.begin();
  }

  endRead(token: number): void {
    this.epochs.end(token);
  }

  /** Compressed clusters' cache key: a host cluster handed out again holds other bytes. */
  protected override hostGeneration(offset: number): number {
    return this.refcounts.generation(offset);
  }

  /** Host clusters for `count` new data clusters from guest cluster `guestStart`: at the guest offset with a data file. */
  private async allocateData(guestStart: number, count: number): Promise<number> {
    if (this.dataFile) return guestStart;
    const hostOffset = await this.refcounts.allocate(count);
    this.fileSize = Math.max(this.fileSize, this.refcounts.endOffset);
    return hostOffset;
  }

  /** Clusters just allocated that read as zeros until written (never in a data file, which may hold old bytes). */
  private isFresh(hostOffset: number): boolean {
    return this.dataFile === undefined && this.refcounts.isFresh(hostOffset);
  }

  /** Opens the image for writing; clears autoclear bits it does not maintain (a header write only when one is set). */
  static async open(parts: Qcow2Parts, options: OpenOptions): Promise<WritableQcow2Image> {
    const { header } = parts;
    const lazy = header.version === 3 && (header.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
    const epochs = new RequestEpochs();
    const refcounts = await Refcounts.load(
      parts.file,
      { clusterBits: header.clusterBits, refcountOrder: header.refcountOrder, tableOffset: header.refcountTableOffset, tableClusters: header.refcountTableClusters },
      parts.fileSize,
      parts.metadata,
      lazy,
      epochs,
    );
    const image = new WritableQcow2Image({ ...parts, notice: options.notice ?? parts.notice }, refcounts, epochs);
    await image.clearAutoclearBits();
    return image;
  }

  attachBacking(reader: BackingReader | undefined): void {
    this.readBacking = reader;
  }

  /**
   * The specification: a program that changes an image clears the autoclear bits it
   * does not keep up to date. Persistent dirty bitmaps then become invalid and are
   * dropped (bitmap-release.ts).
   */
  private async clearAutoclearBits(): Promise<void> {
    if (this.header.version !== 3) return;
    const kept = this.header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW;
    if (kept === this.header.autoclearFeatures) return;
    if (this.header.autoclearFeatures & AUTOCLEAR_BITMAPS) {
      const names = (this.parts.bitmaps ?? []).map((bitmap) => bitmap.name);
      this.notify(
        `${this.file.path}: its persistent dirty bitmaps${names.length > 0 ? ` (${names.join(', ')})` : ''} are no longer valid once it is written here; incremental backups based on them need a new full backup`,
      );
    }
    await this.writeHeaderWord(AUTOCLEAR_AT, kept);
    await flushToDisk(this.file);
    const hadBitmaps = (this.header.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n;
    this.header = { ...this.header, autoclearFeatures: kept };
    // Invalid from now on: their clusters are freed, or qemu-img check would count them as leaks.
    const { bitmaps } = this.parts.extensions;
    if (hadBitmaps && bitmaps) await dropBitmaps(this.file, this.header, bitmaps, this.refcounts, this.fileSize);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.assertWritable();
    // In-place writes go to host offsets looked up here: freed clusters wait until this ends.
    const epoch = this.epochs.begin();
    try {
      await this.writeNow(offset, data);
    } finally {
      this.epochs.end(epoch);
    }
  }

  private async writeNow(offset: number, data: Buffer): Promise<void> {
    const slots = await this.lookup(offset, data.length);
    const parts: Promise<void>[] = [];
    let slow: Slot[] = [];
    const flushSlow = (): void => {
      if (slow.length === 0) return;
      const from = slow[0]!.from;
      const to = slow[slow.length - 1]!.to;
      parts.push(this.allocatingWrite(from, data.subarray(from - offset, to - offset)));
      slow = [];
    };
    try {
      for (const slot of slots) {
        if (this.actionFor(slot) === Action.InPlace) {
          flushSlow();
          const hostOffset = offsetBits(slot.high, slot.low) + (slot.from - slot.clusterStart);
          parts.push(this.writeData(hostOffset, data.subarray(slot.from - offset, slot.to - offset)));
        } else {
          slow.push(slot);
        }
      }
      flushSlow();
    } catch (error) {
      // A damaged entry refused here: the parts already started finish (their failures handled) first.
      await Promise.allSettled(parts);
      throw error;
    }
    // Every part finishes before the request answers, also when one fails early.
    await settleAll(parts);
  }

  async zero(offset: number, length: number): Promise<void> {
    await this.zeroOrDiscard(offset, length, false);
  }

  /** `unmap` (discard): whole clusters this image owns are freed too (v3), as qemu's discard does. */
  private async zeroOrDiscard(offset: number, length: number, unmap: boolean): Promise<void> {
    this.assertWritable();
    // In-place punches go to host offsets looked up here: as in write.
    const epoch = this.epochs.begin();
    try {
      await this.zeroNow(offset, length, unmap);
    } finally {
      this.epochs.end(epoch);
    }
  }

  /** Whether a discard frees the slot's cluster (a whole one this image owns, v3, in the image file, standard L2) rather than punching it. */
  private freesOnDiscard(slot: Slot): boolean {
    const whole = slot.from === slot.clusterStart && slot.to === slot.clusterStart + this.geometry.clusterSize;
    return whole && this.header.version === 3 && !this.dataFile && !this.geometry.extendedL2 && offsetBits(slot.high, slot.low) > 0;
  }

  private async zeroNow(offset: number, length: number, unmap: boolean): Promise<void> {
    // data_file_raw: the data file stays a raw image of the disk, whatever the entries say (as qemu, first).
    if (this.dataFile && this.header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) await this.clearHostRange(offset, length);
    const slots = await this.lookup(offset, length);
    const parts: Promise<void>[] = [];
    const metadata: Slot[] = [];
    const subclusters: Slot[] = [];
    try {
      for (const slot of slots) {
        // Extended L2 in the image file: zero bits, as qemu (subcluster-zero.ts).
        if (this.geometry.extendedL2 && !this.dataFile) {
          if (!this.readsAsZeros(slot)) subclusters.push(slot);
          continue;
        }
        if (unmap && this.freesOnDiscard(slot) && (this.actionFor(slot) !== Action.Allocate || this.kindOf(slot) === Kind.Zero)) {
          // A cluster this image owns, holding data or zeros ("zero, allocated"): its entry becomes a zero cluster, the cluster is freed.
          metadata.push(slot);
          continue;
        }
        // Every subcluster the range touches, not only the first (extended L2: a zero one before data ones).
        if (this.readsAsZeros(slot)) continue;
        if (this.actionFor(slot) === Action.InPlace) {
          const hostOffset = offsetBits(slot.high, slot.low) + (slot.from - slot.clusterStart);
          parts.push(this.clearHostRange(hostOffset, slot.to - slot.from));
        } else if (this.geometry.extendedL2) {
          if (!this.allSubclusters(slot, Kind.Zero)) parts.push(this.write(slot.from, Buffer.alloc(slot.to - slot.from)));
        } else {
          metadata.push(slot);
        }
      }
    } catch (error) {
      await Promise.allSettled(parts); // as in write
      throw error;
    }
    if (metadata.length > 0) parts.push(this.zeroUnderLock(metadata, unmap));
    if (subclusters.length > 0) parts.push(this.zeroSubclusters(subclusters));
    await settleAll(parts);
  }

  /** Writes one whole guest cluster compressed, into an unallocated cluster only (compressed-write.ts). */
  async writeCompressed(offset: number, data: Buffer): Promise<void> {
    this.assertWritable();
    this.compressed ??= new CompressedWriter({
      file: this.file,
      geometry: this.geometry,
      refcounts: this.refcounts,
      compressionType: this.header.compressionType,
      virtualSize: this.virtualSize,
      hasDataFile: this.dataFile !== undefined,
      underLock: (change) => this.underLock(change),
      ownedTable: (l1Index) => this.ownedTable(l1Index),
      link: (table, first, entries) => this.link(table, first, entries, [], true),
      markDirty: () => this.markDirty(),
      grew: () => {
        this.fileSize = Math.max(this.fileSize, this.refcounts.endOffset);
      },
      writePlain: (at, bytes) => this.write(at, bytes),
    });
    await this.compressed.write(offset, data);
  }

  /** Discard reads as zeros afterwards here, as a punched hole must: the same as zero. */
  async discard(offset: number, length: number): Promise<void> {
    await this.zeroOrDiscard(offset, length, true);
  }

  override async flush(): Promise<void> {
    if (this.closed) return;
    await this.links.soon();
    await this.flushData();
    // Freed clusters whose free this flush made durable: punched now, so the file's allocated size shrinks.
    if (this.refcounts.reclaimable) await this.allocationLock.runExclusive(() => this.refcounts.reclaim());
  }

  /**
   * Idle clean (the generic layer calls it after a while without writes): the pending
   * L2 entries and deferred refcounts are written and flushed, then with lazy refcounts
   * the dirty bit is cleared (durably); markDirty sets it again before the next
   * metadata change. Without lazy refcounts there is no bit, but a crash from then on
   * leaves no leaked cluster either. An image that met damaged metadata stays dirty.
   */
  async markClean(): Promise<void> {
    if (this.closed || this.links.closing) return;
    await this.links.soon();
    await this.allocationLock.runExclusive(async () => {
      if (this.closed || this.brokenBy !== undefined) return;
      if (!this.links.empty) return; // written to since: not idle after all
      await this.refcounts.writeBack();
      await this.flushData();
      // The frees this flush made durable: punched now, so an idle image gives their space back.
      if (this.refcounts.reclaimable) await this.refcounts.reclaim();
      if (!this.dirtyMarked) return;
      // Unmarked first: if the header write fails, the next change sets the bit again.
      this.dirtyMarked = false;
      await this.setIncompatible(this.header.incompatibleFeatures & ~INCOMPAT_DIRTY);
      log('%s: dirty bit cleared (idle)', this.file.path);
    });
  }

  override async close(): Promise<void> {
    if (this.closed) return;
    await this.links.beginClose(); // a persist in flight ends first: its entries are older than what is pending now
    await this.allocationLock.runExclusive(async () => {
      try {
        await this.links.persistLocked();
        if (this.dirtyMarked) {
          await this.flushData();
          await this.setIncompatible(this.header.incompatibleFeatures & ~INCOMPAT_DIRTY);
          this.dirtyMarked = false;
          log('%s: dirty bit cleared on close', this.file.path);
        } else {
          await this.flushData();
        }
      } finally {
        await super.close();
      }
    });
  }

  // --- lookup ---

  /** The L2 entries of every cluster [offset, offset + length) touches. */
  private async lookup(offset: number, length: number): Promise<Slot[]> {
    const g = this.geometry;
    const slots: Slot[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const l1Index = g.l1Index(pos);
      const spanEnd = Math.min(end, (l1Index + 1) * g.l2Span);
      const l2Offset = this.l2TableOffset(l1Index);
      const tableOwned = l2Offset !== 0 && (this.l1.readUInt32BE(l1Index * 8) & L2E_COPIED_HIGH) !== 0;
      const collect = (table: Buffer | undefined): void => {
        for (let at = pos; at < spanEnd; ) {
          const clusterStart = g.clusterStart(at);
          const to = Math.min(spanEnd, clusterStart + g.clusterSize);
          const l2Index = g.l2Index(at);
          const [high, low] = table ? wordAt(table, l2Index * g.l2EntryBytes) : [0, 0];
          const [zeroBits, allocBits] = table && g.extendedL2 ? wordAt(table, l2Index * g.l2EntryBytes + 8) : [0, 0];
          slots.push({ l1Index, l2Index, clusterStart, from: at, to, high, low, zeroBits, allocBits, tableOwned });
          at = to;
        }
      };
      if (l2Offset === 0) collect(undefined);
      else await this.l2Cache.read(l2Offset, collect);
      pos = spanEnd;
    }
    return slots;
  }

  /** The kind of the slot's cluster; with extended L2, of its first subcluster the request touches. */
  private kindOf(slot: Slot): Kind {
    return classify(this.geometry, slot.high, slot.low, slot.zeroBits, slot.allocBits, this.subclusterOf(slot, slot.from));
  }

  private subclusterOf(slot: Slot, offset: number): number {
    return Math.floor((offset - slot.clusterStart) / this.geometry.subclusterSize);
  }

  /** True when the guest sees zeros in every subcluster [from, to) touches. */
  private readsAsZeros(slot: Slot): boolean {
    for (let sub = this.subclusterOf(slot, slot.from); sub <= this.subclusterOf(slot, slot.to - 1); sub++) {
      if (!this.zerosBefore(classify(this.geometry, slot.high, slot.low, slot.zeroBits, slot.allocBits, sub))) return false;
    }
    return true;
  }

  /** True when every subcluster [from, to) touches is of `kind`. */
  private allSubclusters(slot: Slot, kind: Kind): boolean {
    for (let sub = this.subclusterOf(slot, slot.from); sub <= this.subclusterOf(slot, slot.to - 1); sub++) {
      if (classify(this.geometry, slot.high, slot.low, slot.zeroBits, slot.allocBits, sub) !== kind) return false;
    }
    return true;
  }

  private actionFor(slot: Slot): Action {
    const kind = this.kindOf(slot);
    const owned = slot.tableOwned && (slot.high & L2E_COPIED_HIGH) !== 0 && this.hasHost(slot.high, slot.low);
    if (this.geometry.extendedL2) {
      if (owned && this.allSubclusters(slot, Kind.Normal)) {
        this.validDataCluster(slot.high, slot.low, slot.clusterStart);
        return Action.InPlace;
      }
      return Action.Allocate;
    }
    if (kind === Kind.Normal && owned) {
      this.validDataCluster(slot.high, slot.low, slot.clusterStart);
      return Action.InPlace;
    }
    if (kind === Kind.Zero && owned && offsetBits(slot.high, slot.low) % this.geometry.clusterSize === 0) return Action.Rewrite;
    return Action.Allocate;
  }

  // --- allocating writes ---

  /** Writes a range that needed metadata changes when looked at; serialized with every other change. */
  private async allocatingWrite(offset: number, data: Buffer): Promise<void> {
    await this.underLock(async () => {
      const g = this.geometry;
      const slots = await this.lookup(offset, data.length);
      for (let i = 0; i < slots.length; ) {
        // One L2 table at a time.
        const l1Index = slots[i]!.l1Index;
        let j = i;
        while (j < slots.length && slots[j]!.l1Index === l1Index) j++;
        const span = slots.slice(i, j);
        const table = await this.ownedTable(l1Index);
        try {
          // The table may have been copied: its entries are the ones to use now.
          for (const slot of span) {
            [slot.high, slot.low] = wordAt(table.handle.table, slot.l2Index * g.l2EntryBytes);
            slot.tableOwned = true;
          }
          await this.writeSpan(span, offset, data, table);
        } finally {
          table.handle.release();
        }
        i = j;
      }
    });
  }

  /** Writes the clusters of one L2 table: in place where possible, else into new clusters allocated together. */
  private async writeSpan(span: Slot[], offset: number, data: Buffer, table: { offset: number; handle: TableHandle<Buffer> }): Promise<void> {
    let run: Slot[] = [];
    const allocateRun = async (): Promise<void> => {
      if (run.length > 0) await this.allocateClusters(run, offset, data, table);
      run = [];
    };
    for (const slot of span) {
      const action = this.actionFor(slot);
      if (action === Action.Allocate && this.geometry.extendedL2 && !(slot.high & L2E_COMPRESSED_HIGH)) {
        await allocateRun();
        await this.writeSubclusters(slot, data.subarray(slot.from - offset, slot.to - offset), table);
        continue;
      }
      if (action === Action.Allocate) {
        run.push(slot);
        continue;
      }
      await allocateRun();
      const hostCluster = offsetBits(slot.high, slot.low);
      const part = data.subarray(slot.from - offset, slot.to - offset);
      if (action === Action.InPlace) {
        await this.writeData(hostCluster + (slot.from - slot.clusterStart), part);
      } else {
        const cluster = Buffer.alloc(this.geometry.clusterSize);
        part.copy(cluster, slot.from - slot.clusterStart);
        await this.writeData(hostCluster, cluster);
        // The zero flag may be cleared on disk only once the rewritten cluster is: until then it
        // holds whatever it held before it was zeroed (found by scripts/power-loss.sh).
        await this.link(table, slot.l2Index, [[(slot.high | L2E_COPIED_HIGH) >>> 0, (slot.low & ~L2E_ZERO_LOW) >>> 0]], [], true);
      }
    }
    await allocateRun();
  }

  /** Allocates neighbouring clusters for `run`, writes them whole, links them, and releases what they replace. */
  private async allocateClusters(run: Slot[], offset: number, data: Buffer, table: { offset: number; handle: TableHandle<Buffer> }): Promise<void> {
    const { clusterSize } = this.geometry;
    await this.markDirty();
    const first = run[0]!;
    const last = run[run.length - 1]!;
    if (run.every((slot) => this.zerosBefore(this.kindOf(slot)) || (slot.from === slot.clusterStart && slot.to === slot.clusterStart + clusterSize))) {
      // Nothing to copy: the guest saw zeros wherever the request leaves a cluster untouched.
      const hostOffset = await this.allocateData(first.clusterStart, run.length);
      const fresh = this.isFresh(hostOffset);
      if (fresh || (first.from === first.clusterStart && last.to === last.clusterStart + clusterSize)) {
        // Whole clusters, or fresh ones (they read as zeros until written): the request's bytes are
        // all there is to write, from its own buffer.
        announce(this.file, 'write_aio');
        await this.data.write(hostOffset + (first.from - first.clusterStart), data.subarray(first.from - offset, last.to - offset));
        await this.linkNew(run, hostOffset, table, fresh && run.every((slot) => this.zerosBefore(this.kindOf(slot))));
        return;
      }
      const buffer = Buffer.alloc(run.length * clusterSize);
      data.copy(buffer, first.from - first.clusterStart, first.from - offset, last.to - offset);
      announce(this.file, 'write_aio');
      await this.data.write(hostOffset, buffer);
      await this.linkNew(run, hostOffset, table, false);
      return;
    }
    const buffer = Buffer.alloc(run.length * clusterSize);
    let copied = false;
    for (const [i, slot] of run.entries()) {
      const cluster = buffer.subarray(i * clusterSize, (i + 1) * clusterSize);
      const head = slot.from - slot.clusterStart;
      const tail = slot.clusterStart + clusterSize - slot.to;
      if (head > 0 || tail > 0) copied = (await this.fillFromBefore(slot, cluster, head, tail)) || copied;
      data.copy(cluster, head, slot.from - offset, slot.to - offset);
    }
    const hostOffset = await this.allocateData(first.clusterStart, run.length);
    announce(this.file, copied ? 'cow_write' : 'write_aio');
    await this.data.write(hostOffset, buffer);
    await this.linkNew(run, hostOffset, table, false);
  }

  /**
   * Links the run's clusters, just written at `hostOffset`, and releases what they replace.
   * `readsAsBefore`: unwritten, the new clusters read as what the guest saw there before
   * (fresh clusters over zeros), so with lazy refcounts the data need not be flushed first.
   */
  private linkNew(run: Slot[], hostOffset: number, table: { offset: number; handle: TableHandle<Buffer> }, readsAsBefore: boolean): Promise<void> {
    const { clusterSize } = this.geometry;
    const entries = run.map((_, i): Entry => {
      const [high, low] = entryFor(hostOffset + i * clusterSize);
      return this.geometry.extendedL2 ? [high, low, 0, ALL_SUBCLUSTERS] : [high, low];
    });
    return this.link(table, run[0]!.l2Index, entries, run.map((slot) => () => this.release(slot)), !readsAsBefore);
  }

  /**
   * Points L2 entries at clusters just written, then drops the references they replace.
   * Refcounts (and data copied from elsewhere) must be durable before the entries are
   * on disk: without lazy refcounts the entries are set in memory at once (reads use
   * them) and written after the next flush of the file, which the LinkPersister does for
   * every pending entry together (at a guest flush, at close, after a second, or when
   * many are pending), so allocating writes do not each wait for an fdatasync.
   * With lazy refcounts the entries are written at once, so the data they point to is
   * flushed first (`dataFirst`) unless, unwritten, it reads as what the guest saw there
   * before (fresh clusters over zeros): otherwise a power loss could leave an entry on
   * disk whose cluster holds neither the old bytes nor the new ones (found by
   * scripts/power-loss.sh: a whole-cluster write over a backing file read back as zeros).
   */
  private async link(table: { offset: number; handle: TableHandle<Buffer> }, first: number, entries: Entry[], releases: (() => Promise<void>)[], dataFirst: boolean): Promise<void> {
    if (this.lazy) {
      if (dataFirst) await this.flushData();
      await this.setEntries(table, first, entries);
      for (const release of releases) await release();
      return;
    }
    this.storeEntries(table.handle.table, first, entries);
    await this.links.add(table.offset, first, first + entries.length, () => this.l2Cache.acquire(table.offset), releases);
  }

  /**
   * Extended L2: writes the subclusters a request touches. A cluster this image
   * owns is written in place; any other gets a new cluster holding the touched
   * subclusters and copies of the old one's allocated ones. Touched subclusters
   * become allocated (their zero bits clear); the others keep their state, so an
   * unallocated one still shows the backing file.
   */
  private async writeSubclusters(slot: Slot, part: Buffer, table: { offset: number; handle: TableHandle<Buffer> }): Promise<void> {
    const g = this.geometry;
    const { clusterSize, subclusterSize } = g;
    const oldHost = offsetBits(slot.high, slot.low);
    const hadHost = this.hasHost(slot.high, slot.low);
    if (hadHost) this.validDataCluster(slot.high, slot.low, slot.clusterStart);
    const owned = slot.tableOwned && (slot.high & L2E_COPIED_HIGH) !== 0 && hadHost;
    const first = this.subclusterOf(slot, slot.from);
    const last = this.subclusterOf(slot, slot.to - 1);
    const cluster = Buffer.alloc(clusterSize);
    let copied = false;
    let touchedWereZeros = true;
    for (let sub = 0; sub < g.subclustersPerCluster; sub++) {
      const kind = classify(g, slot.high, slot.low, slot.zeroBits, slot.allocBits, sub);
      if (kind === Kind.Invalid) throw this.corrupt(slot.clusterStart, `has an impossible subcluster bitmap (subcluster ${sub})`);
      const start = sub * subclusterSize;
      const piece = cluster.subarray(start, start + subclusterSize);
      const touched = sub >= first && sub <= last;
      if (touched && !this.zerosBefore(kind)) touchedWereZeros = false;
      const whole = touched && slot.from - slot.clusterStart <= start && slot.to - slot.clusterStart >= start + subclusterSize;
      if (whole || (touched === false && (owned || kind !== Kind.Normal))) continue;
      // A partly written subcluster keeps the rest of what the guest saw; a copied cluster keeps its allocated ones.
      if (kind === Kind.Normal) {
        announce(this.file, 'cow_read');
        await this.data.read(oldHost + start, piece);
        copied = true;
      } else if (kind === Kind.Unallocated && this.readBacking) {
        await this.readBackingClamped(slot.clusterStart + start, piece);
        copied = true;
      }
    }
    part.copy(cluster, slot.from - slot.clusterStart);
    const touchedMask = last - first + 1 >= 32 ? ALL_SUBCLUSTERS : (((1 << (last - first + 1)) - 1) << first) >>> 0;
    await this.markDirty();
    let target = oldHost;
    announce(this.file, copied ? 'cow_write' : 'write_aio');
    if (owned) {
      await this.data.write(oldHost + first * subclusterSize, cluster.subarray(first * subclusterSize, (last + 1) * subclusterSize));
    } else {
      target = await this.allocateData(slot.clusterStart, 1);
      await this.data.write(target, cluster);
    }
    const keptAlloc = owned ? slot.allocBits : slot.allocBits & (hadHost ? ALL_SUBCLUSTERS : 0);
    const [high, low] = entryFor(target);
    const entry: Entry = [high, low, (slot.zeroBits & ~touchedMask) >>> 0, (keptAlloc | touchedMask) >>> 0];
    const releases = !owned && oldHost > 0 && !this.dataFile ? [() => this.refcounts.decrement(oldHost, clusterSize).then(() => undefined)] : [];
    // Through link() even when owned: the cluster may be one allocated since the last flush, whose
    // entry is still pending (its refcount not on disk yet); writing the entry now would put it
    // on disk ahead of that refcount. An owned cluster's untouched bytes may be anything: data first.
    const readsAsBefore = !copied && !owned && touchedWereZeros && this.isFresh(target);
    await this.link(table, slot.l2Index, [entry], releases, !readsAsBefore);
  }

  /** Whether the guest saw zeros where a cluster or subcluster of this kind is. */
  private zerosBefore(kind: Kind): boolean {
    return kind === Kind.Zero || (kind === Kind.Unallocated && !this.readBacking);
  }

  /**
   * Fills the untouched head and tail of a new cluster with what the guest saw there before.
   * Returns true when those bytes came from somewhere other than zeros.
   */
  private async fillFromBefore(slot: Slot, cluster: Buffer, head: number, tail: number): Promise<boolean> {
    const { clusterSize } = this.geometry;
    const start = slot.clusterStart;
    switch (this.kindOf(slot)) {
      case Kind.Zero:
        return false;
      case Kind.Unallocated:
        if (!this.readBacking) return false;
        announce(this.file, 'cow_read');
        if (head > 0) await this.readBackingClamped(start, cluster.subarray(0, head));
        if (tail > 0) await this.readBackingClamped(start + clusterSize - tail, cluster.subarray(clusterSize - tail));
        return true;
      case Kind.Normal: {
        const hostCluster = this.validDataCluster(slot.high, slot.low, start);
        announce(this.file, 'cow_read');
        if (head > 0) await this.data.read(hostCluster, cluster.subarray(0, head));
        if (tail > 0) await this.data.read(hostCluster + clusterSize - tail, cluster.subarray(clusterSize - tail));
        return true;
      }
      case Kind.Compressed: {
        const decoded = await this.decode(this.compressedCluster(slot.high, slot.low, start));
        decoded.copy(cluster, 0, 0, head);
        decoded.copy(cluster, clusterSize - tail, clusterSize - tail);
        return true;
      }
      case Kind.Invalid:
        throw this.corrupt(start, 'has an impossible subcluster bitmap');
    }
  }

  /** Backing bytes for part of a cluster; the range may run past the image end (the rest stays zero). */
  private async readBackingClamped(offset: number, buffer: Buffer): Promise<void> {
    const inside = Math.max(0, Math.min(buffer.length, this.virtualSize - offset));
    if (inside > 0) await this.readBacking!(offset, buffer.subarray(0, inside));
  }

  /** Drops the reference the slot's old entry held (after the new entry is on disk). */
  private async release(slot: Slot): Promise<void> {
    // Data file clusters carry no refcount in the qcow2 file (qemu's qcow2_free_any_cluster only discards them).
    if (this.dataFile) return;
    const kind = this.kindOf(slot);
    if (kind === Kind.Compressed) {
      this.compressed?.forget();
      const { hostOffset, length } = this.geometry.compressedExtent(slot.high, slot.low);
      await this.refcounts.decrement(hostOffset - (hostOffset % 512), length + (hostOffset % 512), true);
    } else if ((kind === Kind.Normal || kind === Kind.Zero || this.geometry.extendedL2) && offsetBits(slot.high, slot.low) > 0) {
      await this.refcounts.decrement(offsetBits(slot.high, slot.low), this.geometry.clusterSize);
    }
  }

  // --- L2 and L1 tables ---

  /**
   * The L2 table of `l1Index`, owned by the active L1 table alone and pinned:
   * allocated when missing, copied when shared with a snapshot.
   */
  private async ownedTable(l1Index: number): Promise<{ offset: number; handle: TableHandle<Buffer> }> {
    const { clusterSize } = this.geometry;
    const current = this.l2TableOffset(l1Index);
    if (current !== 0 && this.l1.readUInt32BE(l1Index * 8) & L2E_COPIED_HIGH) {
      return { offset: current, handle: await this.l2Cache.acquire(current) };
    }
    await this.markDirty();
    const table = Buffer.alloc(clusterSize);
    if (current !== 0) await this.l2Cache.read(current, (shared) => shared.copy(table));
    const offset = await this.refcounts.allocate(1);
    this.fileSize = Math.max(this.fileSize, this.refcounts.endOffset);
    announce(this.file, 'l2_alloc_write');
    announce(this.file, 'l2_update');
    await this.file.write(offset, table);
    // The table and its refcount are durable before the L1 entry points to it.
    await this.refcounts.barrier();
    await flushToDisk(this.file);
    this.metadata.addRange(offset, clusterSize);
    // In the cache before the L1 entry points to it, so no reader loads a second copy.
    const handle = this.l2Cache.insert(offset, table);
    try {
      const entry = Buffer.alloc(8);
      entry.writeBigUInt64BE(BigInt(offset), 0);
      entry.writeUInt32BE((entry.readUInt32BE(0) | L2E_COPIED_HIGH) >>> 0, 0);
      announce(this.file, 'l1_update');
      await this.file.write(this.header.l1TableOffset + l1Index * 8, entry);
      // In memory only once on disk: after a failed write the next try allocates again.
      entry.copy(this.l1, l1Index * 8);
      // The snapshot usually keeps the old table; when this was its last reference it is no longer metadata.
      if (current !== 0 && (await this.refcounts.decrement(current, clusterSize)).length > 0) this.metadata.removeRange(current, clusterSize);
    } catch (error) {
      handle.release();
      throw error;
    }
    log('%s: L2 table %d %s at %d', this.file.path, l1Index, current === 0 ? 'allocated' : 'copied from a snapshot', offset);
    return { offset, handle };
  }

  /**
   * Sets consecutive L2 entries from `first`: on disk, then in memory, so a failed
   * write leaves the table as the disk has it (the next try allocates again).
   */
  private async setEntries(table: { offset: number; handle: TableHandle<Buffer> }, first: number, entries: Entry[]): Promise<void> {
    const bytes = this.geometry.l2EntryBytes;
    const updated = Buffer.from(table.handle.table.subarray(first * bytes, (first + entries.length) * bytes));
    this.storeEntries(updated, 0, entries);
    announce(this.file, 'l2_update');
    await this.file.write(table.offset + first * bytes, updated);
    updated.copy(table.handle.table, first * bytes);
  }

  /** Sets consecutive L2 entries from `first` in a table in memory. */
  private storeEntries(buffer: Buffer, first: number, entries: Entry[]): void {
    const bytes = this.geometry.l2EntryBytes;
    entries.forEach(([high, low, zeroBits, allocBits], i) => {
      buffer.writeUInt32BE(high, (first + i) * bytes);
      buffer.writeUInt32BE(low, (first + i) * bytes + 4);
      if (bytes === 16 && zeroBits !== undefined && allocBits !== undefined) {
        buffer.writeUInt32BE(zeroBits >>> 0, (first + i) * bytes + 8);
        buffer.writeUInt32BE(allocBits >>> 0, (first + i) * bytes + 12);
      }
    });
  }

  // --- zeroing ---

  /**
   * Zeroes clusters whose entries must change: whole clusters become zero clusters (v3), the
   * rest is written as zeros. With `unmap` (discard), whole clusters this image owns are freed
   * too (their reference dropped once the zero entry is written; the quarantine keeps the
   * cluster from new owners until that is durable and no earlier request can still reach it).
   */
  private async zeroUnderLock(slots: Slot[], unmap: boolean): Promise<void> {
    const { clusterSize } = this.geometry;
    const writes: Slot[] = [];
    await this.underLock(async () => {
      for (const first of slots) {
        const [slot] = await this.lookup(first.from, first.to - first.from);
        if (!slot) continue;
        const kind = this.kindOf(slot);
        const frees = unmap && this.freesOnDiscard(slot) && (kind === Kind.Zero || this.actionFor(slot) !== Action.Allocate);
        if (!frees && (kind === Kind.Zero || (kind === Kind.Unallocated && !this.readBacking))) continue;
        const whole = slot.from === slot.clusterStart && slot.to === slot.clusterStart + clusterSize;
        if (!frees && (!whole || this.header.version !== 3 || this.actionFor(slot) !== Action.Allocate)) {
          writes.push(slot);
          continue;
        }
        const table = await this.ownedTable(slot.l1Index);
        try {
          const [high, low] = wordAt(table.handle.table, slot.l2Index * this.geometry.l2EntryBytes);
          const now = { ...slot, high, low };
          await this.markDirty();
          await this.setEntries(table, slot.l2Index, [[0, L2E_ZERO_LOW]]);
          await this.release(now);
        } finally {
          table.handle.release();
        }
      }
    });
    // Outside the lock: these are ordinary writes (they take it themselves when they allocate).
    for (const slot of writes) await this.write(slot.from, Buffer.alloc(slot.to - slot.from));
  }

  /**
   * Extended L2 (no data file): sets zero bits, or frees whole clusters, as planned by
   * subcluster-zero.ts; an entry that keeps its host cluster goes through link() (it may
   * name a cluster whose refcount is not on disk yet), one that loses it is written at
   * once and the reference dropped after. Partial subclusters are then written as zeros.
   */
  private async zeroSubclusters(slots: Slot[]): Promise<void> {
    const bytes = this.geometry.l2EntryBytes;
    const writes: [number, number][] = [];
    await this.underLock(async () => {
      for (const first of slots) {
        const [looked] = await this.lookup(first.from, first.to - first.from);
        if (!looked || this.readsAsZeros(looked)) continue;
        const table = await this.ownedTable(looked.l1Index);
        try {
          // The table may have been copied: its entries are the ones to use now.
          const [high, low] = wordAt(table.handle.table, looked.l2Index * bytes);
          const [zeroBits, allocBits] = wordAt(table.handle.table, looked.l2Index * bytes + 8);
          const slot = { ...looked, high, low, zeroBits, allocBits, tableOwned: true };
          const plan = planSubclusterZero(this.geometry, slot, (kind) => this.zerosBefore(kind), (sub) => this.corrupt(slot.clusterStart, `has an impossible subcluster bitmap (subcluster ${sub})`));
          writes.push(...plan.writes);
          if (plan.free) {
            await this.markDirty();
            await this.setEntries(table, slot.l2Index, [[0, 0, ALL_SUBCLUSTERS, 0]]);
            await this.release(slot);
          } else if (plan.bits) {
            await this.markDirty();
            await this.link(table, slot.l2Index, [[high, low, plan.bits.zeroBits, plan.bits.allocBits]], [], false);
          }
        } finally {
          table.handle.release();
        }
      }
    });
    // Outside the lock: ordinary writes (they take it themselves when they allocate).
    for (const [from, to] of writes) await this.write(from, Buffer.alloc(to - from));
  }

  private async clearHostRange(hostOffset: number, length: number): Promise<void> {
    const data = this.data;
    if (data.punchHole) await data.punchHole(hostOffset, length);
    else await data.write(hostOffset, Buffer.alloc(length));
  }

  // --- header bits and failure ---

  /** Runs a metadata change under the allocation lock; damaged metadata found there marks the image corrupt. */
  private async underLock(change: () => Promise<void>): Promise<void> {
    await this.links.throttle();
    await this.allocationLock.runExclusive(async () => {
      this.assertWritable();
      try {
        await change();
      } catch (error) {
        if (error instanceof CorruptImageError) await this.markCorrupt(error.message);
        throw error;
      }
    });
  }

  /** With lazy refcounts, sets the dirty bit (durably) before the first metadata change. */
  private async markDirty(): Promise<void> {
    if (!this.lazy || this.dirtyMarked) return;
    await this.setIncompatible(this.header.incompatibleFeatures | INCOMPAT_DIRTY);
    this.dirtyMarked = true;
    log('%s: dirty bit set (lazy refcounts)', this.file.path);
  }

  private async markCorrupt(reason: string): Promise<void> {
    this.brokenBy = reason;
    if (this.header.version !== 3 || this.header.incompatibleFeatures & INCOMPAT_CORRUPT) return;
    try {
      await this.setIncompatible(this.header.incompatibleFeatures | INCOMPAT_CORRUPT);
      this.notify(`${this.file.path}: damaged metadata found while writing; the image is now marked corrupt and takes no more writes (run imgmount check -r all)`);
    } catch (error) {
      log('%s: could not set the corrupt bit: %s', this.file.path, (error as Error).message);
    }
  }

  /** Writes the incompatible feature bits and flushes; the header in memory changes only once that succeeded. */
  private async setIncompatible(bits: bigint): Promise<void> {
    await this.writeHeaderWord(INCOMPATIBLE_AT, bits);
    await flushToDisk(this.file);
    this.header = { ...this.header, incompatibleFeatures: bits };
  }

  private async writeHeaderWord(at: number, value: bigint): Promise<void> {
    const word = Buffer.alloc(8);
    word.writeBigUInt64BE(value, 0);
    announce(this.file, 'header_update');
    await this.file.write(at, word);
  }

  /** Guest data into clusters this image owns. */
  private writeData(hostOffset: number, data: Buffer): Promise<void> {
    announce(this.file, 'write_aio');
    return this.data.write(hostOffset, data);
  }

  private assertWritable(): void {
    if (this.closed) throw new BlockError(`${this.file.path} is closed`, osConstants.errno.EBADF);
    if (this.brokenBy !== undefined) throw new CorruptImageError(`${this.file.path} takes no more writes: ${this.brokenBy}`);
  }
}

/** A standard L2 entry for the cluster at `hostOffset`, with the COPIED flag (refcount 1). */
function entryFor(hostOffset: number): [number, number] {
  const high = Math.floor(hostOffset / 0x100000000);
  return [(high | L2E_COPIED_HIGH) >>> 0, hostOffset % 0x100000000 >>> 0];
}
