/**
 * seSparse extents (ESXi 6.5+ snapshots, "space-efficient sparse"),
 * read-only, as qemu's vmdk_open_se_sparse and get_cluster_offset read them.
 * The format is not documented; qemu checks it strictly and so does this:
 *
 * - the const header (sector 0, u64 fields): magic 0xcafebabe, version
 *   0x200000001, capacity (sectors), grain_size 8 (4 KiB grains),
 *   grain_table_size 64 (sectors: 4096 u64 entries), flags 0, four reserved
 *   fields 0, then offset/size pairs (sectors) of the volatile header, the
 *   journal header, the journal, the grain directory, the grain tables, the
 *   free bitmap, the backmap and the grains; its padding must be zeros;
 * - the volatile header: magic 0xcafecafe, replay_journal 0 (a journal to
 *   replay is refused: the image is dirty), padding zeros.
 *
 * A grain directory entry is 0 (no table) or 0x10000000 in its high 32 bits
 * and the table's index in its low 32 bits (the table is at
 * grain_tables_offset + index * 64 sectors). A grain table entry's top nibble
 * is its type: 0 unallocated (the whole entry must be 0), 1 unmapped and 2
 * zero (both read as zeros, hiding the parent), 3 allocated: the grain index
 * is bits 48..59 plus bits 0..47 shifted left by 12, the grain at
 * grains_offset + index * 8 sectors. Anything else fails the read of that
 * range (qemu: EIO), naming the entry, as does a table or grain outside the file.
 *
 * Every u64 is read as a bigint and bounded before it becomes an offset.
 * Concurrency: see table-extent.ts (immutable after open, cached tables).
 */
import createDebug from 'debug';
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';
import type { Protocol } from '../../block/types.js';
import { MAX_GD_ENTRIES, SECTOR } from './header.js';
import { TableExtent, type GrainAt } from './table-extent.js';

const log = createDebug('imgmount:vmdk');

const CONST_MAGIC = 0xcafebaben;
const VOLATILE_MAGIC = 0xcafecafen;
const VERSION = 0x200000001n;
/** Sectors per grain and per grain table: the only values qemu (and ESXi) use. */
const GRAIN_SECTORS = 8;
const TABLE_SECTORS = 64;
const TABLE_ENTRIES = (TABLE_SECTORS * SECTOR) / 8;
/** Guest sectors one grain table covers (16 MiB). */
const TABLE_COVERAGE = TABLE_ENTRIES * GRAIN_SECTORS;
/** The largest sector number an offset may have (its bytes stay a safe integer). */
const MAX_SECTOR = BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR));

const CONST_FIELDS = [
  'magic', 'version', 'capacity', 'grain_size', 'grain_table_size', 'flags', 'reserved1', 'reserved2', 'reserved3', 'reserved4',
  'volatile_header_offset', 'volatile_header_size', 'journal_header_offset', 'journal_header_size', 'journal_offset', 'journal_size',
  'grain_dir_offset', 'grain_dir_size', 'grain_tables_offset', 'grain_tables_size', 'free_bitmap_offset', 'free_bitmap_size',
  'backmap_offset', 'backmap_size', 'grains_offset', 'grains_size',
] as const;
type ConstField = (typeof CONST_FIELDS)[number];

export interface SeSparseHeader {
  /** Sectors of guest data. */
  capacity: number;
  volatileOffset: number;
  gdOffset: number;
  gdEntries: number;
  tablesOffset: number;
  grainsOffset: number;
}

const hex = (value: bigint) => `0x${value.toString(16)}`;

