/**
 * An opened VHD: fixed (guest offset X is host offset X, the footer after the
 * data), dynamic (blocks through the BAT; unallocated blocks read as zeros)
 * or differencing (blocks through the BAT, then each sector through its
 * block's sector bitmap: a clear bit reads from the parent). Writes for all
 * three; a differencing disk's writes set the bitmap bits of the sectors they
 * cover (differencing-write.ts).
 *
 * Like qemu, a dynamic disk's sector bitmaps are not consulted on reads (qemu
 * writes them all ones), so both read the same bytes.
 *
 * Concurrency rules:
 * - Reads (map) take no lock; a BAT entry changes in memory only after the
 *   block it points to is durable and the entry is written; a cached sector
 *   bitmap is replaced (never changed in place) only after the sectors it
 *   newly claims are durable and the bitmap is written.
 * - A differencing disk's write into sectors it owns goes straight to the
 *   file; any other runs under `allocationLock` (its bitmap updates are
 *   read-modify-write), one block at a time (differencing-write.ts).
 * - Writes into allocated blocks (and fixed disks) go straight to the file.
 * - Block allocation is serialized by `allocationLock`; under it the range is
 *   mapped again, so a block is never allocated twice.
 * - Order of an allocation (crash-safe, as the format allows): the footer is
 *   written at the new end of the file first and flushed (so the file always
 *   ends with a footer, which libvhdi and Windows read, and the copy at
 *   offset 0 stays untouched), then the guest data
 *   and the block's bitmap (over the old trailing footer), fdatasync, then
 *   the BAT entry. A crash before the BAT entry leaves an unreferenced block
 *   past the last one, which the next allocation reuses; never a BAT entry
 *   pointing at unwritten data. A failed BAT write gives up the block's space
 *   (the entry may be on disk), so no two entries can ever share a block.
 */
import { Mutex } from 'async-mutex';
import createDebug from 'debug';
import { constants as osConstants } from 'node:os';
import { BlockError, CorruptImageError } from '../../block/errors.js';
import { announce, flushToDisk } from '../../block/events.js';
import { settleAll } from '../../block/settle.js';
import type { BackingReader, BackingReference, FormatImage, FormatInfo, Mapping, Protocol } from '../../block/types.js';
import { UNALLOCATED, type DynamicHeader } from './dynamic-header.js';
import { writeDifferencing, zeroDifferencing } from './differencing-write.js';
import { DISK_DIFFERENCING, diskTypeName, SECTOR, uuidText, type SizeSource, type VhdFooter } from './footer.js';
import { appendRun, writeByRuns } from '../../block/mapping.js';

const log = createDebug('imgmount:vpc');

/** Bitmaps cached for a differencing disk, in bytes. */
const BITMAP_CACHE_BYTES = 4 * 1024 * 1024;

export interface DynamicParts {
  header: DynamicHeader;
  bat: Uint32Array;
  /** Where the next block goes (firstFreeOffset). */
  allocationEnd: number;
}

export class VpcImage implements FormatImage {
  readonly allocationLock = new Mutex();
  private readonly bitmaps = new Map<number, Promise<Buffer>>();
  private readonly bitmapLimit: number;
  private closed = false;
  private readonly parentUuid: Buffer | undefined;
  /** Reads the parent of a differencing disk (zeros past its end); set by the generic layer. */
  readBacking: BackingReader | undefined;
  readonly write: (offset: number, data: Buffer) => Promise<void>;
  readonly zero: (offset: number, length: number) => Promise<void>;

  constructor(
    readonly file: Protocol,
    readonly footer: VhdFooter,
    /** The footer as on disk, rewritten unchanged at the end of the file as it grows. */
    private readonly footerBytes: Buffer,
    readonly virtualSize: number,
    private readonly sizeSource: SizeSource,
    readonly dynamic: DynamicParts | undefined,
    readonly backing: BackingReference | undefined,
  ) {
    this.bitmapLimit = dynamic ? Math.max(4, Math.floor(BITMAP_CACHE_BYTES / dynamic.header.bitmapBytes)) : 0;
    this.parentUuid = footer.diskType === DISK_DIFFERENCING ? dynamic?.header.parentUuid : undefined;
    if (footer.diskType === DISK_DIFFERENCING) {
      this.write = (offset, data) => writeDifferencing(this, offset, data);
      this.zero = (offset, length) => zeroDifferencing(this, offset, length);
    } else {
      this.write = (offset, data) => this.writeGuest(offset, data);
      this.zero = (offset, length) => this.zeroGuest(offset, length);
    }
  }

