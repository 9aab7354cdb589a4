/**
 * Damaged-image fuzzing (fast-check) over qcow2 and QED: seed images made by
 * qemu-img / qemu-io in several shapes, damaged where their metadata lives
 * (header fields at boundary values, L1/L2 entries, refcount tables and
 * blocks, the snapshot table, header extensions, the bitmap directory,
 * compressed clusters, bit flips, truncation; see helpers/damage.ts), then
 * opened read-only and read-write, read whole in chunks, mapped, checked,
 * repaired, written and closed.
 *
 * Every outcome must be a success or a BlockError with a one-line message,
 * within a time and a memory budget per case, with no unhandled rejection
 * (helpers/contained.ts). Reads must give the image's bytes: every read is
 * done twice into differently poisoned buffers and must agree; where the
 * damage cannot touch a range, a read-only open must read what qemu read
 * from the undamaged seed; and wherever qemu-img (convert --salvage) also
 * reads a sector of the damaged image, both must agree.
 *
 * Seeds are fixed, so CI is reproducible. Knobs for local runs: FUZZ_RUNS
 * (cases per format; a long run: FUZZ_RUNS=3000), FUZZ_SEED (another
 * fast-check seed), FUZZ_SHRINK=1 (shrink a failure), FUZZ_CASE_MS (the time
 * budget of a case), FUZZ_VERBOSE=1 (list the soft findings), FUZZ_DEBUG=MS
 * (print steps slower than MS), FUZZ_KEEP=DIR (keep every damaged file).
 */
import { copyFile, mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkImage, CorruptImageError, openImage, type BlockImage } from '../src/index.js';
import { CaseFailure, CaseRunner, installGuards, progressLine, Watchdog, type Budget } from './helpers/contained.js';
import {
  applyPatches, joinEffects, qcow2Layout, qedLayout, resolveMutation, setBytes, setEntry, setField, truncateTo, untouched,
  type Effect, type Layout, type Mutation, type Patch, type ResolvedMutation,
} from './helpers/damage.js';
import { qemuConvertToRaw, qemuImg, qemuIo, run, seededBytes, skipWithoutQemu } from './helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const RUNS = Number(process.env.FUZZ_RUNS ?? 150);
const SEED = Number(process.env.FUZZ_SEED ?? 20261010);
const budget: Budget = {
  // A case runs up to three opens, four checks and a repair; most take 0.1-0.3 s, the slowest seen ~3.5 s
  // (a check of an L1 table stretched over data: 280k findings). 10 s leaves room for a busy machine.
  caseMs: Number(process.env.FUZZ_CASE_MS ?? 10_000),
  memoryBytes: 256 * MiB,
  watchdogMs: 60_000,
};
/** Images up to this virtual size are read whole; larger ones at sampled places. */
const READ_WHOLE_BYTES = 16 * MiB;
/** qemu-img's view is taken for images up to this virtual size. */
const QEMU_VIEW_BYTES = 64 * MiB;

type Format = 'qcow2' | 'qed';

interface Seed {
  name: string;
  format: Format;
  path: string;
  bytes: Buffer;
  layout: Layout;
  /** The guest content qemu reads from the undamaged seed. */
  reference: Buffer;
}

/** A sparse raw source with seeded random data in a few extents (one across a 2 MiB L2 boundary). */
async function rawSource(dir: string, name: string, size: number, seed: number): Promise<string> {
  const content = Buffer.alloc(size);
  const extents: Array<[number, number]> = [[0, 256 * KiB], [MiB, MiB + 100 * KiB], [2 * MiB - 8 * KiB, 2 * MiB + 8 * KiB], [3 * MiB + 4 * KiB, 3 * MiB + 12 * KiB]];
  if (size > 4 * MiB) extents.push([5 * MiB, 5 * MiB + 64 * KiB], [size - 4 * KiB, size]);
  for (const [index, [start, end]] of extents.entries()) seededBytes(seed + index, end - start).copy(content, start);
  const path = join(dir, name);
  await writeFile(path, content);
  return path;
}

