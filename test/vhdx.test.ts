/**
 * VHDX beyond the conformance entry (which covers qemu-made dynamic and fixed
 * images): map tells the truth about qemu-made images (data runs hold the
 * guest bytes at their host offsets, untouched blocks are unallocated or
 * zero); check agrees with qemu-img check; a log still to be replayed is
 * replayed in memory on a read-only open and the file's bytes stay the same
 * (qemu's replay by `qemu-img check -r all` on a copy, and the test writer's
 * model, are the oracles); differencing images from the test writer read like
 * libvhdi (python3-libvhdi) and the writer's model; damaged structures are
 * refused one field at a time.
 */
import { createHash } from 'node:crypto';
import { copyFile, readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage, openImage, type BlockImage, type OpenImageOptions } from '../src/index.js';
import { makeTempDir, patchBytes, qemuCheck, qemuImg, qemuIo, readAll, readBytes, run, seededBytes, skipWithoutQemu } from './helpers/qemu.js';
import { currentDataWriteGuid, LAYOUT, logEntry, sealChecksum, STATE, writeVhdx, type BlockSpec, type VhdxSpec } from './helpers/vhdx-writer.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const T = { timeout: 60_000 };
const skipQemu = skipWithoutQemu('VHDX tests checked with qemu-img');

async function withImage<R>(path: string, options: OpenImageOptions, body: (image: BlockImage) => Promise<R>): Promise<R> {
  const image = await openImage(path, options);
  try {
    return await body(image);
  } finally {
    await image.close();
  }
}

async function qemuRaw(path: string, dir: string, name: string): Promise<Buffer> {
  const out = join(dir, `${name}.raw`);
  await qemuImg(['convert', '-f', 'vhdx', '-O', 'raw', path, out]);
  return readFile(out);
}

async function sha(path: string): Promise<string> {
  return createHash('sha256').update(await readFile(path)).digest('hex');
}

async function openError(path: string, options: OpenImageOptions = { readOnly: true }): Promise<Error> {
  let image: BlockImage;
  try {
    image = await openImage(path, options);
  } catch (error) {
    return error as Error;
  }
  await image.close();
  throw new Error(`${path} opened, but it should have been refused`);
}

/** libvhdi's reading (python3-libvhdi) of an image with its parents, `ranges` of it or whole. */
async function libvhdiRead(files: string[], out: string, ranges?: Array<[number, number]>): Promise<Buffer> {
  const script = [
    'import pyvhdi, sys, json',
    'names = json.loads(sys.argv[1]); ranges = json.loads(sys.argv[2])',
    'files = []',
    'for n in names:',
    '    f = pyvhdi.file(); f.open(n); files.append(f)',
    'for c, p in zip(files, files[1:]):',
    '    c.set_parent(p)',
    'top = files[0]',
    'if not ranges: ranges = [[0, top.get_media_size()]]',
    'with open(sys.argv[3], "wb") as out:',
    '    for off, length in ranges:',
    '        pos = off',
    '        while pos < off + length:',
    '            n = min(4 << 20, off + length - pos)',
    '            out.write(top.read_buffer_at_offset(n, pos)); pos += n',
  ].join('\n');
  const result = await run('/usr/bin/python3', ['-c', script, JSON.stringify(files), JSON.stringify(ranges ?? []), out]);
  if (result.code !== 0) throw new Error(`libvhdi (python3-libvhdi) failed: ${result.stderr}`);
  return readFile(out);
}

// ---------------------------------------------------------------------------
// qemu-made images: map and check
// ---------------------------------------------------------------------------