  attachBacking(reader: BackingReader | undefined): void {
    this.readBacking = reader;
  }

  async map(offset: number, length: number): Promise<Mapping[]> {
    const dynamic = this.dynamic;
    if (!dynamic) return [{ kind: 'data', guestOffset: offset, length, hostOffset: offset }];
    const { blockSize, bitmapBytes } = dynamic.header;
    const runs: Mapping[] = [];
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const index = Math.floor(pos / blockSize);
      const blockEnd = Math.min(end, (index + 1) * blockSize);
      const entry = dynamic.bat[index]!;
      if (entry === UNALLOCATED) {
        appendRun(runs, { kind: this.backing ? 'backing' : 'zero', guestOffset: pos, length: blockEnd - pos });
      } else {
        const data = entry * SECTOR + bitmapBytes - index * blockSize;
        if (this.backing) await this.mapBySectors(index, entry, pos, blockEnd, data, runs);
        else appendRun(runs, { kind: 'data', guestOffset: pos, length: blockEnd - pos, hostOffset: data + pos });
      }
      pos = blockEnd;
    }
    return runs;
  }

  /** A differencing disk's allocated block: sectors whose bitmap bit is set are here, the others in the parent. */
  private async mapBySectors(index: number, entry: number, start: number, end: number, hostBase: number, runs: Mapping[]): Promise<void> {
    const bitmap = await this.bitmap(entry);
    const blockStart = index * this.dynamic!.header.blockSize;
    for (let pos = start; pos < end; ) {
      const sector = Math.floor((pos - blockStart) / SECTOR);
      const sectorEnd = Math.min(end, blockStart + (sector + 1) * SECTOR);
      const present = (bitmap[sector >> 3]! & (0x80 >> (sector & 7))) !== 0;
      const length = sectorEnd - pos;
      appendRun(runs, present ? { kind: 'data', guestOffset: pos, length, hostOffset: hostBase + pos } : { kind: 'backing', guestOffset: pos, length });
      pos = sectorEnd;
    }
  }

  /**
   * The sector bitmap at sector `entry`, from a small LRU cache. Callers never
   * change the buffer: a writer copies it and puts the copy in with setBitmap
   * once it is on disk, so the cache is never stale.
   */
  bitmap(entry: number): Promise<Buffer> {
    let loading = this.bitmaps.get(entry);
    if (loading) {
      this.bitmaps.delete(entry);
      this.bitmaps.set(entry, loading);
      return loading;
    }
    loading = (async () => {
      const bytes = Buffer.alloc(this.dynamic!.header.bitmapBytes);
      await this.file.read(entry * SECTOR, bytes);
      return bytes;
    })();
    loading.catch(() => this.bitmaps.delete(entry));
    this.bitmaps.set(entry, loading);
    if (this.bitmaps.size > this.bitmapLimit) this.bitmaps.delete(this.bitmaps.keys().next().value!);
    return loading;
  }

  /** Replaces the cached bitmap of the block at sector `entry` (already written to the file). */
  setBitmap(entry: number, bitmap: Buffer): void {
    this.bitmaps.delete(entry);
    this.bitmaps.set(entry, Promise.resolve(bitmap));
    if (this.bitmaps.size > this.bitmapLimit) this.bitmaps.delete(this.bitmaps.keys().next().value!);
  }

  private async writeGuest(offset: number, data: Buffer): Promise<void> {
    this.assertOpen();
    await writeByRuns(this.file, await this.map(offset, data.length), offset, data, (at, part) => this.allocatingWrite(at, part));
  }

  /** A write to blocks that were unallocated when looked at; one block at a time, under the lock. */
  private async allocatingWrite(offset: number, data: Buffer): Promise<void> {
    const { blockSize } = this.dynamic!.header;
    await this.allocationLock.runExclusive(async () => {
      this.assertOpen();
      for (let pos = offset; pos < offset + data.length; ) {
        const index = Math.floor(pos / blockSize);
        const end = Math.min(offset + data.length, (index + 1) * blockSize);
        const part = data.subarray(pos - offset, end - offset);
        const [run] = await this.map(pos, end - pos);
        if (run!.kind === 'data') {
          announce(this.file, 'write_aio');
          await this.file.write(run!.hostOffset, part);
        } else {
          await this.allocateBlock(index, pos - index * blockSize, part, Buffer.alloc(this.dynamic!.header.bitmapBytes, 0xff));
        }
        pos = end;
      }
    });
  }

  /**
   * Allocates block `index` at the end of the file with `data` at `inBlock` and
   * `bitmap` as its sector bitmap; the rest of the block is a hole (zeros).
   * Called under `allocationLock`. Returns the block's BAT entry (its sector).
   */
  async allocateBlock(index: number, inBlock: number, data: Buffer, bitmap: Buffer): Promise<number> {
    const dynamic = this.dynamic!;
    const { bitmapBytes, blockSize, tableOffset } = dynamic.header;
    const start = dynamic.allocationEnd;
    const end = start + bitmapBytes + blockSize;
    announce(this.file, 'cluster_alloc');
    await this.file.write(end, this.footerBytes);
    // Readers that take the footer at the end (libvhdi, Windows) need one there in every crash state.
    await flushToDisk(this.file);
    announce(this.file, 'write_aio');
    await this.file.write(start + bitmapBytes + inBlock, data);
    await this.file.write(start, bitmap);
    await flushToDisk(this.file);
    const entry = Buffer.alloc(4);
    entry.writeUInt32BE(start / SECTOR);
    announce(this.file, 'l1_update');
    try {
      await this.file.write(tableOffset + index * 4, entry);
    } catch (error) {
      // The entry may have reached the disk all the same: never give this space to another block.
      dynamic.allocationEnd = end;
      throw error;
    }
    if (this.backing) this.setBitmap(start / SECTOR, bitmap);
    dynamic.bat[index] = start / SECTOR;
    dynamic.allocationEnd = end;
    log('%s: block %d allocated at %d', this.file.path, index, start);
    return start / SECTOR;
  }

  /**
   * Makes a range read as zeros: allocated bytes are punched (or overwritten with
   * zeros); unallocated blocks of a dynamic disk read as zeros already.
   */
  private async zeroGuest(offset: number, length: number): Promise<void> {
    this.assertOpen();
    const runs = await this.map(offset, length);
    await settleAll(
      runs.map((run) => {
        if (run.kind !== 'data') return undefined;
        if (this.file.punchHole) return this.file.punchHole(run.hostOffset, run.length);
        return this.file.write(run.hostOffset, Buffer.alloc(run.length));
      }),
    );
  }

  /** A differencing disk's parent must be the VHD whose footer UUID the dynamic header names. */
  verifyBacking(backing: { path: string; format: string; specific: Record<string, unknown> | undefined }): void {
    if (!this.parentUuid) return;
    const expected = uuidText(this.parentUuid);
    const found = backing.specific?.['uuid'];
    if (backing.format !== 'vpc' || found !== expected) {
      throw new CorruptImageError(
        `${this.file.path}: its parent ${backing.path} is not the VHD it was made over: the dynamic header's parent_unique_id is ${expected}, the parent's footer has ${typeof found === 'string' ? found : `no VHD UUID (${backing.format})`}`,
      );
    }
  }

  async flush(): Promise<void> {
    this.assertOpen();
    if (!this.file.readOnly) await flushToDisk(this.file);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.allocationLock.runExclusive(async () => {
      this.closed = true;
      await this.file.close();
    });
  }

  info(): FormatInfo {
    const specific: Record<string, unknown> = {
      subformat: diskTypeName(this.footer.diskType),
      'creator-application': this.footer.creatorApp.replace(/\0/g, '\\0'),
      'size-from': this.sizeSource,
      uuid: uuidText(this.footer.uuid),
    };
    if (this.parentUuid) specific['parent-uuid'] = uuidText(this.parentUuid);
    // VHD has no dirty state; qemu-img info shows dirty-flag false, and so does ours.
    return { clusterSize: this.dynamic?.header.blockSize, dirty: false, specific };
  }

  assertOpen(): void {
    if (this.closed) throw new BlockError(`${this.file.path}: image is closed`, osConstants.errno.EBADF);
  }
}
