/**
 * VHDX through a real mount, read-write: an image made by `imgmount create -f
 * vhdx` takes unaligned dd writes (allocating blocks, and in place); after
 * unmount qemu-img compare with the raw reference says identical and
 * qemu-img check is clean. An image with a log left to replay (the test
 * writer's) mounted read-write is replayed on disk, and the mount says so.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuCheck, run, seededBytes } from '../helpers/qemu.js';
import { STATE, writeVhdx, type BlockSpec } from '../helpers/vhdx-writer.js';
import { imgmount, MiB, MountLab, skipWithoutFuse } from './fuse-helpers.js';

async function ddWrite(dir: string, file: string, offset: number, data: Buffer): Promise<void> {
  const blob = join(dir, `blob-${offset}-${data.length}`);
  await writeFile(blob, data);
  const result = await run('dd', [`if=${blob}`, `of=${file}`, `bs=${data.length}`, `seek=${offset}`, 'oflag=seek_bytes', 'conv=notrunc,fsync', 'status=none']);
  if (result.code !== 0) throw new Error(`dd at ${offset}: ${result.stderr}`);
}

describe.skipIf(skipWithoutFuse('VHDX through the FUSE mount'))('VHDX through the FUSE mount', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  test('dd writes into an image imgmount created: after unmount qemu-img compare is identical and check clean', { timeout: 120_000 }, async () => {
    const image = lab.path('disk.vhdx');
    const made = await imgmount(['create', '-f', 'vhdx', '-o', 'block_size=1M', image, '12M']);
    expect(made.code, made.stderr).toBe(0);
    const reference = Buffer.alloc(12 * MiB);
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    const writes: Array<[number, number]> = [[0, 1], [511, 2], [MiB - 3000, 6000], [3 * MiB + 17, 1_000_000], [12 * MiB - 12_345, 12_345], [100, 5000]];
    for (const [index, [offset, length]] of writes.entries()) {
      const data = seededBytes(300 + index, length);
      await ddWrite(lab.dir, join(mnt, 'disk.raw'), offset, data);
      data.copy(reference, offset);
    }
    expect((await readFile(join(mnt, 'disk.raw'))).equals(reference)).toBe(true);
    const unmounted = await imgmount(['unmount', mnt]);
    expect([unmounted.code, unmounted.stderr]).toEqual([0, '']);
    const referenceFile = await lab.file('reference.raw', reference);
    const compare = await run('qemu-img', ['compare', '-f', 'vhdx', '-F', 'raw', image, referenceFile]);
    expect(compare.code, compare.stdout + compare.stderr).toBe(0);
    const check = await qemuCheck(image, 'vhdx');
    expect(check.code, check.stdout + check.stderr).toBe(0);
  });

  test('a log left to replay is replayed on disk by a read-write mount, which says so; qemu then opens the image read-only', { timeout: 120_000 }, async () => {
    const image = lab.path('log.vhdx');
    const blocks = new Map<number, BlockSpec>([
      [0, { state: STATE.FULLY_PRESENT, data: seededBytes(1, MiB) }],
      [2, { state: STATE.FULLY_PRESENT, data: seededBytes(2, MiB), logged: true }],
    ]);
    const { replayed } = await writeVhdx(image, { virtualSize: 4 * MiB, blockSize: MiB, blocks, log: {} });
    expect((await run('qemu-img', ['info', '-f', 'vhdx', image])).stderr).toMatch(/log that needs to be replayed/);
    const mnt = await lab.mountpoint();
    const { result, log } = await lab.mount([image], mnt);
    const said = result.stderr + (await readFile(log, 'utf8'));
    expect(said).toMatch(/replayed on disk for this read-write open/);
    const mounted = await readFile(join(mnt, 'log.raw'));
    expect(mounted.subarray(2 * MiB, 3 * MiB).equals(seededBytes(2, MiB))).toBe(true);
    const unmounted = await imgmount(['unmount', mnt]);
    expect(unmounted.code, unmounted.stderr).toBe(0);
    expect((await run('qemu-img', ['info', '-f', 'vhdx', image])).code).toBe(0);
    const replayedFile = await lab.file('replayed.vhdx', replayed);
    const compare = await run('qemu-img', ['compare', '-f', 'vhdx', '-F', 'vhdx', image, replayedFile]);
    expect(compare.code, compare.stdout + compare.stderr).toBe(0);
  });
});