describe.skipIf(skipQemu)('qemu-made VHDX: map and check', () => {
  async function qemuMade(dir: string, name: string, options: string, size: number, commands: string[]): Promise<string> {
    const path = join(dir, `${name}.vhdx`);
    await qemuImg(['create', '-f', 'vhdx', '-o', options, path, String(size)]);
    await qemuIo(path, commands, 'vhdx');
    return path;
  }

  it('data runs hold the guest bytes at their host offsets; never-written blocks are unallocated (block_state_zero=off) or zero', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const commands = ['write -P 0x41 100 5000', `write -P 0x42 ${3 * MiB - 10} 20`, `write -P 0x43 ${7 * MiB} 4096`];
    for (const [name, option, untouched] of [['off', 'block_state_zero=off', { present: false, zero: true }], ['on', 'block_state_zero=on', { present: true, zero: true }]] as const) {
      const path = await qemuMade(dir, name, `block_size=1M,${option}`, 8 * MiB, commands);
      const expected = await qemuRaw(path, dir, name);
      const file = await readFile(path);
      await withImage(path, { readOnly: true }, async (image) => {
        const runs = await image.map();
        const written = new Set([0, 2, 3, 7]);
        for (const run of runs) {
          const blocks = [...Array(run.length / MiB).keys()].map((i) => run.offset / MiB + i);
          if (run.data) {
            expect(blocks.every((b) => written.has(b)), `${name}: data run at ${run.offset}`).toBe(true);
            expect(run.filename).toBe(path);
            expect(file.subarray(run.hostOffset!, run.hostOffset! + run.length).equals(expected.subarray(run.offset, run.offset + run.length))).toBe(true);
          } else {
            expect(blocks.some((b) => written.has(b)), `${name}: no data at ${run.offset}`).toBe(false);
            expect({ present: run.present, zero: run.zero }).toEqual(untouched);
            expect(expected.subarray(run.offset, run.offset + run.length).equals(Buffer.alloc(run.length))).toBe(true);
          }
        }
        expect(runs.filter((r) => r.data).reduce((n, r) => n + r.length, 0)).toBe(4 * MiB);
      });
    }
  });

  it('check of a clean image finds nothing, like qemu-img check; a truncated file is one corruption naming the block, as qemu-img check says (qemu then refuses the whole image; here only that block fails)', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const path = await qemuMade(dir, 'c', 'block_size=1M,block_state_zero=off', 6 * MiB, ['write -P 0x51 0 4096', `write -P 0x52 ${5 * MiB} 4096`]);
    expect((await qemuCheck(path, 'vhdx')).code).toBe(0);
    const clean = await checkImage(path, { format: 'vhdx' });
    expect(clean).toMatchObject({ corruptions: 0, leaks: 0, allocatedClusters: 2, totalClusters: 6 });
    const size = (await readFile(path)).length;
    await truncate(path, size - MiB / 2);
    const theirs = await qemuCheck(path, 'vhdx');
    expect({ code: theirs.code, says: /1 errors were found/.test(theirs.stdout) }).toEqual({ code: 2, says: true });
    expect(theirs.stderr).toMatch(/BAT entry 5 .*points after end of file/);
    const damaged = await checkImage(path, { format: 'vhdx' });
    expect(damaged.corruptions).toBe(1);
    expect(damaged.messages.join('\n')).toMatch(/payload block 5\b.*past the end of the file/);
    await withImage(path, { readOnly: true }, async (image) => {
      await image.read(0, Buffer.alloc(4096));
      await expect(image.read(5 * MiB, Buffer.alloc(4096))).rejects.toThrow(/payload block 5 .*past the end of the file/);
    });
  });
});

describe.skipIf(skipQemu)('VHDX from the test writer that qemu reads too', () => {
  /** qemu-io verifies that `length` bytes at `offset` are all `value`. */
  async function qemuSees(path: string, offset: number, length: number, value: number): Promise<void> {
    const result = await run('qemu-io', ['-r', '-f', 'vhdx', '-c', `read -P ${value} ${offset} ${length}`, path]);
    expect(result.stdout + result.stderr, `qemu-io read -P ${value} ${offset} ${length}`).not.toMatch(/Pattern verification failed|error|failed/i);
    expect(result.stdout).toMatch(/^read \d+\/\d+ bytes/m);
  }

  for (const sector of [512, 4096] as const) {
    it(`${sector}-byte logical sectors, every fixed/dynamic block state, blocks on both sides of the first sector bitmap entry`, T, async () => {
      const dir = await makeTempDir('imgmount-vhdx-');
      const path = join(dir, `s${sector}.vhdx`);
      // 1 MiB blocks: chunk ratio 4096 (512-byte sectors) or 32768 (4096): BAT entry 4096 is a sector bitmap entry for 512
      const size = 4100 * MiB;
      const blocks = new Map<number, BlockSpec>([
        [0, { state: STATE.FULLY_PRESENT, data: Buffer.alloc(MiB, 0x31) }],
        [1, { state: STATE.ZERO }],
        [2, { state: STATE.UNDEFINED }],
        [3, { state: STATE.UNMAPPED }],
        [4095, { state: STATE.FULLY_PRESENT, data: Buffer.alloc(MiB, 0x32) }],
        [4096, { state: STATE.FULLY_PRESENT, data: Buffer.alloc(MiB, 0x33) }],
        [4099, { state: STATE.FULLY_PRESENT, data: Buffer.alloc(MiB, 0x34) }],
      ]);
      await writeVhdx(path, { virtualSize: size, blockSize: MiB, logicalSectorSize: sector, blocks });
      const expectations: Array<[number, number, number]> = [
        [0, MiB, 0x31], [MiB, 4 * MiB, 0], [4095 * MiB, MiB, 0x32], [4096 * MiB, MiB, 0x33], [4097 * MiB, 2 * MiB, 0], [4099 * MiB, MiB, 0x34],
      ];
      // qemu 7.2 reads only 512-byte logical sectors ("Operation not supported" otherwise): libvhdi is the oracle for both
      const theirs = await libvhdiRead([path], join(dir, 'libvhdi.raw'), expectations.map(([offset, length]) => [offset, length]));
      let at = 0;
      await withImage(path, { readOnly: true }, async (image) => {
        for (const [offset, length, value] of expectations) {
          if (sector === 512) await qemuSees(path, offset, length, value);
          expect(theirs.subarray(at, at + length).equals(Buffer.alloc(length, value)), `libvhdi at ${offset}`).toBe(true);
          at += length;
          const ours = Buffer.alloc(length);
          await image.read(offset, ours);
          expect(ours.equals(Buffer.alloc(length, value)), `ours at ${offset}`).toBe(true);
        }
        if (sector === 512) {
          const info = JSON.parse((await qemuImg(['info', '-f', 'vhdx', '--output=json', path])).stdout) as Record<string, unknown>;
          expect(info['virtual-size']).toBe(image.length);
        }
      });
    });
  }
});

