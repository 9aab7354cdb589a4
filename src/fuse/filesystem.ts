/**
 * The image file system: a flat directory (node 1) with one regular file per
 * opened image (nodes 2, 3, ...), whose bytes are the image's guest bytes. It
 * answers the kernel connection's handlers (kernel/connection.ts) and never
 * sees a byte of the protocol.
 *
 * Concurrency: every handler runs on the JavaScript main thread; requests
 * overlap only at their awaits, and the block layer orders what must be
 * ordered (QED allocations). A READ's buffer is filled, and a WRITE's data
 * consumed, before the handler resolves, so the connection answers only
 * after all I/O on the request's buffer has finished; the connection gives
 * a READ's buffer back (recycleRead) once its reply is written, for the next
 * READ of that size (read-buffers.ts).
 *
 * Semantics, as for a block device:
 * - read: clamped to the virtual size; at or past the end it returns 0 bytes (EOF).
 * - write: one that starts at or past the end fails with ENOSPC; one that crosses
 *   the end writes what fits and returns the short count, so dd reports "No space
 *   left on device".
 * - fsync / fdatasync: the image's flush (driver metadata, then fdatasync of the
 *   image file): stable storage. flush (each close()) needs nothing more: each write
 *   reached the image before it was answered.
 * - size changes: to the current size succeed; to 0 succeed and change nothing (an
 *   open with O_TRUNC, which `dd` and `cp` do, leaves the disk as it is, as for a
 *   block device: FUSE_ATOMIC_O_TRUNC is not negotiated, so the kernel sends that
 *   truncation as a size-0 SETATTR); any other size fails with EINVAL and a log line.
 *   Mode and owner changes fail with EPERM; time changes are accepted and ignored.
 * - lseek SEEK_DATA / SEEK_HOLE answer from the image's map (backing chain included):
 *   ranges that read as zeros (zero clusters, unallocated down the chain) are holes.
 * - fallocate: PUNCH_HOLE|KEEP_SIZE is the image's discard and ZERO_RANGE its zero
 *   (afterwards the range reads as zeros; whole clusters free host space); other
 *   modes, and formats without them, answer EOPNOTSUPP (never ENOSYS, which would
 *   switch fallocate off for the whole connection).
 * - Files are owned by the mounting user, mode 0644 (0444 when read-only), and the
 *   kernel enforces that (default_permissions); st_blocks counts every file of the
 *   image on disk. The directory is 0555: files cannot be created, removed or
 *   renamed (ENOSYS for root, who passes the permission check).
 * - Every error becomes -errno in errno.ts; no error ends the daemon.
 */
import type { BlockImage } from '../block/index.js';
import { Errno, refusal } from './errno.js';
import { log } from './log.js';
import { ReadBufferPool } from './read-buffers.js';
import type { DirectoryEntry, KernelFilesystem, NodeEntry } from './kernel/connection.js';
import type { FuseAttr, Kstatfs } from './kernel/reply.js';
import { FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FOPEN_PARALLEL_DIRECT_WRITES } from './kernel/abi.js';

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const O_ACCMODE = 3;
const O_RDONLY = 0;
const O_DIRECT = 0o40000;
const BLOCK_SIZE = 4096;
const ROOT = 1n;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const FATTR_MODE = 1 << 0;
const FATTR_UID = 1 << 1;
const FATTR_GID = 1 << 2;
const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;
const FALLOC_FL_ZERO_RANGE = 0x10;

/** One image as a file of the mount. */
export interface MountedImage {
  /** The file name in the mount (`disk.raw`). */
  name: string;
  image: BlockImage;
}

interface FileEntry extends MountedImage {
  nodeid: bigint;
  /** Last write through the mount (the mount time before any). */
  mtime: Date;
}

export class ImageFilesystem implements KernelFilesystem {
  private readonly files: FileEntry[] = [];
  private readonly readBuffers = new ReadBufferPool();
  private readonly byName = new Map<string, FileEntry>();
  private readonly mountedAt = new Date();
  private readonly owner = { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 };
  private nextHandle = 1;

  constructor(images: readonly MountedImage[]) {
    images.forEach(({ name, image }, index) => {
      const entry: FileEntry = { name, image, nodeid: BigInt(index + 2), mtime: this.mountedAt };
      this.files.push(entry);
      this.byName.set(name, entry);
    });
  }

