/**
 * Writing qcow2 images with an external data file (qemu-img create -o
 * data_file=...[,data_file_raw=on]), with qemu-img as the oracle:
 *  - seeded random writes, zeroes and discards through the library, then
 *    `qemu-img check` clean and `qemu-img compare` equal to a model raw image;
 *    with data_file_raw=on the data file itself equals the model byte for byte;
 *    imgmount's own check agrees;
 *  - crash states: every prefix of the I/O the image and its data file got
 *    (and, past the last flush of each file, only one file's writes), each
 *    checked by `qemu-img check` (no corruption) and read by `qemu-img
 *    convert`: every byte holds what a guest flush acknowledged or what a
 *    later request wrote there (never a third value, such as zeros where the
 *    backing file showed through);
 *  - extended L2: a zero over a zero subcluster and data ones zeroes them all
 *    (it was skipped when the first touched subcluster already read as zeros);
 *  - an image whose entries do not map guest offset = data file offset opens
 *    read-only, naming the cluster.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockImage as BlockImageClass, checkImage, openImage } from '../src/index.js';
import type { BlockImage, Protocol } from '../src/index.js';
import { FileProtocol } from '../src/block/file.js';
import { ImageFileGate } from '../src/block/gate.js';
import { qcow2 } from '../src/formats/qcow2/index.js';
import { makeTempDir, qemuCompare, qemuConvertToRaw, qemuImg, qemuIo, run, seededBytes, skipWithoutQemu } from './helpers/qemu.js';

const CLUSTER = 4096;
const SIZE = 1024 * 1024;

/** A small deterministic PRNG (mulberry32). */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type Op = { kind: 'write'; offset: number; data: Buffer } | { kind: 'zero' | 'discard'; offset: number; length: number } | { kind: 'flush' };

/** Seeded requests: unaligned writes of up to three clusters, some zeroes and discards, a flush now and then. */
function randomOps(seed: number, count: number): Op[] {
  const next = prng(seed);
  const ops: Op[] = [];
  for (let i = 0; i < count; i++) {
    const roll = next();
    const length = 1 + Math.floor(next() * 3 * CLUSTER);
    const offset = Math.floor(next() * (SIZE - length));
    if (roll < 0.12) ops.push({ kind: 'flush' });
    else if (roll < 0.22) ops.push({ kind: 'zero', offset, length });
    else if (roll < 0.3) ops.push({ kind: 'discard', offset, length });
    else ops.push({ kind: 'write', offset, data: seededBytes(seed * 1000 + i, length) });
  }
  return ops;
}

function applyToModel(model: Buffer, op: Op): void {
  if (op.kind === 'write') op.data.copy(model, op.offset);
  else if (op.kind !== 'flush') model.fill(0, op.offset, op.offset + op.length);
}

async function runOp(image: BlockImage, op: Op): Promise<void> {
  if (op.kind === 'write') await image.write(op.offset, op.data);
  else if (op.kind === 'zero') await image.zero(op.offset, op.length);
  else if (op.kind === 'discard') await image.discard(op.offset, op.length);
  else await image.flush();
}

/** An image with an external data file made by qemu-img, with some data already in it (so writes also go in place). */
async function makeImage(dir: string, raw: boolean, relative = false, extra: { options?: string; backing?: boolean; clusterSize?: number } = {}): Promise<{ path: string; dataPath: string; model: Buffer }> {
  const path = join(dir, 'disk.qcow2');
  const dataPath = join(dir, 'disk.raw');
  const model = Buffer.alloc(SIZE);
  const backingArgs: string[] = [];
  if (extra.backing) {
    const base = join(dir, 'base.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', base, String(SIZE)]);
    await qemuIo(base, ['write -q -P 0x77 0 512k'], 'qcow2');
    model.fill(0x77, 0, 512 * 1024);
    backingArgs.push('-b', base, '-F', 'qcow2');
  }
  const options = `cluster_size=${extra.clusterSize ?? CLUSTER},data_file=${relative ? 'disk.raw' : dataPath},data_file_raw=${raw ? 'on' : 'off'}${extra.options ? `,${extra.options}` : ''}`;
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', options, ...backingArgs, path, String(SIZE)], { cwd: dir });
  await qemuIo(path, ['write -q -P 0x5a 64k 64k', 'write -q -P 0x3c 300k 10k'], 'qcow2', { cwd: dir });
  model.fill(0x5a, 64 * 1024, 128 * 1024);
  model.fill(0x3c, 300 * 1024, 310 * 1024);
  return { path, dataPath, model };
}

