/**
 * The image file system without a kernel: each handler is called the way the
 * kernel connection calls it, over a fake image, to pin down the errno of every
 * refusal, the clamping at the end of the file and the errno mapping of thrown
 * errors (errno.ts). (Draining requests in flight is the connection's, tested
 * through real unmounts.)
 */
import { constants } from 'node:os';
import { describe, expect, test } from 'vitest';
import { BlockError, CorruptImageError, ReadOnlyError } from '../../src/index.js';
import type { BlockImage } from '../../src/index.js';
import { toFuseError } from '../../src/fuse/errno.js';
import { ImageFilesystem } from '../../src/fuse/filesystem.js';

const { errno } = constants;

/** An in-memory stand-in for BlockImage; `fail` makes the next read or write throw it. */
class FakeImage {
  readonly path = '/images/disk.qed';
  readonly format = 'qed';
  readonly bytes: Buffer;
  fail: unknown;
  flushes = 0;

  constructor(
    readonly length: number,
    readonly readOnly = false,
  ) {
    this.bytes = Buffer.alloc(length);
  }

  async read(offset: number, buffer: Buffer): Promise<void> {
    this.throwIfFailing();
    if (offset + buffer.length > this.length) throw new Error('read outside the image');
    this.bytes.copy(buffer, 0, offset, offset + buffer.length);
  }

  async write(offset: number, buffer: Buffer): Promise<void> {
    this.throwIfFailing();
    if (offset + buffer.length > this.length) throw new Error('write outside the image');
    buffer.copy(this.bytes, offset);
  }

  async flush(): Promise<void> {
    this.flushes++;
  }

  async allocatedBytes(): Promise<number> {
    return 3 * 4096;
  }

  private throwIfFailing(): void {
    const failure = this.fail;
    this.fail = undefined;
    if (failure !== undefined) throw failure;
  }
}

const FILE = 2n;
const ROOT = 1n;

function filesystem(image: FakeImage): ImageFilesystem {
  return new ImageFilesystem([{ name: 'disk.raw', image: image as unknown as BlockImage }]);
}

/** The negative errno a handler's failure is answered with (errno.ts), or 0 when it succeeds. */
async function answer(work: () => unknown): Promise<number> {
  try {
    await work();
    return 0;
  } catch (error) {
    return toFuseError(error, 'test');
  }
}

