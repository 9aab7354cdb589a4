/**
 * Backing chains, as the generic layer opens them: relative names resolve
 * against the directory of the image that names them (not the cwd);
 * QED_F_BACKING_FORMAT_NO_PROBE means raw even when the bytes look like QED;
 * loops and over-deep chains are refused; backing files are only ever read;
 * a missing backing file is named in the error.
 */
import { copyFile, mkdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockError, MAX_CHAIN_DEPTH, createImage, openImage, type BlockImage } from '../src/index.js';
import {
  makeTempDir, patchBytes, qemuConvertToRaw, qemuImg, qemuInfo, qemuIo, readAll, readU64, run, seededBytes,
  skipWithoutQemu, writeU64, QED_F_BACKING_FILE, QED_F_BACKING_FORMAT_NO_PROBE, QED_F_NEED_CHECK, QED_HEADER,
} from './helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const skipQemu = skipWithoutQemu('backing chains checked against qemu-img');

async function openError(path: string, readOnly = false): Promise<Error> {
  let image: BlockImage;
  try {
    image = await openImage(path, { readOnly });
  } catch (error) {
    return error as Error;
  }
  await image.close();
  throw new Error(`${path} opened, but it should have been refused`);
}

/** Runs `body` with the process's cwd set to `dir`, restoring it after. */
async function inDirectory<T>(dir: string, body: () => Promise<T>): Promise<T> {
  const previous = process.cwd();
  process.chdir(dir);
  try {
    return await body();
  } finally {
    process.chdir(previous);
  }
}

async function readRange(image: BlockImage, offset: number, length: number): Promise<Buffer> {
  const buffer = Buffer.alloc(length);
  await image.read(offset, buffer);
  return buffer;
}

describe('relative backing file names', () => {
  it('resolve against the directory of the image, whatever the cwd', async () => {
    const dir = await makeTempDir();
    const images = join(dir, 'images');
    await mkdir(images);
    const baseContent = seededBytes(1, MiB);
    await writeFile(join(images, 'base.raw'), baseContent);
    // a decoy with the same name next to the cwd: must never be read
    await writeFile(join(dir, 'base.raw'), Buffer.alloc(MiB, 0xdd));
    await createImage(join(images, 'top.qed'), 'qed', { backingFile: 'base.raw', backingFormat: 'raw', options: { cluster_size: '4096' } });

    for (const [cwd, path] of [[dir, 'images/top.qed'], [images, 'top.qed'], [dir, join(images, 'top.qed')]] as const) {
      const image = await inDirectory(cwd, () => openImage(path, { readOnly: true }));
      try {
        expect(image.length).toBe(MiB);
        expect((await readAll(image)).equals(baseContent), `opened as ${path} from ${cwd}`).toBe(true);
        expect((await image.info()).fullBackingFilename).toBe(join(images, 'base.raw'));
      } finally {
        await image.close();
      }
    }
  });

  it('with ../ through two levels, each resolved against its own image', async () => {
    const dir = await makeTempDir();
    await mkdir(join(dir, 'a', 'b'), { recursive: true });
    await mkdir(join(dir, 'c'));
    const baseContent = seededBytes(2, 2 * MiB);
    await writeFile(join(dir, 'c', 'base.raw'), baseContent);
    await createImage(join(dir, 'a', 'mid.qed'), 'qed', { backingFile: '../c/base.raw', backingFormat: 'raw', options: { cluster_size: '4096' } });
    await createImage(join(dir, 'a', 'b', 'top.qed'), 'qed', { backingFile: '../mid.qed', options: { cluster_size: '65536' } });
    const mid = await openImage(join(dir, 'a', 'mid.qed'));
    try {
      await mid.write(5000, Buffer.alloc(3000, 0x4d));
      baseContent.fill(0x4d, 5000, 8000);
    } finally {
      await mid.close();
    }
    const image = await inDirectory(join(dir, 'c'), () => openImage(join('..', 'a', 'b', 'top.qed')));
    try {
      await image.write(100, Buffer.alloc(10, 0x54));
      baseContent.fill(0x54, 100, 110);
      expect((await readAll(image)).equals(baseContent)).toBe(true);
    } finally {
      await image.close();
    }
  });

  it.skipIf(skipQemu)('names stored by qemu-img read the same as qemu-img convert, from another cwd', async () => {
    const dir = await makeTempDir();
    const images = join(dir, 'images');
    await mkdir(images);
    await qemuImg(['create', '-f', 'qed', '-o', 'cluster_size=4096,table_size=2', join(images, 'base.qed'), String(3 * MiB)]);
    await qemuIo(join(images, 'base.qed'), ['write -P 0x61 1000 20000', `write -P 0x62 ${3 * MiB - 4096} 4096`]);
    await qemuImg(['create', '-f', 'qed', '-b', 'base.qed', '-F', 'qed', join(images, 'top.qed'), String(4 * MiB)]);
    await qemuIo(join(images, 'top.qed'), ['write -P 0x63 10000 100']);
    expect((await qemuInfo(join(images, 'top.qed')))['backing-filename']).toBe('base.qed');
    const expected = await qemuConvertToRaw(join(images, 'top.qed'), dir);
    await qemuImg(['create', '-f', 'qed', join(dir, 'base.qed'), String(4 * MiB)]); // decoy in the cwd
    const image = await inDirectory(dir, () => openImage('images/top.qed', { readOnly: true }));
    try {
      expect((await readAll(image)).equals(expected)).toBe(true);
    } finally {
      await image.close();
    }
  });
});

