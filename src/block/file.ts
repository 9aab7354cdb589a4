/**
 * The `file` protocol: positional I/O on a host file. Reads past the end of
 * the file return zeros (a sparse or short file reads like its zero-filled
 * tail); flush is fdatasync. Concurrency: calls may overlap freely; each is
 * one pread/pwrite, on libuv's thread pool or (below) on the calling thread. A read-write open holds the image's
 * write lock (lock.ts) until close, so two imgmount processes never write one
 * image at once, and QEMU's own byte-range locks are taken and respected
 * (qemu-locks.ts), so neither does a running VM.
 *
 * A pwrite that writes nothing fails the write with EIO (it would otherwise be
 * repeated forever).
 *
 * The hot path (read/write) uses fs's callback functions on the raw fd: on
 * Node 20, FileHandle.read costs about a third more CPU per call, which
 * showed as the largest item in profiles of 4 KiB random reads.
 *
 * Reads try the page cache first, on the calling (main) thread: preadv2 with
 * RWF_NOWAIT (native addon) returns at once with what is cached, or EAGAIN;
 * only the rest goes through libuv's thread pool, whose round trip costs
 * about 100 µs, far more than copying a cached 4 KiB block.
 *
 * Small writes (up to 64 KiB) are made on the calling thread too, with a
 * synchronous pwrite, when no other I/O of this file is waiting in the thread
 * pool: copying 4 KiB into the page cache takes 13-17 µs here, while handing
 * it to the pool costs the main thread more than that (the submit contends on
 * libuv's queue lock with the worker it wakes) and adds two wake-ups to the
 * request's latency. ext4 refuses RWF_NOWAIT for buffered writes
 * (EOPNOTSUPP, measured on Linux 6.18), so such a write may block (dirty-page
 * throttling); with I/O already in flight, writes go to the pool, so a
 * blocked write never holds up I/O that could run beside it, and after a
 * write that took over 2 ms every write goes to the pool for a second.
 */
import { open, realpath, stat, type FileHandle } from 'node:fs/promises';
import { constants as fsConstants, fdatasync as fdatasyncCallback, read as readCallback, write as writeCallback, writeSync } from 'node:fs';
import createDebug from 'debug';
import { constants as osConstants } from 'node:os';
import { constants as nativeConstants, fallocate, preadNowait, seekExtent } from '../native/index.js';
import { HostIoError, hostIoError, InvalidArgumentError } from './errors.js';
import { lockForWriting, type ImageLock } from './lock.js';
import { releaseWriteLocks, takeQemuLocks } from './qemu-locks.js';
import type { HostOffset, Protocol } from './types.js';

const log = createDebug('imgmount:file');

export class FileProtocol implements Protocol {
  private constructor(
    readonly path: string,
    private writable: boolean,
    private readonly handle: FileHandle,
    private lock: ImageLock | undefined,
  ) {}

  get readOnly(): boolean {
    return !this.writable;
  }

  /**
   * Gives up writing: a read-write open whose image turned out to be read-only here
   * (its format refuses to write it) keeps only a reader's locks, so qemu and other
   * imgmount processes are not locked out of an image nobody writes.
   */
  async keepReadOnly(): Promise<void> {
    if (!this.writable) return;
    this.writable = false;
    releaseWriteLocks(this.handle.fd);
    const lock = this.lock;
    this.lock = undefined;
    await lock?.release();
    log('%s: read-only from now on; write locks released', this.path);
  }

  /** Whether reads try the page cache first (RWF_NOWAIT); off for a file system that refuses it. */
  private nowait = true;

  /** This file's reads, writes and flushes now waiting in the thread pool. */
  private pending = 0;
  /** When small writes may be made on the calling thread again (performance.now()), after one that waited. */
  private inlineAgainAt = 0;

