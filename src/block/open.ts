/**
 * Opening images and their backing chains, creating, checking and resizing
 * images: the block layer's entry points by file name. The list of formats is always
 * passed in (src/index.ts wires the default list), so the block layer never
 * imports the formats.
 *
 * Every file goes through the gate (gate.ts): backing files and the files a
 * driver opens resolve against the directory of the image that names them,
 * follow the file policy, and are read-only below the top image. Loops are
 * refused and the chain depth is bounded. A format that cannot write (its
 * driver has `readOnlyReason`) is opened read-only before any write lock is
 * taken, with one notice.
 */
import { realpath } from 'node:fs/promises';
import createDebug from 'debug';
import { FileProtocol, pathExists } from './file.js';
import { BlockImage } from './image.js';
import { BlockError, HostIoError, InvalidArgumentError, UnsupportedFeatureError, hostIoError } from './errors.js';
import { resolveBackingName } from './backing-name.js';
import { ImageFileGate, resolveAllowed, type FilePolicy } from './gate.js';
import { lockForWriting } from './lock.js';
import { FormatList, sampleFile } from './probe.js';
import { rawProbeGuard } from './probe-guard.js';
import { idleCleanDelayMs } from './idle-clean.js';
import { checkLayers, openImageFilters, resolveFilters, wrapProtocol, type FilterSpec, type ResolvedFilter } from './filters/index.js';
import type { CheckResult, CreateOptions, FormatDriver } from './types.js';
import type { BlockImage as OpenedImage } from './image.js';
import { constants as osConstants } from 'node:os';

const log = createDebug('imgmount:open');

/** Longest backing chain accepted (the top image counts as one). */
export const MAX_CHAIN_DEPTH = 64;

/** Exit status qemu-img check uses for a format without a check (and the errno-free marker here). */
export const NO_CHECK_EXIT_STATUS = 63;

export interface OpenImageOptions extends FilePolicy {
  /** The formats to probe and open with. */
  formats: FormatList;
  /** Open the top image read-only (backing files are always read-only). */
  readOnly?: boolean;
  /** The top image's format; probed when omitted. */
  format?: string;
  /** An internal snapshot (id or name) of the top image to open; implies read-only. */
  snapshot?: string;
  /** Metadata cache bound in bytes, per image in the chain. */
  metadataCacheBytes?: number;
  /** Receives lines the user should see (repairs made on open, read-only fallbacks). */
  notice?: (line: string) => void;
  /** Open the backing chain (default true); `info` turns it off to describe images whose backing file is missing. */
  openBacking?: boolean;
  /**
   * Idle clean (idle-clean.ts): after this many seconds without writes a read-write
   * image is made durable and marked clean (need-check / dirty bit cleared) until the
   * next write; default 5 (as the mount's --idle-clean), 0 turns it off.
   */
  idleCleanSeconds?: number;
  /** Filters between the layers (filters/index.ts), applied in the order given. */
  filters?: readonly FilterSpec[];
  /**
   * Open options of the top image's format, as qemu's driver options (vpc's
   * force_size_calc=chs|current_size); a name the format does not take is refused.
   */
  formatOptions?: Readonly<Record<string, string>>;
  /** The top image is written only through writeCompressed, in guest order (convert; OpenOptions.compressedWrites). */
  compressedWrites?: boolean;
}

/** Opens an image and its whole backing chain. */
export async function openImage(path: string, options: OpenImageOptions): Promise<BlockImage> {
  const readOnly = (options.readOnly ?? false) || options.snapshot !== undefined;
  const filters = resolveFilters(options.filters);
  const image = await openLayer(path, options.format, readOnly, options, filters, []);
  try {
    checkLayers(filters, chainLength(image), path);
  } catch (error) {
    await image.close();
    throw error;
  }
  return image;
}

function chainLength(image: BlockImage): number {
  let length = 0;
  for (let layer: BlockImage | undefined = image; layer; layer = layer.backing) length += 1;
  return length;
}