describe('the image file system', () => {
  test('reads are clamped at the end; 0 bytes at and past it', async () => {
    const image = new FakeImage(10_000);
    image.bytes.fill(7);
    const fs = filesystem(image);
    const tail = await fs.read(FILE, 9_000, 4096);
    expect(tail.length).toBe(1000);
    expect(tail.every((byte) => byte === 7)).toBe(true);
    expect((await fs.read(FILE, 10_000, 4096)).length).toBe(0);
    expect((await fs.read(FILE, 20_000, 4096)).length).toBe(0);
  });

  test('writes: ENOSPC at the end, short across it, EROFS when read-only', async () => {
    const fs = filesystem(new FakeImage(10_000));
    const data = Buffer.alloc(4096, 1);
    expect(await answer(() => fs.write(FILE, 10_000, data))).toBe(-errno.ENOSPC);
    expect(await fs.write(FILE, 8_000, data)).toBe(2000);
    const readOnly = filesystem(new FakeImage(10_000, true));
    expect(await answer(() => readOnly.write(FILE, 0, data))).toBe(-errno.EROFS);
    expect(await answer(() => readOnly.open(FILE, 2 /* O_RDWR */))).toBe(-errno.EROFS);
    expect(readOnly.open(FILE, 0).fh).toBeGreaterThan(0);
  });

  test('size changes: the same size and 0 (an O_TRUNC open) change nothing; any other size is EINVAL; mode changes EPERM', async () => {
    const fs = filesystem(new FakeImage(10_000));
    const FATTR_SIZE = 1 << 3;
    expect((await fs.setattr(FILE, { size: 10_000, valid: FATTR_SIZE })).size).toBe(10_000);
    expect((await fs.setattr(FILE, { size: 0, valid: FATTR_SIZE })).size).toBe(10_000);
    expect(await answer(() => fs.setattr(FILE, { size: 20_000, valid: FATTR_SIZE }))).toBe(-errno.EINVAL);
    expect(await answer(() => fs.setattr(FILE, { size: 4096, valid: FATTR_SIZE }))).toBe(-errno.EINVAL);
    expect(await answer(() => fs.setattr(FILE, { valid: 1 /* FATTR_MODE */ }))).toBe(-errno.EPERM);
    expect((await fs.setattr(FILE, { valid: 1 << 4 /* FATTR_ATIME */ })).size).toBe(10_000);
  });

  test('fsync flushes the image; unknown nodes and names are ENOENT; the root is a directory', async () => {
    const image = new FakeImage(4096);
    const fs = filesystem(image);
    await fs.fsync(FILE);
    expect(image.flushes).toBe(1);
    expect(await answer(() => fs.fsync(7n))).toBe(-errno.ENOENT);
    expect(await answer(() => fs.lookup(ROOT, 'other.raw'))).toBe(-errno.ENOENT);
    expect(await answer(() => fs.lookup(FILE, 'x'))).toBe(-errno.ENOTDIR);
    expect(await answer(() => fs.open(ROOT, 0))).toBe(-errno.EISDIR);
    expect((await fs.lookup(ROOT, 'disk.raw')).nodeid).toBe(FILE);
    expect(fs.readdir(ROOT).map((entry) => entry.name)).toEqual(['.', '..', 'disk.raw']);
  });

  test('getattr: size, blocks from the allocation, modes', async () => {
    const fs = filesystem(new FakeImage(1 << 20));
    expect(await fs.getattr(FILE)).toMatchObject({ ino: FILE, size: 1 << 20, blocks: 24, mode: 0o100644, nlink: 1 });
    expect(await fs.getattr(ROOT)).toMatchObject({ mode: 0o40555 });
  });

  test('driver errors become their errno; anything else EIO, and the next request works', async () => {
    const image = new FakeImage(8192);
    const fs = filesystem(image);
    image.fail = new CorruptImageError('L2 table outside the file');
    expect(await answer(() => fs.read(FILE, 0, 512))).toBe(-errno.EIO);
    image.fail = Object.assign(new Error('disk full'), { code: 'ENOSPC' });
    expect(await answer(() => fs.write(FILE, 0, Buffer.alloc(512)))).toBe(-errno.ENOSPC);
    image.fail = new TypeError('a bug');
    expect(await answer(() => fs.read(FILE, 0, 512))).toBe(-errno.EIO);
    image.fail = 'not even an Error';
    expect(await answer(() => fs.read(FILE, 0, 512))).toBe(-errno.EIO);
    expect((await fs.read(FILE, 0, 512)).length).toBe(512);
  });

  test('fallocate: allocating answers EOPNOTSUPP (never ENOSYS, which would switch it off for the whole connection)', async () => {
    const fs = filesystem(new FakeImage(8192));
    expect(await answer(() => fs.fallocate(FILE, 0, 4096, 0))).toBe(-errno.EOPNOTSUPP);
    expect(await answer(() => fs.fallocate(FILE, 0, 4096, 0x8 /* COLLAPSE_RANGE */))).toBe(-errno.EOPNOTSUPP);
  });
});

describe('toFuseError', () => {
  test('maps every kind of failure to a negative errno', () => {
    expect(toFuseError(new ReadOnlyError('read-only'), 'write')).toBe(-errno.EROFS);
    expect(toFuseError(new BlockError('odd', errno.ENOTSUP), 'read')).toBe(-errno.ENOTSUP);
    expect(toFuseError(Object.assign(new Error('x'), { code: 'EACCES' }), 'open')).toBe(-errno.EACCES);
    expect(toFuseError(Object.assign(new Error('x'), { code: 'ENOTANERRNO' }), 'open')).toBe(-errno.EIO);
    expect(toFuseError(new BlockError('bad errno', -5), 'read')).toBe(-errno.EIO);
    expect(toFuseError(undefined, 'read')).toBe(-errno.EIO);
    expect(toFuseError(null, 'read')).toBe(-errno.EIO);
  });
});