  async lookup(parent: bigint, name: string): Promise<NodeEntry> {
    this.directory(parent);
    const entry = this.byName.get(name);
    if (!entry) throw refusal(`no such file ${name}`, Errno.ENOENT);
    return { nodeid: entry.nodeid, attr: await this.fileAttr(entry) };
  }

  async getattr(node: bigint): Promise<FuseAttr> {
    return node === ROOT ? this.directoryAttr() : this.fileAttr(this.file(node));
  }

  async setattr(node: bigint, change: { size?: number; valid: number }): Promise<FuseAttr> {
    if (node === ROOT) throw refusal('the mount directory cannot be changed', Errno.EPERM);
    const entry = this.file(node);
    if (change.valid & (FATTR_MODE | FATTR_UID | FATTR_GID)) {
      throw refusal(`${entry.name}: its mode and owner are fixed by the mount`, Errno.EPERM);
    }
    const { size } = change;
    if (size !== undefined && size !== entry.image.length && size !== 0) {
      if (entry.image.readOnly) throw refusal(`${entry.name} is read-only`, Errno.EROFS);
      throw refusal(
        `refusing to resize ${entry.name} from ${entry.image.length} to ${size} bytes: the virtual size cannot be changed through the mount`,
        Errno.EINVAL,
      );
    }
    if (size === 0 && entry.image.length !== 0) log('%s: a truncation to 0 (an open with O_TRUNC) leaves the disk as it is', entry.name);
    return this.fileAttr(entry);
  }

  open(node: bigint, flags: number): { fh: number; openFlags: number } {
    if (node === ROOT) throw refusal('the mount directory is not a file', Errno.EISDIR);
    const entry = this.file(node);
    if ((flags & O_ACCMODE) !== O_RDONLY && entry.image.readOnly) {
      throw refusal(`${entry.name} is read-only (${entry.image.path} is open read-only)`, Errno.EROFS);
    }
    // The bytes change only through this mount, so the kernel's page cache of a file never goes stale.
    // An O_DIRECT open bypasses that cache anyway; FOPEN_DIRECT_IO sends its I/O
    // straight here, where FOPEN_PARALLEL_DIRECT_WRITES lets its writes run side by
    // side (the cached path holds the inode lock for each). The kernel invalidates
    // the cached pages a direct write covers and serializes direct writes again while
    // the file also has a cached open, so cached readers never see stale bytes.
    const openFlags = flags & O_DIRECT ? FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES : FOPEN_KEEP_CACHE;
    return { fh: this.handle(), openFlags };
  }

  release(node: bigint): void {
    this.file(node);
  }

  async read(node: bigint, offset: number, size: number): Promise<Buffer> {
    const { image } = this.file(node);
    const count = Math.max(0, Math.min(size, image.length - offset));
    const buffer = this.readBuffers.take(count);
    if (count > 0) await image.read(offset, buffer);
    return buffer;
  }

  recycleRead(data: Buffer): void {
    this.readBuffers.give(data);
  }

  async write(node: bigint, offset: number, data: Buffer): Promise<number> {
    const entry = this.file(node);
    const { image } = entry;
    if (image.readOnly) throw refusal(`${entry.name} is read-only`, Errno.EROFS);
    if (data.length === 0) return 0;
    if (offset >= image.length) {
      throw refusal(`write of ${data.length} bytes at ${offset} is past the end of ${entry.name} (${image.length} bytes)`, Errno.ENOSPC);
    }
    const count = Math.min(data.length, image.length - offset);
    await image.write(offset, data.subarray(0, count));
    entry.mtime = new Date();
    return count;
  }

  flush(node: bigint): void {
    this.file(node);
  }

  async fsync(node: bigint): Promise<void> {
    await this.file(node).image.flush();
  }

  statfs(): Kstatfs {
    const total = this.files.reduce((sum, entry) => sum + entry.image.length, 0);
    return {
      blocks: Math.ceil(total / BLOCK_SIZE),
      bfree: 0,
      bavail: 0,
      files: this.files.length + 1,
      ffree: 0,
      bsize: BLOCK_SIZE,
      namelen: 255,
      frsize: BLOCK_SIZE,
    };
  }

  opendir(node: bigint): number {
    this.directory(node);
    return this.handle();
  }