/** The seed images: qcow2 v2/v3, small and large clusters, refcount widths, compression, extended L2, snapshots, a bitmap, backing files; QED with and without backing. */
const seedRecipes: Array<{ name: string; format: Format; make: (dir: string, path: string) => Promise<void> }> = [
  {
    name: 'qcow2 v3, 64 KiB clusters, a zero cluster',
    format: 'qcow2',
    make: async (dir, path) => {
      await qemuImg(['convert', '-O', 'qcow2', '-o', 'cluster_size=65536', await rawSource(dir, 'v3.raw', 4 * MiB, 1), path]);
      await qemuIo(path, ['write -z 2560k 64k', 'write -P 0x5c 3584k 4k'], 'qcow2');
    },
  },
  {
    name: 'qcow2 v2, 4 KiB clusters',
    format: 'qcow2',
    make: async (dir, path) => qemuImg(['convert', '-O', 'qcow2', '-o', 'compat=0.10,cluster_size=4096', await rawSource(dir, 'v2.raw', 8 * MiB, 2), path]).then(() => undefined),
  },
  {
    name: 'qcow2 v3, 512-byte clusters, 64-bit refcounts',
    format: 'qcow2',
    make: async (dir, path) => {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=64', path, '4M']);
      await qemuIo(path, ['write -P 0x21 0 96k', 'write -P 0x22 1M 20k', 'write -P 0x23 2047k 2k', 'write -z 3M 4k'], 'qcow2');
    },
  },
  {
    name: 'qcow2 v3, 4 KiB clusters, 1-bit refcounts',
    format: 'qcow2',
    make: async (dir, path) => qemuImg(['convert', '-O', 'qcow2', '-o', 'cluster_size=4096,refcount_bits=1', await rawSource(dir, 'r1.raw', 4 * MiB, 3), path]).then(() => undefined),
  },
  {
    name: 'qcow2 v3, 8-bit refcounts, lazy refcounts, dirty bit set',
    format: 'qcow2',
    make: async (dir, path) => {
      await qemuImg(['convert', '-O', 'qcow2', '-o', 'cluster_size=16384,refcount_bits=8,lazy_refcounts=on', await rawSource(dir, 'lazy.raw', 4 * MiB, 4), path]);
      const bytes = await readFile(path);
      bytes.writeBigUInt64BE(bytes.readBigUInt64BE(72) | 1n, 72);
      await writeFile(path, bytes);
    },
  },
  {
    name: 'qcow2 compressed clusters (deflate)',
    format: 'qcow2',
    make: async (dir, path) => {
      const source = join(dir, 'text.raw');
      const text = Buffer.from('compressible text for a compressed qcow2 cluster\n'.repeat(30_000)).subarray(0, MiB);
      await writeFile(source, Buffer.concat([text, seededBytes(5, 256 * KiB), Buffer.alloc(768 * KiB), text.subarray(0, 512 * KiB)]));
      await qemuImg(['convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=65536', source, path]);
    },
  },
  {
    name: 'qcow2 compressed clusters (zstd), 4 KiB clusters',
    format: 'qcow2',
    make: async (dir, path) => {
      const source = join(dir, 'zstd.raw');
      const text = Buffer.from('zstd compressed cluster text 0123456789\n'.repeat(20_000)).subarray(0, 512 * KiB);
      await writeFile(source, Buffer.concat([text, seededBytes(6, 64 * KiB), text]));
      await qemuImg(['convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4096,compression_type=zstd', source, path]);
    },
  },
  {
    name: 'qcow2 extended L2 entries',
    format: 'qcow2',
    make: async (dir, path) => {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536,extended_l2=on', path, '4M']);
      await qemuIo(path, ['write -P 0x31 0 4k', 'write -P 0x32 72k 2k', 'write -P 0x33 1M 130k', 'write -z 2M 8k', 'write -P 0x34 2M 2k'], 'qcow2');
    },
  },
  {
    name: 'qcow2 with an internal snapshot',
    format: 'qcow2',
    make: async (dir, path) => {
      await qemuImg(['convert', '-O', 'qcow2', '-o', 'cluster_size=65536', await rawSource(dir, 'snap.raw', 4 * MiB, 7), path]);
      await qemuImg(['snapshot', '-c', 'before', path]);
      await qemuIo(path, ['write -P 0x44 64k 64k', 'write -P 0x45 3M 128k'], 'qcow2');
    },
  },
  {
    name: 'qcow2 with a persistent dirty bitmap',
    format: 'qcow2',
    make: async (dir, path) => {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', path, '4M']);
      await qemuImg(['bitmap', '--add', path, 'b0']);
      await qemuIo(path, ['write -P 0x51 0 192k', 'write -P 0x52 2M 64k'], 'qcow2');
    },
  },
  {
    name: 'qcow2 over a qcow2 backing file',
    format: 'qcow2',
    make: async (dir, path) => {
      const base = join(dir, 'base.qcow2');
      await qemuImg(['convert', '-O', 'qcow2', await rawSource(dir, 'base.raw', 4 * MiB, 8), base]);
      await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', '-o', 'cluster_size=65536', path]);
      await qemuIo(path, ['write -P 0x61 1M 64k', 'write -P 0x62 2000k 40k', 'write -z 0 64k'], 'qcow2');
    },
  },
  {
    name: 'QED, 64 KiB clusters, table_size 4',
    format: 'qed',
    make: async (dir, path) => {
      await qemuImg(['convert', '-O', 'qed', await rawSource(dir, 'qed.raw', 8 * MiB, 9), path]);
      await qemuIo(path, ['write -z 6M 64k', 'write -P 0x71 7M 4k'], 'qed');
    },
  },
  {
    name: 'QED, 4 KiB clusters, table_size 2',
    format: 'qed',
    make: async (dir, path) => qemuImg(['convert', '-O', 'qed', '-o', 'cluster_size=4096,table_size=2', await rawSource(dir, 'qed4k.raw', 8 * MiB, 10), path]).then(() => undefined),
  },
  {
    name: 'QED over a raw backing file',
    format: 'qed',
    make: async (dir, path) => {
      const base = join(dir, 'qed-base.raw');
      await writeFile(base, seededBytes(11, 4 * MiB));
      await qemuImg(['create', '-q', '-f', 'qed', '-b', base, '-F', 'raw', '-o', 'cluster_size=4096,table_size=2', path, '6M']);
      await qemuIo(path, ['write -P 0x81 512k 64k', 'write -P 0x82 4094k 8k', 'write -P 0x83 5M 4k'], 'qed');
    },
  },
];

