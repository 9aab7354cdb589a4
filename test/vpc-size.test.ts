/**
 * The virtual size of a VHD: from the CHS geometry or from current_size,
 * decided by the creator application as qemu does, or by hand with qemu's
 * open option force_size_calc=chs|current_size (formatOptions here,
 * `--image-opts driver=vpc,force_size_calc=...` for qemu, the oracle). Images
 * are qemu's with the creator and the geometry patched in both footer copies.
 */
import { mkdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../src/index.js';
import { makeTempDir, qemuImg, qemuInfo } from './helpers/qemu.js';
import { imgmount, isImgmountMount } from './fuse/fuse-helpers.js';
import { patchFooter } from './helpers/vhd-layout.js';

const M = 1024 * 1024;

async function qemuSize(path: string, force?: string): Promise<number> {
  if (force === undefined) return (await qemuInfo(path, 'vpc'))['virtual-size'] as number;
  const { stdout } = await qemuImg(['info', '--output=json', '--image-opts', `driver=vpc,force_size_calc=${force},file.driver=file,file.filename=${path}`]);
  return (JSON.parse(stdout) as Record<string, number>)['virtual-size']!;
}

async function oursSize(path: string, force?: string): Promise<number> {
  const image = await openImage(path, { readOnly: true, formatOptions: force === undefined ? undefined : { force_size_calc: force } });
  try {
    return image.length;
  } finally {
    await image.close();
  }
}

describe('VHD virtual size: by creator application, or forced with force_size_calc, like qemu', () => {
  const creators = ['vpc ', 'qemu', 'win ', 'qem2', 'd2v ', 'CTXS', 'tap\0', 'VBox'];
  for (const subformat of ['dynamic', 'fixed']) {
    it(`${subformat}: creators ${creators.map((c) => JSON.stringify(c)).join(', ')} x default, chs, current_size`, { timeout: 60_000 }, async () => {
      const dir = await makeTempDir();
      for (const [i, creator] of creators.entries()) {
        const path = join(dir, `c${i}.vhd`);
        await qemuImg(['create', '-q', '-f', 'vpc', '-o', `subformat=${subformat},force_size=on`, path, String(30 * M)]);
        await patchFooter(path, 28, Buffer.from(creator, 'latin1'));
        const chs = Buffer.alloc(4);
        chs.writeUInt16BE(200, 0);
        chs.writeUInt8(16, 2);
        chs.writeUInt8(17, 3);
        await patchFooter(path, 56, chs);
        const seen: number[] = [];
        for (const force of [undefined, 'chs', 'current_size']) {
          const theirs = await qemuSize(path, force);
          expect(await oursSize(path, force), `${JSON.stringify(creator)}, force_size_calc=${force}`).toBe(theirs);
          seen.push(theirs);
        }
        // the geometry gives 200*16*17 sectors, current_size 30 MiB: both rules were exercised
        expect(seen.slice(1)).toEqual([200 * 16 * 17 * 512, 30 * M]);
      }
    });
  }

  it('the command line: --open-option force_size_calc=... on info, map, convert and the mount; a bad one is one line', { timeout: 60_000 }, async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.vhd');
    await qemuImg(['create', '-q', '-f', 'vpc', '-o', 'force_size=on', path, String(30 * M)]);
    await patchFooter(path, 28, Buffer.from('vpc ', 'latin1')); // Virtual PC: the geometry counts by default
    const chs = Buffer.alloc(4);
    chs.writeUInt16BE(200, 0);
    chs.writeUInt8(16, 2);
    chs.writeUInt8(17, 3);
    await patchFooter(path, 56, chs);
    const bySize = 30 * M;
    expect(await qemuSize(path, 'current_size')).toBe(bySize);
    const info = await imgmount(['info', '--output=json', '--open-option', 'force_size_calc=current_size', path]);
    expect(info.code, info.stderr).toBe(0);
    expect((JSON.parse(info.stdout) as { 'virtual-size': number })['virtual-size']).toBe(bySize);
    const plain = await imgmount(['info', '--output=json', path]);
    expect((JSON.parse(plain.stdout) as { 'virtual-size': number })['virtual-size']).toBe(200 * 16 * 17 * 512);
    const map = await imgmount(['map', '--output=json', '--open-option', 'force_size_calc=current_size', path]);
    expect(map.code, map.stderr).toBe(0);
    const runs = JSON.parse(map.stdout) as { start: number; length: number }[];
    expect(runs.at(-1)!.start + runs.at(-1)!.length).toBe(bySize);
    const raw = join(dir, 'disk.raw');
    const converted = await imgmount(['convert', '-O', 'raw', '--open-option', 'force_size_calc=current_size', path, raw]);
    expect(converted.code, converted.stderr).toBe(0);
    expect((await stat(raw)).size).toBe(bySize);
    const mnt = join(dir, 'mnt');
    await mkdir(mnt);
    const mounted = await imgmount(['--open-option', 'force_size_calc=current_size', '-r', path, mnt]);
    expect(mounted.code, mounted.stderr).toBe(0);
    try {
      expect(await isImgmountMount(mnt)).toBe(true);
      expect((await stat(join(mnt, 'disk.raw'))).size).toBe(bySize);
    } finally {
      await imgmount(['unmount', mnt]);
    }
    for (const [args, message] of [
      [['info', '--open-option', 'force_size_calc', path], /^imgmount: --open-option force_size_calc: give KEY=VALUE/],
      [['info', '--open-option', 'force_size=on', path], /unknown vpc open option force_size; vpc takes force_size_calc/],
      [['info', '--open-option', 'force_size_calc=chs', '--open-option', 'force_size_calc=chs', path], /--open-option force_size_calc is given twice/],
    ] as const) {
      const refused = await imgmount(args);
      expect(refused.code, refused.stderr).toBe(1);
      expect(refused.stderr).toMatch(message);
      expect(refused.stderr.trimEnd().split('\n')).toHaveLength(1);
    }
  });

  it('a bad value, and an open option of a format that takes none, are refused by name', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'd.vhd');
    await qemuImg(['create', '-q', '-f', 'vpc', path, String(4 * M)]);
    await expect(oursSize(path, 'geometry')).rejects.toThrow("force_size_calc 'geometry' is not chs or current_size");
    await expect(openImage(path, { formatOptions: { force_size: 'on' } })).rejects.toThrow(`${path}: unknown vpc open option force_size; vpc takes force_size_calc`);
    const qed = join(dir, 'd.qed');
    await qemuImg(['create', '-q', '-f', 'qed', qed, String(4 * M)]);
    await expect(openImage(qed, { formatOptions: { force_size_calc: 'chs' } })).rejects.toThrow(`${qed}: unknown qed open option force_size_calc; qed takes none`);
  });
});
