/**
 * An opened VDI image (dynamic or static): translation of guest offsets
 * through the block map, allocating writes, zeroing, flush and close.
 *
 * Concurrency rules:
 * - Reads (map) never take a lock; they read the in-memory block map, whose
 *   entries change only after the block they point to is on disk.
 * - Writes into allocated blocks go straight to the file, concurrently.
 * - Allocating writes are serialized by `allocationLock`; under it the range
 *   is mapped again, so two writers that both saw a block unallocated never
 *   both allocate it.
 *
 * Where new blocks go: first into leaked indexes (below the end of the used
 * data area, counted by blocks_allocated, but used by no entry: what a crash
 * before step 3 below can leave), then appended at `nextIndex` =
 * max(blocks_allocated, highest entry + 1), so a header that lags its
 * entries (a crash of another writer) never makes us hand out a used block.
 * Each new block is written whole: the guest data and zeros around it, since
 * an unallocated block reads as zeros and VDI has no backing file.
 *
 * Crash-safe order of an allocation:
 *   1. the new blocks' bytes and, when the data area grew, the header with
 *      blocks_allocated raised to the new end of the data area (in either
 *      order: neither points to anything);
 *   2. flush: both are durable before anything points to the new blocks;
 *   3. the block map entries (whole sectors).
 * A crash before 3 leaves unused bytes past the data area and perhaps
 * blocks_allocated above the number of entries: qemu-img check reports
 * "allocated blocks mismatch", but no block is shared or lost, qemu (which
 * allocates at index blocks_allocated) never reuses the leaked one, and our
 * next allocation fills it, which makes the count right again. Entries
 * reaching the disk before the count (no flush between) would let qemu hand
 * the same block to a second guest block.
 */
import { Mutex } from 'async-mutex';
import createDebug from 'debug';
import { constants as osConstants } from 'node:os';
import { BlockError, CorruptImageError } from '../../block/errors.js';
import { announce, flushToDisk } from '../../block/events.js';
import { settleAll } from '../../block/settle.js';
import type { FormatImage, FormatInfo, Mapping, Protocol } from '../../block/types.js';
import { blockOffset, entryProblem, isAllocated, type BlockMap } from './bmap.js';
import { headerWithBlocksAllocated, type VdiHeader } from './header.js';
import { appendRun } from '../../block/mapping.js';

const log = createDebug('imgmount:vdi');

/** Bytes of new blocks buffered by one step of an allocating write (at least one block). */
const MAX_STEP_BYTES = 8 * 1024 * 1024;

export class VdiImage implements FormatImage {
  readonly virtualSize: number;
  readonly backing = undefined;
  private readonly allocationLock = new Mutex();
  private closed = false;
  /** Bytes of the file that entries may point into: the size at open, then past each allocation. */
  private validEnd: number;
  /** The data-area index past every used (or counted) block: where appended blocks go. */
  private nextIndex: number;
  /** 1 for each data-area index an entry uses (or an allocation under way has taken). */
  private readonly used: Uint8Array;
  /** No index below this is both below nextIndex and unused: where the search for a leaked index starts. */
  private leakCursor = 0;
  private blocksAllocated: number;

  constructor(
    private readonly file: Protocol,
    private readonly header: VdiHeader,
    private readonly bmap: BlockMap,
    fileSize: number,
  ) {
    this.virtualSize = header.diskSize;
    this.validEnd = fileSize;
    this.blocksAllocated = header.blocksAllocated;
    const used = new Uint8Array(header.blocksInImage);
    this.used = used;
    let highest = -1;
    for (let block = 0; block < bmap.blocks; block++) {
      const entry = bmap.get(block);
      if (isAllocated(entry) && entry < header.blocksInImage) {
        used[entry] = 1;
        highest = Math.max(highest, entry);
      }
    }
    this.nextIndex = Math.max(header.blocksAllocated, highest + 1);
    const leaked = used.subarray(0, this.nextIndex).reduce((count, flag) => count + (flag ? 0 : 1), 0);
    if (leaked > 0) log('%s: %d leaked block index(es) below %d will be reused', file.path, leaked, this.nextIndex);
  }

