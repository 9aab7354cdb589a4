/**
 * VMDK3 extents ("COWD": ESX 2 vmfsSparse / redo-log files), read-only, as
 * qemu's vmdk_open_vmfs_sparse reads them. The header (little-endian u32s
 * after the magic) gives what is used:
 *
 *    4 version       1 (the only one known; qemu does not look)
 *    8 flags         not used (VMware writes 3)
 *   12 numSectors    the extent's size (the descriptor line's count is ignored, as in qemu)
 *   16 granularity   sectors per grain
 *   20 gdOffset      the grain directory (sectors)
 *   24 numGDEntries  its entries: u32 sectors of grain tables (0: none)
 *   28 freeSector    not used for reading
 *
 * Every grain table has 4096 u32 entries: 0 is an unallocated grain (the
 * parent, or zeros), any other value the grain's sector. There are no zero
 * grains and no compression. Each field is checked before use, with its value
 * and range: granularity 1..0x200000 (qemu's bound; 0 divides by zero in
 * qemu), numGDEntries enough for numSectors and at most 32 Mi (qemu's bound),
 * the directory inside the file. A grain table or grain outside the file fails
 * the read of its range, naming the entry.
 *
 * Concurrency: see table-extent.ts (immutable after open, cached tables).
 */
import createDebug from 'debug';
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';
import type { Protocol } from '../../block/types.js';
import { MAX_GD_ENTRIES, MAX_GRAIN_SECTORS, SECTOR } from './header.js';
import { TableExtent, type GrainAt } from './table-extent.js';

const log = createDebug('imgmount:vmdk');

/** Entries of a COWD grain table (qemu's constant). */
export const COWD_GT_ENTRIES = 4096;
/** Bytes of the header fields read (magic and seven u32). */
const COWD_HEADER_BYTES = 32;

export interface CowdHeader {
  version: number;
  /** Sectors of guest data. */
  capacity: number;
  granularity: number;
  gdOffset: number;
  gdEntries: number;
}

/** The COWD header at the start of `head` (at least 32 bytes), checked against the file's size. */
export function parseCowdHeader(head: Buffer, fileSize: number, path: string): CowdHeader {
  const bad = (what: string) => new CorruptImageError(`${path}: VMDK3 ("COWD") extent header: ${what}`);
  if (head.length < COWD_HEADER_BYTES || fileSize < COWD_HEADER_BYTES) throw bad(`the file is ${fileSize} bytes, shorter than the ${COWD_HEADER_BYTES}-byte header`);
  const version = head.readUInt32LE(4);
  const capacity = head.readUInt32LE(12);
  const granularity = head.readUInt32LE(16);
  const gdOffset = head.readUInt32LE(20);
  const gdEntries = head.readUInt32LE(24);
  if (version !== 1) throw new UnsupportedFeatureError(`${path}: VMDK3 ("COWD") extent header: version ${version} is not supported (only 1)`);
  if (granularity < 1 || granularity > MAX_GRAIN_SECTORS) throw bad(`granularity ${granularity} sectors is outside 1..${MAX_GRAIN_SECTORS}`);
  const needed = Math.ceil(capacity / (COWD_GT_ENTRIES * granularity));
  if (gdEntries > MAX_GD_ENTRIES) throw bad(`numGDEntries ${gdEntries} is above ${MAX_GD_ENTRIES}`);
  if (gdEntries < needed) throw bad(`numGDEntries ${gdEntries} is too small for numSectors ${capacity} (${needed} needed with ${granularity}-sector grains)`);
  const gdEnd = gdOffset * SECTOR + gdEntries * 4;
  if (gdOffset < 1 || gdEnd > fileSize) {
    throw bad(`the grain directory (gdOffset ${gdOffset} sectors, ${gdEntries} entries) must lie after the header's first sector and inside the file (${fileSize} bytes)`);
  }
  return { version, capacity, granularity, gdOffset, gdEntries };
}

export class CowdExtent extends TableExtent {
  readonly header: CowdHeader;
  private readonly gd: Uint32Array;
  private readonly fileSize: number;

  constructor(file: Protocol, header: CowdHeader, gd: Uint32Array, fileSize: number, type: string, cacheBytes?: number) {
    super({ file, length: header.capacity * SECTOR, grainSize: header.granularity * SECTOR, tableEntries: COWD_GT_ENTRIES, entryBytes: 4, type, cacheBytes });
    this.header = header;
    this.gd = gd;
    this.fileSize = fileSize;
  }

  protected tableOffset(gdIndex: number): number | undefined {
    const sector = this.gd[gdIndex]!;
    if (sector === 0) return undefined;
    if (sector * SECTOR + this.tableBytes > this.fileSize) {
      throw new CorruptImageError(`${this.file.path}: VMDK3 grain directory entry ${gdIndex} (sector ${sector}) points to a grain table outside the file (${this.fileSize} bytes)`);
    }
    return sector * SECTOR;
  }

  protected grainAt(table: Buffer, index: number, gdIndex: number, grainStart: number): GrainAt {
    const sector = table.readUInt32LE(index * 4);
    if (sector === 0) return 'backing';
    if (sector * SECTOR >= this.fileSize) {
      throw new CorruptImageError(
        `${this.file.path}: VMDK3 grain table ${gdIndex} maps the grain at extent offset ${grainStart} to sector ${sector}, past the end of the file (${this.fileSize} bytes)`,
      );
    }
    return sector * SECTOR;
  }
}

/** Opens a COWD extent file: its header and grain directory, checked; `type` is the descriptor line's (VMFSSPARSE or SPARSE), as info shows it. */
export async function openCowd(file: Protocol, head: Buffer, fileSize: number, type: string, cacheBytes?: number): Promise<CowdExtent> {
  const header = parseCowdHeader(head, fileSize, file.path);
  const bytes = Buffer.alloc(header.gdEntries * 4);
  await file.read(header.gdOffset * SECTOR, bytes);
  const gd = new Uint32Array(header.gdEntries);
  for (let i = 0; i < gd.length; i++) gd[i] = bytes.readUInt32LE(i * 4);
  log('%s: COWD extent, %d sectors, %d-sector grains, %d grain directory entries', file.path, header.capacity, header.granularity, header.gdEntries);
  return new CowdExtent(file, header, gd, fileSize, type, cacheBytes);
}
