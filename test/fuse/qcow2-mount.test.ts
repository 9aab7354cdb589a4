/**
 * qcow2 through a real mount: a read-write mount of an image with an internal
 * snapshot takes dd writes and a whole ext4 file system while the snapshot
 * keeps its bytes (qemu-img check clean afterwards), an internal
 * snapshot mounts with -s (read-only without -r, same file name), -s on a
 * format without snapshots is refused by name, and damaged metadata fails the
 * reads that meet it with EIO while the daemon keeps serving the rest.
 */
import { open, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuConvertToRaw, qemuImg, qemuIo, run } from '../helpers/qemu.js';
import { l2EntryLocation, readBE64, writeBE64 } from '../helpers/qcow2-layout.js';
import { imgmount, isAlive, MiB, MountLab, skipWithoutFuse } from './fuse-helpers.js';

describe.skipIf(skipWithoutFuse('qcow2 through the FUSE mount'))('qcow2 through the FUSE mount', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  async function qcow2WithSnapshot(): Promise<{ image: string; current: Buffer; snapshot: Buffer }> {
    const image = lab.path('disk.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', image, '8M']);
    await qemuIo(image, ['write -P 0x11 0 1M', 'write -P 0x12 5M 100k'], 'qcow2');
    await qemuImg(['snapshot', '-c', 'clean', image]);
    await qemuIo(image, ['write -P 0x21 512k 1M', 'write -z 5M 64k'], 'qcow2');
    const current = await qemuConvertToRaw(image, lab.dir, 'qcow2');
    const snapshot = await qemuConvertToRaw(image, lab.dir, 'qcow2', { snapshot: { name: 'clean' } });
    expect(current.equals(snapshot)).toBe(false);
    return { image, current, snapshot };
  }

  test('a read-write mount takes dd writes and mkfs.ext4 over an image with a snapshot; the snapshot keeps its bytes and qemu-img check is clean', async () => {
    const { image, current, snapshot } = await qcow2WithSnapshot();
    const mnt = await lab.mountpoint();
    const { result } = await lab.mount([image], mnt);
    expect(result.stderr).not.toMatch(/read-only/);
    const file = join(mnt, 'disk.raw');
    expect((await stat(file)).mode & 0o777).toBe(0o644);
    expect((await readFile(file)).equals(current)).toBe(true);
    // Over data shared with the snapshot, over a zero cluster, and over unallocated space.
    const blob = lab.path('blob');
    await writeFile(blob, Buffer.alloc(300 * 1024, 0x5a));
    const expected = Buffer.from(current);
    for (const offset of [700 * 1024, 5 * MiB - 4096, 7 * MiB + 1000]) {
      const dd = await run('dd', [`if=${blob}`, `of=${file}`, 'bs=1k', `seek=${offset}`, 'oflag=seek_bytes', 'conv=notrunc,fsync']);
      expect(dd.code, dd.stderr).toBe(0);
      expected.fill(0x5a, offset, offset + 300 * 1024);
    }
    expect((await readFile(file)).equals(expected)).toBe(true);
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    expect((await run('qemu-img', ['check', image])).code).toBe(0);
    expect((await qemuConvertToRaw(image, lab.dir, 'qcow2')).equals(expected)).toBe(true);
    expect((await qemuConvertToRaw(image, lab.dir, 'qcow2', { snapshot: { name: 'clean' } })).equals(snapshot)).toBe(true);

    await lab.mount([image], mnt);
    const mkfs = await run('mkfs.ext4', ['-q', '-F', file]);
    expect(mkfs.code, mkfs.stderr).toBe(0);
    const fsck = await run('e2fsck', ['-fn', file]);
    expect(fsck.code, fsck.stdout + fsck.stderr).toBe(0);
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    const check = await run('qemu-img', ['check', image]);
    expect(check.code, check.stdout + check.stderr).toBe(0);
    const raw = lab.path('after-mkfs.raw');
    await writeFile(raw, await qemuConvertToRaw(image, lab.dir, 'qcow2'));
    const fsckRaw = await run('e2fsck', ['-fn', raw]);
    expect(fsckRaw.code, fsckRaw.stdout + fsckRaw.stderr).toBe(0);
    expect((await qemuConvertToRaw(image, lab.dir, 'qcow2', { snapshot: { name: 'clean' } })).equals(snapshot)).toBe(true);
  });

  test('-s mounts an internal snapshot read-only under the usual name; -o snapshot= too', async () => {
    const { image, snapshot } = await qcow2WithSnapshot();
    const mnt = await lab.mountpoint();
    await lab.mount(['-s', 'clean', image], mnt);
    expect(await readdir(mnt)).toEqual(['disk.raw']);
    expect((await readFile(join(mnt, 'disk.raw'))).equals(snapshot)).toBe(true);
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    await lab.mount(['-o', 'snapshot=1', image], mnt);
    expect((await readFile(join(mnt, 'disk.raw'))).equals(snapshot)).toBe(true);
  });

  test('-s on a QED image, or a snapshot that does not exist, fails with one line and mounts nothing', async () => {
    const { image } = await qcow2WithSnapshot();
    const qed = lab.path('plain.qed');
    await qemuImg(['create', '-q', '-f', 'qed', qed, '1M']);
    const mnt = await lab.mountpoint();
    for (const [args, message] of [
      [['-s', 'clean', qed], /qed images have no internal snapshots/],
      [['-s', 'nosuch', image], /no snapshot 'nosuch'; the image has 1 \(clean\)/],
    ] as const) {
      const result = await imgmount([...args, mnt]);
      expect(result.code).not.toBe(0);
      expect(result.stderr.trim().split('\n')).toHaveLength(1);
      expect(result.stderr).toMatch(message);
      expect(await readdir(mnt)).toEqual([]);
    }
  });

  test('a damaged L2 entry fails its reads with EIO; the daemon keeps serving every other byte', async () => {
    const image = lab.path('disk.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', image, '4M']);
    await qemuIo(image, ['write -P 0x31 0 4M'], 'qcow2');
    const reference = await qemuConvertToRaw(image, lab.dir, 'qcow2');
    const { l2EntryOffset } = await l2EntryLocation(image, MiB);
    await writeBE64(image, l2EntryOffset, (await readBE64(image, l2EntryOffset)) + 512n);
    const mnt = await lab.mountpoint();
    const { pid, log } = await lab.mount(['-r', image], mnt);
    const file = join(mnt, 'disk.raw');
    const bad = await run('dd', [`if=${file}`, 'of=/dev/null', 'bs=64k', `skip=16`, 'count=1', 'iflag=direct']);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/Input\/output error/);
    const handle = await open(file, 'r');
    try {
      for (const offset of [0, 2 * MiB, 3 * MiB + 4096]) {
        const buffer = Buffer.alloc(64 * 1024);
        await handle.read(buffer, 0, buffer.length, offset);
        expect(buffer.equals(reference.subarray(offset, offset + buffer.length))).toBe(true);
      }
    } finally {
      await handle.close();
    }
    expect(isAlive(pid)).toBe(true);
    expect(await readFile(log, 'utf8')).toMatch(/guest offset 1048576 .* not aligned/);
  });
});
