/**
 * Creating VMDK images as qemu-img create -f vmdk does, with its option
 * names: subformat (monolithicSparse, streamOptimized — a stream is qemu's
 * sparse layout with version 3, the compressed and marker flags and deflate,
 * its grains written by stream-write.ts —, and the descriptor-file forms
 * monolithicFlat, twoGbMaxExtentFlat, twoGbMaxExtentSparse), adapter_type,
 * hwversion, compat6, toolsversion, zeroed_grain, and a vmdk backing file
 * (-b, -F vmdk; its CID becomes parentCID). A sparse file (or sparse extent)
 * is laid out as qemu lays it out: header, descriptor area (sectors 1-20;
 * empty in an extent of a descriptor file), redundant grain directory and
 * its grain tables, primary grain directory and its tables, grains from the
 * next 64 KiB boundary. Extent files are named as qemu names them
 * (disk-flat.vmdk, disk-f001.vmdk..., disk-s001.vmdk...: the file name's
 * last '.' splits it), 2 GiB each for the split forms, next to FILE.
 * Every option is validated, and no extent file may exist yet, before
 * anything is written; a failure removes the files this call created.
 * Concurrency: none (one create at a time per path, like qemu-img).
 */
import { randomInt } from 'node:crypto';
import { lstat, open, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { hostIoError, InvalidArgumentError } from '../../block/errors.js';
import { resolveBackingName } from '../../block/backing-name.js';
import { FileProtocol } from '../../block/file.js';
import { ImageFileGate } from '../../block/gate.js';
import type { CreateOptions } from '../../block/types.js';
import { rejectUnknownOptions } from '../options.js';
import { COMPRESSION_DEFLATE, FLAG_COMPRESS, FLAG_MARKER, FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN, SECTOR, VMDK4_MAGIC } from './header.js';
import { openVmdk } from './open.js';

export const CREATE_OPTIONS = ['subformat', 'adapter_type', 'hwversion', 'compat6', 'toolsversion', 'zeroed_grain'] as const;
const SUBFORMATS = ['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat', 'streamOptimized'];
const ADAPTERS = ['ide', 'buslogic', 'lsilogic', 'legacyESX'];
const GRANULARITY = 128;
const GTES_PER_GT = 512;
const DESC_OFFSET = 1;
const DESC_SECTORS = 20;
/** Grain sectors are 32-bit: qemu's VMDK_EXTENT_MAX_SECTORS. */
const MAX_SECTORS = 2 ** 32;
/** qemu's fixed split size of the twoGbMaxExtent forms: 2 GiB, in sectors. */
export const SPLIT_SECTORS = 0x80000000 / SECTOR;

function flag(options: Record<string, string>, name: string): boolean {
  const value = options[name];
  if (value === undefined || value === 'off' || value === 'false') return false;
  if (value === 'on' || value === 'true') return true;
  throw new InvalidArgumentError(`VMDK option ${name}=${value}: use on or off`);
}

/** One extent file to create: its path, the name its descriptor line gives, its sectors. */
interface ExtentPlan {
  path: string;
  name: string;
  sectors: number;
}

interface Plan {
  subformat: string;
  sectors: number;
  /** streamOptimized: compressed grains with markers (version 3), written only through convert -c. */
  stream: boolean;
  /** monolithicFlat, twoGbMaxExtentFlat: raw extent files. */
  flat: boolean;
  zeroedGrain: boolean;
  /** The extent files of a descriptor-file form (empty for monolithicSparse and streamOptimized). */
  extents: ExtentPlan[];
  descriptor: (cid: number, parentCid: number) => string;
}

/** The extent files qemu-img names for `path`: the base name split at its last '.', then -flat, -fNNN or -sNNN. */
function extentPlans(path: string, subformat: string, sectors: number): ExtentPlan[] {
  const base = basename(path);
  const dot = base.lastIndexOf('.');
  const prefix = dot === -1 ? base : base.slice(0, dot);
  const postfix = dot === -1 ? '' : base.slice(dot);
  const named = (middle: string, count: number): ExtentPlan => {
    const name = `${prefix}${middle}${postfix}`;
    return { path: join(dirname(path), name), name, sectors: count };
  };
  if (subformat === 'monolithicFlat') return [named('-flat', sectors)];
  const letter = subformat === 'twoGbMaxExtentFlat' ? 'f' : 's';
  const plans: ExtentPlan[] = [];
  for (let at = 0; at < sectors; at += SPLIT_SECTORS) {
    plans.push(named(`-${letter}${String(plans.length + 1).padStart(3, '0')}`, Math.min(SPLIT_SECTORS, sectors - at)));
  }
  return plans;
}

function plan(path: string, options: CreateOptions): Plan {
  const o = options.options ?? {};
  rejectUnknownOptions('vmdk', o, CREATE_OPTIONS);
  const subformat = o['subformat'] ?? 'monolithicSparse';
  if (!SUBFORMATS.includes(subformat)) throw new InvalidArgumentError(`unknown VMDK subformat ${subformat} (one of ${SUBFORMATS.join(', ')})`);
  const stream = subformat === 'streamOptimized';
  const flat = subformat === 'monolithicFlat' || subformat === 'twoGbMaxExtentFlat';
  const monolithic = subformat === 'monolithicSparse' || stream;
  const adapter = o['adapter_type'] ?? 'ide';
  if (!ADAPTERS.includes(adapter)) throw new InvalidArgumentError(`unknown VMDK adapter_type ${adapter} (one of ${ADAPTERS.join(', ')})`);
  const compat6 = flag(o, 'compat6');
  const zeroedGrain = flag(o, 'zeroed_grain');
  if (compat6 && o['hwversion'] !== undefined && o['hwversion'] !== 'undefined') throw new InvalidArgumentError('VMDK compat6 cannot be enabled with hwversion set');
  const hwversion = o['hwversion'] !== undefined && o['hwversion'] !== 'undefined' ? o['hwversion'] : compat6 ? '6' : '4';
  const toolsversion = o['toolsversion'] ?? '2147483647';
  for (const [name, value] of [['hwversion', hwversion], ['toolsversion', toolsversion]] as const) {
    if (/["\n\r]/.test(value)) throw new InvalidArgumentError(`VMDK option ${name} must not contain quotes or line breaks`);
  }
  // qemu's refusals, in its words
  if (flat && zeroedGrain) throw new InvalidArgumentError(`VMDK subformat ${subformat} with zeroed_grain=on: a flat image cannot have zeroed grains`);
  if (flat && options.backingFile !== undefined) throw new InvalidArgumentError(`VMDK subformat ${subformat} cannot have a backing file (only sparse ones can)`);
  if (!Number.isSafeInteger(options.size) || options.size < 0) throw new InvalidArgumentError(`size ${options.size} is not a whole non-negative number of bytes`);
  const sectors = Math.ceil(options.size / SECTOR);
  // a flat extent has no 32-bit grain sectors; a split one is 2 GiB at most
  if (monolithic && sectors > MAX_SECTORS) throw new InvalidArgumentError(`size ${options.size} is larger than a ${subformat} VMDK can be (${MAX_SECTORS * SECTOR} bytes)`);
  // qemu-img makes a descriptor without extents then, which qemu itself cannot open
  if (!monolithic && sectors === 0) throw new InvalidArgumentError(`size 0: a ${subformat} VMDK image needs at least one sector (it would have no extent)`);
  if (options.backingFormat !== undefined && options.backingFormat !== 'vmdk') {
    throw new InvalidArgumentError(`the backing file of a VMDK image must be a vmdk image, not ${options.backingFormat}`);
  }
  const heads = adapter === 'ide' ? 16 : 255;
  const name = basename(path);
  if (/["\n\r]/.test(name) || (options.backingFile !== undefined && /["\n\r]/.test(options.backingFile))) {
    throw new InvalidArgumentError('VMDK file names must not contain double quotes or line breaks (the descriptor quotes them)');
  }
  const extents = monolithic ? [] : extentPlans(path, subformat, sectors);
  const lines = monolithic
    ? `RW ${sectors} SPARSE "${name}"\n`
    : extents.map((extent) => `RW ${extent.sectors} ${flat ? 'FLAT' : 'SPARSE'} "${extent.name}"${flat ? ' 0' : ''}\n`).join('');
  return {
    subformat,
    sectors,
    stream,
    flat,
    zeroedGrain,
    extents,
    descriptor: (cid, parentCid) =>
      '# Disk DescriptorFile\n' +
      'version=1\n' +
      `CID=${cid.toString(16)}\n` +
      `parentCID=${parentCid.toString(16)}\n` +
      `createType="${subformat}"\n` +
      // qemu's template: the hint line takes the place of the blank line before the extents
      (options.backingFile !== undefined ? `parentFileNameHint="${options.backingFile}"` : '') +
      '\n# Extent description\n' +
      lines +
      '\n# The Disk Data Base\n#DDB\n\n' +
      `ddb.virtualHWVersion = "${hwversion}"\n` +
      `ddb.geometry.cylinders = "${Math.floor((sectors * SECTOR) / (63 * heads * SECTOR))}"\n` +
      `ddb.geometry.heads = "${heads}"\n` +
      'ddb.geometry.sectors = "63"\n' +
      `ddb.adapterType = "${adapter}"\n` +
      `ddb.toolsVersion = "${toolsversion}"\n`,
  };
}

/** The CID of the vmdk image at `path` (the new image's parent). */
async function parentCid(path: string, name: string): Promise<number> {
  const parentPath = resolveBackingName(path, name);
  const file = await FileProtocol.open(parentPath, true);
  const gate = new ImageFileGate(parentPath, {}, false);
  try {
    const image = await openVmdk(file, { readOnly: true, files: gate });
    return (image.info().specific as { cid: number }).cid;
  } finally {
    await gate.closeAll();
    await file.close();
  }
}

/** Writes a sparse file (or sparse extent, 'wx': never over an existing file) of `sectors` with qemu's layout; `text` is the embedded descriptor, if any. */
async function writeSparse(path: string, sectors: number, stream: boolean, zeroedGrain: boolean, text: Buffer | undefined, mode: 'w' | 'wx'): Promise<void> {
  const grains = Math.ceil(sectors / GRANULARITY);
  const gtSectors = Math.ceil((GTES_PER_GT * 4) / SECTOR);
  const gtCount = Math.ceil(grains / GTES_PER_GT);
  const gdSectors = Math.ceil((gtCount * 4) / SECTOR);
  const rgdOffset = DESC_OFFSET + DESC_SECTORS;
  const gdOffset = rgdOffset + gdSectors + gtSectors * gtCount;
  const grainOffset = Math.ceil((gdOffset + gdSectors + gtSectors * gtCount) / GRANULARITY) * GRANULARITY;

  const header = Buffer.alloc(SECTOR);
  VMDK4_MAGIC.copy(header, 0);
  // qemu's versions: 3 for a stream (written only compressed, so qemu opens it read-write), 2 with zeroed grains, else 1
  header.writeUInt32LE(stream ? 3 : zeroedGrain ? 2 : 1, 4);
  header.writeUInt32LE(FLAG_RGD | FLAG_NL_DETECT | (stream ? FLAG_COMPRESS | FLAG_MARKER : 0) | (zeroedGrain ? FLAG_ZERO_GRAIN : 0), 8);
  header.writeBigUInt64LE(BigInt(sectors), 12);
  header.writeBigUInt64LE(BigInt(GRANULARITY), 20);
  header.writeBigUInt64LE(BigInt(DESC_OFFSET), 28);
  header.writeBigUInt64LE(BigInt(DESC_SECTORS), 36);
  header.writeUInt32LE(GTES_PER_GT, 44);
  header.writeBigUInt64LE(BigInt(rgdOffset), 48);
  header.writeBigUInt64LE(BigInt(gdOffset), 56);
  header.writeBigUInt64LE(BigInt(grainOffset), 64);
  Buffer.from('\n \r\n', 'latin1').copy(header, 73);
  if (stream) header.writeUInt16LE(COMPRESSION_DEFLATE, 77);

  const directory = (first: number) => {
    const bytes = Buffer.alloc(gdSectors * SECTOR);
    for (let i = 0; i < gtCount; i++) bytes.writeUInt32LE(first + gdSectors + i * gtSectors, i * 4);
    return bytes;
  };
  const handle = await open(path, mode);
  try {
    await handle.truncate(grainOffset * SECTOR);
    await handle.write(header, 0, header.length, 0);
    if (text) await handle.write(text, 0, text.length, DESC_OFFSET * SECTOR);
    const rgd = directory(rgdOffset);
    await handle.write(rgd, 0, rgd.length, rgdOffset * SECTOR);
    const gd = directory(gdOffset);
    await handle.write(gd, 0, gd.length, gdOffset * SECTOR);
    await handle.datasync();
  } catch (error) {
    if (mode === 'wx') await rm(path, { force: true }).catch(() => undefined);
    throw error;
  } finally {
    await handle.close();
  }
}

/** A flat extent: a new sparse file of its size (qemu-img's preallocation=off); removed again when that fails. */
async function writeFlat(path: string, sectors: number): Promise<void> {
  const handle = await open(path, 'wx');
  try {
    await handle.truncate(sectors * SECTOR);
    await handle.datasync();
  } catch (error) {
    await rm(path, { force: true }).catch(() => undefined);
    throw error;
  } finally {
    await handle.close();
  }
}

/** Refuses, naming it, an extent file that exists already (qemu-img overwrites it: a file the user did not name would be lost). */
async function refuseExisting(extents: readonly ExtentPlan[]): Promise<void> {
  for (const extent of extents) {
    const found = await lstat(extent.path).then(() => true, (error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT') return false;
      throw hostIoError('cannot create', extent.path, error);
    });
    if (found) throw new InvalidArgumentError(`VMDK extent file ${extent.path} already exists; remove it first (it is not overwritten)`);
  }
}

/** Creates the image; resolves with the extent files made beside a descriptor file (none for a monolithic image). */
export async function createVmdk(path: string, options: CreateOptions): Promise<string[]> {
  const { sectors, stream, flat, zeroedGrain, extents, descriptor } = plan(path, options);
  const parent = options.backingFile !== undefined ? await parentCid(path, options.backingFile) : 0xffffffff;
  const text = Buffer.from(descriptor(randomInt(0, 0x100000000), parent), 'utf8');
  if (extents.length === 0) {
    if (text.length > DESC_SECTORS * SECTOR) throw new InvalidArgumentError(`the VMDK descriptor would be ${text.length} bytes, more than its ${DESC_SECTORS * SECTOR}`);
    try {
      await writeSparse(path, sectors, stream, zeroedGrain, text, 'w');
    } catch (error) {
      throw hostIoError('cannot create', path, error);
    }
    return [];
  }
  await refuseExisting(extents);
  const created: string[] = [];
  let current = path;
  try {
    for (const extent of extents) {
      current = extent.path;
      // each removes its own file when it fails after creating it; never a file it did not create
      if (flat) await writeFlat(extent.path, extent.sectors);
      else await writeSparse(extent.path, extent.sectors, false, zeroedGrain, undefined, 'wx');
      created.push(extent.path);
    }
    // the descriptor last: until it exists, nothing names the extents
    current = path;
    const handle = await open(path, 'w');
    try {
      await handle.write(text, 0, text.length, 0);
      await handle.datasync();
    } finally {
      await handle.close();
    }
  } catch (error) {
    await Promise.all(created.map((file) => rm(file, { force: true }).catch(() => undefined)));
    throw hostIoError('cannot create', current, error);
  }
  return created;
}
