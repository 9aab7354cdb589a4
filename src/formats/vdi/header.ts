/**
 * The VDI header (VirtualBox Disk Image, version 1.1): its on-disk layout,
 * parsing with every field validated (each failure names the field, its
 * value and the allowed range), and the one field this program changes
 * (blocks_allocated). Pure functions; no I/O. Layout (little-endian, the
 * first 512 bytes of the file):
 *
 *   0x000 text (banner, 64 bytes)   0x040 signature 0xbeda107f   0x044 version 0x00010001
 *   0x048 header_size               0x04c image_type (1 dynamic, 2 static)
 *   0x050 image_flags               0x054 description (256 bytes)
 *   0x154 offset_bmap               0x158 offset_data            0x15c cylinders, heads, sectors
 *   0x168 sector_size (512)         0x16c unused                 0x170 disk_size (u64)
 *   0x178 block_size                0x17c block_extra            0x180 blocks_in_image
 *   0x184 blocks_allocated          0x188 uuid_image, uuid_last_snap, uuid_link, uuid_parent (16 bytes each)
 *
 * The checks are qemu's (block/vdi.c vdi_open, with the fixes of
 * CVE-2014-0144's series: disk size and block count bounded) plus the ones
 * that keep every later read and write inside what the header describes
 * (and block sizes other than 1 MiB, which qemu refuses, are accepted as the
 * specification allows them: powers of two, here 512 B to 64 MiB):
 * the block map inside the file, before the data area and past the header;
 * blocks_allocated not above blocks_in_image; block_extra 0 (qemu ignores it
 * and would read the wrong bytes); image types other than dynamic and static
 * refused by name.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';

export const HEADER_BYTES = 512;
export const SIGNATURE_OFFSET = 0x40;
export const VDI_SIGNATURE = 0xbeda107f;
export const VDI_VERSION_1_1 = 0x00010001;
export const SECTOR_SIZE = 512;
/** The only block size qemu reads (and VirtualBox makes). */
export const DEFAULT_BLOCK_SIZE = 1024 * 1024;
/** Other block sizes the specification allows (powers of two) are read in this range, read-only. */
export const MIN_BLOCK_SIZE = 512;
export const MAX_BLOCK_SIZE = 64 * 1024 * 1024;
/** qemu's bound on blocks_in_image (0xffffffff / 4). */
export const MAX_BLOCKS = 0x3fffffff;
export const MAX_DISK_SIZE = MAX_BLOCKS * DEFAULT_BLOCK_SIZE;
/** Largest block map loaded into memory: 128 Mi entries, a 128 TiB disk with 1 MiB blocks. */
export const MAX_BMAP_BYTES = 512 * 1024 * 1024;

export const VDI_TYPE_DYNAMIC = 1;
export const VDI_TYPE_STATIC = 2;

/** The banner qemu writes; VirtualBox writes its own, the value does not matter. */
export const VDI_TEXT = '<<< QEMU VM Virtual Disk Image >>>\n';

const OFFSET_BLOCKS_ALLOCATED = 0x184;

export interface VdiHeader {
  imageType: number;
  offsetBmap: number;
  offsetData: number;
  /** disk_size rounded up to a multiple of 512, as qemu does (VBoxManage convertfromraw writes odd sizes). */
  diskSize: number;
  blockSize: number;
  blocksInImage: number;
  blocksAllocated: number;
  /** The header sector as read, so that rewriting it changes only blocks_allocated. */
  raw: Buffer;
}

function fail(path: string, message: string): never {
  throw new CorruptImageError(`${path}: VDI ${message}`);
}

function unsupported(path: string, message: string): never {
  throw new UnsupportedFeatureError(`${path}: VDI ${message}`);
}

function isNullUuid(bytes: Buffer, offset: number): boolean {
  return bytes.subarray(offset, offset + 16).every((byte) => byte === 0);
}

/** Bytes of the block map: blocks_in_image 32-bit entries, rounded up to whole sectors. */
export function bmapBytes(blocksInImage: number): number {
  return Math.ceil((blocksInImage * 4) / SECTOR_SIZE) * SECTOR_SIZE;
}

