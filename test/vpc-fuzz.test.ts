/**
 * Seeded random damage to the metadata of VHDs qemu made (the footer copies,
 * the dynamic header, the BAT) and of a differencing VHD (its locators too):
 * whatever the damage, opening either fails with one BlockError (a message
 * naming the file), or the image opens and every read either succeeds or fails
 * with a BlockError; never another exception, and never a read outside the
 * file. When both qemu and imgmount read a damaged image whole, they must
 * read the same bytes (qemu 7.2 cannot read differencing disks; those are
 * only checked for not crashing).
 */
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockError, BlockImage, openImage } from '../src/index.js';
import { ImageFileGate } from '../src/block/gate.js';
import { vpc } from '../src/formats/vpc/index.js';
import { makeTempDir, qemuImg, qemuIo, readAll, run, spyProtocol, type SpyProtocol } from './helpers/qemu.js';
import { seededRandom } from './helpers/random.js';
import { footerIdentity, SECTOR, writeSparseVhd } from './helpers/vhd-layout.js';

const M = 1024 * 1024;

interface Outcome {
  opened: boolean;
  read?: Buffer;
}

/**
 * Opens like openImage; images without a parent are opened over a spying
 * protocol, so a read past the end of the file (which would read zeros the
 * image does not hold) fails the test.
 */
async function tryImgmount(path: string, withParent = false): Promise<Outcome> {
  let image: BlockImage;
  let spy: SpyProtocol | undefined;
  try {
    if (withParent) {
      image = await openImage(path, { readOnly: true, format: 'vpc' });
    } else {
      spy = await spyProtocol(path, true);
      const files = new ImageFileGate(path, {}, false);
      const opened = await vpc.open(spy, { readOnly: true, files }).catch(async (error: unknown) => {
        await spy!.close();
        throw error;
      });
      image = new BlockImage({ path, format: 'vpc', file: spy, image: opened, gate: files });
    }
  } catch (error) {
    expect(error, String(error)).toBeInstanceOf(BlockError);
    expect((error as Error).message).toContain(path);
    return { opened: false };
  }
  try {
    expect(image.length).toBeLessThanOrEqual(2040 * 1024 * M);
    if (image.length > 64 * M) return { opened: true };
    try {
      return { opened: true, read: await readAll(image) };
    } catch (error) {
      expect(error, String(error)).toBeInstanceOf(BlockError);
      return { opened: true };
    }
  } finally {
    await image.close();
    expect(spy?.readsPastEnd ?? [], 'reads past the end of the file').toEqual([]);
  }
}

async function qemuRead(path: string, dir: string): Promise<Buffer | undefined> {
  const out = join(dir, 'qemu.raw');
  const result = await run('qemu-img', ['convert', '-f', 'vpc', '-O', 'raw', path, out]);
  return result.code === 0 ? readFile(out) : undefined;
}

/** Damages 1-3 bytes (or one u32 / u64 set to a boundary value) inside [start, end). */
function damage(image: Buffer, random: ReturnType<typeof seededRandom>, areas: Array<[number, number]>): void {
  const [start, end] = areas[random.int(0, areas.length - 1)]!;
  const kind = random.int(0, 2);
  const at = random.int(start, end - 1);
  if (kind === 0) {
    for (let i = random.int(1, 3); i > 0; i--) image[random.int(start, end - 1)] = random.int(0, 255);
  } else if (kind === 1 && at + 4 <= image.length) {
    const values = [0, 1, 0x1ff, 0x200, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];
    image.writeUInt32BE(values[random.int(0, values.length - 1)]!, at - (at % 4));
  } else if (at + 8 <= image.length) {
    image.writeBigUInt64BE([0n, 1n << 53n, (1n << 63n) + 5n, 0xffffffffffffffffn][random.int(0, 3)]!, at - (at % 8));
  }
}