  /** Opens an existing host file; never creates one. */
  static async open(path: string, readOnly: boolean): Promise<FileProtocol> {
    let lock: ImageLock | undefined;
    try {
      await refuseSpecialFile(path);
      const handle = await open(path, readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR);
      try {
        // Another imgmount first (its message names it), then QEMU's locks.
        if (!readOnly) lock = await lockForWriting(await realpath(path), path);
        takeQemuLocks(handle.fd, readOnly, path);
      } catch (error) {
        await handle.close();
        throw error;
      }
      log('opened %s %s', path, readOnly ? 'read-only' : 'read-write');
      return new FileProtocol(path, !readOnly, handle, lock);
    } catch (error) {
      await lock?.release();
      throw hostIoError('cannot open', path, error);
    }
  }

  async read(offset: HostOffset, buffer: Buffer): Promise<void> {
    let done = 0;
    try {
      if (this.nowait && buffer.length > 0) {
        const cached = preadNowait(this.handle.fd, buffer, 0, buffer.length, offset);
        if (cached === -osConstants.errno.EOPNOTSUPP) this.nowait = false; // a file system without RWF_NOWAIT
        else if (cached === 0) done = buffer.length; // at or past the end of the file: zeros
        else if (cached > 0) done = cached;
        if (cached === 0) buffer.fill(0);
      }
      const waits = done < buffer.length;
      if (waits) this.pending++;
      try {
        while (done < buffer.length) {
          const bytesRead = await pread(this.handle.fd, buffer, done, buffer.length - done, offset + done);
          if (bytesRead === 0) break;
          done += bytesRead;
        }
      } finally {
        if (waits) this.pending--;
      }
    } catch (error) {
      throw hostIoError(`read at ${offset} from`, this.path, error);
    }
    if (done < buffer.length) buffer.fill(0, done);
  }

  async write(offset: HostOffset, buffer: Buffer): Promise<void> {
    if (this.pending === 0 && buffer.length <= INLINE_WRITE_MAX && performance.now() >= this.inlineAgainAt) {
      const started = performance.now();
      writeFullyNow(this.handle.fd, buffer, offset, this.path);
      const took = performance.now() - started;
      if (took > INLINE_BLOCKED_MS) {
        // The write waited (dirty-page throttling, a busy disk): the thread pool's for a while.
        this.inlineAgainAt = started + took + INLINE_PAUSE_MS;
        log('%s: a %d-byte write took %s ms on the main thread; writes go to the thread pool for %d ms', this.path, buffer.length, took.toFixed(1), INLINE_PAUSE_MS);
      }
      return;
    }
    this.pending++;
    try {
      await writeFully(pwrite, this.handle.fd, buffer, offset, this.path);
    } finally {
      this.pending--;
    }
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    this.pending++;
    try {
      await datasync(this.handle.fd);
    } catch (error) {
      throw hostIoError('fdatasync', this.path, error);
    } finally {
      this.pending--;
    }
  }

  async size(): Promise<number> {
    try {
      return (await this.handle.stat()).size;
    } catch (error) {
      throw hostIoError('stat', this.path, error);
    }
  }

  async allocatedSize(): Promise<number> {
    try {
      return (await this.handle.stat()).blocks * 512;
    } catch (error) {
      throw hostIoError('stat', this.path, error);
    }
  }

  async truncate(length: number): Promise<void> {
    try {
      await this.handle.truncate(length);
    } catch (error) {
      throw hostIoError(`truncate to ${length}`, this.path, error);
    }
  }

  async punchHole(offset: HostOffset, length: number): Promise<void> {
    if (this.readOnly) throw new HostIoError(`punch a hole in ${this.path}: open read-only`, osConstants.errno.EBADF);
    try {
      fallocate(this.handle.fd, nativeConstants.FALLOC_FL_PUNCH_HOLE | nativeConstants.FALLOC_FL_KEEP_SIZE, offset, length);
    } catch (error) {
      throw hostIoError(`punch a hole of ${length} bytes at ${offset} in`, this.path, error);
    }
  }

  async nextData(offset: HostOffset): Promise<HostOffset | undefined> {
    try {
      const data = seekExtent(this.handle.fd, offset, nativeConstants.SEEK_DATA);
      return data < 0 ? undefined : data;
    } catch (error) {
      throw hostIoError(`SEEK_DATA at ${offset} in`, this.path, error);
    }
  }

