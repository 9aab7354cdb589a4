/**
 * qcow2 through a real mount: a qcow2 image asked for read-write is mounted
 * read-only with a notice (writing qcow2 is not supported yet), an internal
 * snapshot mounts with -s (read-only without -r, same file name), -s on a
 * format without snapshots is refused by name, and damaged metadata fails the
 * reads that meet it with EIO while the daemon keeps serving the rest.
 */
import { open, readFile, readdir, stat } from 'node:fs/promises';
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

  test('a read-write mount of qcow2 is read-only with a notice; the bytes are the image\'s', async () => {
    const { image, current } = await qcow2WithSnapshot();
    const before = await readFile(image);
    const mnt = await lab.mountpoint();
    const { result } = await lab.mount([image], mnt);
    expect(result.stderr).toMatch(/opened read-only: writing qcow2 images is not supported yet/);
    const file = join(mnt, 'disk.raw');
    expect((await stat(file)).mode & 0o777).toBe(0o444);
    expect((await readFile(file)).equals(current)).toBe(true);
    const dd = await run('dd', ['if=/dev/zero', `of=${file}`, 'bs=4k', 'count=1', 'conv=notrunc']);
    expect(dd.code).not.toBe(0);
    expect(dd.stderr).toMatch(/Read-only file system|Permission denied/);
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    expect((await readFile(image)).equals(before)).toBe(true);
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
