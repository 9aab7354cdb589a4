/**
 * What the kernel protocol makes possible, through a real mount:
 * - lseek(SEEK_DATA / SEEK_HOLE) answers from the image's map (backing chain
 *   included), so `cp --sparse=always` copies only the allocated parts;
 * - fallocate(PUNCH_HOLE) and ZERO_RANGE make the range read as zeros (also
 *   after unmount), free host space of whole clusters, and keep qemu-img check
 *   clean; fstrim on ext4 in a loop device over the mount frees space in the image.
 */
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuCheck, qemuConvertToRaw, qemuImg, qemuIo, run, seededBytes } from '../helpers/qemu.js';
import { imgmount, MiB, MountLab, skipWithoutFuse } from './fuse-helpers.js';

/** [start, end) of every data segment of `file`, found with SEEK_DATA / SEEK_HOLE (python3's os.lseek). */
async function dataSegments(file: string): Promise<[number, number][]> {
  const script = [
    'import os, sys, json',
    'fd = os.open(sys.argv[1], os.O_RDONLY); size = os.fstat(fd).st_size; out = []; pos = 0',
    'while pos < size:',
    '    try: data = os.lseek(fd, pos, os.SEEK_DATA)',
    '    except OSError: break',
    '    hole = os.lseek(fd, data, os.SEEK_HOLE); out.append([data, hole]); pos = hole',
    'print(json.dumps(out))',
  ].join('\n');
  const result = await run('python3', ['-c', script, file]);
  if (result.code !== 0) throw new Error(`lseek listing failed: ${result.stderr}`);
  return JSON.parse(result.stdout) as [number, number][];
}

/** The ranges qemu-img map says are not zeros, joined. */
async function qemuDataRanges(path: string, format: string): Promise<[number, number][]> {
  const { stdout } = await qemuImg(['map', '-f', format, '--output=json', path]);
  const ranges: [number, number][] = [];
  for (const run of JSON.parse(stdout) as { start: number; length: number; zero: boolean }[]) {
    if (run.zero) continue;
    const last = ranges[ranges.length - 1];
    if (last && last[1] === run.start) last[1] += run.length;
    else ranges.push([run.start, run.start + run.length]);
  }
  return ranges;
}

async function blocksOf(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}

describe.skipIf(skipWithoutFuse('sparse files through the mount', ['python3', 'fallocate']))('sparse files through the mount', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  test('SEEK_DATA / SEEK_HOLE follow qemu-img map (QED over a backing file, qcow2 with zero clusters); cp --sparse copies only the data', async () => {
    const base = lab.path('base.qed');
    await qemuImg(['create', '-q', '-f', 'qed', base, '64M']);
    await qemuIo(base, ['write -P 0x11 40M 1M']);
    const top = lab.path('top.qed');
    await qemuImg(['create', '-q', '-f', 'qed', '-b', base, '-F', 'qed', top]);
    await qemuIo(top, ['write -P 0x22 1M 64k', 'write -P 0x23 10M 4k', 'write -z 40M 64k']);
    const qcow2 = lab.path('disk.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', qcow2, '32M']);
    await qemuIo(qcow2, ['write -P 0x31 0 128k', 'write -z 64k 64k', 'write -P 0x32 20M 1M'], 'qcow2');
    const mnt = await lab.mountpoint();
    await lab.mount(['-r', top, qcow2], mnt);
    for (const [image, format, name] of [[top, 'qed', 'top.raw'], [qcow2, 'qcow2', 'disk.raw']] as const) {
      const file = join(mnt, name);
      expect(await dataSegments(file)).toEqual(await qemuDataRanges(image, format));
      const copy = lab.path(`${name}.copy`);
      expect((await run('cp', ['--sparse=always', file, copy])).code).toBe(0);
      expect((await readFile(copy)).equals(await qemuConvertToRaw(image, lab.dir, format))).toBe(true);
      expect(await blocksOf(copy)).toBeLessThan(4 * MiB);
    }
  });

  test('punching a hole and zeroing a range: zeros through the mount and after unmount, space freed, qemu-img check clean', async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-q', '-f', 'qed', image, '64M']);
    await qemuIo(image, ['write -P 0x41 0 16M']);
    const raw = await lab.file('plain.img', seededBytes(3, 8 * MiB));
    const mnt = await lab.mountpoint();
    await lab.mount(['-f', 'qed', image], mnt);
    const before = await blocksOf(image);
    const file = join(mnt, 'disk.raw');
    expect((await run('fallocate', ['-p', '-o', String(2 * MiB + 100), '-l', String(8 * MiB), file])).code).toBe(0);
    expect((await run('fallocate', ['-z', '-o', String(12 * MiB), '-l', String(1 * MiB), file])).code).toBe(0);
    const seen = await readFile(file);
    const expected = Buffer.alloc(64 * MiB);
    expected.fill(0x41, 0, 16 * MiB);
    expected.fill(0, 2 * MiB + 100, 10 * MiB + 100);
    expected.fill(0, 12 * MiB, 13 * MiB);
    expect(seen.equals(expected)).toBe(true);
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    expect((await qemuConvertToRaw(image, lab.dir)).equals(expected)).toBe(true);
    expect((await qemuCheck(image)).code).toBe(0);
    expect(await blocksOf(image)).toBeLessThanOrEqual(before - 8 * MiB);

    const rawMount = await lab.mountpoint('mnt-raw');
    await lab.mount(['-f', 'raw', raw], rawMount);
    const rawBefore = await blocksOf(raw);
    expect((await run('fallocate', ['-p', '-o', '0', '-l', String(4 * MiB), join(rawMount, 'plain.raw')])).code).toBe(0);
    expect((await readFile(join(rawMount, 'plain.raw'))).subarray(0, 4 * MiB).equals(Buffer.alloc(4 * MiB))).toBe(true);
    expect(await blocksOf(raw)).toBeLessThanOrEqual(rawBefore - 4 * MiB);
  });

  test('allocating fallocate (mode 0) is refused with EOPNOTSUPP, and the mount keeps working', async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-q', '-f', 'qed', image, '8M']);
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    const result = await run('fallocate', ['-o', '0', '-l', '4096', join(mnt, 'disk.raw')]);
    expect(result.code).not.toBe(0);
    expect(result.stderr).toMatch(/Operation not supported/);
    expect((await readFile(join(mnt, 'disk.raw'))).length).toBe(8 * MiB);
  });

  test('fstrim on ext4 in a loop device over the mount frees space in the image', { timeout: 60_000 }, async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-q', '-f', 'qed', image, '256M']);
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    const device = await lab.loop(join(mnt, 'disk.raw'));
    expect((await run('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', device])).code).toBe(0);
    const fsDir = await lab.mountpoint('ext4');
    expect((await run('mount', [device, fsDir])).code).toBe(0);
    lab.track(fsDir);
    expect((await run('dd', ['if=/dev/urandom', `of=${join(fsDir, 'big')}`, 'bs=1M', 'count=64', 'conv=fsync', 'status=none'])).code).toBe(0);
    await run('sync', []);
    const full = await blocksOf(image);
    await run('rm', [join(fsDir, 'big')]);
    await run('sync', []);
    const trim = await run('fstrim', ['-v', fsDir]);
    expect(trim.code, trim.stderr).toBe(0);
    await run('sync', []);
    expect(await blocksOf(image)).toBeLessThanOrEqual(full - 48 * MiB);
    expect((await run('umount', [fsDir])).code).toBe(0);
    expect((await run('e2fsck', ['-fn', device])).code).toBe(0);
    await lab.unloop(device);
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    expect((await qemuCheck(image)).code).toBe(0);
  });
});
