/**
 * One conformance suite for every format (test/helpers/formats.ts lists the
 * formats and the shapes of image qemu makes in each). The oracle is always
 * qemu-img / qemu-io:
 *
 * 0. each shape is what its name says (qemu-img info fields, kinds of run in
 *    qemu-img map), and info() agrees with qemu-img info;
 * 1. images made by qemu read through the library byte for byte like
 *    `qemu-img convert -O raw`, in one request and in unaligned odd-sized pieces;
 * 2. `map()` agrees with `qemu-img map --output=json` (whole image and an
 *    unaligned sub-range);
 * 3. backing chains across formats (qcow2 over QED over raw, QED over qcow2,
 *    backing files shorter than the image) read like `qemu-img convert` of the top;
 * 4. writable formats: seeded random writes against an in-memory model, then
 *    `qemu-img check` is clean and `qemu-img compare` matches a raw of the model;
 * 5. read-only formats: a read-write open comes back read-only with a notice,
 *    and the files stay untouched;
 * 6. internal snapshots open like `qemu-img convert -l snapshot.name=...`.
 */
import { createHash } from 'node:crypto';
import { copyFile, readFile, rm, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage, type BlockImage } from '../src/index.js';
import {
  built, describeEachFormat, mapForComparison, oracleRaw, qemuMapHas, type BuiltImage, type FormatEntry, type Shape,
  readOnlyShapes,
} from './helpers/formats.js';
import { firstDifference, makeTempDir, qemuInfo, qemuMap, readAll, run } from './helpers/qemu.js';
import { seededRandom } from './helpers/random.js';

const TIMEOUT = { timeout: 60_000 };

/** Fails with the first differing offset, the bytes there and how many differ. */
function expectSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  const at = firstDifference(actual, expected);
  if (at < 0) return;
  let count = 0;
  let last = at;
  const length = Math.min(actual.length, expected.length);
  for (let i = at; i < length; i++) {
    if (actual[i] !== expected[i]) {
      count += 1;
      last = i;
    }
  }
  const show = (buffer: Buffer) => buffer.subarray(at, at + 16).toString('hex');
  throw new Error(
    `${what}: first difference at offset ${at} (0x${at.toString(16)}); got ${show(actual)}, qemu ${show(expected)}; ` +
      `${count} bytes differ, the last at ${last}; lengths ${actual.length} / ${expected.length}`,
  );
}

async function withImage<T>(path: string, options: Parameters<typeof openImage>[1], body: (image: BlockImage) => Promise<T>): Promise<T> {
  const image = await openImage(path, options);
  try {
    return await body(image);
  } finally {
    await image.close();
  }
}

/** Reads in `pieces` sequential pieces of 4097 bytes, then odd-sized reads at seeded offsets, 8 in flight at a time. */
async function expectPiecesLikeQemu(image: BlockImage, expected: Buffer, built: BuiltImage, seed: number): Promise<void> {
  expectSameBytes(await readAll(image, 4097), expected, 'sequential 4097-byte reads');
  const random = seededRandom(seed);
  const c = built.clusterSize;
  const reads: Array<[number, number]> = [];
  for (let i = 0; i < 96; i++) {
    const kind = i % 3;
    let length = kind === 0 ? 4097 : kind === 1 ? random.int(1, 3 * c + 17) : random.int(1, 600);
    length = Math.min(length, expected.length);
    // kind 2: near a cluster boundary
    const offset =
      kind === 2
        ? Math.min(expected.length - length, Math.max(0, random.int(0, Math.floor(expected.length / c)) * c + random.int(-300, 300)))
        : random.int(0, expected.length - length);
    reads.push([offset, length]);
  }
  if (built.backingLength !== undefined) reads.push([built.backingLength - 1000, 2000], [built.backingLength - 1, 2]);
  for (let i = 0; i < reads.length; i += 8) {
    const batch = reads.slice(i, i + 8).map(([offset, length]) => ({ offset, buffer: Buffer.alloc(length, 0xee) }));
    await Promise.all(batch.map(({ offset, buffer }) => image.read(offset, buffer)));
    for (const { offset, buffer } of batch) {
      expectSameBytes(buffer, expected.subarray(offset, offset + buffer.length), `seed ${seed}: read of ${buffer.length} bytes at ${offset}`);
    }
  }
}