describe('backing names and sizes at the edges', () => {
  it.skipIf(skipQemu)('a relative name longer than one 4 KiB header cluster', async () => {
    const dir = await makeTempDir();
    const parts = Array.from({ length: 16 }, (_, i) => `${String(i).padStart(2, '0')}${'d'.repeat(250)}`); // 4056 bytes with base.raw
    const relative = join(...parts, 'base.raw');
    await mkdir(join(dir, ...parts), { recursive: true });
    const content = seededBytes(21, 256 * KiB);
    await writeFile(join(dir, relative), content);
    const top = join(dir, 'top.qed');
    await createImage(top, 'qed', { backingFile: relative, backingFormat: 'raw', options: { cluster_size: '4096' } });
    const header = await readFile(top);
    expect(header.readUInt32LE(QED_HEADER.headerSize)).toBe(2); // the name spills into a second header cluster
    expect((await qemuInfo(top))['backing-filename']).toBe(relative);
    const image = await openImage(top);
    try {
      await image.write(4090, Buffer.alloc(20, 0x5e));
      content.fill(0x5e, 4090, 4110);
      expect((await readAll(image)).equals(content)).toBe(true);
    } finally {
      await image.close();
    }
    expect((await qemuConvertToRaw(top, dir)).equals(content)).toBe(true);
  });

  it.skipIf(skipQemu)('a raw backing file whose size is not a multiple of 512', async () => {
    const dir = await makeTempDir();
    const backingSize = 1_000_001;
    const content = seededBytes(22, backingSize);
    await writeFile(join(dir, 'base.raw'), content);
    const top = join(dir, 'top.qed');
    await createImage(top, 'qed', { backingFile: 'base.raw', backingFormat: 'raw', options: { cluster_size: '4096' } });
    const image = await openImage(top);
    try {
      expect(image.length).toBe(Math.ceil(backingSize / 512) * 512);
      await image.write(backingSize - 3, Buffer.alloc(2, 0x7f)); // copy-on-write of the cluster holding the odd end
      const expected = Buffer.alloc(image.length);
      content.copy(expected);
      expected.fill(0x7f, backingSize - 3, backingSize - 1);
      expect((await readAll(image)).equals(expected)).toBe(true);
    } finally {
      await image.close();
    }
    const check = await run('qemu-img', ['check', top]);
    expect(check.code, check.stdout + check.stderr).toBe(0);
    const expected = Buffer.alloc(Math.ceil(backingSize / 512) * 512);
    content.copy(expected);
    expected.fill(0x7f, backingSize - 3, backingSize - 1);
    expect((await qemuConvertToRaw(top, dir)).equals(expected)).toBe(true);
  });
});