  readdir(node: bigint): DirectoryEntry[] {
    this.directory(node);
    return [
      { name: '.', nodeid: ROOT, mode: S_IFDIR },
      { name: '..', nodeid: ROOT, mode: S_IFDIR },
      ...this.files.map((entry) => ({ name: entry.name, nodeid: entry.nodeid, mode: S_IFREG })),
    ];
  }

  access(node: bigint): void {
    if (node !== ROOT) this.file(node);
  }

  async lseek(node: bigint, offset: number, whence: number): Promise<number> {
    const { image, name } = this.file(node);
    if (whence !== SEEK_DATA && whence !== SEEK_HOLE) throw refusal(`${name}: lseek whence ${whence} is answered by the kernel`, Errno.EINVAL);
    if (offset >= image.length) throw refusal(`${name}: lseek to ${offset} is at or past the end`, Errno.ENXIO);
    for (const run of await image.map(offset, image.length - offset)) {
      const hole = run.zero;
      if (whence === SEEK_DATA && !hole) return Math.max(offset, run.offset);
      if (whence === SEEK_HOLE && hole) return Math.max(offset, run.offset);
    }
    if (whence === SEEK_DATA) throw refusal(`${name}: no data after ${offset}`, Errno.ENXIO);
    return image.length; // the end of the file is a hole
  }

  async fallocate(node: bigint, offset: number, length: number, mode: number): Promise<void> {
    const entry = this.file(node);
    const { image, name } = entry;
    const punch = mode === (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
    const zeroRange = (mode & ~FALLOC_FL_KEEP_SIZE) === FALLOC_FL_ZERO_RANGE;
    if (!punch && !zeroRange) {
      // Allocating (mode 0) cannot be promised for an image; EOPNOTSUPP makes posix_fallocate write zeros instead.
      throw refusal(`${name}: fallocate mode 0x${mode.toString(16)} is not supported (only punching holes and zeroing ranges)`, Errno.EOPNOTSUPP);
    }
    if (image.readOnly) throw refusal(`${name} is read-only`, Errno.EROFS);
    const end = Math.min(image.length, offset + length);
    if (end <= offset) return;
    if (punch) await image.discard(offset, end - offset);
    else await image.zero(offset, end - offset);
    entry.mtime = new Date();
  }

  private handle(): number {
    const handle = this.nextHandle;
    this.nextHandle = this.nextHandle >= 0x7fffffff ? 1 : this.nextHandle + 1;
    return handle;
  }

  private directory(node: bigint): void {
    if (node === ROOT) return;
    this.file(node);
    throw refusal(`node ${node} is not a directory`, Errno.ENOTDIR);
  }

  private file(node: bigint): FileEntry {
    const entry = node >= 2n ? this.files[Number(node) - 2] : undefined;
    if (!entry) throw refusal(node === ROOT ? 'the mount directory is not a file' : `no such node ${node}`, node === ROOT ? Errno.EISDIR : Errno.ENOENT);
    return entry;
  }

  /** 0555: the files can be written, but none can be added, removed or renamed. */
  private directoryAttr(): FuseAttr {
    return this.attr(ROOT, { mode: S_IFDIR | 0o555, nlink: 2, size: BLOCK_SIZE, blocks: 0, time: this.mountedAt });
  }

  private async fileAttr(entry: FileEntry): Promise<FuseAttr> {
    const allocated = await entry.image.allocatedBytes();
    return this.attr(entry.nodeid, {
      mode: S_IFREG | (entry.image.readOnly ? 0o444 : 0o644),
      nlink: 1,
      size: entry.image.length,
      blocks: Math.ceil(allocated / 512),
      time: entry.mtime,
    });
  }

  private attr(ino: bigint, fields: { mode: number; nlink: number; size: number; blocks: number; time: Date }): FuseAttr {
    const ms = fields.time.getTime();
    const seconds = Math.floor(ms / 1000);
    const nsec = (ms - seconds * 1000) * 1_000_000;
    return {
      ino,
      size: fields.size,
      blocks: fields.blocks,
      atime: seconds,
      mtime: seconds,
      ctime: seconds,
      atimensec: nsec,
      mtimensec: nsec,
      ctimensec: nsec,
      mode: fields.mode,
      nlink: fields.nlink,
      uid: this.owner.uid,
      gid: this.owner.gid,
      rdev: 0,
      blksize: BLOCK_SIZE,
      flags: 0,
    };
  }
}
