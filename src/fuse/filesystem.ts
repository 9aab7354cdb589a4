/**
 * The FUSE operations: a flat directory with one regular file per opened image,
 * whose bytes are the image's guest bytes.
 *
 * Thread model. fuse-native runs libfuse's multithreaded loop: each kernel request
 * is taken by a libfuse worker thread, which hands it to the JavaScript main thread
 * (uv_async) and blocks until the handler calls back. So every handler here runs
 * on the one JavaScript thread, and requests overlap only while a handler awaits:
 * handlers never block, and two requests may interleave at any `await` (the block
 * layer orders what must be ordered, such as QED allocations). The Buffer a read
 * or write handler gets is libfuse's own memory, valid only until the callback:
 * it is filled or consumed before answering and never kept.
 *
 * Semantics:
 * - read: clamped to the virtual size; at or past the end it returns 0 bytes (EOF).
 * - write: a write that starts at or past the end fails with ENOSPC; one that crosses
 *   the end writes what fits and returns the short count. That is what a block
 *   device does, so dd reports "No space left on device".
 * - fsync / fdatasync: the image's flush (driver metadata, then fdatasync of the
 *   image file): stable storage. flush (on every close()) does nothing more: each
 *   write already reached the image before it was answered.
 * - truncate to the current size succeeds; any other size fails with EINVAL and a
 *   log line (as for a block device: the virtual size does not change here).
 * - Files are owned by the mounting user, mode 0644 (0444 when read-only);
 *   st_blocks counts what the image file occupies on disk. The directory is 0555:
 *   files cannot be created, removed or renamed (ENOSYS for root, who passes the
 *   permission check).
 * - Every error becomes -errno in errno.ts; no error ends the daemon.
 */
import type Fuse from 'fuse-native';
import type { BlockImage } from '../block/index.js';
import { Errno, refusal, toFuseError } from './errno.js';
import { log, trace } from './log.js';

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const O_ACCMODE = 3;
const O_RDONLY = 0;
const BLOCK_SIZE = 4096;

/** One image as a file of the mount. */
export interface MountedImage {
  /** The file name in the mount (`disk.raw`). */
  name: string;
  image: BlockImage;
}

interface FileEntry extends MountedImage {
  /** Last write through the mount (the mount time before any). */
  mtime: Date;
}

export class ImageFilesystem {
  private readonly files = new Map<string, FileEntry>();
  private readonly mountedAt = new Date();
  private readonly owner = { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 };
  private nextHandle = 1;
  private running = 0;
  private idle: (() => void)[] = [];

  constructor(images: readonly MountedImage[]) {
    for (const { name, image } of images) {
      this.files.set(`/${name}`, { name, image, mtime: this.mountedAt });
    }
  }

  /** Requests being answered right now. */
  get requestsInFlight(): number {
    return this.running;
  }

  /** Resolves once no request is being answered. */
  drain(): Promise<void> {
    if (this.running === 0) return Promise.resolve();
    return new Promise((resolve) => this.idle.push(resolve));
  }

  /** The handlers for fuse-native. */
  operations(): Fuse.Operations {
    return {
      getattr: (path, done) =>
        this.serve(`getattr ${path}`, () => this.getattr(path), (stat) => done(0, stat), (errno) => done(errno)),
      readdir: (path, done) =>
        this.serve(`readdir ${path}`, () => this.readdir(path), ([names, stats]) => done(0, names, stats), (errno) => done(errno)),
      open: (path, flags, done) =>
        this.serve(`open ${path} flags 0x${flags.toString(16)}`, () => this.open(path, flags), (handle) => done(0, handle), (errno) => done(errno)),
      release: (path, handle, done) =>
        this.serve(`release ${path} #${handle}`, () => this.entry(path), () => done(0), done),
      read: (path, handle, buffer, length, position, done) =>
        this.serve(`read ${path} ${length}@${position}`, () => this.read(path, buffer, length, position), done, done),
      write: (path, handle, buffer, length, position, done) =>
        this.serve(`write ${path} ${length}@${position}`, () => this.write(path, buffer, length, position), done, done),
      flush: (path, handle, done) => this.serve(`flush ${path} #${handle}`, () => this.entry(path), () => done(0), done),
      fsync: (path, dataSync, handle, done) =>
        this.serve(`fsync ${path}${dataSync ? ' (data)' : ''}`, () => this.entry(path).image.flush(), () => done(0), done),
      truncate: (path, size, done) => this.serve(`truncate ${path} ${size}`, () => this.truncate(path, size), () => done(0), done),
      ftruncate: (path, handle, size, done) =>
        this.serve(`ftruncate ${path} ${size}`, () => this.truncate(path, size), () => done(0), done),
      statfs: (path, done) => this.serve(`statfs ${path}`, () => this.statfs(), (statfs) => done(0, statfs), (errno) => done(errno)),
    };
  }

