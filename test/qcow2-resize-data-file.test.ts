/**
 * imgmount resize of qcow2 images with an external data file, against qemu-img
 * resize 7.2 of an identical image made the same way in another directory
 * (absolute data file names, so both programs find each image's own data
 * file): grown (past one L2 table's span, so data_file_raw needs a new L2
 * table), shrunk with --shrink (mid-cluster), grown again. After each step:
 * qemu-img check clean, qemu-img compare equal to qemu's image and to a raw
 * model resized the same way, the same virtual size in qemu-img info, the
 * data file as long as qemu's, the same qemu-img map shape (data_file_raw:
 * every cluster mapped at its guest offset) and, with data_file_raw, the data
 * file itself equal to the model.
 */
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, normalizeMap, qemuCheck, qemuCompare, qemuImg, qemuInfo, qemuIo, qemuMap, run, skipWithoutQemu } from './helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const bin = resolve(import.meta.dirname, '../bin/imgmount');

interface Side {
  image: string;
  data: string;
}

async function makeSide(dir: string, raw: boolean): Promise<Side> {
  const side = { image: join(dir, 'disk.qcow2'), data: join(dir, 'data.raw') };
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${side.data},data_file_raw=${raw ? 'on' : 'off'}`, side.image, '4M']);
  await qemuIo(side.image, ['write -q -P 0x11 0 1M', 'write -q -P 0x22 3M 1M', 'write -q -P 0x33 1536k 100k'], 'qcow2');
  return side;
}

function modelOf(size: number): Buffer {
  const model = Buffer.alloc(size);
  const fill = (value: number, from: number, to: number): void => {
    if (from < size) model.fill(value, from, Math.min(to, size));
  };
  fill(0x11, 0, 1 * MiB);
  fill(0x33, 1536 * KiB, 1636 * KiB);
  fill(0x22, 3 * MiB, 4 * MiB);
  return model;
}

async function expectLikeQemu(ours: Side, theirs: Side, model: Buffer, dir: string, raw: boolean): Promise<void> {
  const check = await qemuCheck(ours.image, 'qcow2');
  expect(check.code, check.stdout + check.stderr).toBe(0);
  const compare = await qemuCompare(ours.image, 'qcow2', theirs.image, 'qcow2');
  expect(compare.code, compare.stdout + compare.stderr).toBe(0);
  const modelPath = join(dir, 'model.raw');
  await writeFile(modelPath, model);
  const withModel = await qemuCompare(ours.image, 'qcow2', modelPath, 'raw');
  expect(withModel.code, withModel.stdout + withModel.stderr).toBe(0);
  expect((await qemuInfo(ours.image, 'qcow2'))['virtual-size']).toBe(model.length);
  expect((await stat(ours.data)).size, 'the data file size').toBe((await stat(theirs.data)).size);
  expect(normalizeMap(await qemuMap(ours.image, 'qcow2'), false)).toEqual(normalizeMap(await qemuMap(theirs.image, 'qcow2'), false));
  if (raw) expect((await readFile(ours.data)).equals(model), 'the raw data file is the disk').toBe(true);
}

async function resizeBoth(ours: Side, theirs: Side, size: number, shrink: boolean): Promise<void> {
  const flags = shrink ? ['--shrink'] : [];
  const result = await run(bin, ['resize', ...flags, '-f', 'qcow2', ours.image, String(size)]);
  expect(result.code, result.stderr).toBe(0);
  await qemuImg(['resize', '-q', ...flags, '-f', 'qcow2', theirs.image, String(size)]);
}

describe.skipIf(skipWithoutQemu('qcow2 resize with a data file'))('qcow2 resize with an external data file, against qemu-img resize', () => {
  for (const raw of [false, true]) {
    it(`data_file_raw=${raw ? 'on' : 'off'}: grows, shrinks and grows again as qemu-img does (the data file too)`, async () => {
      const dir = await makeTempDir();
      const ours = await makeSide(await makeTempDir(), raw);
      const theirs = await makeSide(await makeTempDir(), raw);
      // Past 512 MiB: a second L2 table.
      const grown = 600 * MiB;
      await resizeBoth(ours, theirs, grown, false);
      await expectLikeQemu(ours, theirs, modelOf(grown), dir, raw);
      const shrunk = 1536 * KiB + 4608;
      await resizeBoth(ours, theirs, shrunk, true);
      await expectLikeQemu(ours, theirs, modelOf(shrunk), dir, raw);
      await resizeBoth(ours, theirs, 3 * MiB, false);
      const model = modelOf(3 * MiB);
      model.fill(0, shrunk);
      await expectLikeQemu(ours, theirs, model, dir, raw);
    }, 120_000);
  }
});
