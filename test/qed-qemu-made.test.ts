/**
 * QED images made by other qemu-img commands than create + qemu-io: convert
 * from raw (data and holes), resize (a larger image_size over the same L1
 * table), and rebase -u (a new backing name written into the header). Each
 * reads through our library exactly like `qemu-img convert -O raw`.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../src/index.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuIo, readAll, seededBytes, skipWithoutQemu } from './helpers/qemu.js';

const MiB = 1024 * 1024;

async function readsLikeQemu(path: string, dir: string): Promise<void> {
  const expected = await qemuConvertToRaw(path, dir);
  const image = await openImage(path, { readOnly: true });
  try {
    expect(image.length).toBe(expected.length);
    expect((await readAll(image)).equals(expected)).toBe(true);
  } finally {
    await image.close();
  }
}

describe.skipIf(skipWithoutQemu('QED images from other qemu-img commands'))('QED images from other qemu-img commands', () => {
  it('qemu-img convert -O qed of a raw file with data and holes', async () => {
    const dir = await makeTempDir();
    const source = Buffer.alloc(20 * MiB);
    seededBytes(11, 5 * MiB).copy(source, 0);
    seededBytes(12, 2 * MiB).copy(source, 12 * MiB);
    await writeFile(join(dir, 'src.raw'), source);
    await qemuImg(['convert', '-f', 'raw', '-O', 'qed', join(dir, 'src.raw'), join(dir, 'c.qed')]);
    await readsLikeQemu(join(dir, 'c.qed'), dir);
  });

  it('qemu-img resize of a QED image with data near its old end', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'r.qed');
    await qemuImg(['create', '-f', 'qed', path, '10M']);
    await qemuIo(path, ['write -P 3 9M 1M']);
    await qemuImg(['resize', '-f', 'qed', path, '30M']);
    await qemuIo(path, ['write -P 5 29M 512k']);
    await readsLikeQemu(path, dir);
  });

  it('qemu-img rebase -u onto another backing file', async () => {
    const dir = await makeTempDir();
    await qemuImg(['create', '-f', 'raw', join(dir, 'old.raw'), '8M']);
    await writeFile(join(dir, 'new.raw'), seededBytes(13, 8 * MiB));
    const path = join(dir, 'o.qed');
    await qemuImg(['create', '-f', 'qed', '-b', 'old.raw', '-F', 'raw', path]);
    await qemuIo(path, ['write -P 4 1M 64k']);
    await qemuImg(['rebase', '-u', '-f', 'qed', '-b', 'new.raw', '-F', 'raw', path]);
    await readsLikeQemu(path, dir);
  });
});