  /** Takes up to `count` leaked indexes (lowest first), marking them used. */
  private takeLeaked(count: number): number[] {
    const taken: number[] = [];
    while (taken.length < count && this.leakCursor < this.nextIndex) {
      if (!this.used[this.leakCursor]) {
        this.used[this.leakCursor] = 1;
        taken.push(this.leakCursor);
      }
      this.leakCursor += 1;
    }
    return taken;
  }

  /** Gives back indexes an allocation took and did not use. */
  private release(indexes: readonly number[]): void {
    for (const index of indexes) {
      this.used[index] = 0;
      this.leakCursor = Math.min(this.leakCursor, index);
    }
  }

  async map(offset: number, length: number): Promise<Mapping[]> {
    const runs: Mapping[] = [];
    const { blockSize } = this.header;
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const block = Math.floor(pos / blockSize);
      const runEnd = Math.min(end, (block + 1) * blockSize);
      const entry = this.bmap.get(block);
      if (!isAllocated(entry)) {
        appendRun(runs, { kind: 'zero', guestOffset: pos, length: runEnd - pos });
      } else {
        const problem = entryProblem(this.header, block, entry, this.validEnd);
        if (problem !== undefined) {
          throw new CorruptImageError(`${this.file.path}: VDI block map entry ${block} (guest bytes ${block * blockSize}..${(block + 1) * blockSize}): ${problem}; run 'imgmount check'`);
        }
        appendRun(runs, { kind: 'data', guestOffset: pos, length: runEnd - pos, hostOffset: blockOffset(this.header, entry) + (pos - block * blockSize) });
      }
      pos = runEnd;
    }
    return runs;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.assertOpen();
    const runs = await this.map(offset, data.length);
    // Every part finishes before the request answers (settleAll): a part failing fast
    // must not hand the buffer back while another still writes from it.
    await settleAll(
      runs.map((run) => {
        const part = data.subarray(run.guestOffset - offset, run.guestOffset - offset + run.length);
        return run.kind === 'data' ? this.writeData(run.hostOffset, part) : this.allocatingWrite(run.guestOffset, part);
      }),
    );
  }

  private writeData(hostOffset: number, data: Buffer): Promise<void> {
    announce(this.file, 'write_aio');
    return this.file.write(hostOffset, data);
  }

  /** Writes to a range that was unallocated when looked at; serialized with other allocations. */
  private async allocatingWrite(offset: number, data: Buffer): Promise<void> {
    await this.allocationLock.runExclusive(async () => {
      this.assertOpen();
      for (const run of await this.map(offset, data.length)) {
        const part = data.subarray(run.guestOffset - offset, run.guestOffset - offset + run.length);
        if (run.kind === 'data') {
          await this.writeData(run.hostOffset, part);
          continue;
        }
        const { blockSize } = this.header;
        for (let pos = run.guestOffset; pos < run.guestOffset + run.length; ) {
          const stepEnd = Math.min(run.guestOffset + run.length, (Math.floor(pos / blockSize) + Math.max(1, Math.floor(MAX_STEP_BYTES / blockSize))) * blockSize);
          await this.allocateBlocks(pos, part.subarray(pos - run.guestOffset, stepEnd - run.guestOffset));
          pos = stepEnd;
        }
      }
    });
  }

  /** Allocates the unallocated blocks under [offset, offset + data.length) and writes `data` there (see the order above). */
  private async allocateBlocks(offset: number, data: Buffer): Promise<void> {
    const { blockSize, blocksInImage } = this.header;
    const first = Math.floor(offset / blockSize);
    const count = Math.ceil((offset + data.length) / blockSize) - first;
    const reused = this.takeLeaked(count);
    const appended = count - reused.length;
    if (this.nextIndex + appended > blocksInImage) {
      this.release(reused);
      throw new CorruptImageError(
        `${this.file.path}: VDI has no free block left (next index ${this.nextIndex}, blocks_in_image ${blocksInImage}): the block map holds duplicate entries; run 'imgmount check'`,
      );
    }
    const indexes = [...reused, ...Array.from({ length: appended }, (_, i) => this.nextIndex + i)];
    const blocks = Buffer.alloc(count * blockSize);
    data.copy(blocks, offset - first * blockSize);
    const nextIndex = this.nextIndex + appended;
    const sizeBefore = await this.file.size();
    try {
      announce(this.file, 'cluster_alloc');
      // Runs of neighbouring indexes go out as one write.
      for (let i = 0; i < count; ) {
        let j = i + 1;
        while (j < count && indexes[j] === indexes[j - 1]! + 1) j++;
        await this.file.write(blockOffset(this.header, indexes[i]!), blocks.subarray(i * blockSize, j * blockSize));
        i = j;
      }
      if (nextIndex > this.blocksAllocated) {
        announce(this.file, 'header_update');
        await this.file.write(0, headerWithBlocksAllocated(this.header, nextIndex));
      }
      await flushToDisk(this.file);
    } catch (error) {
      // blocks_allocated may have reached the disk: harmless (a lead), and the next allocation writes it again.
      this.release(reused);
      // Nothing points to the new blocks yet: cut the file back so the failure leaves nothing behind.
      try {
        if ((await this.file.size()) > sizeBefore) await this.file.truncate(sizeBefore);
      } catch (cause) {
        log('%s: could not cut back a failed allocation: %s', this.file.path, (cause as Error).message);
      }
      throw error;
    }
    for (let index = this.nextIndex; index < nextIndex; index++) this.used[index] = 1;
    this.nextIndex = nextIndex;
    this.blocksAllocated = Math.max(this.blocksAllocated, nextIndex);
    this.validEnd = Math.max(this.validEnd, blockOffset(this.header, Math.max(...indexes) + 1));
    await this.bmap.update(this.file, this.header.offsetBmap, first, indexes);
    log('%s: allocated blocks %d..%d at indexes %s', this.file.path, first, first + count - 1, indexes.join(','));
  }

  /**
   * Makes [offset, offset + length) read as zeros: allocated blocks are
   * punched (or written with zeros), and stay allocated (VDI has no way to free a block
   * without leaving a hole in the data area); unallocated blocks read as zeros already.
   */
  async zero(offset: number, length: number): Promise<void> {
    this.assertOpen();
    const runs = await this.map(offset, length);
    await settleAll(runs.map((run) => (run.kind === 'data' ? this.zeroHostRange(run.hostOffset, run.length) : undefined)));
  }

  async discard(offset: number, length: number): Promise<void> {
    await this.zero(offset, length);
  }

  private async zeroHostRange(hostOffset: number, length: number): Promise<void> {
    if (this.file.punchHole) {
      await this.file.punchHole(hostOffset, length);
      return;
    }
    const piece = Buffer.alloc(Math.min(length, this.header.blockSize));
    for (let pos = hostOffset; pos < hostOffset + length; pos += piece.length) {
      await this.file.write(pos, piece.subarray(0, Math.min(piece.length, hostOffset + length - pos)));
    }
  }

  async flush(): Promise<void> {
    this.assertOpen();
    await flushToDisk(this.file);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.allocationLock.runExclusive(async () => {
      this.closed = true;
      try {
        if (!this.file.readOnly) await flushToDisk(this.file);
      } finally {
        await this.file.close();
      }
    });
  }

  info(): FormatInfo {
    return { clusterSize: this.header.blockSize, dirty: false }; // VDI has no dirty state; qemu-img info shows dirty-flag false
  }

  private assertOpen(): void {
    if (this.closed) throw new BlockError(`${this.file.path}: image is closed`, osConstants.errno.EBADF);
  }
}
