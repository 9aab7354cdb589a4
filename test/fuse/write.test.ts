/**
 * Writing through a real mount: unaligned dd writes with conv=notrunc,fsync end up
 * in the image exactly (qemu-img compare against a raw reference, qemu-img check
 * clean, need-check clear after unmount); fsync makes data and metadata durable
 * while mounted; writes past the end, resizing, and read-only mounts are refused
 * with the documented errno; the kernel sends 1 MiB requests.
 */
import { open, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuCheck, qemuConvertToRaw, qemuImg, qemuIo, run, seededBytes, type RunResult } from '../helpers/qemu.js';
import { imgmount, MiB, MountLab, needCheck, skipWithoutFuse } from './fuse-helpers.js';

/** dd of `data` (from a file in `dir`) at byte `offset` of `file`, like a user would. */
async function ddWrite(dir: string, file: string, offset: number, data: Buffer, conv = 'notrunc,fsync'): Promise<void> {
  const blob = join(dir, `blob-${offset}-${data.length}`);
  await writeFile(blob, data);
  const result = await run('dd', [`if=${blob}`, `of=${file}`, `bs=${data.length}`, `seek=${offset}`, 'oflag=seek_bytes', `conv=${conv}`, 'status=none']);
  if (result.code !== 0) throw new Error(`dd at ${offset}: ${result.stderr}`);
}

/** dd of `count` zero blocks of `bs` bytes at block `seek`; returns dd's result. */
function ddZeros(file: string, bs: number, seek: number, conv: string): Promise<RunResult> {
  return run('dd', ['if=/dev/zero', `of=${file}`, `bs=${bs}`, 'count=1', `seek=${seek}`, ...(conv ? [`conv=${conv}`] : []), 'status=none']);
}

const UNALIGNED_WRITES: readonly [offset: number, length: number][] = [
  [0, 1],
  [511, 2],
  [4095, 4097],
  [65536 - 3, 200_000],
  [3 * MiB + 17, 1_000_000],
  [10 * MiB - 12_345, 12_345],
  [7 * MiB + 65_536 * 3 + 1, 131_071],
];

