/**
 * Opening images and their backing chains, creating and checking images:
 * the library's entry points by file name.
 *
 * Backing files are opened here, never by drivers: names resolve against
 * the directory of the image that names them, they are always opened
 * read-only, loops are refused and the chain depth is bounded.
 */
import { realpath, stat } from 'node:fs/promises';
import createDebug from 'debug';
import { FileProtocol } from './file.js';
import { BlockImage } from './image.js';
import { InvalidArgumentError, UnsupportedFeatureError, hostIoError } from './errors.js';
import { resolveBackingName } from './backing-name.js';
import { lockForWriting } from './lock.js';
import { namedFormat, probeFormat, PROBE_BYTES } from './probe.js';
import type { CheckResult, CreateOptions, FormatDriver, Protocol } from './types.js';

const log = createDebug('imgmount:open');

/** Longest backing chain accepted (the top image counts as one). */
export const MAX_CHAIN_DEPTH = 64;

export interface OpenImageOptions {
  /** Open the top image read-only (backing files are always read-only). */
  readOnly?: boolean;
  /** The top image's format; probed when omitted. */
  format?: string;
  /** Metadata cache bound in bytes, per image in the chain. */
  metadataCacheBytes?: number;
  /** Receives lines the user should see (repairs made on open). */
  notice?: (line: string) => void;
  /** Open the backing chain (default true); `info` turns it off to describe images whose backing file is missing. */
  openBacking?: boolean;
}

/** Opens an image and its whole backing chain. */
export async function openImage(path: string, options: OpenImageOptions = {}): Promise<BlockImage> {
  return openLayer(path, options.format, options.readOnly ?? false, options, []);
}

async function openLayer(
  path: string,
  formatName: string | undefined,
  readOnly: boolean,
  options: OpenImageOptions,
  chain: string[],
): Promise<BlockImage> {
  const canonical = await canonicalPath(path);
  if (chain.includes(canonical)) {
    throw new InvalidArgumentError(`backing chain loops: ${[...chain, canonical].join(' -> ')}`);
  }
  if (chain.length >= MAX_CHAIN_DEPTH) {
    throw new InvalidArgumentError(`backing chain of ${chain[0]} is deeper than ${MAX_CHAIN_DEPTH} images`);
  }
  const file = await FileProtocol.open(path, readOnly);
  let backing: BlockImage | undefined;
  try {
    const format = formatName !== undefined ? namedFormat(formatName) : await probeFile(file);
    log('opening %s as %s%s', path, format.name, readOnly ? ' (read-only)' : '');
    const image = await format.open(file, {
      readOnly,
      metadataCacheBytes: options.metadataCacheBytes,
      notice: options.notice,
    });
    try {
      if (image.backing && options.openBacking !== false) {
        const backingPath = resolveBackingName(path, image.backing.filename);
        backing = await openLayer(backingPath, image.backing.format, true, options, [...chain, canonical]);
      }
      return new BlockImage(path, format.name, file, image, backing);
    } catch (error) {
      await image.close().catch(() => undefined);
      throw error;
    }
  } catch (error) {
    await file.close().catch(() => undefined);
    throw error;
  }
}

async function canonicalPath(path: string): Promise<string> {
  try {
    return await realpath(path);
  } catch (error) {
    throw hostIoError('cannot open', path, error);
  }
}

async function probeFile(file: Protocol): Promise<FormatDriver> {
  const firstBytes = Buffer.alloc(PROBE_BYTES);
  await file.read(0, firstBytes);
  return probeFormat(firstBytes, file.path);
}

export interface CreateImageOptions extends Omit<CreateOptions, 'size'> {
  /** Virtual size; may be omitted when a backing file gives it. */
  size?: number;
  /** Overwrite an existing file. */
  force?: boolean;
}

/** Creates an image file of `formatName`; refuses to overwrite unless `force`. */
export async function createImage(path: string, formatName: string, options: CreateImageOptions): Promise<void> {
  const format = namedFormat(formatName);
  const overwriting = await exists(path);
  if (overwriting && !options.force) {
    throw new InvalidArgumentError(`${path} already exists; pass --force to overwrite it`);
  }
  let size = options.size;
  let backingFormat = options.backingFormat;
  if (options.backingFile !== undefined) {
    const backing = await openImage(resolveBackingName(path, options.backingFile), { readOnly: true, format: backingFormat });
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
    await format.create(path, { ...options, size, backingFormat });
  } finally {
    await lock?.release();
  }
}

export interface CheckImageOptions {
  repair?: boolean;
  format?: string;
  progress?: (done: number, total: number) => void;
}

export interface CheckReport extends CheckResult {
  format: string;
  filename: string;
}

/** Runs a format's consistency check (with repair if asked) on one image file. */
export async function checkImage(path: string, options: CheckImageOptions = {}): Promise<CheckReport> {
  const repair = options.repair ?? false;
  const file = await FileProtocol.open(path, !repair);
  try {
    const format = options.format !== undefined ? namedFormat(options.format) : await probeFile(file);
    if (!format.check) {
      throw new UnsupportedFeatureError(`${path}: ${format.name} images have no metadata to check`);
    }
    const result = await format.check(file, { repair, progress: options.progress });
    if (repair) await file.flush();
    return { ...result, format: format.name, filename: path };
  } finally {
    await file.close();
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}
