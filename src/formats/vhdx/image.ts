/**
 * An opened VHDX image: answers map() from the BAT, one payload block at a
 * time, and for partially present blocks of a differencing image from the
 * sector bitmap (a set bit: the sector is in this file; clear: in the
 * parent). BAT pages and sector bitmaps are 1 MiB tables in a bounded cache.
 * A dynamic or fixed image opened read-write also writes (with a `writer`,
 * writer.ts): in place in FULLY_PRESENT blocks, else into a new block whose
 * BAT entry changes through the log.
 *
 * Concurrency rules: map() calls run concurrently without locks; the table
 * cache shares one load per table. A BAT entry changes in the cached page
 * only once it is durable in the file (writer.ts' order), with the page
 * pinned; allocations run one at a time under the writer's lock, which maps
 * the block again first, so a block is never allocated twice. Writes into
 * FULLY_PRESENT blocks (and into the present sectors of a partially present
 * one) go straight to the file; completing a partially present block under
 * the lock writes only its sectors not present. When the log was replayed in
 * memory (read-only opens), every read (BAT, bitmaps, data) goes through the
 * overlay (`view`), which data mappings name as their file.
 */
import createDebug from 'debug';
import { constants as osConstants } from 'node:os';
import { BlockError, CorruptImageError } from '../../block/errors.js';
import { announce, flushToDisk } from '../../block/events.js';
import type { BackingReader, BackingReference, FormatImage, FormatInfo, Mapping, OpenOptions, Protocol } from '../../block/types.js';
import { TableCache, type TableHandle } from '../../cache/table-cache.js';
import {
  BatGeometry, BITMAP_BYTES, blockProblem, decodeEntry, FULLY_PRESENT, NOT_PRESENT, PARTIALLY_PRESENT, reservedRanges, SB_BLOCK_PRESENT,
  STATE_NAMES, UNDEFINED, UNMAPPED, UNMAPPED_V095, ZERO,
} from './bat.js';
import { guidText, MiB, type RegionTable, type VhdxHeader } from './header.js';
import type { VhdxMetadata } from './metadata.js';
import { appendRun, writeByRuns } from '../../block/mapping.js';
import { LOG_SECTOR } from './log.js';
import type { VhdxWriter } from './writer.js';

const log = createDebug('imgmount:vhdx');

/** Default bound of cached BAT pages and sector bitmaps (1 MiB each). */
export const DEFAULT_TABLE_CACHE_BYTES = 16 * MiB;
const TABLE_BYTES = MiB;
/** Zeros are written in pieces of at most this many bytes. */
const ZERO_CHUNK = MiB;
/** Blocks one write allocates together (their BAT sectors in one log entry, which a 1 MiB log holds). */
const MAX_BLOCKS_PER_ENTRY = 64;

interface FreshBlock {
  block: number;
  /** Where `data` starts in the block. */
  inBlock: number;
  data: Buffer;
  /** The block read the parent (a differencing image): the rest of the new block is the parent's bytes. */
  fromParent: boolean;
}

/** Parent bytes are copied in pieces of at most this many bytes. */
const COPY_CHUNK = MiB;
/** Zero writes punch whole pieces of this size out of the file. */
const PUNCH_UNIT = 4096;

export interface VhdxParts {
  header: VhdxHeader;
  regions: RegionTable;
  metadata: VhdxMetadata;
  geometry: BatGeometry;
  /** The size the file has (after the in-memory replay, when there was one). */
  fileSize: number;
  /** Log entries replayed in memory at open. */
  replayedEntries: number;
  /** Log entries replayed on disk at this (read-write) open. */
  replayedOnDisk: number;
}

export class VhdxImage implements FormatImage {
  readonly virtualSize: number;
  private readonly cache: TableCache<Buffer>;
  private readonly reserved: ReturnType<typeof reservedRanges>;
  /** The file the data mappings name: the overlay when the log was replayed in memory. */
  private readonly dataFile: Protocol | undefined;
  private closed = false;
  /** Reads the parent of a differencing image (zeros past its end); set by the generic layer. */
  private readBacking: BackingReader | undefined;
  readonly write?: (offset: number, data: Buffer) => Promise<void>;
  readonly zero?: (offset: number, length: number) => Promise<void>;

