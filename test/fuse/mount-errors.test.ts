/**
 * A mount that cannot be made fails fast, with exit status 1 and one line on
 * stderr, and leaves nothing behind: no mount, no daemon, no opened image.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuImg, writeU32 } from '../helpers/qemu.js';
import { daemonsFor, imgmount, isImgmountMount, MountLab, skipWithoutFuse } from './fuse-helpers.js';

describe.skipIf(skipWithoutFuse('mounts that cannot be made'))('mounts that cannot be made', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  /** Runs imgmount ARGS, expecting a one-line failure that matches `message`, and nothing left behind. */
  async function expectFailure(args: string[], mountpoint: string, message: RegExp): Promise<void> {
    const started = Date.now();
    const result = await imgmount(args);
    expect(result.stderr).toMatch(/^imgmount: [^\n]+\n$/);
    expect(result.stderr).toMatch(message);
    expect(result.code).toBe(1);
    expect(Date.now() - started).toBeLessThan(5000);
    expect(await isImgmountMount(mountpoint)).toBe(false);
    expect(await daemonsFor(mountpoint)).toEqual([]);
  }

  test('a corrupt image fails the mount fast, naming the problem', async () => {
    const image = lab.path('bad.qed');
    await qemuImg(['create', '-f', 'qed', image, '64M']);
    await writeU32(image, 4, 3); // cluster_size
    const mnt = await lab.mountpoint();
    await expectFailure([image, mnt], mnt, /bad\.qed: QED cluster_size 3 /);
    await expectFailure(['--foreground', image, mnt], mnt, /bad\.qed: QED cluster_size 3 /);
  });

  test('a corrupt second image closes the first one again', async () => {
    const good = lab.path('good.qed');
    await qemuImg(['create', '-f', 'qed', good, '1M']);
    const before = await readFile(good);
    const bad = lab.path('bad.qed');
    await qemuImg(['create', '-f', 'qed', bad, '1M']);
    await writeU32(bad, 0, 0x12345678); // magic: no longer QED, and -f says it must be
    const mnt = await lab.mountpoint();
    await expectFailure(['-f', 'qed', good, bad, mnt], mnt, /bad\.qed/);
    expect((await readFile(good)).equals(before)).toBe(true);
  });

  test('missing or unusable files and mount points', async () => {
    const image = lab.path('disk.img');
    await writeFile(image, Buffer.alloc(65536));
    const mnt = await lab.mountpoint();
    await expectFailure([lab.path('missing.qed'), mnt], mnt, /missing\.qed/);
    await expectFailure([image, lab.path('nowhere')], lab.path('nowhere'), /mount point .*nowhere does not exist/);
    await expectFailure([image, image], image, /is not a directory/);
    await expectFailure(['-f', 'vmdk9', image, mnt], mnt, /unknown format 'vmdk9'/);
    await expectFailure(['--log', lab.path('no', 'such', 'dir.log'), image, mnt], mnt, /cannot open log file/);
  });

  test('a mount point that is not empty, unless -o nonempty', async () => {
    const image = lab.path('disk.img');
    await writeFile(image, Buffer.alloc(65536));
    const mnt = await lab.mountpoint();
    await writeFile(join(mnt, 'something'), 'x');
    await expectFailure([image, mnt], mnt, /is not empty/);
    await lab.mount(['-o', 'nonempty', image], mnt);
    expect(await isImgmountMount(mnt)).toBe(true);
  });

  test('a mount point that is already mounted', async () => {
    const image = lab.path('disk.img');
    await writeFile(image, Buffer.alloc(65536));
    const mnt = await lab.mountpoint();
    const { pid } = await lab.mount([image], mnt);
    const result = await imgmount([image, mnt]);
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/^imgmount: .*mnt is already a mount point \(fuse\.imgmount/);
    expect(await daemonsFor(mnt)).toEqual([pid]);
  });

  test('file names that clash, --name with several images, bad -o options', async () => {
    await mkdir(lab.path('a'));
    await mkdir(lab.path('b'));
    const first = lab.path('a', 'disk.qed');
    const second = lab.path('b', 'disk.img');
    await writeFile(first, Buffer.alloc(65536));
    await writeFile(second, Buffer.alloc(65536));
    const mnt = await lab.mountpoint();
    await expectFailure(['-f', 'raw', first, second, mnt], mnt, /would both appear as disk\.raw/);
    await expectFailure(['--name', 'x.raw', first, second, mnt], mnt, /--name sets the file name of a single image/);
    await expectFailure(['--name', '../x', first, mnt], mnt, /cannot be a file name/);
    await expectFailure(['-o', 'ro,bogus', first, mnt], mnt, /unknown mount option 'bogus'/);
    await expectFailure(['-f', 'raw', '-o', 'format=qed', first, mnt], mnt, /--format raw and -o format=qed disagree/);
    await expectFailure([mnt], mnt, /give at least one IMAGE and the MOUNTPOINT/);
  });
});
