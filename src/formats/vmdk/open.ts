/**
 * Opening a VMDK image in any of its two forms, as qemu does:
 *
 * - a sparse file ("KDMV" at 0: monolithicSparse, streamOptimized) with its
 *   descriptor embedded in sector 1; its grain directory is read here. A
 *   header with capacity 0 and a descriptor is opened as a descriptor file
 *   (qemu's behaviour).
 * - a descriptor file (text) listing extents in other files (monolithicFlat,
 *   twoGbMaxExtentFlat / Sparse, vmfs): each extent file is opened through
 *   the gate, confined to the image's directory unless the user allowed
 *   other directories (CVE-2022-47951: a descriptor naming arbitrary host
 *   files). VMDK3 ("COWD", vmfsSparse: cowd.ts) and seSparse (sesparse.ts)
 *   extents are read-only; a sparse extent that is itself a descriptor is
 *   refused, as is a "COWD" file opened directly (qemu fails it too). For a
 *   read-write open, FLAT, VMFS and SPARSE extent files open read-write
 *   (through the same confined gate) and the image is writable when every
 *   extent is (writable.ts: writeRefusal, the layout checks here).
 *
 * Everything is read once here; the image is immutable afterwards.
 */
import { realpath } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import createDebug from 'debug';
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';
import type { BackingReference, FormatImage, OpenOptions, Protocol } from '../../block/types.js';
import {
  DESCRIPTOR_FILE_MAX_BYTES, EMBEDDED_DESCRIPTOR_BYTES, descriptorText, parseDescriptorFile, parseEmbeddedDescriptor, type Descriptor, type ExtentLine,
} from './descriptor.js';
import { FlatExtent, SparseExtent, type Extent } from './extent.js';
import { CowdExtent, openCowd } from './cowd.js';
import { SeSparseExtent, openSeSparse } from './sesparse.js';
import { COMPRESSION_DEFLATE, FLAG_RGD, SECTOR, VMDK3_MAGIC, VMDK4_MAGIC, embeddedDescriptorOnly, readSparseHeader, type SparseHeader } from './header.js';
import { VmdkImage, type VmdkImageParts } from './image.js';
import { StreamVmdkImage, streamRefusal } from './stream-write.js';
import { WritableVmdkImage, writeRefusal, type DescriptorPlace } from './writable.js';

const log = createDebug('imgmount:vmdk');

/** A sparse extent's header and grain directory, read and checked. */
export async function readSparse(file: Protocol, fileSize: number): Promise<{ header: SparseHeader; gd: Uint32Array }> {
  const sector = Buffer.alloc(SECTOR);
  await file.read(0, sector);
  const header = await readSparseHeader(file, sector, fileSize);
  const bytes = Buffer.alloc(header.gdEntries * 4);
  await file.read(header.gdOffset * SECTOR, bytes);
  const gd = new Uint32Array(header.gdEntries);
  for (let i = 0; i < gd.length; i++) gd[i] = bytes.readUInt32LE(i * 4);
  return { header, gd };
}

function refuseVmdk3(path: string): never {
  // qemu opens it too, then fails to find a CID at offset 512 (EINVAL)
  throw new UnsupportedFeatureError(`${path}: a VMDK3 ("COWD", ESX vmfsSparse) file opens only through the descriptor file naming it (a VMFSSPARSE extent line)`);
}

/** Why a descriptor file's image opens read-only when an extent type is one that is not written (qemu cannot write seSparse either). */
function descriptorRefusal(extents: readonly Extent[]): string | undefined {
  if (extents.some((extent) => extent instanceof SeSparseExtent)) return 'writing VMDK seSparse extents is not supported (qemu opens them read-only too)';
  if (extents.some((extent) => extent instanceof CowdExtent)) return 'writing VMDK3 ("COWD", vmfsSparse) extents is not supported';
  return undefined;
}

