/**
 * What a mount is made of, as plain data: the mount configuration (it crosses the
 * IPC channel to a background daemon), the `-o` mount(8)-style options, the names
 * of the files in the mount, and the options of the kernel mount.
 *
 * Pure functions only; every check happens here, before anything is opened.
 */
import { basename, extname } from 'node:path';
import { InvalidArgumentError } from '../block/errors.js';
import type { KernelMountOptions } from './kernel/mount.js';
import type { FilterSpec } from '../block/filters/types.js';

/** One mount, fully resolved: every path is absolute. */
export interface MountConfig {
  images: string[];
  mountpoint: string;
  /** Format of every image (no probing); probed when undefined. */
  format?: string;
  /** An internal snapshot (id or name) to show instead of the current state; implies read-only. */
  snapshot?: string;
  readOnly: boolean;
  allowOther: boolean;
  /** The file name in the mount, for a single image. */
  name?: string;
  /** Log every FUSE operation. */
  debug: boolean;
  /** Append the daemon's log to this file. */
  logFile?: string;
  /** Mount over a directory that is not empty (refused by default, as libfuse does). */
  nonempty: boolean;
  /** L2-table cache bound per image in bytes; the format's default when undefined. A bound below 4 tables (0 too) is raised to 4 tables by the format, with a notice. */
  cacheBytes?: number;
  /** Idle clean (src/block/idle-clean.ts): seconds without writes before an image is marked clean; the library's default (5) when undefined, 0 off. */
  idleCleanSeconds?: number;
  /** Directories the files images name (backing files, data files) must lie in; anywhere when undefined. */
  allowFiles?: string[];
  /** Filters on every image (src/block/filters), file options resolved. */
  filters?: FilterSpec[];
  /** Open options of the images' format (`--open-option`), for every image. */
  formatOptions?: Record<string, string>;
  /** Longest busy poll of /dev/fuse after the last reply, in microseconds (`--busy-poll`); the transport's default when undefined, 0 off. */
  busyPollUs?: number;
}

/** What `-o` can set; the same settings as the long options. */
export interface MountOptionSettings {
  readOnly?: boolean;
  allowOther?: boolean;
  format?: string;
  snapshot?: string;
  name?: string;
  debug?: boolean;
  logFile?: string;
  foreground?: boolean;
  nonempty?: boolean;
  cacheSize?: string;
  idleClean?: string;
  busyPoll?: string;
}

const FLAG_OPTIONS: Record<string, (settings: MountOptionSettings) => void> = {
  ro: (s) => (s.readOnly = true),
  'read-only': (s) => (s.readOnly = true),
  read_only: (s) => (s.readOnly = true),
  rw: (s) => (s.readOnly = false),
  allow_other: (s) => (s.allowOther = true),
  'allow-other': (s) => (s.allowOther = true),
  debug: (s) => (s.debug = true),
  foreground: (s) => (s.foreground = true),
  nonempty: (s) => (s.nonempty = true),
  defaults: () => undefined,
};

const VALUE_OPTIONS: Record<string, (settings: MountOptionSettings, value: string) => void> = {
  format: (s, v) => (s.format = v),
  snapshot: (s, v) => (s.snapshot = v),
  name: (s, v) => (s.name = v),
  log: (s, v) => (s.logFile = v),
  cache_size: (s, v) => (s.cacheSize = v),
  idle_clean: (s, v) => (s.idleClean = v),
  busy_poll: (s, v) => (s.busyPoll = v),
};

/** Parses `-o ro,allow_other,format=qed` (repeatable) into settings; later items win. */
export function parseMountOptions(lists: readonly string[]): MountOptionSettings {
  const settings: MountOptionSettings = {};
  for (const list of lists) {
    for (const rawItem of list.split(',')) {
      const item = rawItem.trim();
      if (item === '') continue;
      const equals = item.indexOf('=');
      if (equals < 0) {
        const apply = FLAG_OPTIONS[item];
        if (!apply) throw unknownOption(item);
        apply(settings);
      } else {
        const key = item.slice(0, equals);
        const value = item.slice(equals + 1);
        const apply = VALUE_OPTIONS[key];
        if (!apply) throw unknownOption(item);
        if (value === '') throw new InvalidArgumentError(`mount option '${key}' needs a value (${key}=...)`);
        apply(settings, value);
      }
    }
  }
  return settings;
}

function unknownOption(item: string): InvalidArgumentError {
  const known = [...Object.keys(FLAG_OPTIONS), ...Object.keys(VALUE_OPTIONS).map((key) => `${key}=...`)];
  return new InvalidArgumentError(`unknown mount option '${item}' (known: ${known.join(', ')})`);
}

/** The file an image appears as: its name with the extension replaced by `.raw` (`disk.qed` -> `disk.raw`). */
export function rawFileName(imagePath: string): string {
  const name = basename(imagePath);
  const extension = extname(name);
  return `${extension === '' ? name : name.slice(0, -extension.length)}.raw`;
}

/** The file names of a mount, in image order; refuses clashes and unusable names. */
export function mountFileNames(images: readonly string[], name: string | undefined): string[] {
  if (images.length === 0) throw new InvalidArgumentError('no image given: imgmount [options] IMAGE... MOUNTPOINT');
  if (name !== undefined && images.length > 1) {
    throw new InvalidArgumentError(`--name sets the file name of a single image, but ${images.length} images were given`);
  }
  const names = name !== undefined ? [name] : images.map(rawFileName);
  const seen = new Map<string, string>();
  names.forEach((fileName, index) => {
    checkFileName(fileName);
    const image = images[index];
    const other = seen.get(fileName);
    if (other !== undefined) {
      throw new InvalidArgumentError(`${other} and ${image} would both appear as ${fileName}; mount them separately with --name`);
    }
    seen.set(fileName, image);
  });
  return names;
}

function checkFileName(name: string): void {
  if (name === '' || name === '.' || name === '..' || name.includes('/') || name.includes('\0')) {
    throw new InvalidArgumentError(`'${name}' cannot be a file name (no '/', not empty, '.' or '..')`);
  }
  if (Buffer.byteLength(name) > 255) throw new InvalidArgumentError(`file name '${name}' is longer than 255 bytes`);
}

/** The kernel's file-system type of our mounts in /proc/self/mountinfo. */
export const FUSE_SUBTYPE = 'imgmount';
export const MOUNT_TYPE = `fuse.${FUSE_SUBTYPE}`;

/**
 * How a mount is made (kernel/mount.ts): the source shown by mount(8) and df (the
 * image, when its name can travel in fusermount's option syntax: no commas,
 * backslashes or spaces), the `fuse.imgmount` type, read-only, allow_other. The
 * kernel enforces the files' mode and owner (default_permissions, always on).
 */
export function kernelMountOptions(config: MountConfig): KernelMountOptions {
  const source = config.images[0] ?? FUSE_SUBTYPE;
  const usable = !/[,\\\s]/.test(source) && Buffer.byteLength(source) < 900;
  return { fsname: usable ? source : FUSE_SUBTYPE, subtype: FUSE_SUBTYPE, readOnly: config.readOnly, allowOther: config.allowOther };
}