/** Per-case choices besides the damage. */
interface Knobs {
  probe: boolean;
  chunk: number;
  parallel: boolean;
  fix: 'all' | 'leaks';
  writes: Array<{ at: number; length: number }>;
}

const valueChoice = fc.record({ choice: fc.nat(63), random: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }), bit: fc.nat(63), pick: fc.nat() });
const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('field' as const), group: fc.nat(), pick: fc.nat(), value: valueChoice }) },
  { weight: 6, arbitrary: fc.record({ kind: fc.constant('entry' as const), table: fc.nat(), pick: fc.nat(), entry: fc.nat(), used: fc.boolean(), value: valueChoice }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('flip' as const), region: fc.nat(), pick: fc.nat(), at: fc.nat(), mask: fc.integer({ min: 1, max: 255 }), count: fc.integer({ min: 1, max: 12 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('truncate' as const), how: fc.nat(), at: fc.nat() }) },
);
const knobs: fc.Arbitrary<Knobs> = fc.record({
  probe: fc.boolean(),
  chunk: fc.constantFrom(64 * KiB, 200_000, MiB, 3 * 4096 + 1),
  parallel: fc.boolean(),
  fix: fc.constantFrom('all' as const, 'leaks' as const),
  writes: fc.array(fc.record({ at: fc.double({ min: 0, max: 1, noNaN: true }), length: fc.integer({ min: 1, max: 130 * KiB }) }), { minLength: 1, maxLength: 2 }),
});

/** Where to read: the whole disk in chunks, or (a large one) its start, sampled places and its end. */
function readPlan(length: number, chunk: number): Array<[number, number]> {
  const plan: Array<[number, number]> = [];
  const covered = length <= READ_WHOLE_BYTES ? length : 2 * MiB;
  for (let offset = 0; offset < covered; offset += chunk) plan.push([offset, Math.min(covered, offset + chunk)]);
  if (covered < length) {
    for (let i = 1; i <= 8; i++) {
      const at = Math.floor((length / 9) * i / 512) * 512;
      plan.push([at, Math.min(length, at + chunk)]);
    }
    plan.push([Math.max(0, length - chunk), length]);
  }
  return plan;
}

/** Reads every chunk of the plan into a buffer poisoned with `poison`; undefined for a chunk that failed. */
async function readChunks(runner: CaseRunner, image: BlockImage, plan: Array<[number, number]>, poison: number, parallel: boolean, step: string): Promise<Array<Buffer | undefined>> {
  const readOne = async ([start, end]: [number, number]): Promise<Buffer | undefined> => {
    const buffer = Buffer.alloc(end - start, poison);
    const { outcome } = await runner.run(`${step} ${start}..${end}`, () => image.read(start, buffer));
    return outcome === 'ok' ? buffer : undefined;
  };
  if (!parallel) {
    const out: Array<Buffer | undefined> = [];
    for (const range of plan) out.push(await readOne(range));
    return out;
  }
  return Promise.all(plan.map(readOne));
}