  async nextHole(offset: HostOffset): Promise<HostOffset> {
    try {
      const hole = seekExtent(this.handle.fd, offset, nativeConstants.SEEK_HOLE);
      return hole < 0 ? offset : hole;
    } catch (error) {
      throw hostIoError(`SEEK_HOLE at ${offset} in`, this.path, error);
    }
  }

  async close(): Promise<void> {
    try {
      await this.handle.close();
    } catch (error) {
      throw hostIoError('close', this.path, error);
    } finally {
      await this.lock?.release();
    }
  }
}

/** Whether `path` exists (any kind of file); other failures than ENOENT are errors. */
export async function pathExists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw hostIoError('cannot look at', path, error);
  }
}

/**
 * Only regular files are images here: opening a FIFO would block forever, and a
 * device's size is not what stat says. Checked before open, so nothing hangs.
 */
async function refuseSpecialFile(path: string): Promise<void> {
  const info = await stat(path);
  if (info.isFile()) return;
  const kind = info.isDirectory()
    ? 'a directory'
    : info.isBlockDevice()
      ? 'a block device (not supported yet)'
      : info.isFIFO()
        ? 'a FIFO'
        : info.isSocket()
          ? 'a socket'
          : 'a character device';
  throw new InvalidArgumentError(`${path} is ${kind}, not a regular image file`);
}

/** fdatasync through fs's callback API (cheaper per call than FileHandle.datasync on Node 20). */
function datasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fdatasyncCallback(fd, (error) => (error ? reject(error) : resolve())));
}

function pread(fd: number, buffer: Buffer, at: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    readCallback(fd, buffer, at, length, position, (error, bytesRead) => (error ? reject(error) : resolve(bytesRead)));
  });
}

/** One positional write: how many bytes of buffer[at, at + length) reached `position`. */
export type PositionalWrite = (fd: number, buffer: Buffer, at: number, length: number, position: number) => Promise<number>;

/**
 * Writes all of `buffer` at `offset` of the file behind `fd`, repeating short writes.
 * A write of 0 bytes makes no progress and would repeat forever: it fails with EIO.
 */
export async function writeFully(write: PositionalWrite, fd: number, buffer: Buffer, offset: HostOffset, path: string): Promise<void> {
  let done = 0;
  try {
    while (done < buffer.length) {
      const bytesWritten = await write(fd, buffer, done, buffer.length - done, offset + done);
      if (!(bytesWritten > 0)) throw noProgress(offset + done, path, bytesWritten, buffer.length - done);
      done += bytesWritten;
    }
  } catch (error) {
    throw hostIoError(`write at ${offset} to`, path, error);
  }
}

function noProgress(at: number, path: string, written: number, wanted: number): HostIoError {
  return new HostIoError(`write at ${at} to ${path}: the host wrote ${written} of ${wanted} bytes (no progress)`, osConstants.errno.EIO);
}

/** The largest write made on the calling thread (see the top of this file). */
const INLINE_WRITE_MAX = 64 * 1024;
/** A write on the calling thread that took longer than this waited for something (copying 64 KiB takes about 20 µs)... */
const INLINE_BLOCKED_MS = 2;
/** ...and writes then go to the thread pool for this long. */
const INLINE_PAUSE_MS = 1000;

/** writeFully with synchronous pwrites, on the calling thread. */
function writeFullyNow(fd: number, buffer: Buffer, offset: HostOffset, path: string): void {
  let done = 0;
  try {
    while (done < buffer.length) {
      const bytesWritten = writeSync(fd, buffer, done, buffer.length - done, offset + done);
      if (!(bytesWritten > 0)) throw noProgress(offset + done, path, bytesWritten, buffer.length - done);
      done += bytesWritten;
    }
  } catch (error) {
    throw hostIoError(`write at ${offset} to`, path, error);
  }
}

function pwrite(fd: number, buffer: Buffer, at: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    writeCallback(fd, buffer, at, length, position, (error, bytesWritten) => (error ? reject(error) : resolve(bytesWritten)));
  });
}