describe('QED_F_BACKING_FORMAT_NO_PROBE', () => {
  /** A raw backing file whose first bytes are a valid QED header (a QED image used as a raw disk). */
  async function qedLookingRaw(dir: string): Promise<Buffer> {
    const fake = join(dir, 'fake.qed');
    await createImage(fake, 'qed', { size: 8 * MiB, options: { cluster_size: '4096' } });
    const content = Buffer.alloc(MiB);
    (await readFile(fake)).copy(content);
    seededBytes(3, MiB - 64 * KiB).copy(content, 64 * KiB);
    await writeFile(join(dir, 'base.raw'), content);
    return content;
  }

  it('created by this library with backingFormat raw: the backing file is read raw', async () => {
    const dir = await makeTempDir();
    const content = await qedLookingRaw(dir);
    const top = join(dir, 'top.qed');
    await createImage(top, 'qed', { backingFile: 'base.raw', backingFormat: 'raw', options: { cluster_size: '4096' } });
    expect((await readU64(top, QED_HEADER.features)) & QED_F_BACKING_FORMAT_NO_PROBE).toBe(QED_F_BACKING_FORMAT_NO_PROBE);
    const image = await openImage(top);
    try {
      expect(image.length).toBe(MiB); // the raw file's size, not the 8 MiB its QED header claims
      expect(image.backing?.format).toBe('raw');
      await image.write(4000, Buffer.alloc(200, 0x99)); // copy-on-write of a cluster holding the "header"
      content.fill(0x99, 4000, 4200);
      expect((await readAll(image)).equals(content)).toBe(true);
      expect((await readRange(image, 0, 4)).toString('latin1')).toBe('QED\0');
    } finally {
      await image.close();
    }
  });

  it.skipIf(skipQemu)('created by qemu-img -F raw: read raw like qemu does; -F qed probes instead', async () => {
    const dir = await makeTempDir();
    const content = await qedLookingRaw(dir);
    const top = join(dir, 'top.qed');
    await qemuImg(['create', '-f', 'qed', '-o', 'cluster_size=4096', '-b', 'base.raw', '-F', 'raw', top, String(MiB)]);
    expect((await readU64(top, QED_HEADER.features)) & QED_F_BACKING_FORMAT_NO_PROBE).toBe(QED_F_BACKING_FORMAT_NO_PROBE);
    await qemuIo(top, ['write -P 0x77 10 10']);
    content.fill(0x77, 10, 20);
    const expected = await qemuConvertToRaw(top, dir);
    expect(expected.equals(content)).toBe(true);
    let image = await openImage(top, { readOnly: true });
    try {
      expect((await readAll(image)).equals(expected)).toBe(true);
    } finally {
      await image.close();
    }

    // Without the bit the backing file is probed: it is a (empty) QED image then.
    const probed = join(dir, 'probed.qed');
    await qemuImg(['create', '-f', 'qed', '-o', 'cluster_size=4096', '-b', 'base.raw', '-F', 'qed', probed, String(MiB)]);
    expect((await readU64(probed, QED_HEADER.features)) & QED_F_BACKING_FORMAT_NO_PROBE).toBe(0n);
    image = await openImage(probed, { readOnly: true });
    try {
      expect(image.backing?.format).toBe('qed');
      expect((await readAll(image)).equals(await qemuConvertToRaw(probed, dir))).toBe(true);
    } finally {
      await image.close();
    }
  });
});

