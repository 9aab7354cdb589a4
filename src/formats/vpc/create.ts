/**
 * Creating a VHD the way `qemu-img create -f vpc` does, with its option
 * names: subformat=dynamic|fixed, force_size=on|off. Without force_size the
 * size is rounded up to the CHS geometry that describes it (creator "qemu",
 * read back by the geometry); with it the size is kept (creator "qem2", read
 * back by current_size, the geometry set to the largest). Everything is
 * validated before the file is touched. With a backing file (`-b`, a VHD)
 * the disk is differencing (create-differencing.ts) and force_size defaults
 * to on, so the child keeps its parent's size exactly.
 *
 * Dynamic layout: footer copy at 0, dynamic header at 512, the BAT (all
 * unallocated) at 1536, the footer after it; blocks of 2 MiB are appended
 * as they are written. Fixed layout: the data (a sparse file), then the footer.
 *
 * Concurrency: the file is new and ours alone (the generic layer holds the
 * write lock when --force overwrites one).
 */
import { randomUUID } from 'node:crypto';
import { open } from 'node:fs/promises';
import { hostIoError, InvalidArgumentError } from '../../block/errors.js';
import type { CreateOptions } from '../../block/types.js';
import { rejectUnknownOptions } from '../options.js';
import { locatorsBytes, parentIdentity, writeParent } from './create-differencing.js';
import { DYNAMIC_COOKIE, DYNAMIC_HEADER_BYTES } from './dynamic-header.js';
import {
  calculateGeometry, DISK_DIFFERENCING, DISK_DYNAMIC, DISK_FIXED, FOOTER_BYTES, MAX_CHS_SECTORS, MAX_SECTORS, NO_DATA_OFFSET, SECTOR, serializeFooter,
  VHD_EPOCH, vhdChecksum, type Geometry, type VhdFooter,
} from './footer.js';

export const CREATE_OPTIONS = ['subformat', 'force_size'] as const;
/** qemu's block size for new dynamic disks. */
export const DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024;
const TABLE_OFFSET = 3 * SECTOR;

function parseBool(text: string, name: string): boolean {
  if (['on', 'true', 'yes'].includes(text)) return true;
  if (['off', 'false', 'no'].includes(text)) return false;
  throw new InvalidArgumentError(`${name} '${text}' is not on or off`);
}

/** The geometry and the number of sectors qemu gives a new disk of `size` bytes. */
export function sizeForCreate(size: number, forceSize: boolean): { geometry: Geometry; sectors: number } {
  const requested = Math.ceil(size / SECTOR);
  let geometry: Geometry = { cylinders: 0, heads: 0, sectorsPerTrack: 0 };
  if (forceSize) {
    geometry = { cylinders: 65535, heads: 16, sectorsPerTrack: 255 };
  } else {
    const total = Math.min(MAX_CHS_SECTORS, requested);
    for (let i = 0; total > geometry.cylinders * geometry.heads * geometry.sectorsPerTrack; i++) geometry = calculateGeometry(total + i);
  }
  const chs = geometry.cylinders * geometry.heads * geometry.sectorsPerTrack;
  const sectors = chs === MAX_CHS_SECTORS ? requested : chs;
  if (sectors > MAX_SECTORS) {
    throw new InvalidArgumentError(`size ${size} is larger than the 2040 GiB (${MAX_SECTORS * SECTOR} bytes) a VHD may have`);
  }
  return { geometry, sectors };
}

export interface VpcCreatePlan {
  footer: VhdFooter;
  fixed: boolean;
  size: number;
}

/** Validates the options and returns what to write. */
export function planCreate(options: CreateOptions): VpcCreatePlan {
  rejectUnknownOptions('vpc', options.options, CREATE_OPTIONS);
  const differencing = options.backingFile !== undefined;
  const subformat = options.options?.subformat ?? 'dynamic';
  if (subformat !== 'dynamic' && subformat !== 'fixed') throw new InvalidArgumentError(`subformat '${subformat}' is not dynamic or fixed`);
  if (differencing && subformat === 'fixed') throw new InvalidArgumentError('subformat fixed cannot have a backing file: a VHD over a parent is differencing (subformat dynamic)');
  const forceSize = options.options?.force_size !== undefined ? parseBool(options.options.force_size, 'force_size') : differencing;
  if (!Number.isSafeInteger(options.size) || options.size < 0) {
    throw new InvalidArgumentError(`size ${options.size} is not a whole non-negative number of bytes`);
  }
  const { geometry, sectors } = sizeForCreate(options.size, forceSize);
  const size = sectors * SECTOR;
  const fixed = subformat === 'fixed';
  const footer: VhdFooter = {
    features: 2,
    version: 0x00010000,
    dataOffset: fixed ? undefined : SECTOR,
    timestamp: (Math.floor(Date.now() / 1000) - VHD_EPOCH) >>> 0,
    creatorApp: forceSize ? 'qem2' : 'qemu',
    creatorVersion: 0x00050003,
    creatorOs: 'Wi2k',
    originalSize: size,
    currentSize: size,
    geometry,
    diskType: fixed ? DISK_FIXED : differencing ? DISK_DIFFERENCING : DISK_DYNAMIC,
    checksum: 0,
    uuid: Buffer.from(randomUUID().replace(/-/g, ''), 'hex'),
    savedState: 0,
  };
  return { footer, fixed, size };
}

/** The dynamic header of a new disk with `entries` BAT entries. */
export function newDynamicHeader(entries: number, blockSize: number): Buffer {
  const bytes = Buffer.alloc(DYNAMIC_HEADER_BYTES);
  DYNAMIC_COOKIE.copy(bytes, 0);
  bytes.writeBigUInt64BE(NO_DATA_OFFSET, 8);
  bytes.writeBigUInt64BE(BigInt(TABLE_OFFSET), 16);
  bytes.writeUInt32BE(0x00010000, 24);
  bytes.writeUInt32BE(entries, 28);
  bytes.writeUInt32BE(blockSize, 32);
  bytes.writeUInt32BE(vhdChecksum(bytes, 36), 36);
  return bytes;
}

export async function createVpc(path: string, options: CreateOptions): Promise<void> {
  const plan = planCreate(options);
  const footer = serializeFooter(plan.footer);
  const parent = options.backingFile !== undefined ? await parentIdentity(path, options.backingFile, options.backingFormat) : undefined;
  try {
    const handle = await open(path, 'w');
    try {
      if (plan.fixed) {
        await handle.truncate(plan.size);
        await handle.write(footer, 0, FOOTER_BYTES, plan.size);
      } else {
        const entries = Math.ceil(plan.size / DEFAULT_BLOCK_SIZE);
        const tableBytes = Math.ceil((entries * 4) / SECTOR) * SECTOR;
        const locators = parent ? locatorsBytes(parent) : 0;
        const image = Buffer.alloc(TABLE_OFFSET + tableBytes + locators + FOOTER_BYTES, 0xff);
        footer.copy(image, 0);
        const header = newDynamicHeader(entries, DEFAULT_BLOCK_SIZE);
        if (parent) writeParent(header, image, TABLE_OFFSET + tableBytes, parent);
        header.copy(image, SECTOR);
        footer.copy(image, TABLE_OFFSET + tableBytes + locators);
        await handle.write(image, 0, image.length, 0);
      }
      await handle.datasync();
    } finally {
      await handle.close();
    }
  } catch (error) {
    throw hostIoError('cannot create', path, error);
  }
}
