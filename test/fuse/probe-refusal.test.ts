/**
 * Probing refusals through a real mount: an image probed as raw refuses (EPERM,
 * dd says "Operation not permitted") a write that would make it probe as
 * another format next time, and leaves the file as it was; `-f raw` lets the
 * same write through. An image we recognize but cannot read (a VHD with a
 * 511-byte footer) is not mounted: one line naming it, a non-zero exit,
 * nothing left behind.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuImg, qemuInfo, run, seededBytes, type RunResult } from '../helpers/qemu.js';
import { daemonsFor, imgmount, isImgmountMount, MiB, MountLab, skipWithoutFuse } from './fuse-helpers.js';

describe.skipIf(skipWithoutFuse('probing refusals through the mount', ['dd', 'cmp']))('probing refusals through the mount', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  /** dd of `count` blocks of `bs` bytes from `input` onto `output` at byte `offset`, as a user would. */
  function dd(input: string, output: string, offset: number, bs: number): Promise<RunResult> {
    return run('dd', [`if=${input}`, `of=${output}`, `bs=${bs}`, 'count=1', `seek=${offset}`, 'oflag=seek_bytes', 'conv=notrunc,fsync', 'status=none']);
  }

  async function unmount(mnt: string): Promise<void> {
    const result = await imgmount(['unmount', mnt]);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
  }

  test('dd of a qcow2 header or a VHD footer onto a probed-raw mount fails with EPERM and changes nothing; with -f raw it lands', async () => {
    const size = 4 * MiB;
    const content = seededBytes(31, size);
    const image = await lab.file('file.img', content);
    const original = await lab.file('original.img', content);
    const qcow2 = lab.path('header.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', qcow2, '1G']);
    const footer = await lab.file('footer', Buffer.from('conectix', 'latin1'));
    const ordinary = await lab.file('ordinary', seededBytes(32, 4096));

    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    const raw = join(mnt, 'file.raw');
    const refusedHeader = await dd(qcow2, raw, 0, 512);
    expect(refusedHeader.stderr).toContain('Operation not permitted');
    expect(refusedHeader.code).not.toBe(0);
    const refusedFooter = await dd(footer, raw, size - 512, 8);
    expect(refusedFooter.stderr).toContain('Operation not permitted');
    expect(refusedFooter.code).not.toBe(0);
    // Ordinary writes, at the head too, go through.
    const accepted = await dd(ordinary, raw, 1 * MiB, 4096);
    expect(accepted.stderr).toBe('');
    expect(accepted.code).toBe(0);
    expect((await dd('/dev/zero', raw, 0, 4096)).code).toBe(0);
    await unmount(mnt);
    seededBytes(32, 4096).copy(content, 1 * MiB);
    content.fill(0, 0, 4096);
    await writeFile(original, content);
    const cmp = await run('cmp', [image, original]);
    expect(cmp.stdout + cmp.stderr).toBe('');
    expect(cmp.code).toBe(0);
    expect((await qemuInfo(image)).format).toBe('raw');

    // With -f raw the user said what the file is: the same write lands, and the file is now a qcow2 header.
    await lab.mount(['-f', 'raw', image], mnt);
    const written = await dd(qcow2, raw, 0, 512);
    expect(written.stderr).toBe('');
    expect(written.code).toBe(0);
    await unmount(mnt);
    expect((await run('cmp', ['-n', '512', qcow2, image])).code).toBe(0);
    expect((await qemuInfo(image)).format).toBe('qcow2');
    expect((await readFile(image)).subarray(512).equals(content.subarray(512))).toBe(true);
  });

  // vpc is readable now (src/formats/vpc); a fixed VHD with a 511-byte footer (Virtual PC before 2004) is still refused by name.
  test('an old VHD (511-byte footer) is not mounted without -f: one line naming it, non-zero exit, nothing mounted, under any name', async () => {
    const vhd = lab.path('disk.vhd');
    await qemuImg(['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', vhd, '4M']);
    const full = await readFile(vhd);
    await writeFile(vhd, full.subarray(0, full.length - 1));
    const neutral = lab.path('disk.img');
    await writeFile(neutral, await readFile(vhd));
    const mnt = await lab.mountpoint();
    for (const [path, foreground] of [
      [vhd, false],
      [vhd, true],
      [neutral, false],
    ] as const) {
      const result = await imgmount([...(foreground ? ['--foreground'] : []), path, mnt]);
      expect(result.stderr).toMatch(/^imgmount: [^\n]+\n$/);
      expect(result.stderr).toContain(`${path}: a 511-byte VHD footer (Virtual PC before 2004) is not supported`);
      expect(result.code).not.toBe(0);
      expect(await isImgmountMount(mnt)).toBe(false);
      expect(await daemonsFor(mnt)).toEqual([]);
    }
    // -f raw is the user's explicit choice: the container file itself is mounted.
    await lab.mount(['-r', '-f', 'raw', vhd], mnt);
    expect((await readFile(join(mnt, 'disk.raw'))).equals(await readFile(vhd))).toBe(true);
    await unmount(mnt);
  });
});