/** Bodies 1 and 2 for one shape (the chain bodies reuse them). */
function readAndMapTests(format: FormatEntry, shape: Shape, seed: number): void {
  describe(`${shape.name}: ${shape.description}`, () => {
    it('is what its name says, by qemu-img info and map', TIMEOUT, async () => {
      const image = await built(format, shape);
      const says = image.qemuSays;
      expect(await qemuInfo(image.path, image.format, { cwd: image.qemuCwd })).toMatchObject({ format: format.name, ...says.info });
      const runs = await qemuMap(image.path, image.format, { cwd: image.qemuCwd });
      const missing = (says.map ?? []).filter((feature) => !qemuMapHas(runs, feature, image.clusterSize));
      const unexpected = (says.mapNot ?? []).filter((feature) => qemuMapHas(runs, feature, image.clusterSize));
      expect({ missing, unexpected }, JSON.stringify(runs)).toEqual({ missing: [], unexpected: [] });
    });

    it('info() agrees with qemu-img info', TIMEOUT, async () => {
      const image = await built(format, shape);
      const theirs = await qemuInfo(image.path, image.format, { cwd: image.qemuCwd });
      await withImage(image.path, { readOnly: true, format: image.format }, async (opened) => {
        const ours = await opened.info();
        const pick = (info: Record<string, unknown>) => Object.fromEntries(Object.entries(info).filter(([, value]) => value !== undefined));
        const fromOurs = pick({
          'virtual-size': ours.virtualSize,
          'actual-size': ours.actualSize,
          'cluster-size': ours.clusterSize,
          'backing-filename': ours.backingFilename,
          'full-backing-filename': ours.fullBackingFilename,
          'backing-filename-format': theirs['backing-filename-format'] === undefined ? undefined : ours.backingFormat,
          // qemu-img shows no dirty flag for some formats (parallels, bochs, cloop, dmg); ours must show one exactly where qemu-img does
          'dirty-flag': ours.dirty,
          'format-specific': theirs['format-specific'] === undefined ? undefined : { type: format.name, data: ours.formatSpecific },
          snapshots: ours.snapshots?.map((snapshot) => pick({
            id: snapshot.id, name: snapshot.name, 'vm-state-size': snapshot.vmStateSize, 'date-sec': snapshot.dateSec, 'date-nsec': snapshot.dateNsec,
            'vm-clock-sec': snapshot.vmClockSec, 'vm-clock-nsec': snapshot.vmClockNsec, icount: snapshot.icount,
          })),
        });
        // the keys either side gives (of those compared); one side's missing key shows as undefined
        const keys = new Set([...Object.keys(fromOurs), ...['virtual-size', 'cluster-size', 'backing-filename', 'snapshots', 'format-specific', 'dirty-flag'].filter((key) => theirs[key] !== undefined)]);
        const select = (info: Record<string, unknown>) => Object.fromEntries([...keys].map((key) => [key, info[key]]));
        expect(select(fromOurs)).toEqual(select(theirs));
      });
    });

    it('reads in one request like qemu-img convert -O raw (format probed)', TIMEOUT, async () => {
      const image = await built(format, shape);
      const expected = await readFile(await oracleRaw(image));
      await withImage(image.path, { readOnly: true }, async (opened) => {
        expect(opened.format).toBe(format.name);
        expect(opened.length).toBe(expected.length);
        const whole = Buffer.alloc(opened.length, 0xee);
        await opened.read(0, whole);
        expectSameBytes(whole, expected, 'one read of the whole image');
      });
    });

    it('reads in 4097-byte pieces and odd-sized pieces at seeded offsets like qemu-img convert', TIMEOUT, async () => {
      const image = await built(format, shape);
      const expected = await readFile(await oracleRaw(image));
      await withImage(image.path, { readOnly: true, format: image.format }, (opened) => expectPiecesLikeQemu(opened, expected, image, seed));
    });

    it('maps like qemu-img map --output=json', TIMEOUT, async () => {
      const image = await built(format, shape);
      const theirs = await qemuMap(image.path, image.format, { cwd: image.qemuCwd });
      await withImage(image.path, { readOnly: true, format: image.format }, async (opened) => {
        const ours = await opened.map();
        expect(mapForComparison(ours, image.layers)).toEqual(mapForComparison(theirs, image.layers));
        const ownFile = image.dataFile ?? image.path;
        const misplaced = ours.filter((run) => run.data && run.depth === 0 && !run.compressed && run.filename !== ownFile);
        expect(misplaced, `data of the top image is in ${ownFile}`).toEqual([]);
        // an unaligned sub-range
        const start = Math.floor(opened.length / 3) + 1234;
        const length = Math.floor(opened.length / 3) + 777;
        const part = await qemuMap(image.path, image.format, { cwd: image.qemuCwd, start, length });
        expect(mapForComparison(await opened.map(start, length), image.layers)).toEqual(mapForComparison(part, image.layers));
      });
    });
  });
}