/** `qemu-img check --output=json`: the exit code and the counts. */
async function check(path: string, cwd?: string): Promise<{ code: number; corruptions: number; leaks: number; text: string }> {
  const result = await run('qemu-img', ['check', '-f', 'qcow2', '--output=json', path], { cwd });
  const report = result.stdout.trim().startsWith('{') ? (JSON.parse(result.stdout) as Record<string, number>) : {};
  return { code: result.code, corruptions: report['corruptions'] ?? 0, leaks: report['leaks'] ?? 0, text: result.stdout + result.stderr };
}

describe.skipIf(skipWithoutQemu('qcow2 data file writes'))('qcow2 with an external data file: writes', () => {
  for (const [name, raw, extra, seed] of [
    ['data_file_raw=off', false, {}, 8],
    ['data_file_raw=on', true, {}, 7],
    ['extended_l2=on (32 KiB clusters)', false, { options: 'extended_l2=on', clusterSize: 32768 }, 10],
    ['lazy_refcounts=on', false, { options: 'lazy_refcounts=on' }, 11],
    ['over a qcow2 backing file', false, { backing: true }, 12],
  ] as const) {
    it(`${name}: seeded writes, zeroes and discards match a model (check clean, compare equal${raw ? ', data file = model' : ''})`, async () => {
      const dir = await makeTempDir();
      const { path, dataPath, model } = await makeImage(dir, raw, false, extra);
      const notices: string[] = [];
      const image = await openImage(path, { format: 'qcow2', notice: (line) => notices.push(line) });
      expect(notices).toEqual([]);
      expect(image.readOnly).toBe(false);
      for (const op of randomOps(seed, 300)) {
        await runOp(image, op);
        applyToModel(model, op);
      }
      await image.close();
      const result = await check(path);
      expect(result.code, result.text).toBe(0);
      // Our own check agrees (data clusters carry no refcount in the qcow2 file).
      const ours = await checkImage(path, { format: 'qcow2' });
      expect({ corruptions: ours.corruptions, leaks: ours.leaks, messages: ours.messages }).toEqual({ corruptions: 0, leaks: 0, messages: [] });
      const modelPath = join(dir, 'model.raw');
      await writeFile(modelPath, model);
      const compare = await qemuCompare(path, 'qcow2', modelPath, 'raw');
      expect(compare.code, compare.stdout + compare.stderr).toBe(0);
      // The qcow2 file holds metadata only: the data went to the data file.
      expect((await readFile(path)).length).toBeLessThan(SIZE / 4);
      if (raw) expect((await readFile(dataPath)).subarray(0, SIZE).equals(model)).toBe(true);
      const info = JSON.parse((await qemuImg(['info', '--output=json', path])).stdout) as { 'format-specific': { data: Record<string, unknown> } };
      expect(info['format-specific'].data['data-file-raw']).toBe(raw);
    }, 60_000);
  }

  it('an image made by imgmount create -o data_file= is written and reads back in qemu', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'made.qcow2');
    const { createImage } = await import('../src/index.js');
    await createImage(path, 'qcow2', { size: SIZE, options: { data_file: join(dir, 'made.raw'), cluster_size: String(CLUSTER) } });
    const image = await openImage(path, { format: 'qcow2' });
    const model = Buffer.alloc(SIZE);
    for (const op of randomOps(9, 60)) {
      await runOp(image, op);
      applyToModel(model, op);
    }
    await image.close();
    expect((await check(path)).code).toBe(0);
    expect((await qemuConvertToRaw(path, dir, 'qcow2')).equals(model)).toBe(true);
  }, 60_000);

  it('extended L2 (no data file too): zeroing a range whose first subcluster is already zero also zeroes the data subclusters after it', async () => {
    for (const withDataFile of [false, true]) {
      const dir = await makeTempDir();
      const path = join(dir, 'sub.qcow2');
      const dataOption = withDataFile ? `,data_file=${join(dir, 'sub.raw')}` : '';
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=32768,extended_l2=on${dataOption}`, path, String(SIZE)]);
      await qemuIo(path, ['write -q -P 0x11 0 32k', 'write -q -z 0 1k'], 'qcow2');
      const image = await openImage(path, { format: 'qcow2' });
      await image.zero(512, 2048);
      await image.close();
      const expected = Buffer.alloc(SIZE);
      expected.fill(0x11, 2560, 32768);
      expect((await qemuConvertToRaw(path, dir, 'qcow2')).equals(expected), `data file: ${withDataFile}`).toBe(true);
    }
  });

  it('an image that names itself as its external data file is refused by name, read-only or not', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'x.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'data_file=y.qcow2', path, '1M'], { cwd: dir });
    const bytes = await readFile(path);
    bytes.write('x.qcow2', bytes.indexOf('y.qcow2'), 'latin1');
    await writeFile(path, bytes);
    for (const readOnly of [true, false]) {
      await expect(openImage(path, { format: 'qcow2', readOnly })).rejects.toThrow(/x\.qcow2: the qcow2 image names itself as its external data file \(x\.qcow2\)/);
    }
  });

  it('entries that do not map a cluster to its own offset in the data file: read-only, naming the cluster', async () => {
    const dir = await makeTempDir();
    const { path } = await makeImage(dir, false);
    // Point the L2 entry of guest cluster 16 (64k, qemu wrote it) at data file offset 0.
    const header = await readFile(path);
    const l1 = Number(header.readBigUInt64BE(40));
    const l2 = Number(header.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    const patched = Buffer.from(header);
    patched.writeBigUInt64BE(1n << 63n, l2 + 16 * 8);
    await writeFile(path, patched);
    const notices: string[] = [];
    const image = await openImage(path, { format: 'qcow2', notice: (line) => notices.push(line) });
    expect(image.readOnly).toBe(true);
    expect(notices.join('\n')).toMatch(/opened read-only: guest cluster at 65536 is stored at 0 of the external data file/);
    await image.close();
  });
});

/** One file's I/O as the crash model sees it: a write once it completed; a flush covers what completed before it began. */
type Record_ = { file: 0 | 1; kind: 'write'; offset: number; data: Buffer } | { file: 0 | 1; kind: 'flush'; covers: number };

function recording(inner: Protocol, file: 0 | 1, log: Record_[]): Protocol {
  return {
    path: inner.path,
    readOnly: inner.readOnly,
    read: (offset, buffer) => inner.read(offset, buffer),
    async write(offset, buffer) {
      const copy = Buffer.from(buffer);
      await inner.write(offset, buffer);
      log.push({ file, kind: 'write', offset, data: copy });
    },
    async flush() {
      const covers = log.length;
      await inner.flush();
      log.push({ file, kind: 'flush', covers });
    },
    size: () => inner.size(),
    allocatedSize: () => inner.allocatedSize(),
    truncate: (length) => inner.truncate(length),
    close: () => inner.close(),
  };
}

/** The first byte of `actual` that is neither `acked` nor what one of the `later` requests put there; -1 if none. */
function firstUnexplained(actual: Buffer, acked: Buffer, later: readonly Exclude<Op, { kind: 'flush' }>[]): number {
  for (let b = 0; b < acked.length; b++) {
    if (actual[b] === acked[b]) continue;
    const explained = later.some((op) =>
      op.kind === 'write' ? b >= op.offset && b < op.offset + op.data.length && op.data[b - op.offset] === actual[b] : b >= op.offset && b < op.offset + op.length && actual[b] === 0,
    );
    if (!explained) return b;
  }
  return -1;
}

/** The gate openImage uses, with the data file's I/O recorded into the same log as the image file's. */
class RecordingGate extends ImageFileGate {
  constructor(
    private readonly top: string,
    private readonly log: Record_[],
  ) {
    super(top, {}, true);
  }

  override async open(name: string, _role: string, options: { readOnly: boolean }): Promise<Protocol> {
    const opened = recording(await FileProtocol.open(resolve(dirname(this.top), name), options.readOnly), 1, this.log);
    this.opened.push(opened);
    return opened;
  }
}

/** The files after a crash at record `at`: what a flush of each file covered, plus the later writes `keep` picks. */
function crashState(originals: [Buffer, Buffer], log: Record_[], at: number, keep: (file: 0 | 1) => boolean): { files: [Buffer, Buffer]; key: string } {
  const durable = [0, 0];
  for (const r of log.slice(0, at)) if (r.kind === 'flush') durable[r.file] = Math.max(durable[r.file]!, r.covers);
  const files: [Buffer, Buffer] = [Buffer.from(originals[0]), Buffer.from(originals[1])];
  const applied: number[] = [];
  log.slice(0, at).forEach((r, i) => {
    if (r.kind !== 'write' || (i >= durable[r.file]! && !keep(r.file))) return;
    applied.push(i);
    const end = r.offset + r.data.length;
    if (end > files[r.file].length) files[r.file] = Buffer.concat([files[r.file], Buffer.alloc(end - files[r.file].length)]);
    r.data.copy(files[r.file], r.offset);
  });
  return { files, key: applied.join(',') };
}

describe.skipIf(skipWithoutQemu('qcow2 data file crash states'))('qcow2 with an external data file: crash states', () => {
  for (const [raw, lazy, backing] of [[false, false, false], [true, false, false], [false, true, true]] as const) {
    const name = lazy ? 'lazy_refcounts=on over a backing file (each crash state repaired by a read-write open here first)' : `data_file_raw=${raw ? 'on' : 'off'}`;
    it(`${name}: no crash state is corrupt; each byte holds what a flush acknowledged or what a later request wrote there`, async () => {
      const dir = await makeTempDir();
      const { path, dataPath, model } = await makeImage(dir, raw, true, lazy ? { options: 'lazy_refcounts=on', backing } : {});
      const backingImage = backing ? await openImage(join(dir, 'base.qcow2'), { readOnly: true }) : undefined;
      const originals: [Buffer, Buffer] = [await readFile(path), await readFile(dataPath)];
      const log: Record_[] = [];
      const file = recording(await FileProtocol.open(path, false), 0, log);
      const gate = new RecordingGate(path, log);
      const driverImage = await qcow2.open(file, { readOnly: false, files: gate });
      expect(gate.opened.map((p) => p.readOnly)).toEqual([false]);
      const image = new BlockImageClass({ path, format: 'qcow2', file, image: driverImage, gate, backing: backingImage });
      // After each guest flush: the record count and the model it acknowledged; and each later request's range.
      const acks: { at: number; model: Buffer }[] = [{ at: 0, model: Buffer.from(model) }];
      const touched: { at: number; op: Exclude<Op, { kind: 'flush' }> }[] = [];
      for (const op of randomOps(raw ? 21 : lazy ? 23 : 22, 36)) {
        if (op.kind !== 'flush') touched.push({ at: log.length, op });
        await runOp(image, op);
        applyToModel(model, op);
        if (op.kind === 'flush') acks.push({ at: log.length, model: Buffer.from(model) });
      }
      await image.close();
      await backingImage?.close();

      const seen = new Set<string>();
      let states = 0;
      let dirtyStates = 0;
      for (let at = 0; at <= log.length; at++) {
        for (const keep of [() => true, (f: 0 | 1) => f === 0, (f: 0 | 1) => f === 1, () => false]) {
          const state = crashState(originals, log, at, keep);
          // The same files under the same acknowledged model need one look.
          const ack = acks.filter((a) => a.at <= at).pop()!;
          if (seen.has(`${ack.at}:${state.key}`)) continue;
          seen.add(`${ack.at}:${state.key}`);
          states++;
          const crashDir = await makeTempDir();
          const crashPath = join(crashDir, 'disk.qcow2');
          await writeFile(crashPath, state.files[0]);
          await writeFile(join(crashDir, 'disk.raw'), state.files[1]);
          if (state.files[0].readBigUInt64BE(72) & 1n) dirtyStates++;
          if (lazy) {
            // A dirty image's refcounts are stale by design: the repair at a read-write open (as qemu's) comes first.
            const repaired = await openImage(crashPath, { format: 'qcow2', idleCleanSeconds: 0, notice: () => undefined });
            await repaired.close();
          }
          const result = await check(crashPath, crashDir);
          expect(result.corruptions, `crash at record ${at}/${log.length} (${state.key}): ${result.text}`).toBe(0);
          expect(lazy ? [0] : [0, 3], `crash at record ${at}: ${result.text}`).toContain(result.code);
          const guestPath = join(crashDir, 'guest.raw');
          const converted = await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', crashPath, guestPath], { cwd: crashDir });
          expect(converted.code, converted.stderr).toBe(0);
          const guest = await readFile(guestPath);
          const later = touched.filter((t) => t.at >= ack.at).map((t) => t.op);
          expect(firstUnexplained(guest, ack.model, later), `crash at record ${at}: the guest's first byte neither acknowledged nor written later`).toBe(-1);
          if (raw) {
            const dataFile = Buffer.concat([state.files[1], Buffer.alloc(Math.max(0, SIZE - state.files[1].length))]).subarray(0, SIZE);
            expect(firstUnexplained(dataFile, ack.model, later), `crash at record ${at}: the data file's first byte neither acknowledged nor written later`).toBe(-1);
          }
        }
      }
      expect(states).toBeGreaterThan(10);
      // With lazy refcounts the crash states include dirty images (their repair is what is tested).
      if (lazy) expect(dirtyStates).toBeGreaterThan(0);
    }, 300_000);
  }
});