/** qemu-img's reading of the damaged image: its bytes, and the sectors it could not read. */
async function qemuView(path: string, format: Format, dir: string): Promise<{ bytes: Buffer; failed: Set<number> } | undefined> {
  const out = join(dir, 'qemu-view.raw');
  const result = await run('qemu-img', ['convert', '-U', '--salvage', '-f', format, '-O', 'raw', path, out]);
  if (result.code !== 0) return undefined;
  const failed = new Set<number>();
  for (const match of result.stderr.matchAll(/error while reading offset (\d+)/g)) failed.add(Math.floor(Number(match[1]) / 512));
  try {
    return { bytes: await readFile(out), failed };
  } finally {
    await rm(out, { force: true });
  }
}

interface Stats {
  cases: number;
  skipped: number;
  roOpened: number;
  rwOpened: number;
  chunksRead: number;
  chunksFailed: number;
  comparedToSeed: number;
  comparedToQemu: number;
  qemuRefused: number;
  outcomes: Map<string, number>;
  qemuDifferences: string[];
  repairLeftCorruption: string[];
  readBackDifferences: string[];
  slowest: { ms: number; description: string };
}

const newStats = (): Stats => ({
  cases: 0, skipped: 0, roOpened: 0, rwOpened: 0, chunksRead: 0, chunksFailed: 0, comparedToSeed: 0, comparedToQemu: 0, qemuRefused: 0,
  outcomes: new Map(), qemuDifferences: [], repairLeftCorruption: [], readBackDifferences: [], slowest: { ms: 0, description: '' },
});

let workDir: string;
let seeds: Seed[] = [];
let guard: ReturnType<typeof installGuards>;
let watchdog: Watchdog;
let caseNumber = 0;
const qemuMissing = skipWithoutQemu('damaged-image fuzzing');

beforeAll(async () => {
  if (qemuMissing) return;
  workDir = await mkdtemp(join(tmpdir(), 'imgmount-fuzz-'));
  const seedDir = join(workDir, 'seeds');
  await mkdir(seedDir);
  seeds = await Promise.all(
    seedRecipes.map(async (recipe, index) => {
      const path = join(seedDir, `seed-${index}.${recipe.format}`);
      await recipe.make(seedDir, path);
      const layout = recipe.format === 'qcow2' ? await qcow2Layout(path) : await qedLayout(path);
      return { name: recipe.name, format: recipe.format, path, bytes: await readFile(path), layout, reference: await qemuConvertToRaw(path, seedDir, recipe.format) };
    }),
  );
  guard = installGuards(budget);
  watchdog = new Watchdog(budget.watchdogMs);
}, 120_000);

afterAll(async () => {
  guard?.restore();
  await watchdog?.stop();
  if (workDir) await rm(workDir, { recursive: true, force: true });
});

interface Harm {
  description: string;
  patches: Patch[];
  effect: Effect;
  writeSafe: boolean;
}

/** Joins resolved mutations into one damage; patches that cut the file come last. */
function joinDamage(seed: Seed, resolved: readonly ResolvedMutation[]): Harm | undefined {
  if (resolved.length === 0) return undefined;
  const patches = resolved.flatMap((m) => m.patches);
  patches.sort((a, b) => Number('truncateTo' in a) - Number('truncateTo' in b));
  return {
    description: `${seed.name}: ${resolved.map((m) => m.description).join('; ')}`,
    patches,
    effect: resolved.reduce<Effect>((effect, m) => joinEffects(effect, m.effect), 'none'),
    writeSafe: resolved.every((m) => m.writeSafe),
  };
}

