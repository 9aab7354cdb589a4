/**
 * The gate every file an image names goes through: backing files and qcow2
 * external data files resolve against the image's directory, absolute names
 * work by default, `allowFiles` confines them to directories, device nodes
 * and json:/URL names are refused, and `info` shows where each resolved.
 */
import { mkdir, rename, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../src/index.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuIo, readAll, skipWithoutQemu } from './helpers/qemu.js';
import { imgmount } from './fuse/fuse-helpers.js';
import { readAt, writeAt } from './helpers/qcow2-layout.js';
import { refusal } from './helpers/refusal.js';

/** A qcow2 in `dir/images` whose external data file is `dataName` (as stored), written by qemu-io. */
async function withDataFile(dataName: string, cwd: string): Promise<{ image: string }> {
  const image = join(cwd, 'images', 'disk.qcow2');
  await mkdir(join(cwd, 'images'), { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${dataName}`, image, '2M'], { cwd: join(cwd, 'images') });
  // qemu resolves a relative data file name against its working directory, not the image's: run it there.
  await qemuIo(image, ['write -P 0x77 4096 100000'], 'qcow2', { cwd: join(cwd, 'images') });
  return { image };
}

describe.skipIf(skipWithoutQemu('the file gate'))('the file gate', () => {
  it('an external data file named relatively resolves next to the image; info shows where, and its size counts in allocatedBytes', async () => {
    const dir = await makeTempDir();
    const { image } = await withDataFile('disk.data', dir);
    const opened = await openImage(image, { readOnly: true });
    try {
      expect((await readAll(opened)).equals(await qemuConvertToRaw(image, dir, 'qcow2', { cwd: join(dir, 'images') }))).toBe(true);
      const info = await opened.info();
      expect(info.files).toEqual([{ role: 'external data file', name: 'disk.data', path: join(dir, 'images', 'disk.data'), actualSize: expect.any(Number) }]);
      expect(await opened.allocatedBytes()).toBe(info.actualSize + info.files![0]!.actualSize);
    } finally {
      await opened.close();
    }
    const json = JSON.parse((await imgmount(['info', '--output=json', image])).stdout) as Record<string, unknown>;
    expect(json.files).toEqual([expect.objectContaining({ role: 'external data file', filename: 'disk.data', 'full-filename': join(dir, 'images', 'disk.data') })]);
  });

  it('absolute names work by default (libvirt writes them); --allow-files confines data and backing files to directories', async () => {
    const dir = await makeTempDir();
    await mkdir(join(dir, 'elsewhere'));
    const dataPath = join(dir, 'elsewhere', 'disk.data');
    const { image } = await withDataFile(dataPath, dir);
    const reference = await qemuConvertToRaw(image, dir, 'qcow2', { cwd: join(dir, 'images') });
    const opened = await openImage(image);
    expect((await readAll(opened)).equals(reference)).toBe(true);
    await opened.close();

    const refused = await refusal(openImage(image, { allowFiles: [join(dir, 'images')] }));
    expect(refused.message).toMatch(/external data file .*disk\.data resolves to .*elsewhere\/disk\.data, outside the allowed directories/);
    expect(refused.message).toMatch(/--allow-files/);
    const allowed = await openImage(image, { allowFiles: [join(dir, 'images'), join(dir, 'elsewhere')] });
    await allowed.close();

    const cli = await imgmount(['info', '--allow-files', join(dir, 'images'), image]);
    expect(cli.code).toBe(1);
    expect(cli.stderr.trim().split('\n')).toHaveLength(1);
    expect(cli.stderr).toMatch(/outside the allowed directories/);

    const base = join(dir, 'elsewhere', 'base.raw');
    await qemuImg(['create', '-q', '-f', 'raw', base, '2M']);
    const top = join(dir, 'images', 'top.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', top]);
    expect((await refusal(openImage(top, { allowFiles: [join(dir, 'images')] }))).message).toMatch(/backing file .*base\.raw resolves to .*, outside the allowed directories/);
  });

  it('a symlink inside an allowed directory that leads outside it is refused (the real path decides)', async () => {
    const dir = await makeTempDir();
    await mkdir(join(dir, 'elsewhere'));
    const { image } = await withDataFile('disk.data', dir);
    await rename(join(dir, 'images', 'disk.data'), join(dir, 'elsewhere', 'disk.data'));
    await symlink(join(dir, 'elsewhere', 'disk.data'), join(dir, 'images', 'disk.data'));
    expect((await refusal(openImage(image, { allowFiles: [join(dir, 'images')] }))).message).toMatch(/outside the allowed directories/);
    const opened = await openImage(image);
    await opened.close();
  });

  it('a data file name that is a device, a json: name or a URL is refused before anything is opened', async () => {
    const dir = await makeTempDir();
    const { image } = await withDataFile('disk.data', dir);
    const first = await readAt(image, 0, 65536);
    const at = first.indexOf(Buffer.from('disk.data'));
    expect(at).toBeGreaterThan(0);
    // same length names, so the extension's length field stays right
    for (const [name, message] of [
      ['/dev/zero', /is a character device, not a regular image file/],
      ['json:{}xx', /uses a protocol other than plain files/],
    ] as const) {
      await writeAt(image, at, Buffer.from(name));
      expect((await refusal(openImage(image))).message).toMatch(message);
    }
  });

  it('a json: backing file name is refused by name', async () => {
    const dir = await makeTempDir();
    const top = join(dir, 'top.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'json:{"file.filename":"/etc/passwd"}', '-F', 'raw', top, '1M']);
    expect((await refusal(openImage(top))).message).toMatch(/backing file 'json:.*' uses a protocol other than plain files/);
  });
});
