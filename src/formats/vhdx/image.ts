/**
 * An opened VHDX image (read-only): answers map() from the BAT, one payload
 * block at a time, and for partially present blocks of a differencing image
 * from the sector bitmap (a set bit: the sector is in this file; clear: in the
 * parent). BAT pages and sector bitmaps are 1 MiB tables in a bounded cache.
 *
 * Concurrency rules: nothing changes after open (no writes), so map() calls
 * run concurrently without locks; the table cache shares one load per table.
 * When the log was replayed in memory, every read (BAT, bitmaps, data) goes
 * through the overlay (`view`), which data mappings name as their file.
 */
import createDebug from 'debug';
import { CorruptImageError } from '../../block/errors.js';
import type { BackingReference, FormatImage, FormatInfo, Mapping, OpenOptions, Protocol } from '../../block/types.js';
import { TableCache } from '../../cache/table-cache.js';
import {
  BatGeometry, BITMAP_BYTES, blockProblem, decodeEntry, FULLY_PRESENT, NOT_PRESENT, PARTIALLY_PRESENT, reservedRanges, SB_BLOCK_PRESENT,
  STATE_NAMES, UNDEFINED, UNMAPPED, UNMAPPED_V095, ZERO,
} from './bat.js';
import { guidText, MiB, type RegionTable, type VhdxHeader } from './header.js';
import type { VhdxMetadata } from './metadata.js';
import { appendRun } from '../../block/mapping.js';

const log = createDebug('imgmount:vhdx');

/** Default bound of cached BAT pages and sector bitmaps (1 MiB each). */
export const DEFAULT_TABLE_CACHE_BYTES = 16 * MiB;
const TABLE_BYTES = MiB;

export interface VhdxParts {
  header: VhdxHeader;
  regions: RegionTable;
  metadata: VhdxMetadata;
  geometry: BatGeometry;
  /** The size the file has (after the in-memory replay, when there was one). */
  fileSize: number;
  /** Log entries replayed in memory at open. */
  replayedEntries: number;
}

export class VhdxImage implements FormatImage {
  readonly virtualSize: number;
  private readonly cache: TableCache<Buffer>;
  private readonly reserved: ReturnType<typeof reservedRanges>;
  /** The file the data mappings name: the overlay when the log was replayed in memory. */
  private readonly dataFile: Protocol | undefined;

  constructor(
    private readonly file: Protocol,
    /** What reads go through: `file`, or the log overlay over it. */
    private readonly view: Protocol,
    readonly parts: VhdxParts,
    readonly backing: BackingReference | undefined,
    options: OpenOptions,
  ) {
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

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    await this.file.close();
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
        'data-write-guid': guidText(header.dataWriteGuid),
        ...(metadata.parent ? { 'parent-linkage': metadata.parent.get('parent_linkage') } : {}),
      },
    };
  }
}
