/**
 * The UDIF trailer ("koly" block): the last 512 bytes of a DMG, big-endian.
 * Parsing with every field used validated; each failure names the field, its
 * value and the allowed range. Pure functions over bytes already read; no I/O,
 * no state, so no concurrency rules.
 *
 * Layout (offsets in bytes):
 *
 *   0x000 signature "koly"        0x004 version (4)          0x008 header size (512)
 *   0x00c flags                   0x010 running data fork offset
 *   0x018 data fork offset        0x020 data fork length
 *   0x028 resource fork offset    0x030 resource fork length
 *   0x038 segment number (u32)    0x03c segment count (u32)  0x040 segment id (16)
 *   0x050 data fork checksum (type, size, 128 bytes)
 *   0x0d8 XML plist offset        0x0e0 XML plist length     0x0e8 reserved (120)
 *   0x160 master checksum (136)   0x1e8 image variant (u32)  0x1ec sector count (u64)
 *
 * qemu (block/dmg.c) looks for "koly" anywhere in the last 515 bytes of the
 * file rounded up to 512; the specification, dmg2img and this reader take the
 * trailer at exactly the file size - 512 (docs/formats/dmg.md).
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';

export const TRAILER_BYTES = 512;
export const KOLY_MAGIC = Buffer.from('koly', 'latin1');
export const SECTOR_BYTES = 512;
/** qemu's cap on the XML property list (dmg_read_plist_xml): 16 MiB; the resource fork gets the same. */
export const MAX_XML_BYTES = 16 * 1024 * 1024;

export interface Trailer {
  /** Where the trailer starts: the file size - 512. Everything the trailer names lies before it. */
  trailerOffset: number;
  dataForkOffset: number;
  rsrcForkOffset: number;
  rsrcForkLength: number;
  xmlOffset: number;
  xmlLength: number;
  segmentNumber: number;
  segmentCount: number;
  imageVariant: number;
  /** Virtual size in 512-byte sectors. */
  sectorCount: number;
  version: number;
  flags: number;
}

function fail(path: string, message: string): never {
  throw new CorruptImageError(`${path}: DMG ${message}`);
}

/** A 64-bit field as a safe integer, refused above 2^53 - 1 (before it becomes an offset). */
function u64(bytes: Buffer, at: number, field: string, path: string, max = BigInt(Number.MAX_SAFE_INTEGER)): number {
  const value = bytes.readBigUInt64BE(at);
  if (value > max) fail(path, `trailer ${field} ${value} is above the largest supported value ${max}`);
  return Number(value);
}

/** Checks that [offset, offset + length) of a table the trailer names is at most 16 MiB and inside the file before the trailer. */
function within(offset: number, length: number, what: string, trailerOffset: number, path: string): void {
  if (length > MAX_XML_BYTES) fail(path, `trailer ${what} length ${length} is above the limit ${MAX_XML_BYTES} (16 MiB)`);
  if (offset >= trailerOffset || length > trailerOffset - offset) {
    fail(path, `${what} [${offset}, ${offset + length}) is not inside the file before the trailer at ${trailerOffset}`);
  }
}

/** Parses the 512 bytes at the end of a file `fileSize` bytes long. */
export function parseTrailer(bytes: Buffer, fileSize: number, path: string): Trailer {
  if (fileSize < TRAILER_BYTES || bytes.length < TRAILER_BYTES) {
    fail(path, `file is ${fileSize} bytes: too small for the 512-byte koly trailer`);
  }
  if (!bytes.subarray(0, 4).equals(KOLY_MAGIC)) {
    fail(path, `trailer signature at offset ${fileSize - TRAILER_BYTES} is ${bytes.subarray(0, 4).toString('hex')}, not 6b6f6c79 ("koly")`);
  }
  const trailerOffset = fileSize - TRAILER_BYTES;
  const version = bytes.readUInt32BE(0x04);
  if (version !== 4) fail(path, `trailer version ${version} is not 4 (the only UDIF version)`);
  const headerSize = bytes.readUInt32BE(0x08);
  if (headerSize !== TRAILER_BYTES) fail(path, `trailer header size ${headerSize} is not 512`);
  const trailer: Trailer = {
    trailerOffset,
    version,
    flags: bytes.readUInt32BE(0x0c),
    dataForkOffset: u64(bytes, 0x18, 'data fork offset', path),
    rsrcForkOffset: u64(bytes, 0x28, 'resource fork offset', path),
    rsrcForkLength: u64(bytes, 0x30, 'resource fork length', path),
    segmentNumber: bytes.readUInt32BE(0x38),
    segmentCount: bytes.readUInt32BE(0x3c),
    xmlOffset: u64(bytes, 0xd8, 'XML plist offset', path),
    xmlLength: u64(bytes, 0xe0, 'XML plist length', path),
    imageVariant: bytes.readUInt32BE(0x1e8),
    // The virtual size in bytes (sectors * 512) must stay a safe integer.
    sectorCount: u64(bytes, 0x1ec, 'sector count', path, BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR_BYTES))),
  };
  if (trailer.dataForkOffset > trailerOffset) {
    fail(path, `trailer data fork offset ${trailer.dataForkOffset} is past the trailer at ${trailerOffset}`);
  }
  if (trailer.segmentCount > 1) {
    throw new UnsupportedFeatureError(
      `${path}: segmented DMG images are not supported (segment ${trailer.segmentNumber} of ${trailer.segmentCount}: the image is split over several files)`,
    );
  }
  if (trailer.xmlLength === 0 && trailer.rsrcForkLength === 0) {
    fail(path, 'trailer has no XML property list (XML plist length 0) and no resource fork: there is no chunk table');
  }
  // The XML property list is read when there is one, the resource fork only otherwise: only the one read is checked.
  if (trailer.xmlLength !== 0) within(trailer.xmlOffset, trailer.xmlLength, 'XML plist', trailerOffset, path);
  else within(trailer.rsrcForkOffset, trailer.rsrcForkLength, 'resource fork', trailerOffset, path);
  return trailer;
}
