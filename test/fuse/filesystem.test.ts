/**
 * The FUSE operations without a kernel: each handler is called the way fuse-native
 * calls it, over a fake image, to pin down the errno of every refusal, the
 * clamping at the end of the file, the errno mapping of thrown errors (errno.ts),
 * and drain().
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
  release: (() => void) | undefined;

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
    if (this.release) await new Promise<void>((resolve) => (this.release = resolve));
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

function filesystem(image: FakeImage): ReturnType<ImageFilesystem['operations']> & { fs: ImageFilesystem } {
  const fs = new ImageFilesystem([{ name: 'disk.raw', image: image as unknown as BlockImage }]);
  return Object.assign(fs.operations(), { fs });
}

/** Calls a read/write handler and resolves with what it answered. */
function call(handler: (done: (result: number) => void) => void): Promise<number> {
  return new Promise((resolve) => handler(resolve));
}

describe('FUSE operations', () => {
  test('reads are clamped at the end; 0 bytes at and past it', async () => {
    const image = new FakeImage(10_000);
    image.bytes.fill(7);
    const ops = filesystem(image);
    const buffer = Buffer.alloc(4096);
    expect(await call((done) => ops.read!('/disk.raw', 1, buffer, 4096, 9_000, done))).toBe(1000);
    expect(buffer.subarray(0, 1000).every((byte) => byte === 7)).toBe(true);
    expect(await call((done) => ops.read!('/disk.raw', 1, buffer, 4096, 10_000, done))).toBe(0);
    expect(await call((done) => ops.read!('/disk.raw', 1, buffer, 4096, 20_000, done))).toBe(0);
  });

  test('writes: ENOSPC at the end, short across it, EROFS when read-only', async () => {
    const ops = filesystem(new FakeImage(10_000));
    const data = Buffer.alloc(4096, 1);
    expect(await call((done) => ops.write!('/disk.raw', 1, data, 4096, 10_000, done))).toBe(-errno.ENOSPC);
    expect(await call((done) => ops.write!('/disk.raw', 1, data, 4096, 8_000, done))).toBe(2000);
    const readOnly = filesystem(new FakeImage(10_000, true));
    expect(await call((done) => readOnly.write!('/disk.raw', 1, data, 4096, 0, done))).toBe(-errno.EROFS);
    const opened = await new Promise<number>((resolve) => readOnly.open!('/disk.raw', 2 /* O_RDWR */, (result) => resolve(result)));
    expect(opened).toBe(-errno.EROFS);
  });

  test('truncate: the same size succeeds, any other size is EINVAL', async () => {
    const ops = filesystem(new FakeImage(10_000));
    expect(await call((done) => ops.truncate!('/disk.raw', 10_000, done))).toBe(0);
    expect(await call((done) => ops.ftruncate!('/disk.raw', 1, 0, done))).toBe(-errno.EINVAL);
    expect(await call((done) => ops.truncate!('/disk.raw', 20_000, done))).toBe(-errno.EINVAL);
  });

  test('fsync flushes the image; unknown paths are ENOENT', async () => {
    const image = new FakeImage(4096);
    const ops = filesystem(image);
    expect(await call((done) => ops.fsync!('/disk.raw', 1, 1, done))).toBe(0);
    expect(image.flushes).toBe(1);
    expect(await call((done) => ops.fsync!('/other.raw', 0, 1, done))).toBe(-errno.ENOENT);
    const stat = await new Promise<number>((resolve) => ops.getattr!('/other.raw', (result) => resolve(result)));
    expect(stat).toBe(-errno.ENOENT);
  });

  test('getattr: size, blocks from the allocation, modes', async () => {
    const ops = filesystem(new FakeImage(1 << 20));
    const [result, stat] = await new Promise<[number, unknown]>((resolve) => ops.getattr!('/disk.raw', (r, s) => resolve([r, s])));
    expect(result).toBe(0);
    expect(stat).toMatchObject({ size: 1 << 20, blocks: 24, mode: 0o100644, nlink: 1 });
    const [, root] = await new Promise<[number, unknown]>((resolve) => ops.getattr!('/', (r, s) => resolve([r, s])));
    expect(root).toMatchObject({ mode: 0o40555 });
  });

  test('driver errors become their errno; anything else EIO, and the next request works', async () => {
    const image = new FakeImage(8192);
    const ops = filesystem(image);
    const buffer = Buffer.alloc(512);
    image.fail = new CorruptImageError('L2 table outside the file');
    expect(await call((done) => ops.read!('/disk.raw', 1, buffer, 512, 0, done))).toBe(-errno.EIO);
    image.fail = Object.assign(new Error('disk full'), { code: 'ENOSPC' });
    expect(await call((done) => ops.write!('/disk.raw', 1, buffer, 512, 0, done))).toBe(-errno.ENOSPC);
    image.fail = new TypeError('a bug');
    expect(await call((done) => ops.read!('/disk.raw', 1, buffer, 512, 0, done))).toBe(-errno.EIO);
    image.fail = 'not even an Error';
    expect(await call((done) => ops.read!('/disk.raw', 1, buffer, 512, 0, done))).toBe(-errno.EIO);
    expect(await call((done) => ops.read!('/disk.raw', 1, buffer, 512, 0, done))).toBe(512);
  });

  test('drain waits for the requests in flight', async () => {
    const image = new FakeImage(8192);
    const ops = filesystem(image);
    image.release = () => undefined;
    const answered = call((done) => ops.write!('/disk.raw', 1, Buffer.alloc(100), 100, 0, done));
    await new Promise((resolve) => setImmediate(resolve));
    expect(ops.fs.requestsInFlight).toBe(1);
    let drained = false;
    const drain = ops.fs.drain().then(() => (drained = true));
    await new Promise((resolve) => setImmediate(resolve));
    expect(drained).toBe(false);
    image.release!();
    expect(await answered).toBe(100);
    await drain;
    expect(ops.fs.requestsInFlight).toBe(0);
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