/** One fuzz case: damage a copy of the seed, then every operation on it, each contained. */
async function runCase(seed: Seed, harm: Harm | undefined, choice: Knobs, stats: Stats): Promise<void> {
  if (!harm) {
    stats.skipped += 1;
    return;
  }
  const dir = join(workDir, `case-${++caseNumber}`);
  await mkdir(dir);
  const path = join(dir, `damaged.${seed.format}`);
  await writeFile(path, seed.bytes);
  await applyPatches(path, harm.patches);
  const damagedBytes = await readFile(path);
  if (process.env.FUZZ_KEEP) await writeFile(join(process.env.FUZZ_KEEP, `case-${caseNumber}.${seed.format}`), damagedBytes);
  const description = `${harm.description} [${JSON.stringify(choice)}]`;
  const runner = new CaseRunner(description, budget, guard);
  const format = choice.probe ? undefined : seed.format;
  const opened: BlockImage[] = [];
  const track = (image: BlockImage | undefined): BlockImage | undefined => {
    if (image) opened.push(image);
    return image;
  };
  stats.cases += 1;
  watchdog.begin(description);
  try {
    // Read-only: whole disk twice (differently poisoned buffers), map, info.
    const ro = track((await runner.run('open read-only', () => openImage(path, { readOnly: true, format, notice: () => {} }))).value);
    let firstPass: Array<Buffer | undefined> = [];
    let plan: Array<[number, number]> = [];
    let virtualSize = 0;
    if (ro) {
      stats.roOpened += 1;
      virtualSize = ro.length;
      plan = readPlan(ro.length, choice.chunk);
      firstPass = await readChunks(runner, ro, plan, 0xa5, false, 'read');
      await runner.run('map', () => ro.map());
      await runner.run('info', () => ro.info());
      const secondPass = await readChunks(runner, ro, plan, 0x5a, choice.parallel, 'read again');
      plan.forEach(([start, end], i) => {
        const first = firstPass[i];
        const second = secondPass[i];
        if (first) stats.chunksRead += 1;
        else stats.chunksFailed += 1;
        if (first && second && !first.equals(second)) runner.fail(`read ${start}..${end}`, 'two reads of the same range differ (unfilled buffer or nondeterminism)');
        if (first && ro.format === seed.format && untouched(harm.effect, start, end) && end <= seed.reference.length) {
          stats.comparedToSeed += 1;
          if (!first.equals(seed.reference.subarray(start, end))) {
            runner.fail(`read ${start}..${end}`, 'a range the damage cannot reach reads differently from the undamaged seed');
          }
        }
      });
      await runner.run('close read-only', () => ro.close());
    }
    await runner.run('check', () => checkImage(path, { format }));
    if (!(await readFile(path)).equals(damagedBytes)) runner.fail('check', 'a read-only open or a check without repair changed the file');

    // qemu-img's view of the same damaged file, outside the budget (qemu's time is not ours).
    if (ro && ro.format === seed.format && virtualSize <= QEMU_VIEW_BYTES) {
      const view = await qemuView(path, seed.format, dir);
      if (!view) stats.qemuRefused += 1;
      else {
        plan.forEach(([start, end], i) => {
          const ours = firstPass[i];
          if (!ours || end > view.bytes.length) return;
          for (let sector = Math.floor(start / 512); sector * 512 < end; sector++) {
            if (view.failed.has(sector)) continue;
            const from = Math.max(start, sector * 512);
            const to = Math.min(end, (sector + 1) * 512);
            stats.comparedToQemu += 1;
            if (!ours.subarray(from - start, to - start).equals(view.bytes.subarray(from, to))) {
              stats.qemuDifferences.push(`${description}: guest bytes ${from}..${to}`);
              break;
            }
          }
        });
      }
    }

    // Read-write on a copy: reads, a write or two read back, map, flush, close; then the result read-only.
    const rwPath = join(dir, `rw.${seed.format}`);
    await copyFile(path, rwPath);
    const rw = track((await runner.run('open read-write', () => openImage(rwPath, { format, notice: () => {} }))).value);
    if (rw) {
      stats.rwOpened += 1;
      const rwPlan = readPlan(rw.length, choice.chunk).slice(0, 8);
      await readChunks(runner, rw, rwPlan, 0xa5, choice.parallel, 'read-write read');
      for (const [index, { at, length }] of choice.writes.entries()) {
        if (rw.length === 0) break;
        const offset = Math.min(Math.floor(at * rw.length), rw.length - 1);
        const data = seededBytes(caseNumber * 10 + index, Math.min(length, rw.length - offset));
        const written = await runner.run(`write ${data.length} at ${offset}`, () => rw.write(offset, data));
        if (written.outcome !== 'ok') continue;
        const back = Buffer.alloc(data.length, 0xa5);
        const read = await runner.run(`read back ${data.length} at ${offset}`, () => rw.read(offset, back));
        if (read.outcome === 'ok' && !back.equals(data)) {
          // Damaged tables may send a write where another range or the metadata lives (as in qemu); elsewhere it must read back.
          if (harm.writeSafe) runner.fail(`read back ${data.length} at ${offset}`, 'a write that succeeded does not read back');
          stats.readBackDifferences.push(`${description}: ${data.length} bytes at ${offset}`);
        }
      }
      await runner.run('map read-write', () => rw.map());
      await runner.run('flush', () => rw.flush());
      await runner.run('close read-write', () => rw.close());
      const after = track((await runner.run('open after writing', () => openImage(rwPath, { readOnly: true, format, notice: () => {} }))).value);
      if (after) {
        await readChunks(runner, after, readPlan(after.length, MiB), 0xa5, false, 'read after writing');
        await runner.run('close after writing', () => after.close());
      }
      await expectBoundedGrowth(runner, 'close read-write', rwPath, damagedBytes.length);
      await runner.run('check after writing', () => checkImage(rwPath, { format }));
    }

    // Repair on another copy, check again, and read the result.
    const fixPath = join(dir, `fix.${seed.format}`);
    await copyFile(path, fixPath);
    const repaired = await runner.run('check -r', () => checkImage(fixPath, { repair: true, fix: choice.fix, format }));
    await expectBoundedGrowth(runner, 'check -r', fixPath, damagedBytes.length);
    if (repaired.value) {
      const again = await runner.run('check after repair', () => checkImage(fixPath, { format }));
      const left = again.value?.corruptions ?? 0;
      if (choice.fix === 'all' && repaired.value.corruptions === repaired.value.corruptionsFixed && left > 0) {
        stats.repairLeftCorruption.push(`${description}: check -r said every corruption was fixed, the next check found ${left}`);
      }
      const fixed = track((await runner.run('open after repair', () => openImage(fixPath, { readOnly: true, format, notice: () => {} }))).value);
      if (fixed) {
        await readChunks(runner, fixed, readPlan(fixed.length, MiB), 0xa5, false, 'read after repair');
        await runner.run('close after repair', () => fixed.close());
      }
    }
    for (const [, outcome] of runner.outcomes) stats.outcomes.set(outcome, (stats.outcomes.get(outcome) ?? 0) + 1);
    if (runner.elapsedMs > stats.slowest.ms) stats.slowest = { ms: runner.elapsedMs, description };
  } finally {
    watchdog.end();
    runner.finish();
    await Promise.allSettled(opened.map((image) => image.close()));
    await rm(dir, { recursive: true, force: true });
  }
}