async function openLayer(
  path: string,
  formatName: string | undefined,
  readOnly: boolean,
  options: OpenImageOptions,
  filters: readonly ResolvedFilter[],
  chain: string[],
): Promise<BlockImage> {
  const canonical = await canonicalPath(path, chain.length > 0 ? 'backing file' : undefined);
  if (chain.includes(canonical)) {
    throw new InvalidArgumentError(`backing chain loops: ${[...chain, canonical].join(' -> ')}`);
  }
  if (chain.length >= MAX_CHAIN_DEPTH) {
    throw new InvalidArgumentError(`backing chain of ${chain[0]} is deeper than ${MAX_CHAIN_DEPTH} images`);
  }
  const notice = options.notice ?? ((line: string) => log(line));
  const isTop = chain.length === 0;
  const idleCleanMs = isTop ? idleCleanDelayMs(options.idleCleanSeconds) : 0;
  const snapshot = isTop ? options.snapshot : undefined;
  const format = await chooseFormat(path, formatName, options.formats);
  const probedAsRaw = formatName === undefined && format.name === 'raw';
  if (snapshot !== undefined && !format.snapshots) {
    throw new UnsupportedFeatureError(`${path}: ${format.name} images have no internal snapshots; -s/--snapshot cannot be used`);
  }
  const formatOptions = isTop ? options.formatOptions : undefined;
  const unknownOptions = Object.keys(formatOptions ?? {}).filter((name) => !(format.openOptions ?? []).includes(name));
  if (unknownOptions.length > 0) {
    const known = format.openOptions?.length ? `; ${format.name} takes ${format.openOptions.join(', ')}` : `; ${format.name} takes none`;
    throw new InvalidArgumentError(`${path}: unknown ${format.name} open option${unknownOptions.length > 1 ? 's' : ''} ${unknownOptions.join(', ')}${known}`);
  }
  if (!readOnly && format.readOnlyReason !== undefined) {
    notice(`${path}: opened read-only: ${format.readOnlyReason}`);
    readOnly = true;
  }
  const layer = chain.length;
  const raw = await FileProtocol.open(path, readOnly);
  const filterContext = { imagePath: path, layer, readOnly, notice };
  const file = await wrapProtocol(raw, filters, filterContext).catch(async (error: unknown) => {
    await raw.close().catch(() => undefined);
    throw error;
  });
  const gate = new ImageFileGate(path, options, isTop && !readOnly);
  let backing: BlockImage | undefined;
  try {
    log('opening %s as %s%s', path, format.name, readOnly ? ' (read-only)' : '');
    const image = await format.open(file, {
      readOnly,
      metadataCacheBytes: options.metadataCacheBytes,
      notice: options.notice,
      files: gate,
      snapshot,
      formatOptions,
      compressedWrites: isTop ? options.compressedWrites : undefined,
    });
    try {
      if (image.backing && options.openBacking !== false) {
        const backingPath = await resolveAllowed(path, image.backing.filename, 'backing file', options);
        backing = await openLayer(backingPath, image.backing.format, true, options, filters, [...chain, canonical]).catch((error: unknown) => {
          throw describeBackingFailure(error, image.backing!.filename, path);
        });
        image.verifyBacking?.({ path: backing.path, format: backing.format, specific: (await backing.info()).formatSpecific });
      }
      // A format that declined to write this image (its own notice said why) takes no writer's locks.
      if (!readOnly && !image.write) await raw.keepReadOnly();
      const imageFilters = await openImageFilters(filters, { ...filterContext, readOnly: readOnly || !image.write, virtualSize: image.virtualSize });
      return new BlockImage({
        path,
        format: format.name,
        file,
        image,
        backing,
        gate,
        idleCleanMs,
        notice,
        writeGuard: probedAsRaw && !readOnly ? rawProbeGuard(options.formats, file, image.virtualSize) : undefined,
        filters: imageFilters,
      });
    } catch (error) {
      await image.close().catch(() => undefined);
      await backing?.close().catch(() => undefined);
      throw error;
    }
  } catch (error) {
    await gate.closeAll().catch(() => undefined);
    await file.close().catch(() => undefined);
    throw error;
  }
}

/** The format named by the user, or the one probing finds (the file is opened read-only for that, never locked). */
async function chooseFormat(path: string, formatName: string | undefined, formats: FormatList): Promise<FormatDriver> {
  if (formatName !== undefined) return formats.named(formatName);
  const probeFile = await FileProtocol.open(path, true);
  try {
    return formats.probe(await sampleFile(probeFile));
  } finally {
    await probeFile.close();
  }
}