// ---------------------------------------------------------------------------
// The log
// ---------------------------------------------------------------------------

function loggedSpec(log: VhdxSpec['log']): VhdxSpec {
  const blocks = new Map<number, BlockSpec>([
    [0, { state: STATE.FULLY_PRESENT, data: seededBytes(1, MiB) }],
    [1, { state: STATE.FULLY_PRESENT, data: seededBytes(2, MiB), logged: true }],
    [3, { state: STATE.ZERO }],
    [4, { state: STATE.FULLY_PRESENT, data: seededBytes(4, MiB), logged: true }],
  ]);
  return { virtualSize: 6 * MiB, blockSize: MiB, blocks, log };
}

describe.skipIf(skipQemu)('a log still to be replayed', () => {
  it('a read-only open replays it in memory, says so, leaves the file unchanged, and reads like qemu after qemu-img check -r all', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const path = join(dir, 'log.vhdx');
    // one entry (qemu's own shape), wrapping around the end of the 1 MiB log, and a stale entry of an older sequence
    await writeVhdx(path, loggedSpec({ start: MiB - 4096, staleAt: 64 * KiB }));
    const before = await sha(path);
    expect((await run('qemu-img', ['info', '-f', 'vhdx', path])).stderr).toMatch(/log that needs to be replayed/);
    const copy = join(dir, 'copy.vhdx');
    await copyFile(path, copy);
    await qemuImg(['check', '-r', 'all', '-f', 'vhdx', copy]);
    const expected = await qemuRaw(copy, dir, 'copy');
    expect(expected.subarray(MiB, MiB + 4096).equals(seededBytes(2, MiB).subarray(0, 4096))).toBe(true); // qemu did replay it
    // (a read-write open replays it on disk instead: test/vhdx-write.test.ts)
    const notices: string[] = [];
    await withImage(path, { readOnly: true, notice: (line) => notices.push(line) }, async (image) => {
      expect(image.readOnly).toBe(true);
      expect((await readAll(image)).equals(expected)).toBe(true);
      const map = await image.map();
      expect(map.filter((r) => r.data).map((r) => [r.offset, r.length])).toEqual([[0, 2 * MiB], [4 * MiB, MiB]]);
    });
    expect(notices.join('\n')).toMatch(/log holds 1 entry .*replayed in memory .*the file is not changed/);
    expect(await sha(path)).toBe(before);
  });

  it('a log qemu left behind (its BAT write during log replay failed, injected by blkdebug) replays in memory like qemu-img check -r all replays it', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const path = join(dir, 'qemu-log.vhdx');
    await qemuImg(['create', '-q', '-f', 'vhdx', '-o', 'block_size=1M,block_state_zero=off', path, String(8 * MiB)]);
    await qemuIo(path, [`write -P 0x65 ${3 * MiB + 100} 5000`], 'vhdx');
    // the BAT region, from the region table (entry GUID 2DC27766-...)
    const table = await readBytes(path, LAYOUT.region1, 64 * KiB);
    const entries = [...Array(table.readUInt32LE(8)).keys()].map((i) => table.subarray(16 + 32 * i, 48 + 32 * i));
    const batOffset = Number(entries.find((e) => e.readUInt32LE(0) === 0x2dc27766)!.readBigUInt64LE(16));
    const config = join(dir, 'blkdebug.conf');
    await writeFile(config, `[inject-error]\nevent = "pwritev"\nsector = "${batOffset / 512}"\nerrno = "5"\nonce = "on"\n`);
    const spec = { driver: 'vhdx', file: { driver: 'blkdebug', config, image: { driver: 'file', filename: path } } };
    const failed = await run('qemu-io', ['-c', 'write -P 0x66 1000 70000', `json:${JSON.stringify(spec)}`]);
    expect(failed.stdout + failed.stderr).toMatch(/write failed: Input\/output error/);
    expect((await run('qemu-img', ['info', '-f', 'vhdx', path])).stderr).toMatch(/log that needs to be replayed/);
    const before = await sha(path);
    const copy = join(dir, 'copy.vhdx');
    await copyFile(path, copy);
    await qemuImg(['check', '-r', 'all', '-f', 'vhdx', copy]);
    const expected = await qemuRaw(copy, dir, 'copy');
    expect(expected.subarray(1000, 71000).equals(Buffer.alloc(70000, 0x66))).toBe(true);
    const notices: string[] = [];
    await withImage(path, { readOnly: true, notice: (line) => notices.push(line) }, async (image) => {
      expect((await readAll(image)).equals(expected)).toBe(true);
    });
    expect(notices.join('\n')).toMatch(/log holds 1 entry .*replayed in memory/);
    expect(await sha(path)).toBe(before);
  });

  it('a sequence of three entries with a zero descriptor replays whole (the writer\'s replayed image, read by qemu, is the oracle)', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const path = join(dir, 'seq.vhdx');
    const spec = loggedSpec({ entries: 3, start: 200 * KiB, zero: [0, 8192, 12288] });
    spec.blocks.set(5, { state: STATE.FULLY_PRESENT, data: seededBytes(5, MiB), logged: true });
    spec.blockSize = MiB;
    // logged BAT entries in three different 4 KiB BAT sectors need a bigger disk: blocks 600 and 1100
    spec.virtualSize = 1200 * MiB;
    spec.blocks.set(600, { state: STATE.FULLY_PRESENT, data: seededBytes(600, MiB), logged: true });
    spec.blocks.set(1100, { state: STATE.FULLY_PRESENT, data: seededBytes(1100, MiB), logged: true });
    const written = await writeVhdx(path, spec);
    const model = join(dir, 'model.vhdx');
    await writeFile(model, written.replayed);
    const before = await sha(path);
    const ranges: Array<[number, number]> = [[0, 6 * MiB], [600 * MiB - 100, MiB + 200], [1100 * MiB, MiB], [1199 * MiB, MiB]];
    const expected = await qemuRaw(model, dir, 'model');
    await withImage(path, { readOnly: true }, async (image) => {
      for (const [offset, length] of ranges) {
        const ours = Buffer.alloc(length);
        await image.read(offset, ours);
        expect(ours.equals(expected.subarray(offset, offset + length)), `range ${offset}`).toBe(true);
      }
      expect(expected.subarray(600 * MiB, 601 * MiB).equals(seededBytes(600, MiB))).toBe(true);
      const head = Buffer.alloc(6 * MiB);
      await image.read(0, head);
      expect(head.subarray(8192, 8192 + 12288).equals(Buffer.alloc(12288))).toBe(true);
      expect(head.subarray(5 * MiB, 6 * MiB).equals(seededBytes(5, MiB))).toBe(true);
    });
    expect(await sha(path)).toBe(before);
  });

  it('an entry whose CRC-32C does not match is not replayed, as in qemu', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const path = join(dir, 'badlog.vhdx');
    await writeVhdx(path, loggedSpec({ start: 0 }));
    const data = await readBytes(path, LAYOUT.log + 4096 + 100, 1);
    await patchBytes(path, LAYOUT.log + 4096 + 100, Buffer.from([data[0]! ^ 0xff]));
    const copy = join(dir, 'copy.vhdx');
    await copyFile(path, copy);
    await qemuImg(['check', '-r', 'all', '-f', 'vhdx', copy]);
    const expected = await qemuRaw(copy, dir, 'copy');
    expect(expected.subarray(MiB, 2 * MiB).equals(Buffer.alloc(MiB))).toBe(true); // block 1 stayed NOT_PRESENT
    const notices: string[] = [];
    await withImage(path, { readOnly: true, notice: (l) => notices.push(l) }, async (image) => {
      expect((await readAll(image)).equals(expected)).toBe(true);
    });
    expect(notices.join('\n')).not.toMatch(/replayed/);
  });

  it('a log entry that says the file was longer than it is (a truncated file) is refused', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const path = join(dir, 'trunc.vhdx');
    await writeVhdx(path, loggedSpec({ start: 0 }));
    const size = (await readFile(path)).length;
    await truncate(path, size - MiB);
    expect((await openError(path)).message).toMatch(/log entry 100 says the file was at least \d+ bytes long, but it is \d+: the file was truncated/);
  });
});