describeEachFormat('images made by qemu-img / qemu-io read and map like qemu', (format) => {
  for (const [index, shape] of format.shapes.entries()) readAndMapTests(format, shape, 0xc0f + index);
});

describeEachFormat(
  'backing chains across formats read and map like qemu-img convert / map of the top',
  (format) => {
    for (const [index, shape] of format.chains.entries()) readAndMapTests(format, shape, 0xc4a1 + index);
  },
  { needs: 'backing' },
);

/**
 * Seeded random writes (unaligned, across clusters, around the end of a
 * shorter backing file, several in flight over disjoint ranges) and reads
 * against a model that starts as qemu-img convert of the image; the image is
 * reopened between rounds. Writes go to a copy of the image next to it (so a
 * relative backing name still resolves); an image with an external data file
 * (which the copy shares) is built afresh in its own directory first.
 */
async function differential(format: FormatEntry, image: BuiltImage, seed: number): Promise<void> {
  const copy = join(dirname(image.path), `rw-${seed}-${basename(image.path)}`);
  const modelPath = `${copy}.model`;
  await copyFile(image.path, copy);
  try {
    const model = await readFile(await oracleRaw(image));
    const size = model.length;
    const c = image.clusterSize;
    const random = seededRandom(seed);
    const randomRange = (): [number, number] => {
      const kind = random.int(0, 4);
      let offset: number;
      if (kind === 0 || kind === 4) offset = random.int(0, size - 1);
      else if (kind === 1) offset = random.int(0, Math.floor(size / c)) * c + random.int(-3, 3);
      else if (kind === 2) offset = (image.backingLength ?? size) - random.int(0, 2 * c);
      else offset = size - random.int(1, 2 * c);
      offset = Math.min(Math.max(0, offset), size - 1);
      const length = Math.min(random.int(1, kind === 4 ? 4 * c + 17 : 3 * c), size - offset);
      return [offset, length];
    };
    let operations = 0;
    for (let round = 0; round < 3; round++) {
      await withImage(copy, { format: image.format }, async (opened) => {
        expect(opened.readOnly).toBe(false);
        for (let batch = 0; batch < 40; batch++) {
          const taken: Array<[number, number]> = [];
          const pending: Promise<void>[] = [];
          const reads: Array<{ offset: number; expected: Buffer; actual: Buffer }> = [];
          for (let op = 0; op < 6; op++) {
            const [offset, length] = randomRange();
            if (taken.some(([a, b]) => offset < b && a < offset + length)) continue;
            taken.push([offset, offset + length]);
            operations += 1;
            if (random.int(0, 2) !== 0) {
              const data = Buffer.alloc(length);
              random.fill(data);
              data.copy(model, offset);
              pending.push(opened.write(offset, data));
            } else {
              const actual = Buffer.alloc(length);
              reads.push({ offset, expected: Buffer.from(model.subarray(offset, offset + length)), actual });
              pending.push(opened.read(offset, actual));
            }
          }
          await Promise.all(pending);
          for (const { offset, expected, actual } of reads) {
            expectSameBytes(actual, expected, `seed ${seed} round ${round} batch ${batch}: read of ${expected.length} bytes at ${offset}`);
          }
        }
      });
    }
    // 720 attempts; overlapping ones are dropped, more of them with 2 MiB clusters on a 16 MiB image.
    expect(operations).toBeGreaterThan(300);
    await withImage(copy, { readOnly: true, format: image.format }, async (opened) => {
      expectSameBytes(await readAll(opened), model, `seed ${seed}: the whole image after reopening`);
    });
    if (format.checkable) {
      const check = await run('qemu-img', ['check', '-f', image.format, copy], { cwd: image.qemuCwd });
      expect(check.code, check.stdout + check.stderr).toBe(0);
    }
    await writeFile(modelPath, model);
    const compare = await run('qemu-img', ['compare', '-f', image.format, '-F', 'raw', copy, modelPath], { cwd: image.qemuCwd });
    expect(compare.code, compare.stdout + compare.stderr).toBe(0);
  } finally {
    await rm(copy, { force: true });
    await rm(modelPath, { force: true });
  }
}

