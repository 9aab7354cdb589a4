/**
 * Helpers of the convert suites (test/convert*.test.ts): the targets (every
 * format the library creates), qemu-img compare / check as assertions, and
 * the "holes stay holes" check against qemu-img map.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { expect } from 'vitest';
import { formatDrivers, openImage } from '../../src/index.js';
import type { BuiltImage } from './formats.js';
import { qemuImg, qemuInfo, qemuIo, qemuMap, run, type QemuMapRun } from './qemu.js';

export const TIMEOUT = { timeout: 120_000 };
export const bin = resolve(import.meta.dirname, '../../bin/imgmount');

/** The formats DEST can be: every driver that creates images. */
export const TARGETS = formatDrivers.filter((driver) => driver.create !== undefined && !driver.recognizedOnly).map((driver) => driver.name);

export async function compare(a: string, aFormat: string, b: string, bFormat: string, cwd?: string): Promise<void> {
  const result = await run('qemu-img', ['compare', '-f', aFormat, '-F', bFormat, a, b], { cwd });
  expect(result.code, `qemu-img compare ${a} ${b}: ${result.stdout}${result.stderr}`).toBe(0);
}

export async function expectCheckClean(path: string, format: string): Promise<void> {
  if (!formatDrivers.find((driver) => driver.name === format)?.check) return;
  const result = await run('qemu-img', ['check', '-f', format, path]);
  expect(result.code, `qemu-img check ${path}: ${result.stdout}${result.stderr}`).toBe(0);
}

/** The guest ranges qemu-img map shows as data (at any depth of the chain). */
export function dataRanges(runs: readonly QemuMapRun[]): [number, number][] {
  return runs.filter((run) => run.data).map((run) => [run.start, run.start + run.length]);
}

/** DEST's allocation granularity as qemu-img sees it: its cluster size, or the host file system's 4 KiB for raw. */
export async function granularity(path: string, format: string): Promise<number> {
  const info = await qemuInfo(path, format);
  return typeof info['cluster-size'] === 'number' ? Math.max(4096, info['cluster-size']) : 4096;
}

/**
 * DEST's data ranges: qemu-img map's, but for a VHDX DEST, whose qemu 7.2 driver has no block
 * status (its map calls every byte data): our own map, which test/vhdx.test.ts checks against
 * the file's bytes.
 */
export async function destDataRanges(dest: string, format: string): Promise<[number, number][]> {
  if (format !== 'vhdx') return dataRanges(await qemuMap(dest, format));
  const image = await openImage(dest, { format, readOnly: true });
  try {
    return (await image.map()).filter((run) => run.data).map((run): [number, number] => [run.offset, run.offset + run.length]);
  } finally {
    await image.close();
  }
}

/** Fails when DEST has data (qemu-img map) in a granule where the source had none. */
export async function expectHolesKept(source: BuiltImage, dest: string, format: string): Promise<void> {
  const grain = await granularity(dest, format);
  const sourceData = dataRanges(await qemuMap(source.path, source.format, { cwd: source.qemuCwd })).map(
    ([start, end]): [number, number] => [Math.floor(start / grain) * grain, Math.ceil(end / grain) * grain],
  );
  for (const [start, end] of await destDataRanges(dest, format)) {
    for (let at = start; at < end; at = Math.min(end, Math.floor(at / grain) * grain + grain)) {
      const covered = sourceData.some(([from, to]) => from <= at && at < to);
      expect(covered, `${dest} has data at ${at} (of ${start}..${end}) where ${source.path} has none`).toBe(true);
    }
  }
}

export async function sha(path: string): Promise<string> {
  return createHash('sha256').update(await readFile(path)).digest('hex');
}

export async function imgmount(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return run(process.execPath, [bin, ...args]);
}

/** A 16 MiB qcow2 image made by qemu-io: data at 1 MiB.. 4 MiB, zeros written as data, a zero cluster, data near the end. */
export async function qemuQcow2(dir: string, name = 'src.qcow2'): Promise<string> {
  const path = join(dir, name);
  await qemuImg(['create', '-f', 'qcow2', path, '16M']);
  await qemuIo(path, ['write -P 0xab 1M 3M', 'write -P 0 6M 1M', 'write -z 8M 64k', 'write -P 0x5c 15M 100k'], 'qcow2');
  return path;
}

/** Whether DEST's qemu-img map shows compressed clusters (data at depth 0 without a host offset). */
export function compressedRuns(runs: readonly QemuMapRun[]): QemuMapRun[] {
  return runs.filter((run) => run.depth === 0 && run.data && run.offset === undefined);
}