/** Parses and validates the header in `bytes` (the first 512 bytes) of a file `fileSize` bytes long. */
export function parseHeader(bytes: Buffer, fileSize: number, path: string): VdiHeader {
  if (bytes.length < HEADER_BYTES || fileSize < HEADER_BYTES) {
    fail(path, `header is truncated: the file is ${fileSize} bytes, the header needs ${HEADER_BYTES}`);
  }
  const signature = bytes.readUInt32LE(SIGNATURE_OFFSET);
  if (signature !== VDI_SIGNATURE) fail(path, `signature 0x${signature.toString(16).padStart(8, '0')} is not 0x${VDI_SIGNATURE.toString(16)}`);
  const version = bytes.readUInt32LE(0x44);
  if (version !== VDI_VERSION_1_1) {
    unsupported(path, `version ${version >>> 16}.${version & 0xffff} is not supported (only 1.1)`);
  }
  const imageType = bytes.readUInt32LE(0x4c);
  if (imageType !== VDI_TYPE_DYNAMIC && imageType !== VDI_TYPE_STATIC) {
    unsupported(path, `image_type ${imageType} is not supported (1 dynamic or 2 static; 3 undo and 4 differencing images are not)`);
  }
  const offsetBmap = bytes.readUInt32LE(0x154);
  const offsetData = bytes.readUInt32LE(0x158);
  const sectorSize = bytes.readUInt32LE(0x168);
  const diskSizeField = bytes.readBigUInt64LE(0x170);
  const blockSize = bytes.readUInt32LE(0x178);
  const blockExtra = bytes.readUInt32LE(0x17c);
  const blocksInImage = bytes.readUInt32LE(0x180);
  const blocksAllocated = bytes.readUInt32LE(OFFSET_BLOCKS_ALLOCATED);

  if (diskSizeField > BigInt(MAX_DISK_SIZE)) fail(path, `disk_size ${diskSizeField} is above the largest supported size ${MAX_DISK_SIZE}`);
  const diskSize = Math.ceil(Number(diskSizeField) / SECTOR_SIZE) * SECTOR_SIZE;
  if (offsetBmap % SECTOR_SIZE !== 0 || offsetBmap < HEADER_BYTES) {
    fail(path, `offset_bmap ${offsetBmap} is not a multiple of ${SECTOR_SIZE} at or past the ${HEADER_BYTES}-byte header`);
  }
  if (offsetData % SECTOR_SIZE !== 0) fail(path, `offset_data ${offsetData} is not a multiple of ${SECTOR_SIZE}`);
  if (sectorSize !== SECTOR_SIZE) unsupported(path, `sector_size ${sectorSize} is not supported (only ${SECTOR_SIZE})`);
  if ((blockSize & (blockSize - 1)) !== 0 || blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE) {
    unsupported(path, `block_size ${blockSize} is not supported (a power of two in [${MIN_BLOCK_SIZE}, ${MAX_BLOCK_SIZE}]; VirtualBox makes and qemu reads ${DEFAULT_BLOCK_SIZE})`);
  }
  if (blockExtra !== 0) unsupported(path, `block_extra ${blockExtra} is not supported (only 0)`);
  if (blocksInImage > MAX_BLOCKS) fail(path, `blocks_in_image ${blocksInImage} is above ${MAX_BLOCKS}`);
  if (diskSize > blocksInImage * blockSize) {
    fail(path, `disk_size ${diskSize} is larger than blocks_in_image ${blocksInImage} x block_size ${blockSize} = ${blocksInImage * blockSize}`);
  }
  if (blocksAllocated > blocksInImage) fail(path, `blocks_allocated ${blocksAllocated} is above blocks_in_image ${blocksInImage}`);
  const mapBytes = bmapBytes(blocksInImage);
  if (mapBytes > MAX_BMAP_BYTES) {
    unsupported(path, `block map of ${mapBytes} bytes (blocks_in_image ${blocksInImage}) is above the ${MAX_BMAP_BYTES} bytes this program loads`);
  }
  if (offsetBmap + mapBytes > offsetData) {
    fail(path, `offset_bmap ${offsetBmap} with a ${mapBytes}-byte block map runs into the data area at offset_data ${offsetData}`);
  }
  if (offsetBmap + blocksInImage * 4 > fileSize) {
    fail(path, `offset_bmap ${offsetBmap} puts the ${blocksInImage * 4}-byte block map past the end of the ${fileSize}-byte file (truncated image?)`);
  }
  if (!isNullUuid(bytes, 0x1a8)) unsupported(path, 'uuid_link is set: images linked to another image are not supported');
  if (!isNullUuid(bytes, 0x1b8)) unsupported(path, 'uuid_parent is set: differencing images are not supported');
  return {
    imageType,
    offsetBmap,
    offsetData,
    diskSize,
    blockSize,
    blocksInImage,
    blocksAllocated,
    raw: Buffer.from(bytes.subarray(0, HEADER_BYTES)),
  };
}

/** The header sector with `blocksAllocated` in place of the stored value; every other byte as read. */
export function headerWithBlocksAllocated(header: VdiHeader, blocksAllocated: number): Buffer {
  const bytes = Buffer.from(header.raw);
  bytes.writeUInt32LE(blocksAllocated, OFFSET_BLOCKS_ALLOCATED);
  return bytes;
}

export interface NewHeader {
  imageType: number;
  diskSize: number;
  blocksInImage: number;
  uuidImage: Buffer;
  uuidLastSnap: Buffer;
}

/** A new header sector as `create` writes it: qemu's layout (block map at 512, data after it). */
export function serializeNewHeader(header: NewHeader): Buffer {
  const bytes = Buffer.alloc(HEADER_BYTES);
  bytes.write(VDI_TEXT, 0, 'latin1');
  bytes.writeUInt32LE(VDI_SIGNATURE, SIGNATURE_OFFSET);
  bytes.writeUInt32LE(VDI_VERSION_1_1, 0x44);
  bytes.writeUInt32LE(0x180, 0x48);
  bytes.writeUInt32LE(header.imageType, 0x4c);
  bytes.writeUInt32LE(HEADER_BYTES, 0x154);
  bytes.writeUInt32LE(HEADER_BYTES + bmapBytes(header.blocksInImage), 0x158);
  bytes.writeUInt32LE(SECTOR_SIZE, 0x168);
  bytes.writeBigUInt64LE(BigInt(header.diskSize), 0x170);
  bytes.writeUInt32LE(DEFAULT_BLOCK_SIZE, 0x178);
  bytes.writeUInt32LE(header.blocksInImage, 0x180);
  bytes.writeUInt32LE(header.imageType === VDI_TYPE_STATIC ? header.blocksInImage : 0, OFFSET_BLOCKS_ALLOCATED);
  header.uuidImage.copy(bytes, 0x188);
  header.uuidLastSnap.copy(bytes, 0x198);
  return bytes;
}