/** A repair or a session of two small writes may add clusters, never make a small image huge. */
async function expectBoundedGrowth(runner: CaseRunner, step: string, path: string, damagedSize: number): Promise<void> {
  const size = (await stat(path)).size;
  const limit = Math.max(2 * damagedSize, damagedSize + 64 * MiB);
  if (size > limit) runner.fail(step, `the file grew from ${damagedSize} to ${size} bytes (more than ${limit})`);
}

function report(format: Format, stats: Stats): void {
  const outcomes = [...stats.outcomes].map(([name, count]) => `${name} ${count}`).join(', ');
  progressLine(
    `fuzz ${format}: ${stats.cases} cases (${stats.skipped} skipped), ${stats.roOpened} opened read-only, ${stats.rwOpened} read-write; ` +
      `chunks read ${stats.chunksRead}, failed ${stats.chunksFailed}; compared with the seed ${stats.comparedToSeed}, with qemu ${stats.comparedToQemu} sectors ` +
      `(qemu refused ${stats.qemuRefused}, differed ${stats.qemuDifferences.length}); writes not read back over damaged tables ${stats.readBackDifferences.length}; ` +
      `repairs that left corruption ${stats.repairLeftCorruption.length}; outcomes: ${outcomes}; ` +
      `slowest case ${Math.round(stats.slowest.ms)} ms`,
  );
  for (const line of stats.qemuDifferences.slice(0, 20)) progressLine(`  differs from qemu: ${line}`);
  if (!process.env.FUZZ_VERBOSE) return;
  progressLine(`  slowest: ${stats.slowest.description}`);
  for (const line of stats.repairLeftCorruption.slice(0, 50)) progressLine(`  repair incomplete: ${line}`);
  for (const line of stats.readBackDifferences.slice(0, 50)) progressLine(`  write not read back (damaged tables): ${line}`);
}

