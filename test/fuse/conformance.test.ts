/**
 * The conformance shapes (test/helpers/formats.ts) through real mounts of
 * bin/imgmount, with qemu-img as the oracle:
 *
 * - every shape of a format in one read-only mount (`imgmount -r a b c ... MNT`),
 *   each `<shape>.raw` `cmp`-equal to `qemu-img convert -O raw`; the chains
 *   across formats in a second mount; internal snapshots mounted with -s;
 * - writable formats: copies of every shape in one read-write mount, the same
 *   unaligned dd writes into each and into a raw reference, unmount, then
 *   `qemu-img check` is clean and `qemu-img compare` matches the reference.
 */
import { copyFile, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { built, describeEachFormat, oracleRaw, randomBytes, writableShapes, type BuiltImage, type FormatEntry, type Shape } from '../helpers/formats.js';
import { firstDifference, makeTempDir, run } from '../helpers/qemu.js';
import { imgmount, MountLab, skipWithoutFuse } from './fuse-helpers.js';

const TIMEOUT = 60_000;
const TITLE = 'conformance shapes through the FUSE mount';
const skip = skipWithoutFuse(TITLE, ['cmp', 'dd']);

/** The name an image gets in the mount. */
function mountedName(path: string): string {
  return basename(path).replace(/\.[^.]*$/, '') + '.raw';
}

/** `cmp` of a mounted file with qemu's conversion; fails naming the first differing byte. */
async function expectCmpEqual(mounted: string, oracle: string): Promise<void> {
  const result = await run('cmp', [mounted, oracle]);
  if (result.code !== 0) {
    const ours = await readFile(mounted);
    const theirs = await readFile(oracle);
    const at = firstDifference(ours, theirs);
    throw new Error(`cmp ${mounted} ${oracle}: ${(result.stdout + result.stderr).trim()} (first difference at byte offset ${at}; sizes ${ours.length} / ${theirs.length})`);
  }
}

/** lab.mount, failing with the daemon's log in the message (the lab's directory is gone by the time anyone looks). */
async function mountOrExplain(lab: MountLab, args: readonly string[], mnt: string): Promise<void> {
  try {
    await lab.mount(args, mnt);
  } catch (error) {
    const logs = await Promise.all(
      (await readdir(lab.dir)).filter((name) => name.startsWith('daemon-')).map((name) => readFile(lab.path(name), 'utf8').catch(() => '')),
    );
    throw new Error(`${(error as Error).message}\n${logs.join('\n')}`);
  }
}

/** One read-only mount of the images `shapes` build; a test per image compares it with qemu-img convert. */
function readOnlyMount(format: FormatEntry, group: string, shapes: readonly Shape[], extraArgs: readonly string[] = []): void {
  if (shapes.length === 0) return;
  describe(`${group} in one read-only mount${extraArgs.length > 0 ? ` (${extraArgs.join(' ')})` : ''}`, () => {
    let lab: MountLab;
    let mnt: string;
    const images: BuiltImage[] = [];
    beforeAll(async () => {
      lab = await MountLab.create();
      images.push(...(await Promise.all(shapes.map((shape) => built(format, shape)))));
      mnt = await lab.mountpoint();
      await mountOrExplain(lab, ['-r', ...extraArgs, ...images.map((image) => image.path)], mnt);
    }, TIMEOUT);
    afterAll(async () => {
      await lab?.cleanup();
    });

    it('shows one <name>.raw per image', async () => {
      expect((await readdir(mnt)).sort()).toEqual(images.map((image) => mountedName(image.path)).sort());
    });

    for (const [index, shape] of shapes.entries()) {
      it(`${shape.name}: cmp equal to qemu-img convert -O raw (${shape.description})`, { timeout: TIMEOUT }, async () => {
        const image = images[index]!;
        const snapshot = extraArgs[0] === '-s' ? image.snapshots?.find((s) => s.open === extraArgs[1])?.qemu : undefined;
        await expectCmpEqual(join(mnt, mountedName(image.path)), await oracleRaw(image, snapshot));
      });
    }
  });
}

/** dd of `data` at byte `offset` of `file` (notrunc; fsync when asked), exactly as a user would. */
async function dd(file: string, blob: string, offset: number, length: number, fsync: boolean): Promise<void> {
  const result = await run('dd', [`if=${blob}`, `of=${file}`, `bs=${length}`, 'count=1', `seek=${offset}`, 'oflag=seek_bytes', `conv=notrunc${fsync ? ',fsync' : ''}`, 'status=none']);
  if (result.code !== 0) throw new Error(`dd of ${length} bytes at ${offset} into ${file}: ${result.stderr}`);
}

/** Unaligned writes: the first byte, across sectors, clusters and 128 KiB FUSE requests, the backing file's end, the tail. */
function ddWrites(image: BuiltImage, size: number): Array<[number, number]> {
  const c = image.clusterSize;
  const writes: Array<[number, number]> = [
    [0, 1],
    [511, 2],
    [4095, 4097],
    [c - 3, 2 * c + 7],
    [Math.floor(size / 3) + 17, 300_001],
    [Math.floor(size / 2) - 65_536 * 3 + 1, 131_071],
    [size - 12_345, 12_345],
  ];
  if (image.backingLength !== undefined) writes.push([image.backingLength - 1000, 5000]);
  return writes.map(([offset, length]) => [Math.max(0, Math.min(offset, size - 1)), Math.min(length, size - Math.max(0, Math.min(offset, size - 1)))]);
}

describeEachFormat(
  TITLE,
  (format) => {
    readOnlyMount(format, 'every shape', format.shapes);
    readOnlyMount(format, 'chains across formats', format.chains);
    if (format.snapshots) {
      for (const shape of format.shapes) {
        for (const snapshot of shape.snapshots ?? []) readOnlyMount(format, `snapshot ${snapshot.open} of ${shape.name}`, [shape], ['-s', snapshot.open]);
      }
    }

    if (format.writable) {
      it('dd writes into copies of every shape in one read-write mount; after unmount qemu-img check is clean and compare matches', { timeout: TIMEOUT }, async () => {
        const lab = await MountLab.create();
        const copies: Array<{ image: BuiltImage; copy: string; reference: string }> = [];
        try {
          for (const shape of writableShapes(format, format.shapes)) {
            const shared = await built(format, shape);
            // A copy would share the build's external data file: such a shape is built afresh in a private directory.
            const image = shared.dataFile ? await shape.build(await makeTempDir()) : shared;
            // next to the original, so relative backing names resolve; under a name no other image has
            const copy = join(dirname(image.path), `mnt-rw-${basename(image.path)}`);
            await copyFile(image.path, copy);
            const reference = lab.path(`${shape.name}.reference.raw`);
            await copyFile(await oracleRaw(image), reference);
            copies.push({ image, copy, reference });
          }
          const mnt = await lab.mountpoint();
          await mountOrExplain(lab, ['-f', format.name, ...copies.map(({ copy }) => copy)], mnt);
          let n = 0;
          for (const { image, copy, reference } of copies) {
            const size = (await readFile(reference)).length;
            const mounted = join(mnt, mountedName(copy));
            for (const [offset, length] of ddWrites(image, size)) {
              const blob = lab.path(`blob-${n}`);
              await writeFile(blob, randomBytes(length, 0xdd00 + n));
              await dd(mounted, blob, offset, length, n % 2 === 0);
              await dd(reference, blob, offset, length, false);
              n += 1;
            }
            // read back through the mount (the kernel page cache and the driver) before unmounting
            const through = await readFile(mounted);
            const expected = await readFile(reference);
            expect(firstDifference(through, expected), `${mounted} read back after the dd writes`).toBe(-1);
          }
          const unmounted = await imgmount(['unmount', mnt]);
          expect(unmounted.code, unmounted.stderr).toBe(0);
          const problems: string[] = [];
          for (const { image, copy, reference } of copies) {
            if (format.checkable) {
              const check = await run('qemu-img', ['check', '-f', image.format, copy], { cwd: image.qemuCwd });
              if (check.code !== 0) problems.push(`qemu-img check ${copy} exited ${check.code}: ${check.stdout}${check.stderr}`);
            }
            const compare = await run('qemu-img', ['compare', '-f', image.format, '-F', 'raw', copy, reference], { cwd: image.qemuCwd });
            if (compare.code !== 0) problems.push(`qemu-img compare ${copy} ${reference} exited ${compare.code}: ${compare.stdout}${compare.stderr}`);
          }
          expect(problems).toEqual([]);
        } finally {
          await lab.cleanup();
          await Promise.all(copies.map(({ copy }) => rm(copy, { force: true })));
        }
      });
    }
  },
  { skip },
);