  /**
   * Runs one request: answers with `succeed(result)` or, for anything thrown,
   * `fail(-errno)`; counts requests in flight for drain().
   */
  private serve<T>(request: string, work: () => T | Promise<T>, succeed: (result: T) => void, fail: (errno: number) => void): void {
    this.running++;
    const started = trace.enabled ? performance.now() : 0;
    const finished = (outcome: string): void => {
      if (trace.enabled) trace('%s -> %s (%s ms)', request, outcome, (performance.now() - started).toFixed(2));
      this.running--;
      if (this.running === 0) for (const wake of this.idle.splice(0)) wake();
    };
    // Inside an async function, even a handler that throws before its first await becomes a rejection.
    (async () => work())()
      .then(
        (result) => {
          finished(typeof result === 'number' ? String(result) : 'ok');
          succeed(result);
        },
        (error: unknown) => {
          const errno = toFuseError(error, request);
          finished(errnoName(errno));
          fail(errno);
        },
      )
      .catch((error: unknown) => log('answering %s failed: %O', request, error));
  }

  private entry(path: string): FileEntry {
    const entry = this.files.get(path);
    if (!entry) throw refusal(`no such file ${path}`, Errno.ENOENT);
    return entry;
  }

  private async getattr(path: string): Promise<Fuse.Stat> {
    if (path === '/') return this.directoryStat();
    return this.fileStat(this.entry(path));
  }

  /** 0555: the files can be written, but none can be added, removed or renamed. */
  private directoryStat(): Fuse.Stat {
    const time = this.mountedAt;
    return { mode: S_IFDIR | 0o555, nlink: 2, size: BLOCK_SIZE, ...this.owner, atime: time, mtime: time, ctime: time };
  }

  private async fileStat(entry: FileEntry): Promise<Fuse.Stat> {
    const allocated = await entry.image.allocatedBytes();
    return {
      mode: S_IFREG | (entry.image.readOnly ? 0o444 : 0o644),
      nlink: 1,
      size: entry.image.length,
      blksize: BLOCK_SIZE,
      blocks: Math.ceil(allocated / 512),
      ...this.owner,
      atime: entry.mtime,
      mtime: entry.mtime,
      ctime: entry.mtime,
    };
  }

  private async readdir(path: string): Promise<[string[], Fuse.Stat[]]> {
    if (path !== '/') throw refusal(`${path} is not a directory`, this.files.has(path) ? Errno.ENOTDIR : Errno.ENOENT);
    const entries = [...this.files.values()];
    return [entries.map((entry) => entry.name), await Promise.all(entries.map((entry) => this.fileStat(entry)))];
  }

  private open(path: string, flags: number): number {
    const entry = this.entry(path);
    if ((flags & O_ACCMODE) !== O_RDONLY && entry.image.readOnly) {
      throw refusal(`${entry.name} is read-only (${entry.image.path} is open read-only)`, Errno.EROFS);
    }
    const handle = this.nextHandle;
    this.nextHandle = this.nextHandle >= 0x7fffffff ? 1 : this.nextHandle + 1;
    return handle;
  }

  private async read(path: string, buffer: Buffer, length: number, position: number): Promise<number> {
    const { image } = this.entry(path);
    const count = Math.max(0, Math.min(length, image.length - position));
    if (count > 0) await image.read(position, buffer.subarray(0, count));
    return count;
  }

  private async write(path: string, buffer: Buffer, length: number, position: number): Promise<number> {
    const entry = this.entry(path);
    const { image } = entry;
    if (image.readOnly) throw refusal(`${entry.name} is read-only`, Errno.EROFS);
    if (length === 0) return 0;
    if (position >= image.length) {
      throw refusal(`write of ${length} bytes at ${position} is past the end of ${entry.name} (${image.length} bytes)`, Errno.ENOSPC);
    }
    const count = Math.min(length, image.length - position);
    await image.write(position, buffer.subarray(0, count));
    entry.mtime = new Date();
    return count;
  }

  private truncate(path: string, size: number): void {
    const entry = this.entry(path);
    if (size === entry.image.length) return;
    if (entry.image.readOnly) throw refusal(`${entry.name} is read-only`, Errno.EROFS);
    throw refusal(
      `refusing to resize ${entry.name} from ${entry.image.length} to ${size} bytes: the virtual size cannot be changed through the mount`,
      Errno.EINVAL,
    );
  }

  private statfs(): Fuse.StatFs {
    const total = [...this.files.values()].reduce((sum, entry) => sum + entry.image.length, 0);
    const blocks = Math.min(0xffffffff, Math.ceil(total / BLOCK_SIZE));
    const files = this.files.size + 1;
    return { bsize: BLOCK_SIZE, frsize: BLOCK_SIZE, blocks, bfree: 0, bavail: 0, files, ffree: 0, favail: 0, fsid: 0, flag: 0, namemax: 255 };
  }
}

function errnoName(errno: number): string {
  const name = Object.entries(Errno).find(([, value]) => value === -errno)?.[0];
  return name ?? String(errno);
}