async function fuzz(format: Format, seedOffset: number): Promise<void> {
  const mine = seeds.filter((seed) => seed.format === format);
  const stats = newStats();
  try {
    await fc.assert(
      fc.asyncProperty(fc.nat(mine.length - 1), fc.array(mutation, { minLength: 1, maxLength: 3 }), knobs, async (seedIndex, mutations, choice) => {
        const seed = mine[seedIndex]!;
        const resolved = mutations.map((m) => resolveMutation(seed.layout, seed.bytes, m)).filter((m) => m !== undefined);
        await runCase(seed, joinDamage(seed, resolved), choice, stats);
      }),
      { seed: SEED + seedOffset, numRuns: RUNS, endOnFailure: process.env.FUZZ_SHRINK === undefined },
    );
  } catch (error) {
    // fast-check wraps the case's failure; show the case itself first.
    const cause = (error as { cause?: unknown }).cause;
    if (cause instanceof CaseFailure) {
      const replay = (error as Error).message.split('\n').filter((line) => /seed|Counterexample|Shrunk/.test(line));
      throw new Error(`${cause.message}\n${replay.join('\n')}`);
    }
    throw error;
  } finally {
    report(format, stats);
  }
  expect(stats.qemuDifferences).toEqual([]);
}

const timeout = Math.max(120_000, RUNS * 2 * budget.caseMs);

describe.skipIf(qemuMissing)('damaged images: every outcome is a success or a contained error', () => {
  it('qcow2', { timeout }, () => fuzz('qcow2', 0));
  it('QED', { timeout }, () => fuzz('qed', 1));
});

/** Cases the fuzzing found (each failed before its fix); seeds by name, damage by field and table names. */
const regressions: Array<{ name: string; seed: string; damage: (layout: Layout, file: Buffer) => ResolvedMutation[]; knobs?: Partial<Knobs> }> = [
  {
    name: 'qcow2 check: a bitmap table size from a damaged bitmap directory is not allocated (24 GB)',
    seed: 'qcow2 with a persistent dirty bitmap',
    damage: (layout) => [setField(layout, 'bitmap 0 bitmap_table_size', 0xb7f0a3c1n)],
  },
  {
    name: 'qcow2 check: a bitmap directory size above 64 MiB is not allocated',
    seed: 'qcow2 with a persistent dirty bitmap',
    damage: (layout) => [setField(layout, 'bitmaps extension directory size', 1n << 40n)],
  },
  {
    name: 'a backing file name with a newline gives a one-line message',
    seed: 'QED over a raw backing file',
    damage: (layout) => [setBytes(layout, 'backing name', 0, 5, Buffer.from('\n\x0f'))],
  },
  {
    name: 'qcow2 with the dirty bit set, l1_size 16385 and one cluster cut off: the read-write open ends in time',
    seed: 'qcow2 v3, 8-bit refcounts, lazy refcounts, dirty bit set',
    damage: (layout) => [setField(layout, 'l1_size', 16385n), truncateTo(layout, layout.fileSize - layout.clusterSize)],
  },
  {
    name: 'qcow2: a compressed cluster that decodes short is an EIO for a write that copies from it, not a RangeError',
    seed: 'qcow2 compressed clusters (deflate)',
    damage: (layout, file) => [setEntry(layout, file, 'L2', 0, 0, (entry) => entry ^ 1n)],
    knobs: { writes: [{ at: 0, length: 13220 }] },
  },
  {
    name: 'qcow2 check -r: a refcount block entry 4 TiB past the end of the file is rebuilt, not reached by growing the file',
    seed: 'qcow2 with an internal snapshot',
    damage: (layout, file) => [setEntry(layout, file, 'refcount table', 0, 5, 1n << 42n)],
  },
  {
    name: 'qcow2 check: l1_size 65536 over L2 tables and data (every data cluster read as an L2 table) ends in time',
    seed: 'qcow2 v3, 64 KiB clusters, a zero cluster',
    damage: (layout) => [setField(layout, 'l1_size', 65536n)],
  },
  {
    name: 'qcow2 writing: a refcount block 256 GiB past the end of the file is refused, not written there',
    seed: 'qcow2 with an internal snapshot',
    damage: (layout, file) => [setEntry(layout, file, 'refcount table', 0, 0, (entry) => entry ^ (1n << 38n))],
    knobs: { writes: [{ at: 0, length: 118617 }] },
  },
  {
    name: 'qcow2 writing: a write whose first part fails to allocate while a later part is refused at once leaves no unhandled rejection',
    seed: 'qcow2 v3, 512-byte clusters, 64-bit refcounts',
    damage: (layout, file) => [setEntry(layout, file, 'L1', 0, 0, (entry) => entry + 512n), setField(layout, 'snapshots_offset', 512n), truncateTo(layout, 41030)],
    knobs: { chunk: 12289, writes: [{ at: 0, length: 67470 }, { at: 0, length: 65498 }] },
  },
];