export async function openVmdk(file: Protocol, options: OpenOptions): Promise<FormatImage> {
  const fileSize = await file.size();
  if (fileSize < 4) throw new CorruptImageError(`${file.path}: the file is ${fileSize} bytes, too small to be a VMDK image`);
  const head = Buffer.alloc(SECTOR);
  await file.read(0, head);
  const magic = head.subarray(0, 4);
  if (magic.equals(VMDK3_MAGIC)) refuseVmdk3(file.path);
  if (magic.equals(VMDK4_MAGIC)) {
    const disguised = embeddedDescriptorOnly(head);
    if (disguised === undefined) return openMonolithic(file, fileSize, options);
    const descBytes = disguised.descOffset * BigInt(SECTOR);
    if (descBytes >= BigInt(fileSize)) {
      throw new CorruptImageError(`${file.path}: VMDK desc_offset ${disguised.descOffset} sectors lies past the end of the file (${fileSize} bytes)`);
    }
    const { image } = await openDescriptorFile(file, fileSize, Number(descBytes), { ...options, readOnly: true });
    if (!options.readOnly) notice(options, `${file.path}: opened read-only: writing a VMDK descriptor kept inside a sparse header is not supported`);
    return image;
  }
  const { image, parts, shared } = await openDescriptorFile(file, fileSize, 0, { ...options, readOnly: true }, !options.readOnly);
  if (options.readOnly) return image;
  const refusal = descriptorRefusal(parts.extents) ?? shared;
  if (refusal !== undefined) {
    notice(options, `${file.path}: opened read-only: ${refusal}`);
    return image;
  }
  // qemu rewrites the descriptor file's first sectors, NUL-padded, for a new CID: room for a longer CID
  const room = Math.ceil((fileSize + 8) / SECTOR) * SECTOR;
  const problem = parts.extents
    .filter((extent): extent is SparseExtent => extent instanceof SparseExtent)
    .map((extent) => extentLayoutProblem(extent))
    .find((found) => found !== undefined);
  return writableOrNotice(file, parts, { offset: 0, room }, options, problem);
}

/** Why a sparse extent of a descriptor file cannot be written (its tables must lie before its grains), if it cannot. */
function extentLayoutProblem(extent: SparseExtent): string | undefined {
  const { header } = extent;
  const roomSectors = header.descOffset === 0 ? 0 : Math.min(header.descSize, EMBEDDED_DESCRIPTOR_BYTES / SECTOR);
  const problem = layoutProblem(header, roomSectors, extent.directory, false);
  return problem === undefined ? undefined : `extent ${extent.file.path}: ${problem}`;
}

function notice(options: OpenOptions, line: string): void {
  (options.notice ?? ((text: string) => log(text)))(line);
}

/** A writable image when the extents allow it, otherwise the read-only one with a notice saying why. */
async function writableOrNotice(file: Protocol, parts: VmdkImageParts, place: DescriptorPlace, options: OpenOptions, placeProblem?: string, stream = false): Promise<FormatImage> {
  const refusal = placeProblem ?? (stream ? streamRefusal(parts.extents) : writeRefusal(parts.extents, (extent) => extent.header.version));
  if (refusal === undefined) {
    const redundant = new Map<SparseExtent, Uint32Array | undefined>();
    for (const extent of parts.extents) {
      if (!(extent instanceof SparseExtent)) continue;
      const rgd = await readRedundant(extent);
      if (typeof rgd === 'string') {
        notice(options, `${file.path}: opened read-only: ${rgd}`);
        return new VmdkImage(parts);
      }
      redundant.set(extent, rgd);
    }
    const writable = { ...parts, descriptorPlace: place, redundant };
    return stream ? new StreamVmdkImage(writable) : new WritableVmdkImage(writable);
  }
  notice(options, `${file.path}: opened read-only: ${refusal}`);
  return new VmdkImage(parts);
}

/** The redundant grain directory of a sparse extent (undefined without one), or why it cannot be written. */
async function readRedundant(extent: SparseExtent): Promise<Uint32Array | undefined | string> {
  const { header } = extent;
  if (!(header.flags & FLAG_RGD)) return undefined;
  const bytes = Buffer.alloc(header.gdEntries * 4);
  await extent.file.read(header.rgdOffset * SECTOR, bytes);
  const rgd = new Uint32Array(header.gdEntries);
  const gtSectors = Math.ceil((header.numGtesPerGt * 4) / SECTOR);
  const roomSectors = Math.min(header.descSize, EMBEDDED_DESCRIPTOR_BYTES / SECTOR);
  for (let i = 0; i < rgd.length; i++) {
    rgd[i] = bytes.readUInt32LE(i * 4);
    if (rgd[i] === 0 || !metadataSectors(header, rgd[i]!, gtSectors, roomSectors)) {
      return `redundant grain directory entry ${i} of ${extent.file.path} (sector ${rgd[i]}) names no grain table between the header and grain_offset ${header.grainOffset}`;
    }
  }
  return rgd;
}