/** "backing file base.raw of disk.qed: no such file" instead of a bare ENOENT. */
function describeBackingFailure(error: unknown, name: string, imagePath: string): unknown {
  if (error instanceof HostIoError && error.errno === osConstants.errno.ENOENT && !error.message.startsWith('backing file')) {
    const path = resolveBackingName(imagePath, name);
    const where = path === name ? '' : ` (looked for ${path})`;
    return new HostIoError(`backing file ${name} of ${imagePath}: no such file${where}`, error.errno);
  }
  return error;
}

async function canonicalPath(path: string, role?: string): Promise<string> {
  try {
    return await realpath(path);
  } catch (error) {
    throw hostIoError(role ? `cannot open ${role}` : 'cannot open', path, error);
  }
}

export interface CreateImageOptions extends Omit<CreateOptions, 'size'> {
  formats: FormatList;
  /** Virtual size; may be omitted when a backing file gives it. */
  size?: number;
}

/** Creates an image file of `formatName`; refuses to overwrite unless `force`. */
/** Creates an image; resolves with the other files the format made beside `path` (none for most formats). */
export async function createImage(path: string, formatName: string, options: CreateImageOptions): Promise<string[]> {
  const format = options.formats.named(formatName);
  if (!format.create) throw new UnsupportedFeatureError(`creating ${format.name} images is not supported`);
  const overwriting = await pathExists(path);
  if (overwriting && !options.force) {
    throw new InvalidArgumentError(`${path} already exists; pass --force to overwrite it`);
  }
  let size = options.size;
  let backingFormat = options.backingFormat;
  if (options.backingFile !== undefined) {
    const backingPath = resolveBackingName(path, options.backingFile);
    const backing = await openImage(backingPath, { formats: options.formats, readOnly: true, format: backingFormat }).catch((error: unknown) => {
      throw describeBackingFailure(error, options.backingFile!, path);
    });
    try {
      size ??= backing.length;
      backingFormat ??= backing.format;
    } finally {
      await backing.close();
    }
  } else if (backingFormat !== undefined) {
    throw new InvalidArgumentError('a backing format (-F) was given without a backing file (-b)');
  }
  if (size === undefined) throw new InvalidArgumentError('a size is needed when there is no backing file');
  // Overwriting (--force) an image that a mount is writing would pull it from under the mount.
  const lock = overwriting ? await lockForWriting(await canonicalPath(path), path) : undefined;
  try {
    const { formats: _formats, ...createOptions } = options;
    return (await format.create(path, { ...createOptions, size, backingFormat })) ?? [];
  } finally {
    await lock?.release();
  }
}

export interface CheckImageOptions {
  formats: FormatList;
  repair?: boolean;
  /** With `repair`: 'leaks' repairs only leaks, 'all' (the default) everything. */
  fix?: 'leaks' | 'all';
  format?: string;
  progress?: (done: number, total: number) => void;
  /** Filters on the image file (protocol filters of layer 0 only: check reads one file, not the disk). */
  filters?: readonly FilterSpec[];
}

export interface CheckReport extends CheckResult {
  format: string;
  filename: string;
}

/** A format without a consistency check: qemu-img check exits 63 for it. */
export class NoCheckError extends BlockError {
  constructor(message: string) {
    super(message, osConstants.errno.ENOTSUP);
  }
}

/** Runs a format's consistency check (with repair if asked) on one image file. */
export async function checkImage(path: string, options: CheckImageOptions): Promise<CheckReport> {
  const repair = options.repair ?? false;
  const format = await chooseFormat(path, options.format, options.formats);
  if (!format.check) throw new NoCheckError(`${path}: ${format.name} images have no metadata to check`);
  if (repair && format.readOnlyReason !== undefined) {
    throw new UnsupportedFeatureError(`${path}: cannot repair: ${format.readOnlyReason}`);
  }
  const filters = resolveFilters(options.filters);
  const unusable = filters.find((filter) => !filter.definition.wrapProtocol || filter.layer !== 0);
  if (unusable) {
    throw new InvalidArgumentError(
      unusable.layer !== 0
        ? `filter ${unusable.definition.name}: check reads only the image file itself, so layer=${unusable.layer} does not apply`
        : `filter ${unusable.definition.name} watches reads of the disk, which check does not make`,
    );
  }
  const raw = await FileProtocol.open(path, !repair);
  const file = await wrapProtocol(raw, filters, { imagePath: path, layer: 0, readOnly: !repair, notice: (line) => log(line) }).catch(async (error: unknown) => {
    await raw.close().catch(() => undefined);
    throw error;
  });
  try {
    const result = await format.check(file, { repair, fix: options.fix, progress: options.progress });
    if (repair) await file.flush();
    return { ...result, format: format.name, filename: path };
  } finally {
    await file.close();
  }
}