/** The const header (the file's first sector), checked; then the volatile header is read and checked by openSeSparse. */
export function parseSeSparseHeader(sector: Buffer, fileSize: number, path: string): SeSparseHeader {
  const where = `${path}: VMDK seSparse const header`;
  if (fileSize < SECTOR) throw new CorruptImageError(`${where}: the file is ${fileSize} bytes, shorter than the ${SECTOR}-byte header`);
  const raw = {} as Record<ConstField, bigint>;
  CONST_FIELDS.forEach((name, i) => (raw[name] = sector.readBigUInt64LE(i * 8)));
  if (raw.magic !== CONST_MAGIC) throw new CorruptImageError(`${where}: magic ${hex(raw.magic)} is not ${hex(CONST_MAGIC)}`);
  const unsupported = (what: string) => new UnsupportedFeatureError(`${where}: ${what}`);
  if (raw.version !== VERSION) throw unsupported(`version ${hex(raw.version)} is not supported (only ${hex(VERSION)})`);
  if (raw.grain_size !== BigInt(GRAIN_SECTORS)) throw unsupported(`grain_size ${raw.grain_size} sectors is not supported (only ${GRAIN_SECTORS})`);
  if (raw.grain_table_size !== BigInt(TABLE_SECTORS)) throw unsupported(`grain_table_size ${raw.grain_table_size} sectors is not supported (only ${TABLE_SECTORS})`);
  if (raw.flags !== 0n) throw unsupported(`flags ${hex(raw.flags)} are not supported (only 0)`);
  for (const name of ['reserved1', 'reserved2', 'reserved3', 'reserved4'] as const) {
    if (raw[name] !== 0n) throw unsupported(`${name} is ${hex(raw[name])} (must be 0)`);
  }
  const padding = sector.subarray(CONST_FIELDS.length * 8, SECTOR);
  if (padding.some((byte) => byte !== 0)) throw unsupported('its padding (bytes 208..511) is not zeros');
  const fileSectors = BigInt(Math.floor(fileSize / SECTOR));
  const sectorField = (name: ConstField, what: string): number => {
    if (raw[name] > MAX_SECTOR) throw new CorruptImageError(`${where}: ${name} ${raw[name]} is above ${MAX_SECTOR} sectors (${what})`);
    return Number(raw[name]);
  };
  const capacity = sectorField('capacity', 'the extent size');
  const volatileOffset = sectorField('volatile_header_offset', 'the volatile header');
  if (volatileOffset < 1 || BigInt(volatileOffset) + 1n > fileSectors) {
    throw new CorruptImageError(`${where}: volatile_header_offset ${volatileOffset} must be a sector after the const header inside the file (1..${fileSectors - 1n})`);
  }
  const gdOffset = sectorField('grain_dir_offset', 'the grain directory');
  const gdSize = sectorField('grain_dir_size', 'the grain directory');
  const gdEntries = (gdSize * SECTOR) / 8;
  const needed = Math.ceil(capacity / TABLE_COVERAGE);
  if (gdEntries > MAX_GD_ENTRIES) throw new CorruptImageError(`${where}: grain_dir_size ${gdSize} sectors holds ${gdEntries} entries, above ${MAX_GD_ENTRIES}`);
  if (gdEntries < needed) {
    throw new CorruptImageError(`${where}: grain_dir_size ${gdSize} sectors holds ${gdEntries} entries, too few for capacity ${capacity} sectors (${needed} needed)`);
  }
  if (gdOffset < 1 || BigInt(gdOffset + gdSize) > fileSectors) {
    throw new CorruptImageError(`${where}: the grain directory (grain_dir_offset ${gdOffset}, grain_dir_size ${gdSize} sectors) must lie after the const header inside the file (${fileSectors} sectors)`);
  }
  const tablesOffset = sectorField('grain_tables_offset', 'the grain tables');
  const grainsOffset = sectorField('grains_offset', 'the grains');
  if (tablesOffset < 1 || tablesOffset > fileSectors) throw new CorruptImageError(`${where}: grain_tables_offset ${tablesOffset} lies outside the file (1..${fileSectors} sectors)`);
  if (grainsOffset < 1 || grainsOffset > fileSectors) throw new CorruptImageError(`${where}: grains_offset ${grainsOffset} lies outside the file (1..${fileSectors} sectors)`);
  return { capacity, volatileOffset, gdOffset, gdEntries, tablesOffset, grainsOffset };
}