/** Recomputes both footer checksums and the dynamic header's checksum most of the time, so damage reaches the fields. */
function fixChecksums(image: Buffer, random: ReturnType<typeof seededRandom>): void {
  if (random.int(0, 3) === 0) return;
  const sum = (from: number, length: number, skip: number) => {
    let s = 0;
    for (let i = from; i < from + length; i++) if (i < from + skip || i >= from + skip + 4) s = (s + image[i]!) >>> 0;
    return ~s >>> 0;
  };
  for (const at of [0, image.length - 512]) if (image.subarray(at, at + 8).toString('latin1') === 'conectix') image.writeUInt32BE(sum(at, 512, 64), at + 64);
  if (image.subarray(512, 520).toString('latin1') === 'cxsparse') image.writeUInt32BE(sum(512, 1024, 36), 512 + 36);
}

describe('randomly damaged VHDs never crash, hang or read outside the file', () => {
  it('dynamic and fixed images qemu made: 150 damaged copies, compared with qemu where both read', { timeout: 240_000 }, async () => {
    const dir = await makeTempDir();
    const dynamic = join(dir, 'dynamic.vhd');
    await qemuImg(['create', '-q', '-f', 'vpc', dynamic, String(6 * M)]);
    await qemuIo(dynamic, ['write -P 0x11 0 3000', `write -P 0x22 ${2 * M + 5} 70000`, `write -P 0x33 ${6 * M - 9000} 9000`], 'vpc');
    const fixed = join(dir, 'fixed.vhd');
    await qemuImg(['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', fixed, String(3 * M)]);
    const random = seededRandom(0xf022);
    let compared = 0;
    for (let i = 0; i < 150; i++) {
      const source = i % 3 === 2 ? fixed : dynamic;
      const image = await readFile(source);
      const areas: Array<[number, number]> = source === fixed ? [[image.length - 512, image.length - 427]] : [[0, 85], [512, 1536], [1536, 1536 + 16], [image.length - 512, image.length - 427]];
      for (let n = random.int(1, 2); n > 0; n--) damage(image, random, areas);
      fixChecksums(image, random);
      const path = join(dir, `damaged-${i}.vhd`);
      await writeFile(path, image);
      const ours = await tryImgmount(path);
      if (ours.read) {
        const theirs = await qemuRead(path, dir);
        if (theirs && theirs.length === ours.read.length) {
          expect(ours.read.equals(theirs), `damaged copy ${i}: ours reads what qemu reads`).toBe(true);
          compared++;
        }
      }
    }
    expect(compared).toBeGreaterThan(10);
  });

  it('differencing images: 80 damaged copies of the header, locators and BAT', { timeout: 120_000 }, async () => {
    const dir = await makeTempDir();
    const parent = join(dir, 'parent.vhd');
    const size = 16 * 63 * SECTOR * 6;
    await qemuImg(['create', '-q', '-f', 'vpc', '-o', 'force_size=on', parent, String(size)]);
    const child = join(dir, 'child.vhd');
    await writeSparseVhd(child, {
      size,
      blockSize: 2 * M,
      chs: [6, 16, 63],
      creatorApp: 'vpc ',
      sectors: new Map([[0, Buffer.alloc(SECTOR, 1)], [5000, Buffer.alloc(SECTOR, 2)]]),
      parent: { uuid: (await footerIdentity(parent)).uuid, timestamp: 9, name: 'parent.vhd', locators: [{ code: 'W2ru', text: '.\\parent.vhd' }, { code: 'MacX', text: 'file://localhost/nowhere/parent.vhd' }] },
    });
    const random = seededRandom(0xd1ff);
    for (let i = 0; i < 80; i++) {
      const image = await readFile(child);
      for (let n = random.int(1, 2); n > 0; n--) damage(image, random, [[512, 1536], [1536, 2560], [2560, 2560 + 16]]);
      fixChecksums(image, random);
      const path = join(dir, `child-${i}.vhd`);
      await writeFile(path, image);
      await tryImgmount(path, true);
    }
    await copyFile(child, join(dir, 'intact.vhd'));
    expect((await tryImgmount(join(dir, 'intact.vhd'), true)).read).toBeDefined();
  });
});