  constructor(
    private readonly file: Protocol,
    /** What reads go through: `file`, or the log overlay over it. */
    private readonly view: Protocol,
    readonly parts: VhdxParts,
    readonly backing: BackingReference | undefined,
    options: OpenOptions,
    /** Present when the image is writable (read-write open of a dynamic or fixed image). */
    private readonly writer?: VhdxWriter,
  ) {
    if (writer) {
      this.write = (offset, data) => this.writeGuest(offset, data);
      this.zero = (offset, length) => this.zeroGuest(offset, length);
    }
    this.virtualSize = parts.metadata.virtualSize;
    this.reserved = reservedRanges(parts.header, parts.regions);
    this.dataFile = view === file ? undefined : view;
    this.cache = new TableCache<Buffer>({
      maxBytes: options.metadataCacheBytes ?? DEFAULT_TABLE_CACHE_BYTES,
      tableBytes: TABLE_BYTES,
      sizeOf: (table) => table.length,
      load: async (offset) => {
        const table = Buffer.alloc(TABLE_BYTES);
        await this.view.read(offset, table);
        return table;
      },
    });
    const raised = this.cache.raisedNotice(file.path, TABLE_BYTES);
    if (raised) (options.notice ?? ((line: string) => log(line)))(raised);
  }

  attachBacking(reader: BackingReader | undefined): void {
    this.readBacking = reader;
  }

  private get geometry(): BatGeometry {
    return this.parts.geometry;
  }

  /** The BAT entry with index `index`. */
  private async batEntry(index: number): Promise<bigint> {
    const byte = index * 8;
    const page = Math.floor(byte / TABLE_BYTES) * TABLE_BYTES;
    return this.cache.read(this.parts.regions.bat.fileOffset + page, (table) => table.readBigUInt64LE(byte - page));
  }