describeEachFormat(
  'random writes match an in-memory model; qemu-img check is clean and qemu-img compare matches',
  (format) => {
    for (const [index, shape] of [...format.shapes, ...format.chains].entries()) {
      if (shape.readOnly) continue;
      it(`${shape.name}: ${shape.description}`, TIMEOUT, async () => {
        const image = await built(format, shape);
        // The shared build's data file must stay as built: the writes go to a private one.
        await differential(format, image.dataFile ? await shape.build(await makeTempDir()) : image, 0xd1ff + index);
      });
    }
  },
  { needs: 'write' },
);

async function fingerprint(paths: readonly string[]): Promise<string[]> {
  return Promise.all(paths.map(async (path) => createHash('sha256').update(await readFile(path)).digest('hex')));
}

describeEachFormat(
  'read-only formats and shapes: a read-write open is read-only, with a notice, and changes nothing',
  (format) => {
    for (const shape of readOnlyShapes(format, [...format.shapes, ...format.chains])) {
      it(`${shape.name}`, TIMEOUT, async () => {
        const image = await built(format, shape);
        const files = [image.path, ...(image.dataFile ? [image.dataFile] : [])];
        const before = await fingerprint(files);
        const notices: string[] = [];
        await withImage(image.path, { notice: (line) => notices.push(line) }, async (opened) => {
          expect(opened.readOnly).toBe(true);
          expect(notices.some((line) => line.includes(image.path) && /read-only/.test(line) && (!shape.readOnly || shape.readOnly.test(line))), notices.join('\n')).toBe(true);
          await expect(opened.write(0, Buffer.alloc(512, 1))).rejects.toMatchObject({ name: 'ReadOnlyError' });
          await opened.flush();
        });
        expect(await fingerprint(files)).toEqual(before);
      });
    }
  },
  { needs: 'read-only' },
);

describeEachFormat('internal snapshots open like qemu-img convert -l', (format) => {
  if (format.snapshots) {
    for (const shape of format.shapes) {
      for (const which of shape.snapshots ?? []) {
        it(`${shape.name}: snapshot ${which.open} (${shape.description})`, TIMEOUT, async () => {
          const image = await built(format, shape);
          const expected = await readFile(await oracleRaw(image, which.qemu));
          const current = await readFile(await oracleRaw(image));
          expect(firstDifference(expected, current), 'qemu reads the snapshot differently from the current state').toBeGreaterThanOrEqual(0);
          await withImage(image.path, { snapshot: which.open, format: image.format }, async (opened) => {
            expect(opened.readOnly).toBe(true);
            expectSameBytes(await readAll(opened), expected, `snapshot ${which.open} read whole`);
            expectSameBytes(await readAll(opened, 4097), expected, `snapshot ${which.open} in 4097-byte pieces`);
          });
        });
      }
    }
  } else {
    it('opening an internal snapshot is refused by name', TIMEOUT, async () => {
      const image = await built(format, format.shapes[0]!);
      await expect(openImage(image.path, { snapshot: 'snap1', format: image.format })).rejects.toThrow(/snapshot/);
    });
  }
});
