/**
 * The Parallels header and its catalog (BAT): the on-disk layout and parsing
 * with every field validated as qemu's block/parallels.c does (each failure
 * names the field, its value and the allowed range), plus the bounds from
 * CVE-2014-0142 (tracks 0: a division by zero) and the catalog size limits
 * (no allocation before the BAT is known to fit in the file). Pure functions.
 *
 * Layout (little-endian, 64 bytes, then bat_entries u32 entries):
 *
 *   0 magic[16] "WithoutFreeSpace" (v1: BAT entries in sectors) or
 *               "WithouFreSpacExt" (v2: BAT entries in clusters)
 *  16 version (2)  20 heads  24 cylinders  28 tracks (sectors per cluster)
 *  32 bat_entries  36 nb_sectors (u64; v1 uses its low 32 bits)
 *  44 inuse (0x746f6e59 while open read-write)  48 data_off (sectors)
 *  52 flags  56 ext_off (u64, sectors: the format extension cluster)
 */
import { CorruptImageError } from '../../block/errors.js';

export const MAGIC_V1 = Buffer.from('WithoutFreeSpace', 'latin1');
export const MAGIC_V2 = Buffer.from('WithouFreSpacExt', 'latin1');
export const HEADER_VERSION = 2;
export const HEADER_BYTES = 64;
export const INUSE_MAGIC = 0x746f6e59;
/** qemu's bound on tracks: INT32_MAX / 513 sectors per cluster. */
export const MAX_TRACKS = Math.floor(0x7fffffff / 513);
/** qemu's bound on the catalog: INT_MAX / 4 entries. */
export const MAX_BAT_ENTRIES = Math.floor(0x7fffffff / 4);
const SECTOR = 512;

export interface ParallelsHeader {
  version: 1 | 2;
  tracks: number;
  clusterSize: number;
  batEntries: number;
  /** Guest size in sectors (v1: the low 32 bits of nb_sectors). */
  totalSectors: number;
  inuse: boolean;
  dataOff: number;
  flags: number;
  /** The format extension's offset in sectors; 0 when there is none. */
  extOff: bigint;
  /** Sectors per BAT unit: 1 for v1, tracks for v2. */
  offMultiplier: number;
  /** Bytes of header and catalog: 64 + 4 * bat_entries. */
  headerBytes: number;
}

function fail(path: string, message: string): never {
  throw new CorruptImageError(`${path}: parallels ${message}`);
}

/** Parses the 64-byte header of a file `fileSize` bytes long; the catalog is checked by checkCatalog. */
export function parseHeader(bytes: Buffer, fileSize: number, path: string): ParallelsHeader {
  if (bytes.length < HEADER_BYTES || fileSize < HEADER_BYTES) {
    fail(path, `header is truncated: the file is ${fileSize} bytes, the header needs ${HEADER_BYTES}`);
  }
  const magic = bytes.subarray(0, 16);
  const v1 = magic.equals(MAGIC_V1);
  if (!v1 && !magic.equals(MAGIC_V2)) fail(path, `magic ${JSON.stringify(magic.toString('latin1'))} is not "WithoutFreeSpace" or "WithouFreSpacExt"`);
  const version = bytes.readUInt32LE(16);
  if (version !== HEADER_VERSION) fail(path, `version ${version} is not ${HEADER_VERSION}`);
  const tracks = bytes.readUInt32LE(28);
  if (tracks < 1 || tracks > MAX_TRACKS) {
    fail(path, `tracks (sectors per cluster) ${tracks} is not in [1, ${MAX_TRACKS}]`);
  }
  const batEntries = bytes.readUInt32LE(32);
  if (batEntries > MAX_BAT_ENTRIES) fail(path, `bat_entries ${batEntries} is not in [0, ${MAX_BAT_ENTRIES}]`);
  const headerBytes = HEADER_BYTES + 4 * batEntries;
  if (headerBytes > fileSize) {
    fail(path, `bat_entries ${batEntries} puts the ${4 * batEntries}-byte catalog past the end of the ${fileSize}-byte file (truncated image?)`);
  }
  let nbSectors = bytes.readBigUInt64LE(36);
  if (v1) nbSectors &= 0xffffffffn;
  if (nbSectors > BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR))) {
    fail(path, `nb_sectors ${nbSectors} is above the largest supported size 2^53-1 bytes`);
  }
  return {
    version: v1 ? 1 : 2,
    tracks,
    clusterSize: tracks * SECTOR,
    batEntries,
    totalSectors: Number(nbSectors),
    inuse: bytes.readUInt32LE(44) === INUSE_MAGIC,
    dataOff: bytes.readUInt32LE(48),
    flags: bytes.readUInt32LE(52),
    extOff: bytes.readBigUInt64LE(56),
    offMultiplier: v1 ? 1 : tracks,
    headerBytes,
  };
}

/** The first sector of the cluster BAT entry `entry` points to (0: unallocated). */
export function entrySector(header: ParallelsHeader, entry: number): number {
  return entry * header.offMultiplier;
}

/**
 * What qemu checks of the catalog at open: the data end (data_off, or the
 * first sector after the catalog, then past every allocated cluster) must be
 * inside the file. Names the first BAT entry whose cluster ends past the file.
 */
export function checkCatalog(header: ParallelsHeader, bat: Buffer, fileSize: number, path: string): void {
  const fileSectors = Math.floor(fileSize / SECTOR);
  const dataEnd = header.dataOff !== 0 ? header.dataOff : Math.ceil(header.headerBytes / SECTOR);
  if (dataEnd > fileSectors) fail(path, `data_off ${header.dataOff} (sectors) is past the end of the ${fileSize}-byte file`);
  for (let i = 0; i < header.batEntries; i++) {
    const entry = bat.readUInt32LE(4 * i);
    if (entry === 0) continue;
    const sector = entrySector(header, entry);
    if (sector + header.tracks > fileSectors) {
      fail(path, `BAT entry ${i} (guest bytes ${i * header.clusterSize}..) points to sector ${sector}, whose ${header.clusterSize}-byte cluster ends past the end of the ${fileSize}-byte file`);
    }
  }
}