// ---------------------------------------------------------------------------
// Differencing images
// ---------------------------------------------------------------------------

/** The model of a chain: each layer's blocks over the one below (ZERO reads zeros; UNDEFINED/UNMAPPED/NOT_PRESENT the parent). */
function modelRead(layers: VhdxSpec[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (let pos = offset; pos < offset + length; pos++) {
    for (const layer of layers) {
      const block = Math.floor(pos / layer.blockSize);
      const within = pos - block * layer.blockSize;
      const spec = layer.blocks.get(block);
      const sector = Math.floor(within / (layer.logicalSectorSize ?? 512));
      if (spec?.state === STATE.ZERO) break;
      if (spec?.state === STATE.FULLY_PRESENT || (spec?.state === STATE.PARTIALLY_PRESENT && spec.present!(sector))) {
        out[pos - offset] = spec.data?.[within] ?? 0;
        break;
      }
      if (!layer.parent) break; // bottom: zeros
    }
  }
  return out;
}

describe('differencing VHDX (made by the test writer)', () => {
  async function chain(dir: string, sector: 512 | 4096, blockSize: number, size: number, childBlocks: (parentGuid: string) => Map<number, BlockSpec>) {
    const parentSpec: VhdxSpec = { virtualSize: size, blockSize, logicalSectorSize: sector, blocks: new Map() };
    for (let b = 0; b * blockSize < Math.min(size, 8 * blockSize); b++) parentSpec.blocks.set(b, { state: STATE.FULLY_PRESENT, data: seededBytes(0x100 + b, blockSize) });
    const parent = join(dir, 'base.vhdx');
    const { dataWriteGuid } = await writeVhdx(parent, parentSpec);
    const childSpec: VhdxSpec = {
      virtualSize: size, blockSize, logicalSectorSize: sector, blocks: childBlocks(dataWriteGuid),
      parent: { linkage: dataWriteGuid, relativePath: '.\\base.vhdx', absoluteWin32Path: 'C:\\Hyper-V\\base.vhdx' },
    };
    const child = join(dir, 'child.avhdx');
    await writeVhdx(child, childSpec);
    return { parent, child, layers: [childSpec, parentSpec] };
  }

  const partial = (pattern: (s: number) => boolean, seed: number, blockSize: number): BlockSpec => ({ state: STATE.PARTIALLY_PRESENT, data: seededBytes(seed, blockSize), present: pattern });

  it('every block state and partially present blocks read like libvhdi and the model; map shows this layer and the parent', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const { parent, child, layers } = await chain(dir, 512, MiB, 8 * MiB, () => new Map<number, BlockSpec>([
      [1, { state: STATE.UNDEFINED }],
      [2, { state: STATE.UNMAPPED }],
      [3, { state: STATE.FULLY_PRESENT, data: seededBytes(3, MiB) }],
      [4, partial((s) => s % 3 === 0, 4, MiB)],
      [5, partial((s) => s === 0 || s === 2047 || (s >= 100 && s < 1000), 5, MiB)],
      [6, partial(() => false, 6, MiB)],
    ]));
    const expected = await libvhdiRead([child, parent], join(dir, 'libvhdi.raw'));
    expect(expected.equals(modelRead(layers, 0, 8 * MiB)), 'libvhdi agrees with the model').toBe(true);
    await withImage(child, { readOnly: true }, async (image) => {
      expect(image.format).toBe('vhdx');
      expect((await readAll(image, 4097)).equals(expected)).toBe(true);
      const runs = await image.map(4 * MiB, 2 * MiB);
      expect(runs.slice(0, 3).map((r) => [r.offset - 4 * MiB, r.length, r.depth])).toEqual([[0, 512, 0], [512, 1024, 1], [1536, 512, 0]]);
      const block5 = runs.filter((r) => r.offset >= 5 * MiB).map((r) => [r.offset - 5 * MiB, r.length, r.depth]);
      expect(block5).toEqual([[0, 512, 0], [512, 100 * 512 - 512, 1], [100 * 512, 900 * 512, 0], [1000 * 512, (2047 - 1000) * 512, 1], [2047 * 512, 512, 0]]);
      const info = await image.info();
      expect(info.backingFilename).toBe('base.vhdx');
    });
  });

  it('a ZERO block hides the parent (the specification; libvhdi 20210425 shows the parent there instead)', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const { child, layers } = await chain(dir, 512, MiB, 4 * MiB, () => new Map([[1, { state: STATE.ZERO }]]));
    await withImage(child, { readOnly: true }, async (image) => {
      const all = await readAll(image);
      expect(all.equals(modelRead(layers, 0, 4 * MiB))).toBe(true);
      expect(all.subarray(MiB, 2 * MiB).equals(Buffer.alloc(MiB))).toBe(true);
      expect(all.subarray(0, MiB).equals(seededBytes(0x100, MiB))).toBe(true);
    });
  });

  it('4096-byte logical sectors, 2 MiB blocks, a partially present block in the second chunk (its sector bitmap after 8192 payload entries)', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    // chunk ratio = 2^23 * 4096 / 2 MiB = 16384 payload blocks per sector bitmap block; block 16390 is in chunk 1
    const size = 16400 * 2 * MiB;
    const { parent, child, layers } = await chain(dir, 4096, 2 * MiB, size, () => new Map<number, BlockSpec>([
      [0, partial((s) => s % 2 === 1, 10, 2 * MiB)],
      [16390, partial((s) => s < 7 || s === 511, 11, 2 * MiB)],
      [16399, { state: STATE.FULLY_PRESENT, data: seededBytes(12, 2 * MiB) }],
    ]));
    const ranges: Array<[number, number]> = [[0, 2 * MiB], [16390 * 2 * MiB - 5000, 2 * MiB + 10000], [size - 3 * MiB, 3 * MiB]];
    const expected = await libvhdiRead([child, parent], join(dir, 'libvhdi.raw'), ranges);
    let at = 0;
    await withImage(child, { readOnly: true }, async (image) => {
      for (const [offset, length] of ranges) {
        const ours = Buffer.alloc(length);
        await image.read(offset, ours);
        expect(ours.equals(expected.subarray(at, at + length)), `libvhdi at ${offset}`).toBe(true);
        expect(ours.equals(modelRead(layers, offset, length)), `model at ${offset}`).toBe(true);
        at += length;
      }
    });
  });

  it('a chain of three (child over a differencing parent over a qemu-made base) reads like libvhdi', { ...T, skip: skipQemu }, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const base = join(dir, 'base.vhdx');
    await qemuImg(['create', '-f', 'vhdx', '-o', 'block_size=1M', base, String(4 * MiB)]);
    await qemuIo(base, ['write -P 0x61 0 4M'], 'vhdx');
    const mid = join(dir, 'mid.avhdx');
    const midGuid = (await writeVhdx(mid, {
      virtualSize: 4 * MiB, blockSize: MiB, blocks: new Map([[1, partial((s) => s < 1024, 21, MiB)], [2, { state: STATE.FULLY_PRESENT, data: seededBytes(22, MiB) }]]),
      parent: { linkage: currentDataWriteGuid(await readFile(base)), relativePath: 'base.vhdx' },
    })).dataWriteGuid;
    const top = join(dir, 'top.avhdx');
    await writeVhdx(top, {
      virtualSize: 4 * MiB, blockSize: MiB, blocks: new Map([[1, partial((s) => s % 4 === 0, 31, MiB)], [3, partial((s) => s > 2000, 33, MiB)]]),
      parent: { linkage: midGuid, relativePath: '.\\mid.avhdx' },
    });
    const expected = await libvhdiRead([top, mid, base], join(dir, 'libvhdi.raw'));
    await withImage(top, { readOnly: true }, async (image) => {
      expect((await readAll(image)).equals(expected)).toBe(true);
      expect((await image.map()).some((r) => r.depth === 2 && r.data)).toBe(true);
    });
  });

  it('a parent whose DataWriteGuid is not the parent_linkage is refused, naming both GUIDs', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const { child } = await chain(dir, 512, MiB, 2 * MiB, () => new Map());
    await writeVhdx(join(dir, 'base.vhdx'), { virtualSize: 2 * MiB, blockSize: MiB, blocks: new Map() }); // a different base, same name
    expect((await openError(child)).message).toMatch(/parent base\.vhdx has data write GUID \{[0-9a-f-]{36}\}, but this image was made over \{[0-9a-f-]{36}\}/);
  });
});