async function openMonolithic(file: Protocol, fileSize: number, options: OpenOptions): Promise<FormatImage> {
  const { header, gd } = await readSparse(file, fileSize);
  // qemu reads the embedded descriptor's 20 sectors; bytes past the end of a short file read as zeros
  const bytes = Buffer.alloc(EMBEDDED_DESCRIPTOR_BYTES);
  await file.read((header.descOffset || 1) * SECTOR, bytes);
  const descriptor = parseEmbeddedDescriptor(descriptorText(bytes), file.path);
  const extent = new SparseExtent({ file, own: true, header, gd, fileSize, type: '', index: 0, cacheBytes: options.metadataCacheBytes });
  const createType = header.compressAlgorithm === COMPRESSION_DEFLATE ? 'streamOptimized' : 'monolithicSparse';
  log('%s: %s, %d sectors, %d-sector grains%s', file.path, createType, header.capacity, header.granularity, header.fromFooter ? ' (header from the footer)' : '');
  const parts: VmdkImageParts = { file, extents: [extent], descriptor, createType, backing: backingOf(descriptor) };
  if (options.readOnly) return new VmdkImage(parts);
  if (extent.compressed && !options.compressedWrites) {
    notice(options, `${file.path}: opened read-only: a stream-optimized VMDK image takes only whole compressed grains in increasing order, which only imgmount convert writes`);
    return new VmdkImage(parts);
  }
  // the CID update rewrites the descriptor area: at most qemu's 20 sectors of it
  const roomSectors = Math.min(header.descSize, EMBEDDED_DESCRIPTOR_BYTES / SECTOR);
  return writableOrNotice(file, parts, { offset: header.descOffset * SECTOR, room: roomSectors * SECTOR }, options, (extent.compressed ? streamRefusal([extent]) : undefined) ?? layoutProblem(header, roomSectors, gd), extent.compressed);
}

/**
 * Why the metadata of a sparse file is laid out so that writing could overwrite some of it, if it is:
 * the descriptor area and every grain table of the primary directory must lie between the header
 * and grain_offset (the redundant directory's tables are checked in readRedundant).
 */
function layoutProblem(header: SparseHeader, roomSectors: number, gd: Uint32Array, needsDescriptor = true): string | undefined {
  if (needsDescriptor && (header.descOffset === 0 || roomSectors === 0)) return 'its header names no embedded descriptor area (desc_offset / desc_size 0)';
  if (header.descOffset + roomSectors > header.grainOffset) return `its descriptor area (sector ${header.descOffset}) reaches past grain_offset ${header.grainOffset}`;
  const gtSectors = Math.ceil((header.numGtesPerGt * 4) / SECTOR);
  const gdSectors = Math.ceil((header.gdEntries * 4) / SECTOR);
  for (const [name, offset] of [['gd_offset', header.gdOffset], ['rgd_offset', header.rgdOffset]] as const) {
    if (offset !== 0 && !metadataSectors(header, offset, gdSectors, roomSectors)) {
      return `its grain directory (${name} ${offset}) does not lie between the header and grain_offset ${header.grainOffset}, clear of the descriptor`;
    }
  }
  for (let i = 0; i < gd.length; i++) {
    if (gd[i] !== 0 && !metadataSectors(header, gd[i]!, gtSectors, roomSectors)) {
      return `grain table ${i} (sector ${gd[i]}) does not lie between the header and grain_offset ${header.grainOffset}, clear of the descriptor`;
    }
  }
  return undefined;
}

/** True when sectors [sector, sector + count) lie after the header and the descriptor area, before the grains. */
function metadataSectors(header: SparseHeader, sector: number, count: number, roomSectors: number): boolean {
  const afterDescriptor = sector >= header.descOffset + roomSectors || sector + count <= header.descOffset;
  return sector >= 1 && sector + count <= header.grainOffset && afterDescriptor;
}

/**
 * The parent of a differencing image, probed: a VMDK parent is found by its magic (and then its CID
 * checked, verifyBacking), and a parent of another format reads too. qemu 7.2 opens every parent as
 * vmdk, so a descriptor naming a qcow2 or raw parent fails there. Until the parent is opened, info
 * names its format vmdk, as qemu-img info does.
 */
function backingOf(descriptor: Descriptor): BackingReference | undefined {
  return descriptor.parentFileNameHint === undefined ? undefined : { filename: descriptor.parentFileNameHint, assumedFormat: 'vmdk' };
}