describe.skipIf(qemuMissing)('damaged images found by the fuzzing', () => {
  const defaults: Knobs = { probe: false, chunk: 200_000, parallel: false, fix: 'all', writes: [{ at: 0, length: 53721 }, { at: 0.5, length: 4096 }] };
  for (const { name, seed: seedName, damage: harmOf, knobs: overrides } of regressions) {
    it(name, { timeout: 60_000 }, async () => {
      const seed = seeds.find((s) => s.name === seedName);
      if (!seed) throw new Error(`no seed named ${seedName}`);
      const stats = newStats();
      await runCase(seed, joinDamage(seed, harmOf(seed.layout, seed.bytes)), { ...defaults, ...overrides }, stats);
      expect(stats.cases).toBe(1);
    });
  }
});

describe.skipIf(qemuMissing)('writes over damaged tables', () => {
  it('QED: an L1 entry pointing at the L1 table itself fails with EIO, and a write there never overwrites the L1 table', async () => {
    const seed = seeds.find((s) => s.name === 'QED, 4 KiB clusters, table_size 2')!;
    const dir = join(workDir, 'qed-l1-alias');
    await mkdir(dir, { recursive: true });
    const path = join(dir, 'disk.qed');
    await writeFile(path, seed.bytes);
    const l1 = seed.layout.tables.find((t) => t.kind === 'L1')!;
    await applyPatches(path, setEntry(seed.layout, seed.bytes, 'L1', 0, 0, BigInt(l1.offset)).patches);
    const l1Before = (await readFile(path)).subarray(l1.offset, l1.offset + l1.entries * 8);
    const image = await openImage(path, { format: 'qed' });
    try {
      await expect(image.read(0, Buffer.alloc(4096))).rejects.toThrow(CorruptImageError);
      await expect(image.write(8192, seededBytes(5, 70_000))).rejects.toThrow(/on the L1 table/);
      await image.write(5 * MiB, seededBytes(6, 4096)); // the other L2 table still takes writes
    } finally {
      await image.close();
    }
    expect((await readFile(path)).subarray(l1.offset, l1.offset + l1.entries * 8).equals(l1Before), 'the L1 table is unchanged').toBe(true);
  });
});

describe.skipIf(qemuMissing)('writes over damaged refcounts', () => {
  it('qcow2: a metadata cluster that a damaged refcount block calls free is never handed out for data', async () => {
    const seed = seeds.find((s) => s.name === 'qcow2 v3, 4 KiB clusters, 1-bit refcounts')!;
    const dir = join(workDir, 'refcount-reuse');
    await mkdir(dir, { recursive: true });
    const path = join(dir, 'disk.qcow2');
    await writeFile(path, seed.bytes);
    // 1-bit refcounts: the first word of block 0 covers clusters 0-63; only cluster 56 keeps refcount 1.
    await applyPatches(path, setEntry(seed.layout, seed.bytes, 'refcount block', 0, 0, 1n).patches);
    const l1 = seed.layout.tables.find((t) => t.kind === 'L1')!;
    const header = seed.bytes.subarray(0, seed.layout.clusterSize);
    const l1Bytes = seed.bytes.subarray(l1.offset, l1.offset + l1.entries * 8);
    const data = seededBytes(99, 3 * 4096);
    const image = await openImage(path, { format: 'qcow2' });
    try {
      await image.write(image.length - data.length, data);
    } finally {
      await image.close();
    }
    const after = await readFile(path);
    expect(after.subarray(0, header.length).equals(header), 'the header cluster is untouched').toBe(true);
    expect(after.subarray(l1.offset, l1.offset + l1Bytes.length).equals(l1Bytes), 'the L1 table is untouched').toBe(true);
    const reopened = await openImage(path, { readOnly: true, format: 'qcow2' });
    try {
      const back = Buffer.alloc(data.length);
      await reopened.read(reopened.length - data.length, back);
      expect(back.equals(data)).toBe(true);
    } finally {
      await reopened.close();
    }
  });
});
