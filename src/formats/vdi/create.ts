/**
 * Creating a VDI image with qemu-img's option names: `static=on|off`
 * (default off). Layout as qemu makes it: the header sector, the block map
 * at 512 (whole sectors), the data area after it; 1 MiB blocks. A dynamic
 * image has every entry unallocated (0xffffffff); a static one has entry i =
 * block i and the file extended (sparse) over every block. Options are
 * validated before anything is written.
 */
import { randomUUID } from 'node:crypto';
import { open } from 'node:fs/promises';
import { hostIoError, InvalidArgumentError } from '../../block/errors.js';
import type { CreateOptions } from '../../block/types.js';
import { rejectUnknownOptions } from '../options.js';
import { VDI_UNALLOCATED } from './bmap.js';
import { bmapBytes, DEFAULT_BLOCK_SIZE, HEADER_BYTES, MAX_BMAP_BYTES, MAX_DISK_SIZE, SECTOR_SIZE, serializeNewHeader, VDI_TYPE_DYNAMIC, VDI_TYPE_STATIC } from './header.js';

export const CREATE_OPTIONS = ['static'] as const;

function parseBool(name: string, text: string | undefined): boolean {
  if (text === undefined) return false;
  if (['on', 'yes', 'true'].includes(text)) return true;
  if (['off', 'no', 'false'].includes(text)) return false;
  throw new InvalidArgumentError(`${name} '${text}' is not on or off`);
}

/** A random UUID in VirtualBox's byte order (the first three fields little-endian). */
function uuidBytes(): Buffer {
  const bytes = Buffer.from(randomUUID().replace(/-/g, ''), 'hex');
  bytes.subarray(0, 4).reverse();
  bytes.subarray(4, 6).reverse();
  bytes.subarray(6, 8).reverse();
  return bytes;
}

export async function createVdi(path: string, options: CreateOptions): Promise<void> {
  rejectUnknownOptions('vdi', options.options, CREATE_OPTIONS);
  const isStatic = parseBool('static', options.options?.static);
  if (options.backingFile !== undefined) throw new InvalidArgumentError('VDI images cannot have a backing file');
  if (!Number.isSafeInteger(options.size) || options.size < 0) {
    throw new InvalidArgumentError(`size ${options.size} is not a whole non-negative number of bytes`);
  }
  const diskSize = Math.ceil(options.size / SECTOR_SIZE) * SECTOR_SIZE;
  if (diskSize > MAX_DISK_SIZE) throw new InvalidArgumentError(`size ${options.size} is above ${MAX_DISK_SIZE}, the largest VDI image`);
  const blocks = Math.ceil(diskSize / DEFAULT_BLOCK_SIZE);
  const mapBytes = bmapBytes(blocks);
  if (mapBytes > MAX_BMAP_BYTES) throw new InvalidArgumentError(`size ${options.size} needs a ${mapBytes}-byte block map, above the ${MAX_BMAP_BYTES} bytes this program loads`);
  const head = Buffer.alloc(HEADER_BYTES + mapBytes);
  serializeNewHeader({
    imageType: isStatic ? VDI_TYPE_STATIC : VDI_TYPE_DYNAMIC,
    diskSize,
    blocksInImage: blocks,
    uuidImage: uuidBytes(),
    uuidLastSnap: uuidBytes(),
  }).copy(head, 0);
  for (let i = 0; i < blocks; i++) head.writeUInt32LE(isStatic ? i : VDI_UNALLOCATED, HEADER_BYTES + i * 4);
  try {
    const handle = await open(path, 'w');
    try {
      await handle.write(head, 0, head.length, 0);
      if (isStatic) await handle.truncate(head.length + blocks * DEFAULT_BLOCK_SIZE);
      await handle.datasync();
    } finally {
      await handle.close();
    }
  } catch (error) {
    throw hostIoError('cannot create', path, error);
  }
}
