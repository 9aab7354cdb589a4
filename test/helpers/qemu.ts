/**
 * Shared helpers for the integration tests: unique temp directories that are
 * removed after each test, running qemu-img / qemu-io with execFile (never a
 * shell), reading an opened image whole, a seeded byte generator, and
 * little-endian patching of image files.
 *
 * The real tools are the oracle. When one is missing, `qemuTools.missing`
 * says why and the suites that need it skip with that reason printed once.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach } from 'vitest';
import { BlockImage as BlockImageClass } from '../../src/index.js';
import type { BlockImage, MapRun, Protocol } from '../../src/index.js';
import { FileProtocol } from '../../src/block/file.js';
import { ImageFileGate } from '../../src/block/gate.js';
import { qed } from '../../src/formats/qed/index.js';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a program without a shell; never throws for a non-zero exit. */
export function run(command: string, args: readonly string[], options: { cwd?: string } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { cwd: options.cwd, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8' }, (error, stdout, stderr) => {
      if (error && typeof (error as NodeJS.ErrnoException).code === 'string') {
        reject(error); // the program could not be started (ENOENT...)
        return;
      }
      const code = error ? (typeof error.code === 'number' ? error.code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/** Runs a program and fails with its output when it exits non-zero. */
export async function runOk(command: string, args: readonly string[], options: { cwd?: string } = {}): Promise<RunResult> {
  const result = await run(command, args, options);
  if (result.code !== 0) {
    throw new Error(`${command} ${args.join(' ')} exited ${result.code}\n${result.stdout}${result.stderr}`);
  }
  return result;
}

async function toolProblem(command: string): Promise<string | undefined> {
  try {
    const result = await run(command, ['--version']);
    return result.code === 0 ? undefined : `${command} --version exited ${result.code}`;
  } catch (error) {
    return `${command} is not installed (${(error as Error).message}); install the Debian package qemu-utils`;
  }
}

const problems = (await Promise.all(['qemu-img', 'qemu-io'].map(toolProblem))).filter((p): p is string => p !== undefined);

/** Whether qemu-img and qemu-io can be run, and if not, why. */
export const qemuTools = {
  available: problems.length === 0,
  missing: problems.join('; '),
};

/** For describe.skipIf: true (and a printed reason) when the qemu tools are missing. */
export function skipWithoutQemu(suite: string): boolean {
  if (!qemuTools.available) console.warn(`skipping "${suite}": ${qemuTools.missing}`);
  return !qemuTools.available;
}

/**
 * Runs qemu-img, failing with its output on a non-zero exit. Creating an encrypted
 * image benchmarks PBKDF on the CPU first, and on a loaded machine qemu sometimes
 * fails that with "Unable to get accurate CPU usage": that one error is retried.
 */
export async function qemuImg(args: readonly string[], options: { cwd?: string } = {}): Promise<RunResult> {
  for (let attempt = 1; ; attempt++) {
    const result = await run('qemu-img', args, options);
    if (result.code === 0) return result;
    // Measured here: 5-6 of 30 creates fail this way on an idle machine, more
    // under load; 25 attempts make a spurious failure negligible.
    if (attempt < 25 && /Unable to get accurate CPU usage/.test(result.stderr)) continue;
    throw new Error(`qemu-img ${args.join(' ')} exited ${result.code}\n${result.stdout}${result.stderr}`);
  }
}

/**
 * Runs qemu-io commands (`write -P 0xaa 0 512`...) on one image in one process.
 * qemu-io exits non-zero when any command failed. Pass the format: the 'qed'
 * default is kept for the QED-only suites written before other formats existed.
 */
export async function qemuIo(path: string, commands: readonly string[], format = 'qed', options: { cwd?: string } = {}): Promise<void> {
  const args = ['-f', format];
  for (const command of commands) args.push('-c', command);
  args.push(path);
  await runOk('qemu-io', args, options);
}

/** Which internal snapshot `qemu-img convert -l` reads: by name or by id. */
export type SnapshotSelector = { name: string } | { id: string };

export interface ConvertOptions {
  /** Convert an internal snapshot instead of the current state (`-l snapshot.name=...`). */
  snapshot?: SnapshotSelector;
  /** Where qemu-img runs (qemu resolves a relative external data file name against its cwd). */
  cwd?: string;
}

/** Writes the guest bytes of an image, as `qemu-img convert -O raw` produces them, to `out`. */
export async function qemuConvertToRawFile(path: string, format: string, out: string, options: ConvertOptions = {}): Promise<void> {
  const snapshot = options.snapshot === undefined ? [] : ['-l', 'name' in options.snapshot ? `snapshot.name=${options.snapshot.name}` : `snapshot.id=${options.snapshot.id}`];
  await qemuImg(['convert', '-f', format, ...snapshot, '-O', 'raw', path, out], { cwd: options.cwd });
}

/**
 * The guest bytes of an image as `qemu-img convert -O raw` produces them (through a
 * file in `dir`). Pass the format: the 'qed' default is kept for the QED-only suites.
 */
export async function qemuConvertToRaw(path: string, dir: string, format = 'qed', options: ConvertOptions = {}): Promise<Buffer> {
  const out = join(dir, `converted-${Math.random().toString(36).slice(2)}.raw`);
  await qemuConvertToRawFile(path, format, out, options);
  try {
    return await readFile(out);
  } finally {
    await rm(out, { force: true });
  }
}

/** `qemu-img compare -f FORMAT -F OTHERFORMAT`; exit 0 identical, 1 different, 2 error. */
export function qemuCompare(path: string, format: string, other: string, otherFormat: string): Promise<RunResult> {
  return run('qemu-img', ['compare', '-f', format, '-F', otherFormat, path, other]);
}

export interface QemuMapRun {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** `qemu-img map --output=json`; pass the format (the 'qed' default is for the QED-only suites). */
export async function qemuMap(path: string, format = 'qed', options: { cwd?: string; start?: number; length?: number } = {}): Promise<QemuMapRun[]> {
  const range = [...(options.start === undefined ? [] : [`--start-offset=${options.start}`]), ...(options.length === undefined ? [] : [`--max-length=${options.length}`])];
  const { stdout } = await qemuImg(['map', '-f', format, '--output=json', ...range, path], { cwd: options.cwd });
  return JSON.parse(stdout) as QemuMapRun[];
}

/** `qemu-img info --output=json`, probing the format unless it is given. */
export async function qemuInfo(path: string, format?: string, options: { cwd?: string } = {}): Promise<Record<string, unknown>> {
  const { stdout } = await qemuImg(['info', ...(format === undefined ? [] : ['-f', format]), '--output=json', path], options);
  return JSON.parse(stdout) as Record<string, unknown>;
}

/** `qemu-img check`; exit 0 clean, 2 corruptions, 3 leaks, 63 no check for the format. Pass the format ('qed' default for the QED-only suites). */
export function qemuCheck(path: string, format = 'qed'): Promise<RunResult> {
  return run('qemu-img', ['check', '-f', format, path]);
}

/** Runs of `map` in the shape qemu-img prints (start/length/flags/offset), for comparison. */
export interface MapShape {
  start: number;
  length: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/**
 * Normalizes runs from either side: neighbouring runs with the same flags (and,
 * for data, contiguous host offsets in the same file) are joined, so the two
 * programs' different splitting does not matter.
 */
export function normalizeMap(runs: ReadonlyArray<QemuMapRun | MapRun>, withOffsets: boolean): MapShape[] {
  const out: MapShape[] = [];
  for (const run of runs) {
    const start = 'start' in run ? run.start : run.offset;
    const hostOffset = 'start' in run ? run.offset : run.hostOffset;
    const shape: MapShape = { start, length: run.length, present: run.present, zero: run.zero, data: run.data };
    if (withOffsets && run.data && hostOffset !== undefined) shape.offset = hostOffset;
    const last = out[out.length - 1];
    if (
      last &&
      last.start + last.length === shape.start &&
      last.present === shape.present &&
      last.zero === shape.zero &&
      last.data === shape.data &&
      (last.offset === undefined) === (shape.offset === undefined) &&
      (last.offset === undefined || last.offset + last.length === shape.offset)
    ) {
      last.length += shape.length;
    } else {
      out.push(shape);
    }
  }
  return out;
}

const tempDirs: string[] = [];

/** A fresh directory under the OS temp dir, removed after the current test. */
export async function makeTempDir(prefix = 'imgmount-test-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  tempDirs.push(dir);
  return dir;
}

afterEach(async () => {
  const dirs = tempDirs.splice(0);
  await Promise.all(dirs.map((dir) => rm(dir, { recursive: true, force: true })));
});

/** Reads the whole guest content of an opened image, in pieces of `chunk` bytes. */
export async function readAll(image: BlockImage, chunk = 8 * 1024 * 1024): Promise<Buffer> {
  const out = Buffer.alloc(image.length);
  for (let offset = 0; offset < image.length; offset += chunk) {
    await image.read(offset, out.subarray(offset, Math.min(image.length, offset + chunk)));
  }
  return out;
}

/** The first offset where two buffers differ (a length difference counts at the shorter end), or -1. */
export function firstDifference(actual: Buffer, expected: Buffer): number {
  const length = Math.min(actual.length, expected.length);
  // compare in large slices first so equal images cost little
  for (let start = 0; start < length; start += 65536) {
    const end = Math.min(length, start + 65536);
    if (actual.subarray(start, end).equals(expected.subarray(start, end))) continue;
    for (let i = start; i < end; i++) if (actual[i] !== expected[i]) return i;
  }
  return actual.length === expected.length ? -1 : length;
}

/** Deterministic pseudo-random bytes (mulberry32), so failures reproduce. */
export function seededBytes(seed: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  let state = seed >>> 0;
  for (let i = 0; i < length; i++) {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = ((t ^ (t >>> 14)) >>> 0) & 0xff;
  }
  return out;
}

/** Reads `length` bytes at `offset` of a host file. */
export async function readBytes(path: string, offset: number, length: number): Promise<Buffer> {
  const handle = await open(path, 'r');
  try {
    const buffer = Buffer.alloc(length);
    const { bytesRead } = await handle.read(buffer, 0, length, offset);
    return buffer.subarray(0, bytesRead);
  } finally {
    await handle.close();
  }
}

/** Writes bytes at `offset` of a host file (which must exist). */
export async function patchBytes(path: string, offset: number, bytes: Buffer): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    await handle.write(bytes, 0, bytes.length, offset);
  } finally {
    await handle.close();
  }
}

export async function readU64(path: string, offset: number): Promise<bigint> {
  return (await readBytes(path, offset, 8)).readBigUInt64LE(0);
}

export async function writeU64(path: string, offset: number, value: bigint): Promise<void> {
  const bytes = Buffer.alloc(8);
  bytes.writeBigUInt64LE(value);
  await patchBytes(path, offset, bytes);
}

export async function writeU32(path: string, offset: number, value: number): Promise<void> {
  const bytes = Buffer.alloc(4);
  bytes.writeUInt32LE(value);
  await patchBytes(path, offset, bytes);
}

/** QED header offsets (all little-endian), from the specification. */
export const QED_HEADER = {
  magic: 0,
  clusterSize: 4,
  tableSize: 8,
  headerSize: 12,
  features: 16,
  compatFeatures: 24,
  autoclearFeatures: 32,
  l1TableOffset: 40,
  imageSize: 48,
  backingFilenameOffset: 56,
  backingFilenameSize: 60,
} as const;

export const QED_F_BACKING_FILE = 0x01n;
export const QED_F_NEED_CHECK = 0x02n;
export const QED_F_BACKING_FORMAT_NO_PROBE = 0x04n;

/** Where a guest offset's L2 entry lives in a QED file (reading the L1 table from disk). */
export async function qedEntryLocations(path: string, guestOffset: number): Promise<{ l1EntryOffset: number; l2Offset: number; l2EntryOffset: number }> {
  const header = await readBytes(path, 0, 64);
  const clusterSize = header.readUInt32LE(QED_HEADER.clusterSize);
  const tableSize = header.readUInt32LE(QED_HEADER.tableSize);
  const l1TableOffset = Number(header.readBigUInt64LE(QED_HEADER.l1TableOffset));
  const entries = (tableSize * clusterSize) / 8;
  const l2Span = entries * clusterSize;
  const l1Index = Math.floor(guestOffset / l2Span);
  const l2Index = Math.floor((guestOffset % l2Span) / clusterSize);
  const l1EntryOffset = l1TableOffset + l1Index * 8;
  const l2Offset = Number(await readU64(path, l1EntryOffset));
  return { l1EntryOffset, l2Offset, l2EntryOffset: l2Offset + l2Index * 8 };
}

/** A host-file protocol that records every call, to assert on the I/O a driver does. */
export interface SpyProtocol extends Protocol {
  /** Calls in order: `read offset length`, `write offset length`, `flush`, `truncate length`. */
  readonly calls: string[];
  /** Reads that asked for bytes past the end of the file at the time they were made. */
  readonly readsPastEnd: string[];
}

export async function spyProtocol(path: string, readOnly: boolean): Promise<SpyProtocol> {
  const inner = await FileProtocol.open(path, readOnly);
  const calls: string[] = [];
  const readsPastEnd: string[] = [];
  return {
    path,
    readOnly,
    calls,
    readsPastEnd,
    async read(offset, buffer) {
      calls.push(`read ${offset} ${buffer.length}`);
      const size = await inner.size();
      if (offset + buffer.length > size) readsPastEnd.push(`read of ${buffer.length} at ${offset} in a ${size}-byte file`);
      return inner.read(offset, buffer);
    },
    async write(offset, buffer) {
      calls.push(`write ${offset} ${buffer.length}`);
      return inner.write(offset, buffer);
    },
    async flush() {
      calls.push('flush');
      return inner.flush();
    },
    size: () => inner.size(),
    allocatedSize: () => inner.allocatedSize(),
    async truncate(length) {
      calls.push(`truncate ${length}`);
      return inner.truncate(length);
    },
    close: () => inner.close(),
  };
}

/** Opens a QED image (no backing file) over `protocol`, as openImage would. */
export async function openQedOver(protocol: Protocol): Promise<BlockImage> {
  const files = new ImageFileGate(protocol.path, {}, !protocol.readOnly);
  const image = await qed.open(protocol, { readOnly: protocol.readOnly, files });
  return new BlockImageClass({ path: protocol.path, format: 'qed', file: protocol, image, gate: files });
}