/** A new size: absolute, or relative to the current one (`{ delta: -1 << 30 }`). */
export type ResizeTarget = number | { delta: number };

export interface ResizeImageOptions {
  formats: FormatList;
  /** Allow making the image smaller (qemu-img resize --shrink); refused without it. */
  shrink?: boolean;
  format?: string;
  /** Receives lines the user should see (a repair done first). */
  notice?: (line: string) => void;
}

export interface ResizeReport {
  format: string;
  oldSize: number;
  newSize: number;
}

/**
 * Changes an image's virtual size, as qemu-img resize: the driver's `resize`
 * runs on the image file opened read-write, which takes the image's write
 * lock (an image a mount or a VM is writing is refused with EBUSY). Growing
 * leaves the old content and then zeros: what of the new area would not read
 * as zeros afterwards (a backing file longer than the old size, bytes the
 * last cluster kept past the old end) is zeroed through the image opened
 * read-write, up to the end of the backing file's data, as qemu does (qemu
 * refuses it where the format has no zero clusters; here zeros are written).
 * That second read-write open follows the first once it is closed.
 */
export async function resizeImage(path: string, target: ResizeTarget, options: ResizeImageOptions): Promise<ResizeReport> {
  const format = await chooseFormat(path, options.format, options.formats);
  if (!format.resize) throw new UnsupportedFeatureError(`${path}: resizing ${format.name} images is not supported`);
  if (format.readOnlyReason !== undefined) throw new UnsupportedFeatureError(`${path}: cannot resize: ${format.readOnlyReason}`);
  const notice = options.notice ?? ((line: string) => log(line));
  const opened = (readOnly: boolean): Promise<OpenedImage> => openImage(path, { formats: options.formats, format: format.name, readOnly, notice });
  const current = await opened(true);
  const oldSize = current.length;
  await current.close();
  const newSize = typeof target === 'number' ? target : oldSize + target.delta;
  if (!Number.isSafeInteger(newSize) || newSize <= 0) {
    throw new InvalidArgumentError(`${path}: the new size ${newSize} is not a positive number of bytes`);
  }
  if (newSize < oldSize && !options.shrink) {
    throw new InvalidArgumentError(
      `${path}: shrinking it from ${oldSize} to ${newSize} bytes deletes the data past the new end; use --shrink to shrink it`,
    );
  }
  if (newSize !== oldSize) {
    const file = await FileProtocol.open(path, false);
    // Files the image names (a qcow2 data file) open through the gate, read-write, and close after.
    const files = new ImageFileGate(path, {}, true);
    try {
      await format.resize(file, newSize, { shrink: options.shrink ?? false, notice, files });
      await file.flush();
    } finally {
      await files.closeAll().finally(() => file.close());
    }
    log('%s: resized from %d to %d bytes', path, oldSize, newSize);
  }
  if (newSize > oldSize) await zeroGrownArea(opened, oldSize, newSize);
  return { format: format.name, oldSize, newSize };
}

/** Zeroes what of [oldSize, newSize) reads as anything but zeros (backing data, bytes left past the old end). */
async function zeroGrownArea(opened: (readOnly: boolean) => Promise<OpenedImage>, oldSize: number, newSize: number): Promise<void> {
  const probe = await opened(true);
  let runs: { offset: number; length: number }[];
  try {
    runs = (await probe.map(oldSize, newSize - oldSize)).filter((run) => run.data || !run.zero);
  } finally {
    await probe.close();
  }
  if (runs.length === 0) return;
  const image = await opened(false);
  try {
    for (const run of runs) await image.zero(run.offset, run.length);
    await image.flush();
  } finally {
    await image.close();
  }
}