describe.skipIf(skipWithoutFuse('writing through the FUSE mount'))('writing through the FUSE mount', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  test('unaligned dd writes, then unmount: qemu-img compare and check are clean, need-check is clear', async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', '-o', 'cluster_size=65536', image, '10M']);
    await qemuIo(image, ['write -P 0x5a 1M 512k']);
    const reference = await qemuConvertToRaw(image, lab.dir);
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    for (const [index, [offset, length]] of UNALIGNED_WRITES.entries()) {
      const data = seededBytes(100 + index, length);
      await ddWrite(lab.dir, join(mnt, 'disk.raw'), offset, data);
      data.copy(reference, offset);
    }
    expect((await readFile(join(mnt, 'disk.raw'))).equals(reference)).toBe(true);
    const unmounted = await imgmount(['unmount', mnt]);
    expect(unmounted.stderr).toBe('');
    expect(unmounted.code).toBe(0);

    expect(await needCheck(image)).toBe(false);
    const referenceFile = await lab.file('reference.raw', reference);
    const compare = await run('qemu-img', ['compare', '-f', 'qed', '-F', 'raw', image, referenceFile]);
    expect(compare.stdout + compare.stderr).toContain('Images are identical');
    expect(compare.code).toBe(0);
    const check = await qemuCheck(image);
    expect(check.stdout).toContain('No errors were found');
    expect(check.code).toBe(0);
  });

  test('the same writes to a raw image land in the file', async () => {
    const reference = seededBytes(7, 12 * MiB);
    const image = await lab.file('disk.img', reference);
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    for (const [index, [offset, length]] of UNALIGNED_WRITES.entries()) {
      const data = seededBytes(200 + index, length);
      await ddWrite(lab.dir, join(mnt, 'disk.raw'), offset, data);
      data.copy(reference, offset);
    }
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    expect((await readFile(image)).equals(reference)).toBe(true);
  });

  test('after fsync the data and its metadata are in the image file while it is still mounted', async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', image, '8M']);
    const mnt = await lab.mountpoint();
    // --idle-clean 0: need-check stays set until the unmount, however slow this machine is.
    await lab.mount(['--idle-clean', '0', image], mnt);
    const data = seededBytes(8, 300_000);
    await ddWrite(lab.dir, join(mnt, 'disk.raw'), 2 * MiB + 3, data);
    // qemu-img reads the file as it is on disk now, need-check still set (-U: no locking).
    const converted = lab.path('converted.raw');
    await qemuImg(['convert', '-U', '-f', 'qed', '-O', 'raw', image, converted]);
    expect((await readFile(converted)).subarray(2 * MiB + 3, 2 * MiB + 3 + data.length).equals(data)).toBe(true);
    expect(await needCheck(image)).toBe(true);
  });

  test('a write at the end fails with ENOSPC; one across the end is short', async () => {
    const image = await lab.file('disk.img', Buffer.alloc(MiB));
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    const handle = await open(join(mnt, 'disk.raw'), 'r+');
    try {
      await expect(handle.write(Buffer.alloc(10, 1), 0, 10, MiB)).rejects.toMatchObject({ code: 'ENOSPC' });
      const { bytesWritten } = await handle.write(Buffer.alloc(8192, 2), 0, 8192, MiB - 4096);
      expect(bytesWritten).toBe(4096);
      expect((await handle.stat()).size).toBe(MiB);
    } finally {
      await handle.close();
    }
    const dd = await ddZeros(join(mnt, 'disk.raw'), 4096, MiB / 4096, 'notrunc');
    expect(dd.code).not.toBe(0);
    expect(dd.stderr).toMatch(/No space left on device/);
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    expect((await readFile(image)).subarray(MiB - 4096).equals(Buffer.alloc(4096, 2))).toBe(true);
  });

  test('truncating to the current size succeeds, O_TRUNC opens (dd, cp) leave the disk as is; other sizes fail with EINVAL and a log line', async () => {
    const image = await lab.file('disk.img', Buffer.alloc(MiB));
    const mnt = await lab.mountpoint();
    const { log } = await lab.mount([image], mnt);
    const file = join(mnt, 'disk.raw');
    expect((await run('truncate', ['-s', String(MiB), file])).code).toBe(0);
    const shrink = await run('truncate', ['-s', '4096', file]);
    expect(shrink.stderr).toMatch(/Invalid argument/);
    const grow = await run('truncate', ['-s', String(2 * MiB), file]);
    expect(grow.stderr).toMatch(/Invalid argument/);
    // dd without conv=notrunc: with seek it truncates to the seek offset (coreutils 9 warns and
    // writes anyway); without seek it opens with O_TRUNC, which leaves the disk as it is (as for
    // a block device), so plain dd and cp work.
    const seeking = await ddZeros(file, 512, 1, '');
    expect(seeking.stderr).toMatch(/failed to truncate to 512 bytes.*Invalid argument/);
    await writeFile(lab.path('ones'), Buffer.alloc(4096, 1));
    const truncating = await run('dd', [`if=${lab.path('ones')}`, `of=${file}`, 'bs=4096', 'status=none']);
    expect(truncating).toMatchObject({ code: 0, stderr: '' });
    expect((await stat(file)).size).toBe(MiB);
    await writeFile(lab.path('twos'), Buffer.alloc(8192, 2));
    expect(await run('cp', [lab.path('twos'), file])).toMatchObject({ code: 0, stderr: '' });
    const head = await readFile(file);
    expect(head.length).toBe(MiB);
    expect(head.subarray(0, 8192).equals(Buffer.alloc(8192, 2))).toBe(true);
    expect(head.subarray(8192).equals(Buffer.alloc(MiB - 8192))).toBe(true);
    expect(await readFile(log, 'utf8')).toMatch(/refusing to resize disk\.raw from 1048576 to 4096 bytes/);
  });

  test('a read-only mount refuses writes with EROFS and leaves the image untouched', async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', image, '4M']);
    await qemuIo(image, ['write -P 0x42 0 64k']);
    const before = await readFile(image);
    for (const [name, options] of [['r', ['-r']], ['o', ['-o', 'ro']], ['long', ['--read-only']]] as const) {
      const mnt = await lab.mountpoint(`mnt-${name}`);
      await lab.mount([...options, image], mnt);
      const file = join(mnt, 'disk.raw');
      expect((await stat(file)).mode & 0o777).toBe(0o444);
      await expect(open(file, 'r+')).rejects.toMatchObject({ code: 'EROFS' });
      await expect(writeFile(file, 'x', { flag: 'r+' })).rejects.toMatchObject({ code: 'EROFS' });
      const dd = await ddZeros(file, 512, 0, 'notrunc');
      expect(dd.stderr).toMatch(/Read-only file system/);
      expect((await readFile(file)).subarray(0, 65536).equals(Buffer.alloc(65536, 0x42))).toBe(true);
      expect((await imgmount(['unmount', mnt])).code).toBe(0);
    }
    expect((await readFile(image)).equals(before)).toBe(true);
  });

  test('an image file that cannot be written is mounted read-only, with a notice', async () => {
    const dir = lab.path('ro');
    await run('mkdir', [dir]);
    const image = join(dir, 'disk.img');
    await writeFile(image, seededBytes(9, MiB));
    // A read-only bind mount: even root cannot open the file for writing.
    expect((await run('mount', ['--bind', dir, dir])).code).toBe(0);
    lab.track(dir);
    expect((await run('mount', ['-o', 'remount,bind,ro', dir])).code).toBe(0);
    const mnt = await lab.mountpoint();
    const { result } = await lab.mount([image], mnt);
    expect(result.stderr).toMatch(/not writable.*mounting it read-only/);
    await expect(open(join(mnt, 'disk.raw'), 'r+')).rejects.toMatchObject({ code: 'EROFS' });
    expect((await readFile(join(mnt, 'disk.raw'))).equals(await readFile(image))).toBe(true);
  });

  test('the kernel sends requests of 1 MiB (FUSE_MAX_PAGES), not 4 KiB or 128 KiB pieces', async () => {
    const image = await lab.file('disk.img', Buffer.alloc(4 * MiB));
    const mnt = await lab.mountpoint();
    const { log } = await lab.mount(['-d', image], mnt);
    const data = seededBytes(10, 2 * MiB);
    await ddWrite(lab.dir, join(mnt, 'disk.raw'), 0, data, 'notrunc');
    const back = await run('dd', [`if=${join(mnt, 'disk.raw')}`, 'of=/dev/null', 'bs=1M', 'count=2', 'iflag=direct', 'status=none']);
    expect(back.code).toBe(0);
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    const text = await readFile(log, 'utf8');
    const sizes = (kind: string) => [...text.matchAll(new RegExp(`${kind} node 2 (\\d+)@\\d+ -> `, 'g'))].map((match) => Number(match[1]));
    expect(Math.max(...sizes('write'))).toBe(MiB);
    expect(sizes('write').length).toBeLessThanOrEqual(2 + 2);
    expect(Math.max(...sizes('read'))).toBe(MiB);
  });
});