  async map(offset: number, length: number): Promise<Mapping[]> {
    const runs: Mapping[] = [];
    const { blockSize } = this.geometry;
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const block = Math.floor(pos / blockSize);
      const blockStart = block * blockSize;
      const blockEnd = Math.min(end, blockStart + blockSize);
      const blockLength = Math.min(blockSize, this.virtualSize - blockStart);
      const { state, offset: hostOffset } = decodeEntry(await this.batEntry(this.geometry.payloadEntry(block)));
      const describe = () => `payload block ${block} (guest bytes ${blockStart}..${blockStart + blockLength})`;
      switch (state) {
        case NOT_PRESENT:
          appendRun(runs, { kind: 'backing', guestOffset: pos, length: blockEnd - pos });
          break;
        case UNDEFINED:
        case UNMAPPED:
        case UNMAPPED_V095:
          // Contents the writer gave up: qemu reads zeros; a differencing image reads its parent (see docs/formats/vhdx.md).
          appendRun(runs, this.parts.metadata.hasParent ? { kind: 'backing', guestOffset: pos, length: blockEnd - pos } : { kind: 'zero', guestOffset: pos, length: blockEnd - pos });
          break;
        case ZERO:
          appendRun(runs, { kind: 'zero', guestOffset: pos, length: blockEnd - pos });
          break;
        case FULLY_PRESENT:
        case PARTIALLY_PRESENT: {
          const problem = blockProblem(hostOffset, blockLength, this.parts.fileSize, this.reserved);
          if (problem) throw new CorruptImageError(`${this.file.path}: the BAT entry of ${describe()} is ${STATE_NAMES[state]} at ${problem}`);
          if (state === FULLY_PRESENT) {
            appendRun(runs, { kind: 'data', guestOffset: pos, length: blockEnd - pos, hostOffset: hostOffset! + (pos - blockStart), file: this.dataFile });
          } else {
            if (!this.parts.metadata.hasParent) {
              throw new CorruptImageError(`${this.file.path}: the BAT entry of ${describe()} is PARTIALLY_PRESENT, which only a differencing image may use`);
            }
            await this.mapPartial(block, blockStart, hostOffset!, pos, blockEnd, runs);
          }
          break;
        }
        default:
          throw new CorruptImageError(`${this.file.path}: the BAT entry of ${describe()} has state ${state}, which is reserved`);
      }
      pos = blockEnd;
    }
    return runs;
  }

  /** A partially present block: sector by sector from its sector bitmap. */
  private async mapPartial(block: number, blockStart: number, hostOffset: number, from: number, to: number, runs: Mapping[]): Promise<void> {
    const entryIndex = this.geometry.bitmapEntry(block);
    const { state, offset } = decodeEntry(await this.batEntry(entryIndex));
    const where = `the sector bitmap entry (BAT entry ${entryIndex}) of partially present payload block ${block}`;
    if (state !== SB_BLOCK_PRESENT) throw new CorruptImageError(`${this.file.path}: ${where} has state ${state}, not present`);
    const problem = blockProblem(offset, BITMAP_BYTES, this.parts.fileSize, this.reserved);
    if (problem) throw new CorruptImageError(`${this.file.path}: ${where} points to ${problem}`);
    const { sectorSize } = this.geometry;
    const firstBit = this.geometry.bitmapFirstBit(block);
    await this.cache.read(offset!, (bitmap) => {
      for (let pos = from; pos < to; ) {
        const sector = Math.floor((pos - blockStart) / sectorSize);
        const bit = firstBit + sector;
        const present = (bitmap[bit >> 3]! >> (bit & 7)) & 1;
        const runEnd = Math.min(to, blockStart + (sector + 1) * sectorSize);
        appendRun(
          runs,
          present
            ? { kind: 'data', guestOffset: pos, length: runEnd - pos, hostOffset: hostOffset + (pos - blockStart), file: this.dataFile }
            : { kind: 'backing', guestOffset: pos, length: runEnd - pos },
        );
        pos = runEnd;
      }
    });
  }

  private async writeGuest(offset: number, data: Buffer): Promise<void> {
    this.assertOpen();
    await this.writer!.userVisible();
    await writeByRuns(this.file, await this.map(offset, data.length), offset, data, (at, part) => this.allocatingWrite(at, part));
  }

  /**
   * A write to blocks that were not present when looked at, under the writer's lock: each block is
   * mapped again (an earlier request may have allocated it meanwhile: then in place). Blocks still
   * missing are allocated together, their BAT entries in one log entry; the rest of a new block is
   * zeros, or in a differencing image the parent's bytes where the block read the parent. A
   * partially present block of a differencing image is completed in place (its sectors not present
   * filled from the parent) and becomes FULLY_PRESENT through the log.
   */
  private async allocatingWrite(offset: number, data: Buffer): Promise<void> {
    const { blockSize } = this.geometry;
    await this.writer!.lock.runExclusive(async () => {
      this.assertOpen();
      const fresh: FreshBlock[] = [];
      const completed: Array<{ index: number; value: bigint }> = [];
      for (let pos = offset; pos < offset + data.length; ) {
        const block = Math.floor(pos / blockSize);
        const end = Math.min(offset + data.length, (block + 1) * blockSize);
        const part = data.subarray(pos - offset, end - offset);
        const runs = await this.map(pos, end - pos);
        if (runs.every((run) => run.kind === 'data')) {
          for (const run of runs) {
            announce(this.file, 'write_aio');
            await this.file.write(run.hostOffset, part.subarray(run.guestOffset - pos, run.guestOffset - pos + run.length));
          }
        } else {
          const entry = this.geometry.payloadEntry(block);
          const { state, offset: host } = decodeEntry(await this.batEntry(entry));
          if (state === PARTIALLY_PRESENT) {
            await this.completePartial(block, host!, pos, part);
            completed.push({ index: entry, value: BigInt(host!) | BigInt(FULLY_PRESENT) });
          } else {
            fresh.push({ block, inBlock: pos - block * blockSize, data: part, fromParent: this.parts.metadata.hasParent && runs[0]!.kind === 'backing' });
          }
        }
        pos = end;
      }
      if (completed.length > 0) {
        await flushToDisk(this.file);
        await this.setBatEntries(completed);
      }
      for (let i = 0; i < fresh.length; i += MAX_BLOCKS_PER_ENTRY) await this.allocateBlocks(fresh.slice(i, i + MAX_BLOCKS_PER_ENTRY));
    });
  }

  /** New blocks, contiguous at the end of the file, their data flushed, then their BAT entries through one log entry. Under the writer's lock. */
  private async allocateBlocks(fresh: readonly FreshBlock[]): Promise<void> {
    const writer = this.writer!;
    const { blockSize } = this.geometry;
    const start = await writer.reserveBlocks(blockSize, fresh.length);
    this.parts.fileSize = writer.fileSize;
    for (const [i, f] of fresh.entries()) {
      const host = start + i * blockSize;
      if (f.fromParent) {
        const blockStart = f.block * blockSize;
        const blockLength = Math.min(blockSize, this.virtualSize - blockStart);
        await this.copyParent(blockStart, blockStart + f.inBlock, host);
        await this.copyParent(blockStart + f.inBlock + f.data.length, blockStart + blockLength, host + f.inBlock + f.data.length);
      }
      announce(this.file, 'write_aio');
      await this.file.write(host + f.inBlock, f.data);
    }
    await flushToDisk(this.file);
    await this.setBatEntries(fresh.map((f, i) => ({ index: this.geometry.payloadEntry(f.block), value: BigInt(start + i * blockSize) | BigInt(FULLY_PRESENT) })));
    log('%s: payload blocks %j allocated from %d', this.file.path, fresh.map((f) => f.block), start);
  }

  /**
   * A partially present block about to become FULLY_PRESENT: the parent's bytes go into its sectors
   * not present (which read the parent until the BAT entry changes), then `part` at `pos`.
   */
  private async completePartial(block: number, host: number, pos: number, part: Buffer): Promise<void> {
    const blockStart = block * this.geometry.blockSize;
    const blockLength = Math.min(this.geometry.blockSize, this.virtualSize - blockStart);
    for (const run of await this.map(blockStart, blockLength)) {
      if (run.kind === 'backing') await this.copyParent(run.guestOffset, run.guestOffset + run.length, host + (run.guestOffset - blockStart));
    }
    announce(this.file, 'write_aio');
    await this.file.write(host + (pos - blockStart), part);
  }

  /** Copies the parent's guest bytes [from, to) to file offset `host`, 1 MiB at a time. */
  private async copyParent(from: number, to: number, host: number): Promise<void> {
    if (!this.readBacking) throw new BlockError(`${this.file.path}: a write into a differencing VHDX needs its parent, which is not open`, osConstants.errno.EIO);
    for (let at = from; at < to; at += COPY_CHUNK) {
      const bytes = Buffer.alloc(Math.min(COPY_CHUNK, to - at));
      await this.readBacking!(at, bytes);
      announce(this.file, 'cow_write');
      await this.file.write(host + (at - from), bytes);
    }
  }

  /** Changes BAT entries through the log (writer.ts: their 4 KiB sectors in one entry), then in the cached pages. Under the writer's lock. */
  private async setBatEntries(changes: ReadonlyArray<{ index: number; value: bigint }>): Promise<void> {
    const batOffset = this.parts.regions.bat.fileOffset;
    const handles = new Map<number, TableHandle<Buffer>>();
    try {
      const sectors = new Map<number, Buffer>();
      for (const { index, value } of changes) {
        const byte = index * 8;
        const page = Math.floor(byte / TABLE_BYTES) * TABLE_BYTES;
        let handle = handles.get(page);
        if (!handle) {
          handle = await this.cache.acquire(batOffset + page);
          handles.set(page, handle);
        }
        const sectorAt = Math.floor(byte / LOG_SECTOR) * LOG_SECTOR;
        let sector = sectors.get(sectorAt);
        if (!sector) {
          sector = Buffer.from(handle.table.subarray(sectorAt - page, sectorAt - page + LOG_SECTOR));
          sectors.set(sectorAt, sector);
        }
        sector.writeBigUInt64LE(value, byte - sectorAt);
      }
      await this.writer!.logAndApply([...sectors].map(([at, data]) => ({ offset: batOffset + at, data })));
      for (const { index, value } of changes) {
        const byte = index * 8;
        const page = Math.floor(byte / TABLE_BYTES) * TABLE_BYTES;
        handles.get(page)!.table.writeBigUInt64LE(value, byte - page);
      }
    } finally {
      for (const handle of handles.values()) handle.release();
    }
  }

  /**
   * Makes a range read as zeros: stored bytes become zeros (whole 4 KiB pieces punched out of the
   * file when it can, the rest written as zeros; the BAT does not change); blocks not present read
   * as zeros already, but in a differencing image, where they read the parent, zeros are written
   * like any data.
   */
  private async zeroGuest(offset: number, length: number): Promise<void> {
    this.assertOpen();
    await this.writer!.userVisible();
    const runs = await this.map(offset, length);
    for (const run of runs) {
      if (run.kind === 'backing' && this.parts.metadata.hasParent) {
        // Reads the parent: zeros must be written into this image (a new block, the rest from the parent).
        for (let at = run.guestOffset; at < run.guestOffset + run.length; at += ZERO_CHUNK) {
          await this.allocatingWrite(at, Buffer.alloc(Math.min(ZERO_CHUNK, run.guestOffset + run.length - at)));
        }
        continue;
      }
      if (run.kind !== 'data') continue;
      const start = run.hostOffset;
      const end = start + run.length;
      const punchFrom = Math.ceil(start / PUNCH_UNIT) * PUNCH_UNIT;
      const punchTo = Math.floor(end / PUNCH_UNIT) * PUNCH_UNIT;
      if (this.file.punchHole && punchTo > punchFrom) {
        await this.writeZeros(start, punchFrom);
        await this.file.punchHole(punchFrom, punchTo - punchFrom);
        await this.writeZeros(punchTo, end);
      } else {
        await this.writeZeros(start, end);
      }
    }
  }

  private async writeZeros(from: number, to: number): Promise<void> {
    for (let at = from; at < to; at += ZERO_CHUNK) {
      announce(this.file, 'write_aio');
      await this.file.write(at, Buffer.alloc(Math.min(ZERO_CHUNK, to - at)));
    }
  }

  /** fdatasync, then (writer.ts) a header without the log GUID when one names it: nothing left to replay. */
  async flush(): Promise<void> {
    this.assertOpen();
    const writer = this.writer;
    if (!writer) return;
    await flushToDisk(this.file);
    await writer.lock.runExclusive(() => writer.settle());
  }

  /** Idle clean: the same as flush (the log GUID is the only "dirty" state a VHDX has). */
  async markClean(): Promise<void> {
    if (!this.closed) await this.flush();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    const writer = this.writer;
    const finish = async () => {
      this.closed = true;
      if (writer) {
        await flushToDisk(this.file);
        await writer.settle();
      }
      await this.file.close();
    };
    if (writer) await writer.lock.runExclusive(finish);
    else await finish();
  }

  private assertOpen(): void {
    if (this.closed) throw new BlockError(`${this.file.path}: image is closed`, osConstants.errno.EBADF);
  }

  info(): FormatInfo {
    const { metadata, header } = this.parts;
    return {
      clusterSize: metadata.blockSize,
      dirty: this.parts.replayedEntries > 0,
      specific: {
        subformat: metadata.hasParent ? 'differencing' : metadata.leaveBlocksAllocated ? 'fixed' : 'dynamic',
        'block-size': metadata.blockSize,
        'logical-sector-size': metadata.logicalSectorSize,
        'physical-sector-size': metadata.physicalSectorSize,
        'log-size': header.logLength,
        'log-entries-replayed-in-memory': this.parts.replayedEntries,
        ...(this.parts.replayedOnDisk > 0 ? { 'log-entries-replayed-on-disk': this.parts.replayedOnDisk } : {}),
        'data-write-guid': guidText((this.writer?.currentHeader ?? header).dataWriteGuid),
        ...(metadata.parent ? { 'parent-linkage': metadata.parent.get('parent_linkage') } : {}),
      },
    };
  }
}
