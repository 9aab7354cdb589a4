/**
 * Seeded damage for the read-only formats' tests (qcow v1, parallels, bochs,
 * cloop): each case overwrites a few bytes of a copy of a qemu-made image,
 * inside regions the caller names (header, tables), then opens it, reads it
 * whole and maps it. What must hold: the open or read either succeeds or fails
 * with a BlockError whose message is one line naming the file (never another
 * error: a RangeError is an out-of-bounds read), within a time limit (no hang);
 * and when both this library and `qemu-img convert` read the damaged image,
 * they read the same bytes.
 */
import { copyFile, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { expect } from 'vitest';
import { BlockError, openImage } from '../../src/index.js';
import { run } from './qemu.js';
import { seededRandom } from './random.js';

export interface Region {
  start: number;
  end: number;
}

export interface FuzzSummary {
  cases: number;
  refusedAtOpen: number;
  refusedAtRead: number;
  read: number;
  /** Cases both sides read (and agreed on). */
  agreedWithQemu: number;
  /** Cases read here that qemu-img refused (this library is not stricter there; it reads what the tables say). */
  qemuRefusedOnly: number;
  /** Cases refused here that qemu-img convert read (where this library is stricter than qemu 7.2). */
  refusedOnlyHere: number;
  /** The kinds of refusal (the message without numbers) of those cases. */
  stricterThanQemu: Set<string>;
  /** Distinct first words of refusal messages, for the report. */
  messages: Set<string>;
}

const CASE_LIMIT_MS = 10_000;

function withLimit<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${CASE_LIMIT_MS} ms (a hang)`)), CASE_LIMIT_MS);
  });
  return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
}

function expectBlockError(error: unknown, path: string, what: string): string {
  if (!(error instanceof BlockError)) throw new Error(`${what}: not a BlockError: ${(error as Error)?.stack ?? String(error)}`);
  expect(error.message, what).not.toMatch(/\n/);
  expect(error.message, what).toContain(path);
  return error.message.slice(path.length + 2).split(' ').slice(0, 3).join(' ');
}

/**
 * Runs `count` seeded damage cases on copies of `source` (format `format`), each
 * changing 1-3 runs of 1-4 bytes inside `regions` (a region listed twice is hit twice as often).
 */
export async function fuzzDamage(dir: string, source: string, format: string, regions: readonly Region[], seed: number, count: number): Promise<FuzzSummary> {
  const original = await readFile(source);
  const random = seededRandom(seed);
  const summary: FuzzSummary = { cases: 0, refusedAtOpen: 0, refusedAtRead: 0, read: 0, agreedWithQemu: 0, qemuRefusedOnly: 0, refusedOnlyHere: 0, stricterThanQemu: new Set(), messages: new Set() };
  const path = join(dir, `fuzz.${format}`);
  const oracle = join(dir, `fuzz.${format}.raw`);
  for (let i = 0; i < count; i++) {
    const damaged = Buffer.from(original);
    const changes: string[] = [];
    for (let k = random.int(1, 3); k > 0; k--) {
      const region = regions[random.int(0, regions.length - 1)]!;
      const at = random.int(region.start, Math.max(region.start, Math.min(region.end, damaged.length) - 1));
      const length = random.int(1, 4);
      for (let j = at; j < Math.min(damaged.length, at + length); j++) {
        const mode = random.int(0, 3);
        damaged[j] = mode === 0 ? 0xff : mode === 1 ? 0 : random.int(0, 255);
      }
      changes.push(`${at}+${length}`);
    }
    await writeFile(path, damaged);
    const what = `seed ${seed} case ${i} (bytes ${changes.join(', ')})`;
    summary.cases += 1;
    let image;
    try {
      image = await withLimit(openImage(path, { readOnly: true, format }), `${what}: open`);
    } catch (error) {
      summary.refusedAtOpen += 1;
      summary.messages.add(expectBlockError(error, path, what));
      if (await qemuReads(format, path, oracle)) stricter(summary, error, path);
      continue;
    }
    let bytes: Buffer | undefined;
    let refusal: unknown;
    try {
      bytes = Buffer.alloc(image.length);
      await withLimit(image.read(0, bytes), `${what}: read`);
      await withLimit(image.map(), `${what}: map`);
    } catch (error) {
      summary.refusedAtRead += 1;
      summary.messages.add(expectBlockError(error, path, what));
      refusal = error;
      bytes = undefined;
    } finally {
      await image.close();
    }
    if (!bytes) {
      if (await qemuReads(format, path, oracle)) stricter(summary, refusal, path);
      continue;
    }
    summary.read += 1;
    const qemu = await run('qemu-img', ['convert', '-f', format, '-O', 'raw', path, oracle]);
    if (qemu.code === 0) {
      const theirs = await readFile(oracle);
      expect(bytes.equals(theirs), `${what}: read here differs from qemu-img convert`).toBe(true);
      summary.agreedWithQemu += 1;
    } else {
      summary.qemuRefusedOnly += 1;
    }
    await rm(oracle, { force: true });
  }
  await rm(path, { force: true });
  return summary;
}

function stricter(summary: FuzzSummary, error: unknown, path: string): void {
  summary.refusedOnlyHere += 1;
  summary.stricterThanQemu.add((error as Error).message.slice(path.length + 2).replace(/\d+/g, 'N'));
}

async function qemuReads(format: string, path: string, oracle: string): Promise<boolean> {
  const qemu = await run('qemu-img', ['convert', '-f', format, '-O', 'raw', path, oracle]);
  await rm(oracle, { force: true });
  return qemu.code === 0;
}

/** A copy of `source` in `dir` under `name`, with `patch` applied (offset, bytes). */
export async function patchedCopy(source: string, dir: string, name: string, patches: ReadonlyArray<[number, Buffer]>): Promise<string> {
  const path = join(dir, name);
  await copyFile(source, path);
  const content = await readFile(path);
  for (const [at, bytes] of patches) bytes.copy(content, at);
  await writeFile(path, content);
  return path;
}

export function be32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value);
  return b;
}

export function be64(value: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(value);
  return b;
}

export function le32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(value);
  return b;
}

export function le64(value: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(value);
  return b;
}