describe('loops and depth', () => {
  it('a -> b -> a is refused with a message about the loop', async () => {
    const dir = await makeTempDir();
    const a = join(dir, 'a.qed');
    const b = join(dir, 'b.qed');
    await createImage(b, 'qed', { size: MiB });
    await createImage(a, 'qed', { size: MiB, backingFile: 'b.qed', backingFormat: 'qed' });
    await createImage(b, 'qed', { size: MiB, backingFile: 'a.qed', backingFormat: 'qed', force: true });
    for (const path of [a, b]) {
      for (const readOnly of [true, false]) {
        const error = await openError(path, readOnly);
        expect(error).toBeInstanceOf(BlockError);
        expect(error.message).toMatch(/loop/);
        expect(error.message).toContain('a.qed');
        expect(error.message).toContain('b.qed');
      }
    }
    // a refused open leaves no need-check or other change behind
    expect((await readU64(a, QED_HEADER.features)) & QED_F_NEED_CHECK).toBe(0n);
  });

  it('an image naming itself, or a symlink to itself, is a loop', async () => {
    const dir = await makeTempDir();
    const self = join(dir, 'self.qed');
    await createImage(self, 'qed', { size: MiB });
    await createImage(self, 'qed', { size: MiB, backingFile: 'self.qed', backingFormat: 'qed', force: true });
    expect((await openError(self, true)).message).toMatch(/loop/);

    const viaLink = join(dir, 'x.qed');
    await createImage(viaLink, 'qed', { size: MiB });
    await symlink('x.qed', join(dir, 'link.qed'));
    await createImage(viaLink, 'qed', { size: MiB, backingFile: './link.qed', backingFormat: 'qed', force: true });
    expect((await openError(viaLink, true)).message).toMatch(/loop/);
  });

  /**
   * Writes a chain l000.raw <- l001.qed <- ... <- lNNN.qed (names of equal
   * length, so each layer is a copy of one template with the name patched).
   */
  async function buildChain(dir: string, qedLayers: number): Promise<{ top: string; base: Buffer }> {
    const base = seededBytes(4, 64 * KiB);
    await writeFile(join(dir, 'l000.raw'), base);
    const name = (i: number) => `l${String(i).padStart(3, '0')}`;
    const template = join(dir, 'l001.qed');
    await createImage(template, 'qed', { backingFile: 'l000.raw', backingFormat: 'raw', options: { cluster_size: '4096' } });
    const nameOffset = Number((await readFile(template)).readUInt32LE(QED_HEADER.backingFilenameOffset));
    for (let i = 2; i <= qedLayers; i++) {
      const path = join(dir, `${name(i)}.qed`);
      await copyFile(template, path);
      await patchBytes(path, nameOffset, Buffer.from(`${name(i - 1)}.qed`, 'utf8'));
      await writeU64(path, QED_HEADER.features, QED_F_BACKING_FILE); // probe the QED layer below
    }
    return { top: join(dir, `${name(qedLayers)}.qed`), base };
  }

  it(`a chain of MAX_CHAIN_DEPTH (${MAX_CHAIN_DEPTH}) images opens; one more is refused`, async () => {
    const dir = await makeTempDir();
    const { top: deepest, base } = await buildChain(dir, MAX_CHAIN_DEPTH);
    const accepted = join(dir, `l${String(MAX_CHAIN_DEPTH - 1).padStart(3, '0')}.qed`);
    const image = await openImage(accepted);
    try {
      let depth = 0;
      for (let layer: BlockImage | undefined = image; layer; layer = layer.backing) depth += 1;
      expect(depth).toBe(MAX_CHAIN_DEPTH);
      await image.write(10, Buffer.alloc(5, 0xab));
      base.fill(0xab, 10, 15);
      expect((await readAll(image)).equals(base)).toBe(true);
    } finally {
      await image.close();
    }
    const error = await openError(deepest, true);
    expect(error).toBeInstanceOf(BlockError);
    expect(error.message).toMatch(/deep/);
    expect(error.message).toContain(String(MAX_CHAIN_DEPTH));
  });
});