/** The volatile header: its magic, no journal to replay, zero padding. */
export function checkVolatileHeader(sector: Buffer, path: string): void {
  const where = `${path}: VMDK seSparse volatile header`;
  const magic = sector.readBigUInt64LE(0);
  if (magic !== VOLATILE_MAGIC) throw new CorruptImageError(`${where}: magic ${hex(magic)} is not ${hex(VOLATILE_MAGIC)}`);
  const replay = sector.readBigUInt64LE(24);
  if (replay !== 0n) throw new UnsupportedFeatureError(`${where}: replay_journal is ${replay}: the image is dirty, and replaying its journal is not supported`);
  if (sector.subarray(32).some((byte) => byte !== 0)) throw new UnsupportedFeatureError(`${where}: its padding (bytes 32..511) is not zeros`);
}

export class SeSparseExtent extends TableExtent {
  readonly header: SeSparseHeader;
  private readonly gd: BigUint64Array;
  private readonly fileSize: number;

  constructor(file: Protocol, header: SeSparseHeader, gd: BigUint64Array, fileSize: number, cacheBytes?: number) {
    super({ file, length: header.capacity * SECTOR, grainSize: GRAIN_SECTORS * SECTOR, tableEntries: TABLE_ENTRIES, entryBytes: 8, type: 'SESPARSE', cacheBytes });
    this.header = header;
    this.gd = gd;
    this.fileSize = fileSize;
  }

  protected tableOffset(gdIndex: number): number | undefined {
    const entry = this.gd[gdIndex]!;
    if (entry === 0n) return undefined;
    const name = `${this.file.path}: VMDK seSparse grain directory entry ${gdIndex} (${hex(entry)})`;
    if (entry >> 32n !== 0x10000000n) throw new CorruptImageError(`${name} is neither 0 nor an allocated grain table (0x10000000 in its high 32 bits)`);
    const sector = this.header.tablesOffset + Number(entry & 0xffffffffn) * TABLE_SECTORS;
    if ((sector + TABLE_SECTORS) * SECTOR > this.fileSize) {
      throw new CorruptImageError(`${name} points to a grain table at sector ${sector}, outside the file (${this.fileSize} bytes)`);
    }
    return sector * SECTOR;
  }

  protected grainAt(table: Buffer, index: number, gdIndex: number, grainStart: number): GrainAt {
    const entry = table.readBigUInt64LE(index * 8);
    const type = entry >> 60n;
    if (entry === 0n) return 'backing';
    if (type === 1n || type === 2n) return 'zero';
    const name = `${this.file.path}: VMDK seSparse grain table ${gdIndex} entry ${index} (${hex(entry)}, the grain at extent offset ${grainStart})`;
    if (type !== 3n) throw new CorruptImageError(`${name} has type ${type} (0 unallocated with all bits 0, 1 unmapped, 2 zero, 3 allocated)`);
    const grain = ((entry & 0x0fff000000000000n) >> 48n) | ((entry & 0x0000ffffffffffffn) << 12n);
    const sector = BigInt(this.header.grainsOffset) + grain * BigInt(GRAIN_SECTORS);
    if (sector * BigInt(SECTOR) >= BigInt(this.fileSize)) {
      throw new CorruptImageError(`${name} maps grain ${grain} to sector ${sector}, past the end of the file (${this.fileSize} bytes)`);
    }
    return Number(sector) * SECTOR;
  }
}

/** Opens a seSparse extent file: both headers and the grain directory, checked. */
export async function openSeSparse(file: Protocol, head: Buffer, fileSize: number, cacheBytes?: number): Promise<SeSparseExtent> {
  const header = parseSeSparseHeader(head, fileSize, file.path);
  const volatile = Buffer.alloc(SECTOR);
  await file.read(header.volatileOffset * SECTOR, volatile);
  checkVolatileHeader(volatile, file.path);
  const bytes = Buffer.alloc(header.gdEntries * 8);
  await file.read(header.gdOffset * SECTOR, bytes);
  const gd = new BigUint64Array(header.gdEntries);
  for (let i = 0; i < gd.length; i++) gd[i] = bytes.readBigUInt64LE(i * 8);
  log('%s: seSparse extent, %d sectors, %d grain directory entries', file.path, header.capacity, header.gdEntries);
  return new SeSparseExtent(file, header, gd, fileSize, cacheBytes);
}