// ---------------------------------------------------------------------------
// Damaged structures, one field at a time
// ---------------------------------------------------------------------------

describe('damaged VHDX structures are refused naming the field', () => {
  const META = LAYOUT.log + MiB; // the writer's metadata region
  async function image(dir: string, name = 'd.vhdx', spec?: Partial<VhdxSpec>): Promise<string> {
    const path = join(dir, name);
    await writeVhdx(path, {
      virtualSize: 4 * MiB, blockSize: MiB,
      blocks: new Map([[0, { state: STATE.FULLY_PRESENT, data: seededBytes(7, MiB) }], [2, { state: STATE.FULLY_PRESENT, data: seededBytes(8, MiB) }]]),
      ...spec,
    });
    return path;
  }
  /** Changes a checksummed 4 KiB header / 64 KiB region table and seals it again (so the field, not the CRC, is what is wrong). */
  async function patchSealed(path: string, at: number, size: number, change: (b: Buffer) => void): Promise<void> {
    const bytes = await readBytes(path, at, size);
    change(bytes);
    sealChecksum(bytes, 4);
    await patchBytes(path, at, bytes);
  }
  const both = async (path: string, change: (b: Buffer) => void) => {
    await patchSealed(path, LAYOUT.header1, 4096, change);
    await patchSealed(path, LAYOUT.header2, 4096, change);
  };
  const regions = async (path: string, change: (b: Buffer) => void) => {
    await patchSealed(path, LAYOUT.region1, 64 * KiB, change);
    await patchSealed(path, LAYOUT.region2, 64 * KiB, change);
  };
  const u32 = (v: number) => { const b = Buffer.alloc(4); b.writeUInt32LE(v); return b; };
  /** Offset in the metadata region of the metadata table entry `i` (the writer's order: params, size, page83, logical, physical). */
  const itemAt = async (path: string, i: number) => META + (await readBytes(path, META + 48 + 32 * i, 4)).readUInt32LE(0);

  const cases: Array<[string, (path: string) => Promise<void>, RegExp]> = [
    ['file identifier', (p) => patchBytes(p, 0, Buffer.from('vhdxfilf')), /file identifier is not "vhdxfile"/],
    ['header CRC-32C (both)', async (p) => { await patchBytes(p, LAYOUT.header1 + 200, Buffer.from([1])); await patchBytes(p, LAYOUT.header2 + 200, Buffer.from([1])); }, /header 1 .*CRC-32C checksum 0x[0-9a-f]+ does not match.*header 2 .*CRC-32C/],
    ['header signature (both)', (p) => both(p, (b) => b.write('hexd', 0, 'latin1')), /header 1 .*signature is 0x[0-9a-f]+, not "head"/],
    ['header version', (p) => both(p, (b) => b.writeUInt16LE(2, 66)), /version is 2, only 1 exists/],
    ['header log version', (p) => both(p, (b) => b.writeUInt16LE(1, 64)), /log version is 1, only 0 is known/],
    ['header log length', (p) => both(p, (b) => b.writeUInt32LE(MiB + 4096, 68)), /log length 1052672 is not a multiple of 1 MiB/],
    ['header log offset', (p) => both(p, (b) => b.writeBigUInt64LE(BigInt(MiB / 2), 72)), /log offset 524288 is not a multiple of 1 MiB at or after 1 MiB/],
    ['header log offset above 2^53', (p) => both(p, (b) => b.writeBigUInt64LE(1n << 60n, 72)), /log offset is 1152921504606846976, above 2\^53/],
    ['headers with one sequence number that differ', (p) => patchSealed(p, LAYOUT.header2, 4096, (b) => { b.writeBigUInt64LE(1n, 8); b[40] = b[40]! ^ 1; }), /both VHDX headers have sequence number 1 but differ/],
    ['region table CRC-32C (both copies)', async (p) => { await patchBytes(p, LAYOUT.region1 + 900, Buffer.from([9])); await patchBytes(p, LAYOUT.region2 + 900, Buffer.from([9])); }, /region table 1 .*CRC-32C.*region table 2 .*CRC-32C/],
    ['region table entry count', (p) => regions(p, (b) => b.writeUInt32LE(2048, 8)), /entry count is 2048, at most 2047 fit/],
    ['region past the end of the file', (p) => regions(p, (b) => b.writeUInt32LE(64 * MiB, 40)), /BAT region \(67108864 bytes at \d+\) ends past the end of the file/],
    ['region misaligned', (p) => regions(p, (b) => b.writeBigUInt64LE(BigInt(3 * MiB + 4096), 32)), /BAT region offset 3149824 is not a multiple of 1 MiB/],
    ['regions overlapping', (p) => regions(p, (b) => b.writeBigUInt64LE(BigInt(META), 32)), /overlaps another region/],
    ['region overlapping the log', (p) => regions(p, (b) => b.writeBigUInt64LE(BigInt(LAYOUT.log), 64)), /the log .* overlaps the metadata region/],
    ['an unknown required region', async (p) => {
      await truncate(p, 8 * MiB);
      await regions(p, (b) => { b.writeUInt32LE(3, 8); b.fill(0x77, 80, 96); b.writeBigUInt64LE(BigInt(7 * MiB), 96); b.writeUInt32LE(MiB, 104); b.writeUInt32LE(1, 108); });
    }, /required region 77777777-.* is not known/],
    ['no BAT region', (p) => regions(p, (b) => { b.fill(0x11, 16, 32); b.writeUInt32LE(0, 44); }), /no BAT region/],
    ['metadata table signature', (p) => patchBytes(p, META, Buffer.from('metadatx')), /metadata table signature is "metadatx"/],
    ['metadata table entry count', (p) => patchBytes(p, META + 10, Buffer.from([0x00, 0x08])), /metadata table entry count is 2048/],
    ['metadata item outside the region', (p) => patchBytes(p, META + 48, u32(MiB - 4)), /file parameters \(8 bytes at 1048572\) is outside the metadata region/],
    ['metadata item inside the table', (p) => patchBytes(p, META + 48, u32(4096)), /file parameters \(8 bytes at 4096\) is outside/],
    ['block size 0', async (p) => patchBytes(p, await itemAt(p, 0), u32(0)), /block size is 0, it must be a power of 2 from 1 MiB to 256 MiB/],
    ['block size 3 MiB', async (p) => patchBytes(p, await itemAt(p, 0), u32(3 * MiB)), /block size is 3145728/],
    ['block size 512 MiB', async (p) => patchBytes(p, await itemAt(p, 0), u32(512 * MiB)), /block size is 536870912/],
    ['virtual size 0', async (p) => patchBytes(p, await itemAt(p, 1), Buffer.alloc(8)), /virtual disk size is 0, it must be from 1 byte to 64 TiB/],
    ['virtual size above 64 TiB', async (p) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(1n << 47n); await patchBytes(p, await itemAt(p, 1), b); }, /virtual disk size is 140737488355328/],
    ['virtual size not a multiple of the sector', async (p) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(4 * MiB - 100)); await patchBytes(p, await itemAt(p, 1), b); }, /virtual disk size 4194204 is not a multiple of the logical sector size 512/],
    ['virtual size needing more BAT than its region (CVE-2014-0148)', async (p) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(1n << 40n); await patchBytes(p, await itemAt(p, 1), b); }, /the BAT region holds 131072 entries, but 1048831 are needed/],
    ['logical sector size', async (p) => patchBytes(p, await itemAt(p, 3), u32(1024)), /logical sector size is 1024, it must be 512 or 4096/],
    ['physical sector size', async (p) => patchBytes(p, await itemAt(p, 4), u32(520)), /physical sector size is 520, it must be 512 or 4096/],
    ['a missing required item', async (p) => { await patchBytes(p, META + 32 + 32 * 2, Buffer.alloc(16, 0x33)); await patchBytes(p, META + 56 + 32 * 2, u32(0)); }, /the metadata table has no page 83 data/],
    ['an unknown required item', (p) => patchBytes(p, META + 32 + 32 * 2, Buffer.concat([Buffer.alloc(16, 0x33), u32(64 * KiB), u32(16), u32(4)])), /required metadata item 33333333-.* is not known/],
    ['HasParent without a parent locator', async (p) => patchBytes(p, (await itemAt(p, 0)) + 4, u32(2)), /differencing image \(HasParent set\) without a parent locator/],
  ];

  for (const [field, damage, message] of cases) {
    it(field, T, async () => {
      const dir = await makeTempDir('imgmount-vhdx-');
      const path = await image(dir);
      await damage(path);
      const error = await openError(path, { readOnly: true, format: 'vhdx' });
      expect(error.message).toMatch(message);
      expect(error.message).toContain(path);
    });
  }

  it('a damaged header 1 falls back to header 2 (and the second region table copy serves when the first is damaged)', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const path = await image(dir);
    const expected = await withImage(path, { readOnly: true }, readAll);
    await patchBytes(path, LAYOUT.header2 + 300, Buffer.from([5])); // header 2 has the higher sequence number: now header 1 is the valid one
    await patchBytes(path, LAYOUT.region1 + 3000, Buffer.from([5]));
    await withImage(path, { readOnly: true }, async (opened) => expect((await readAll(opened)).equals(expected)).toBe(true));
  });

  const batCases: Array<[string, (bat: number) => bigint, RegExp]> = [
    ['a block past the end of the file', () => (BigInt(64 * MiB) | 6n), /payload block 1 .* FULLY_PRESENT at offset 67108864, whose 1048576 bytes end past the end of the file/],
    ['a block on the metadata region', () => (BigInt(META) | 6n), /payload block 1 .* FULLY_PRESENT at offset \d+, on the metadata region/],
    ['a block on the header section', () => 6n, /FULLY_PRESENT at offset 0, on the header section/],
    ['a block on the BAT', (bat) => (BigInt(bat) | 6n), /on the BAT region/],
    ['a reserved state', () => 4n, /payload block 1 .* has state 4, which is reserved/],
    ['PARTIALLY_PRESENT without a parent', (bat) => (BigInt(bat + MiB) | 7n), /PARTIALLY_PRESENT, which only a differencing image may use/],
  ];
  for (const [what, entry, message] of batCases) {
    it(`BAT: ${what} fails reads of that block only, and check counts it`, T, async () => {
      const dir = await makeTempDir('imgmount-vhdx-');
      const path = await image(dir);
      const bat = META + MiB;
      const b = Buffer.alloc(8);
      b.writeBigUInt64LE(entry(bat));
      await patchBytes(path, bat + 8, b);
      await withImage(path, { readOnly: true }, async (opened) => {
        await opened.read(0, Buffer.alloc(MiB));
        await opened.read(2 * MiB, Buffer.alloc(MiB));
        await expect(opened.read(MiB + 10, Buffer.alloc(10))).rejects.toThrow(message);
      });
      expect((await checkImage(path, { format: 'vhdx' })).corruptions).toBe(1);
    });
  }

  it('a read-write check (repair) of a clean image changes nothing and finds nothing', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const path = await image(dir);
    const before = await sha(path);
    const result = await checkImage(path, { format: 'vhdx', repair: true });
    expect([result.corruptions, result.messages]).toEqual([0, []]);
    expect(await sha(path)).toBe(before);
  });

  it('a hostile log of overlapping entries (one at every 4 KiB, each as long as the log) is refused instead of checksummed 256 times', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const path = await image(dir);
    const logGuid = Buffer.alloc(16, 0x42);
    await both(path, (h) => logGuid.copy(h, 48));
    const log = Buffer.alloc(MiB);
    for (let at = 0; at < MiB; at += 4096) {
      log.write('loge', at, 'latin1');
      log.writeUInt32LE(MiB, at + 8);
      log.writeBigUInt64LE(BigInt(at + 1), at + 16);
      logGuid.copy(log, at + 32);
    }
    await patchBytes(path, LAYOUT.log, log);
    expect((await openError(path)).message).toMatch(/overlapping entries whose checksums would need to be computed over more than 4 times its 1048576 bytes/);
  });

  it('log entries are only valid with the log GUID of the header (an entry of another GUID is not replayed)', T, async () => {
    const dir = await makeTempDir('imgmount-vhdx-');
    const path = await image(dir);
    const expected = await withImage(path, { readOnly: true }, readAll);
    const logGuid = Buffer.alloc(16, 0x42);
    await both(path, (h) => logGuid.copy(h, 48));
    const foreign = logEntry(5n, Buffer.alloc(16, 0x43), 0, 10 * MiB, [{ offset: META + MiB, data: Buffer.alloc(4096, 0xff) }]);
    await patchBytes(path, LAYOUT.log, foreign);
    await withImage(path, { readOnly: true }, async (opened) => expect((await readAll(opened)).equals(expected)).toBe(true));
  });
});
