/**
 * Reading through a real mount: the raw file holds exactly the guest bytes that
 * `qemu-img convert -O raw` produces (raw images, QED, QED over a raw backing file,
 * QED over a QED chain), sizes and block counts are right, reads stop at the end,
 * and several images share one mount.
 */
import { open, readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qedEntryLocations, qemuConvertToRaw, qemuImg, qemuIo, seededBytes, writeU64 } from '../helpers/qemu.js';
import { imgmount, MiB, MountLab, skipWithoutFuse } from './fuse-helpers.js';

describe.skipIf(skipWithoutFuse('reading through the FUSE mount'))('reading through the FUSE mount', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  test('a raw image reads byte for byte', async () => {
    const content = seededBytes(1, 3 * MiB + 512);
    const image = await lab.file('disk.img', content);
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    expect(await readdir(mnt)).toEqual(['disk.raw']);
    expect((await readFile(join(mnt, 'disk.raw'))).equals(content)).toBe(true);
  });

  test('a QED image written by qemu-io reads like qemu-img convert -O raw', async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', image, '40M']);
    await qemuIo(image, ['write -P 0x11 0 64k', 'write -P 0x22 1000k 300k', 'write -P 0x33 39M 1M', 'write -z 1050k 4k']);
    const expected = await qemuConvertToRaw(image, lab.dir);
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    expect((await readFile(join(mnt, 'disk.raw'))).equals(expected)).toBe(true);
  });

  test('a QED image over a raw backing file reads like qemu-img convert -O raw', async () => {
    const base = await lab.file('base.img', seededBytes(2, 8 * MiB));
    const image = lab.path('top.qed');
    await qemuImg(['create', '-f', 'qed', '-b', base, '-F', 'raw', image]);
    await qemuIo(image, ['write -P 0x44 12345 70000', 'write -P 0x55 7M 1M']);
    const expected = await qemuConvertToRaw(image, lab.dir);
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    expect((await readFile(join(mnt, 'top.raw'))).equals(expected)).toBe(true);
  });

  test('a QED image over a QED backing chain reads like qemu-img convert -O raw', async () => {
    const base = lab.path('base.qed');
    const middle = lab.path('middle.qed');
    const top = lab.path('top.qed');
    await qemuImg(['create', '-f', 'qed', base, '16M']);
    await qemuIo(base, ['write -P 0x01 0 16M']);
    await qemuImg(['create', '-f', 'qed', '-b', base, '-F', 'qed', middle]);
    await qemuIo(middle, ['write -P 0x02 1M 2M', 'write -z 5M 1M']);
    await qemuImg(['create', '-f', 'qed', '-b', middle, '-F', 'qed', top, '20M']);
    await qemuIo(top, ['write -P 0x03 1536k 64k', 'write -P 0x04 18M 1M']);
    const expected = await qemuConvertToRaw(top, lab.dir);
    const mnt = await lab.mountpoint();
    await lab.mount([top], mnt);
    const actual = await readFile(join(mnt, 'top.raw'));
    expect(actual.length).toBe(20 * MiB);
    expect(actual.equals(expected)).toBe(true);
  });

  test('st_size is the virtual size, st_blocks what the image file occupies', async () => {
    const image = lab.path('sparse.qed');
    await qemuImg(['create', '-f', 'qed', image, '1G']);
    await qemuIo(image, ['write -P 0x66 0 2M']);
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    const mounted = await stat(join(mnt, 'sparse.raw'));
    const host = await stat(image);
    expect(mounted.size).toBe(1024 * MiB);
    expect(mounted.blocks).toBe(host.blocks);
    expect(mounted.mode & 0o777).toBe(0o644);
    expect(mounted.uid).toBe(process.getuid?.());
  });

  test('reads are clamped at the end of the file', async () => {
    const image = await lab.file('disk.img', seededBytes(3, MiB));
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    const handle = await open(join(mnt, 'disk.raw'), 'r');
    try {
      const buffer = Buffer.alloc(4096);
      expect((await handle.read(buffer, 0, 4096, MiB - 100)).bytesRead).toBe(100);
      expect((await handle.read(buffer, 0, 4096, MiB)).bytesRead).toBe(0);
      expect((await handle.read(buffer, 0, 4096, MiB + 12345)).bytesRead).toBe(0);
    } finally {
      await handle.close();
    }
  });

  test('several images in one mount, each as its own file', async () => {
    const raw = await lab.file('one.img', seededBytes(4, MiB));
    const qed = lab.path('two.qed');
    await qemuImg(['create', '-f', 'qed', qed, '2M']);
    await qemuIo(qed, ['write -P 0x77 4096 8192']);
    // Converted before the mount: a read-write mount holds QEMU's write lock, as a VM does.
    const expected = await qemuConvertToRaw(qed, lab.dir);
    const mnt = await lab.mountpoint();
    await lab.mount([raw, qed], mnt);
    expect((await readdir(mnt)).sort()).toEqual(['one.raw', 'two.raw']);
    expect((await readFile(join(mnt, 'one.raw'))).equals(await readFile(raw))).toBe(true);
    expect((await readFile(join(mnt, 'two.raw'))).equals(expected)).toBe(true);
  });

  test('--name and -o name= set the file name; -f skips probing', async () => {
    const image = await lab.file('disk.img', seededBytes(5, 65536));
    const first = await lab.mountpoint('first');
    await lab.mount(['--name', 'guest.bin', '-f', 'raw', image], first);
    expect(await readdir(first)).toEqual(['guest.bin']);
    const second = await lab.mountpoint('second');
    await lab.mount(['-o', 'name=other.raw,format=raw,ro', image], second);
    expect(await readdir(second)).toEqual(['other.raw']);
    expect((await stat(join(second, 'other.raw'))).mode & 0o777).toBe(0o444);
  });

  test('a QED image can be mounted as raw with -f raw (its bytes as they are in the file)', async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', image, '1M']);
    const mnt = await lab.mountpoint();
    await lab.mount(['-r', '-f', 'raw', image], mnt);
    expect((await readFile(join(mnt, 'disk.raw'))).equals(await readFile(image))).toBe(true);
  });

  test('a read that meets corrupt metadata fails with EIO, is logged, and the mount stays up', async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', image, '64M']);
    await qemuIo(image, ['write -P 0x01 0 64k', 'write -P 0x02 32M 64k']);
    const { l2EntryOffset } = await qedEntryLocations(image, 32 * MiB);
    await writeU64(image, l2EntryOffset, 12345n); // a misaligned data cluster offset
    const mnt = await lab.mountpoint();
    const { log } = await lab.mount(['-r', image], mnt);
    const handle = await open(join(mnt, 'disk.raw'), 'r');
    try {
      await expect(handle.read(Buffer.alloc(65536), 0, 65536, 32 * MiB)).rejects.toMatchObject({ code: 'EIO' });
      const good = Buffer.alloc(65536);
      await handle.read(good, 0, 65536, 0);
      expect(good.equals(Buffer.alloc(65536, 0x01))).toBe(true);
    } finally {
      await handle.close();
    }
    expect(await readFile(log, 'utf8')).toMatch(/read node 2 \d+@33554432: .*points to 12345/);
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
  });

  test('the mount shows in the mount table with the image as its source', async () => {
    const image = await lab.file('disk.img', Buffer.alloc(65536));
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    const table = await readFile('/proc/self/mountinfo', 'utf8');
    const line = table.split('\n').find((entry) => entry.includes(` ${mnt} `));
    expect(line).toMatch(new RegExp(` - fuse\\.imgmount ${image.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} `));
  });
});