/** `writeExtents`: FLAT, VMFS and SPARSE extent files are opened read-write (the image may be written). */
async function openDescriptorFile(
  file: Protocol, fileSize: number, at: number, options: OpenOptions, writeExtents = false,
): Promise<{ image: FormatImage; parts: VmdkImageParts; shared?: string }> {
  const bytes = Buffer.alloc(Math.min(fileSize - at, DESCRIPTOR_FILE_MAX_BYTES));
  await file.read(at, bytes);
  const descriptor = parseDescriptorFile(descriptorText(bytes), file.path);
  if (descriptor.extents.length === 0) throw new CorruptImageError(`${file.path}: the VMDK descriptor lists no extent qemu would open (RW, a known type, a positive size)`);
  // a file named twice (or the descriptor named as an extent): every extent opens read-only, the image too
  const shared = writeExtents ? await sharedFile(file.path, descriptor.extents) : undefined;
  const extents: Extent[] = [];
  for (const line of descriptor.extents) extents.push(await openExtent(file, line, extents.length, options, writeExtents && shared === undefined));
  const total = extents.reduce((sum, extent) => sum + extent.length, 0);
  if (!Number.isSafeInteger(total)) throw new CorruptImageError(`${file.path}: the VMDK extents add up to more than ${Number.MAX_SAFE_INTEGER} bytes`);
  // qemu's quirk: a compressed extent makes the image's create type streamOptimized
  const createType = extents.some((extent) => extent.compressed) ? 'streamOptimized' : descriptor.createType!;
  log('%s: %s descriptor with %d extent(s)', file.path, createType, extents.length);
  const parts: VmdkImageParts = { file, extents, descriptor, createType, backing: backingOf(descriptor) };
  return { image: new VmdkImage(parts), parts, shared };
}

/**
 * Why the extents cannot be written when two lines name one file (symbolic links followed), or a
 * line names the descriptor file: a write through one would overwrite the other's bytes or grains.
 * Names that do not resolve are left to the gate, which refuses them with its own message.
 */
async function sharedFile(imagePath: string, lines: readonly ExtentLine[]): Promise<string | undefined> {
  const real = async (path: string) => realpath(path).catch(() => undefined);
  const own = await real(imagePath);
  const seen = new Set<string>();
  for (const line of lines) {
    const path = await real(resolve(dirname(imagePath), line.fileName));
    if (path === undefined) continue;
    if (path === own) return `the extent ${line.fileName} is the descriptor file itself (writes would overwrite the descriptor)`;
    if (seen.has(path)) return `the extent file ${line.fileName} is named by more than one extent line (writes through one would overwrite the other)`;
    seen.add(path);
  }
  return undefined;
}

async function openExtent(image: Protocol, line: ExtentLine, index: number, options: OpenOptions, write: boolean): Promise<Extent> {
  const writable = write && (line.type === 'FLAT' || line.type === 'VMFS' || line.type === 'SPARSE');
  const file = await options.files.open(line.fileName, 'VMDK extent', { readOnly: !writable, confined: true });
  if (line.type === 'FLAT' || line.type === 'VMFS') return new FlatExtent(file, line.sectors * SECTOR, line.flatOffset * SECTOR, line.type, false);
  const fileSize = await file.size();
  if (fileSize < 4) throw new CorruptImageError(`${file.path}: VMDK extent of ${image.path} is ${fileSize} bytes, too small for a sparse extent`);
  const head = Buffer.alloc(SECTOR);
  await file.read(0, head);
  if (line.type === 'SESPARSE') return openSeSparse(file, head, fileSize, options.metadataCacheBytes);
  const magic = head.subarray(0, 4);
  // as in qemu, SPARSE and VMFSSPARSE lines both take a "COWD" or a "KDMV" file
  if (magic.equals(VMDK3_MAGIC)) return openCowd(file, head, fileSize, line.type, options.metadataCacheBytes);
  if (!magic.equals(VMDK4_MAGIC)) throw new CorruptImageError(`${file.path}: VMDK ${line.type} extent of ${image.path} starts with neither "KDMV" nor "COWD"`);
  if (embeddedDescriptorOnly(head)) throw new UnsupportedFeatureError(`${file.path}: VMDK extent of ${image.path} is itself a descriptor; nested descriptors are not supported`);
  // as in qemu, the size of a sparse extent is its header's capacity, not the descriptor line's
  const { header, gd } = await readSparse(file, fileSize);
  return new SparseExtent({ file, own: false, header, gd, fileSize, type: line.type, index, cacheBytes: options.metadataCacheBytes });
}