describe('backing files are opened read-only', () => {
  it('writes to the top never change the backing files, even a dirty one or one with autoclear bits', async () => {
    const dir = await makeTempDir();
    const raw = join(dir, 'base.raw');
    const mid = join(dir, 'mid.qed');
    const top = join(dir, 'top.qed');
    const model = Buffer.alloc(6 * MiB);
    seededBytes(5, 2 * MiB + 100).copy(model); // shorter than the chain above it
    await writeFile(raw, model.subarray(0, 2 * MiB + 100));
    await createImage(mid, 'qed', { size: 4 * MiB, backingFile: 'base.raw', backingFormat: 'raw', options: { cluster_size: '4096', table_size: '1' } });
    const midImage = await openImage(mid);
    try {
      await midImage.write(MiB - 10, Buffer.alloc(20000, 0x3c));
      model.fill(0x3c, MiB - 10, MiB - 10 + 20000);
    } finally {
      await midImage.close();
    }
    // the middle layer looks like it crashed, and carries autoclear bits a read-write open would clear
    await writeU64(mid, QED_HEADER.features, QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE | QED_F_NEED_CHECK);
    await writeU64(mid, QED_HEADER.autoclearFeatures, 0x100n);
    await createImage(top, 'qed', { size: 6 * MiB, backingFile: 'mid.qed', backingFormat: 'qed', options: { cluster_size: '65536' } });

    const before = { raw: await readFile(raw), mid: await readFile(mid) };
    const notices: string[] = [];
    const image = await openImage(top, { notice: (line) => notices.push(line) });
    try {
      expect(image.readOnly).toBe(false);
      expect(image.backing?.readOnly).toBe(true);
      expect(image.backing?.backing?.readOnly).toBe(true);
      await expect(image.backing!.write(0, Buffer.alloc(1))).rejects.toMatchObject({ name: 'ReadOnlyError' });
      // partial clusters everywhere: each copies the rest of its cluster up from the chain
      const writes: Array<[number, number]> = [[1, 10], [MiB - 100, 300], [2 * MiB + 50, 100], [4 * MiB - 7, 14], [6 * MiB - 1, 1]];
      let n = 0;
      for (const [offset, length] of writes) {
        const data = seededBytes(100 + n++, length);
        await image.write(offset, data);
        data.copy(model, offset);
      }
      await image.flush();
      expect((await readAll(image)).equals(model)).toBe(true);
    } finally {
      await image.close();
    }
    expect((await readFile(raw)).equals(before.raw)).toBe(true);
    expect((await readFile(mid)).equals(before.mid)).toBe(true);
    expect(notices.filter((line) => line.includes('mid.qed'))).toEqual([]);
  });
});

describe('a missing backing file', () => {
  it('gives an error naming it', async () => {
    const dir = await makeTempDir();
    await mkdir(join(dir, 'sub'));
    const gone = join(dir, 'sub', 'gone.qed');
    await createImage(gone, 'qed', { size: MiB });
    const top = join(dir, 'sub', 'top.qed');
    await createImage(top, 'qed', { backingFile: 'gone.qed', backingFormat: 'qed' });
    await rm(gone);
    for (const readOnly of [true, false]) {
      const error = await inDirectory(dir, () => openError(top, readOnly));
      expect(error).toBeInstanceOf(BlockError);
      expect(error.message).toContain(gone); // the resolved path, so the user knows where it was looked for
      expect((error as BlockError).errno).toBe(osConstants.errno.ENOENT);
      expect(error.message).not.toMatch(/\n/);
    }
    // the top image is left as it was: no need-check, nothing written
    expect((await readU64(top, QED_HEADER.features)) & QED_F_NEED_CHECK).toBe(0n);
  });
});
