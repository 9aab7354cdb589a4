/**
 * Writing VHDX (dynamic and fixed), through the library, against a model raw
 * file: seeded random writes and zero writes over qemu-made images of each
 * block state (ZERO, NOT_PRESENT, FULLY_PRESENT of a fixed image with
 * block_state_zero=off), then `qemu-img check` clean, `qemu-img compare`
 * with the model, and our own read-back equal. Also: the header change
 * before the first write (new DataWriteGuid, higher sequence number, no log
 * GUID), writes into a differencing image (new blocks filled from the parent,
 * partially present blocks completed; libvhdi is the oracle), and a log
 * left to replay (made by the test writer, qemu's replay of a copy is the
 * oracle) replayed on disk at a read-write open. Writes through a real FUSE
 * mount: test/fuse/conformance.test.ts -t vhdx.
 */
import { createHash } from 'node:crypto';
import { copyFile, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage, openImage } from '../src/index.js';
import { makeTempDir, qemuCheck, qemuCompare, qemuConvertToRaw, qemuImg, qemuIo, readAll, run, seededBytes, skipWithoutQemu } from './helpers/qemu.js';
import { seededRandom } from './helpers/random.js';
import { STATE, writeVhdx, type BlockSpec } from './helpers/vhdx-writer.js';

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

  it('a zero write over stored data punches whole 4 KiB pieces out of the file and reads zeros, here and in qemu', T, async () => {
    const dir = await makeTempDir('imgmount-vhdxw-');
    const path = join(dir, 'disk.vhdx');
    await qemuImg(['create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', path, '4M']);
    await qemuIo(path, ['write -P 0x44 0 3M'], 'vhdx');
    const allocated = (await stat(path)).blocks;
    const image = await openImage(path, { format: 'vhdx' });
    await image.zero(1000, 2 * MiB);
    await image.close();
    expect((await stat(path)).blocks, 'blocks of the file').toBeLessThan(allocated - 3000);
    const model = Buffer.alloc(4 * MiB);
    model.fill(0x44, 0, 3 * MiB);
    model.fill(0, 1000, 1000 + 2 * MiB);
    await expectLikeModel(path, model, dir);
  });

  it('an allocation leaves the log GUID in the header until the next flush, or idle clean: then no log is left to replay', T, async () => {
    const dir = await makeTempDir('imgmount-vhdxw-');
    const path = join(dir, 'disk.vhdx');
    await qemuImg(['create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', path, '4M']);
    const none = '0'.repeat(32);
    const image = await openImage(path, { format: 'vhdx', idleCleanSeconds: 0 });
    await image.write(2 * MiB, Buffer.alloc(4096, 0x31));
    expect((await currentHeader(path)).logGuid, 'after an allocation').not.toBe(none);
    await image.flush();
    expect((await currentHeader(path)).logGuid, 'after flush').toBe(none);
    await image.write(100, Buffer.alloc(10, 0x32)); // in place: no log entry
    await image.write(3 * MiB, Buffer.alloc(10, 0x33));
    expect((await currentHeader(path)).logGuid).not.toBe(none);
    await image.close();
    expect((await currentHeader(path)).logGuid, 'after close').toBe(none);
    const idle = await openImage(path, { format: 'vhdx', idleCleanSeconds: 1 });
    await idle.write(MiB, Buffer.alloc(10, 0x34));
    expect((await currentHeader(path)).logGuid).not.toBe(none);
    await new Promise((resolve) => setTimeout(resolve, 2500));
    expect((await currentHeader(path)).logGuid, 'after idle clean, still open').toBe(none);
    await idle.close();
    expect((await qemuCheck(path, 'vhdx')).code).toBe(0);
  });

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

function sha(bytes: Buffer): string {
  return createHash('sha256').update(bytes).digest('hex');
}

describe.skipIf(skipWithoutQemu('vhdx log replay on disk'))('a log left to replay, at a read-write open', () => {
  async function pendingLog(dir: string): Promise<{ path: string; expected: Buffer }> {
    const path = join(dir, 'log.vhdx');
    const blocks = new Map<number, BlockSpec>([
      [0, { state: STATE.FULLY_PRESENT, data: seededBytes(1, MiB) }],
      [1, { state: STATE.FULLY_PRESENT, data: seededBytes(2, MiB), logged: true }],
      [3, { state: STATE.ZERO }],
      [4, { state: STATE.FULLY_PRESENT, data: seededBytes(4, MiB), logged: true }],
    ]);
    await writeVhdx(path, { virtualSize: 6 * MiB, blockSize: MiB, blocks, log: { start: MiB - 4096, staleAt: 64 * 1024 } }); // one entry, qemu's own shape (qemu replays only the last entry of longer sequences)
    // qemu's replay of a copy is the oracle
    const copy = join(dir, 'copy.vhdx');
    await copyFile(path, copy);
    await qemuImg(['check', '-q', '-r', 'all', '-f', 'vhdx', copy]);
    const expected = await qemuConvertToRaw(copy, dir, 'vhdx');
    expect(expected.subarray(MiB, 2 * MiB).equals(seededBytes(2, MiB))).toBe(true);
    return { path, expected };
  }

  it('replays it on disk, says so, empties the log (qemu-img opens it read-only again), reads like qemu\'s replay, and writes', T, async () => {
    const dir = await makeTempDir('imgmount-vhdxw-');
    const { path, expected } = await pendingLog(dir);
    expect((await run('qemu-img', ['info', '-f', 'vhdx', path])).stderr).toMatch(/log that needs to be replayed/);
    const before = sha(await readFile(path));
    // a read-only open first: replayed in memory, the file unchanged
    const quiet: string[] = [];
    const ro = await openImage(path, { format: 'vhdx', readOnly: true, notice: (line) => quiet.push(line) });
    expect((await readAll(ro)).equals(expected)).toBe(true);
    await ro.close();
    expect(quiet.join('\n')).toMatch(/replayed in memory for this read-only open; the file is not changed/);
    expect(sha(await readFile(path))).toBe(before);
    // then read-write: replayed on disk
    const notices: string[] = [];
    const image = await openImage(path, { format: 'vhdx', notice: (line) => notices.push(line) });
    expect(image.readOnly).toBe(false);
    expect(notices.join('\n')).toMatch(/log holds 1 entry .*replayed on disk for this read-write open \(the file was changed\), and the log emptied/);
    expect((await readAll(image)).equals(expected)).toBe(true);
    await image.write(5 * MiB + 3, Buffer.from('after replay'));
    await image.close();
    expect(sha(await readFile(path))).not.toBe(before);
    const model = Buffer.from(expected);
    Buffer.from('after replay').copy(model, 5 * MiB + 3);
    // the log GUID is gone: qemu opens it read-only, check is clean, and it reads the model
    expect((await run('qemu-img', ['info', '-f', 'vhdx', path])).code).toBe(0);
    await expectLikeModel(path, model, dir);
    const again: string[] = [];
    const reopened = await openImage(path, { format: 'vhdx', notice: (line) => again.push(line) });
    await reopened.close();
    expect(again.join('\n')).not.toMatch(/log/);
  });

  it('check -r (a read-write check) replays it on disk too, as qemu-img check -r all does', T, async () => {
    const dir = await makeTempDir('imgmount-vhdxw-');
    const { path, expected } = await pendingLog(dir);
    const result = await checkImage(path, { format: 'vhdx', repair: true });
    expect(result.corruptions).toBe(0);
    expect(result.messages.join('\n')).toMatch(/replayed on disk/);
    expect((await qemuCheck(path, 'vhdx')).code).toBe(0);
    expect((await qemuConvertToRaw(path, dir, 'vhdx')).equals(expected)).toBe(true);
  });

});

/** The guest bytes of `files` (child first, then its parents) as libvhdi (python3-libvhdi) reads them. */
async function libvhdiRead(files: string[], out: string): Promise<Buffer> {
  const script = [
    'import pyvhdi, sys, json',
    'names = json.loads(sys.argv[1])',
    'files = []',
    'for n in names:',
    '    f = pyvhdi.file(); f.open(n); files.append(f)',
    'for c, p in zip(files, files[1:]):',
    '    c.set_parent(p)',
    'top = files[0]',
    'with open(sys.argv[2], "wb") as out:',
    '    pos = 0',
    '    while pos < top.get_media_size():',
    '        n = min(4 << 20, top.get_media_size() - pos)',
    '        out.write(top.read_buffer_at_offset(n, pos)); pos += n',
  ].join('\n');
  const result = await run('/usr/bin/python3', ['-c', script, JSON.stringify(files), out]);
  if (result.code !== 0) throw new Error(`libvhdi (python3-libvhdi) failed: ${result.stderr}`);
  return readFile(out);
}

describe('writing a differencing VHDX (the test writer makes it; libvhdi and a model are the oracles)', () => {
  it('seeded random writes and zero writes over every block state read like the model, here and in libvhdi; the parent is not changed', T, async () => {
    const dir = await makeTempDir('imgmount-vhdxw-');
    const parent = join(dir, 'base.vhdx');
    const parentBlocks = new Map<number, BlockSpec>();
    for (let b = 0; b < 6; b++) parentBlocks.set(b, { state: STATE.FULLY_PRESENT, data: seededBytes(20 + b, MiB) });
    const { dataWriteGuid } = await writeVhdx(parent, { virtualSize: 6 * MiB, blockSize: MiB, blocks: parentBlocks });
    const child = join(dir, 'child.avhdx');
    // Block 0 NOT_PRESENT (the parent), 1 partially present (every third sector here), 2 fully present,
    // 3 UNDEFINED and 4 UNMAPPED (both the parent, as libvhdi reads them), 5 NOT_PRESENT.
    await writeVhdx(child, {
      virtualSize: 6 * MiB, blockSize: MiB, parent: { linkage: dataWriteGuid, relativePath: 'base.vhdx' },
      blocks: new Map<number, BlockSpec>([
        [1, { state: STATE.PARTIALLY_PRESENT, data: seededBytes(31, MiB), present: (sector) => sector % 3 === 0 }],
        [2, { state: STATE.FULLY_PRESENT, data: seededBytes(32, MiB) }],
        [3, { state: STATE.UNDEFINED }],
        [4, { state: STATE.UNMAPPED }],
      ]),
    });
    const parentBefore = sha(await readFile(parent));
    const model = await libvhdiRead([child, parent], join(dir, 'before.raw'));
    const first = await openImage(child, { format: 'vhdx', readOnly: true });
    expect((await readAll(first)).equals(model), 'ours and libvhdi agree before writing').toBe(true);
    await first.close();
    // One write into every block (every state), a zero write across present and absent sectors of the partial block.
    const direct = await openImage(child, { format: 'vhdx' });
    expect(direct.readOnly).toBe(false);
    for (let b = 0; b < 6; b++) {
      const data = seededBytes(40 + b, 3000);
      await direct.write(b * MiB + 700, data);
      data.copy(model, b * MiB + 700);
    }
    await direct.zero(MiB + 100_000, 5000);
    model.fill(0, MiB + 100_000, MiB + 105_000);
    await direct.zero(4 * MiB - 2000, 4000); // UNDEFINED block 3: reads the parent, so zeros are written
    model.fill(0, 4 * MiB - 2000, 4 * MiB + 2000);
    await direct.close();
    expect((await libvhdiRead([child, parent], join(dir, 'direct.raw'))).equals(model), 'libvhdi reads the direct writes').toBe(true);
    await randomWrites(child, model, 99, 60);
    expect((await libvhdiRead([child, parent], join(dir, 'after.raw'))).equals(model), 'libvhdi reads the model').toBe(true);
    const image = await openImage(child, { format: 'vhdx', readOnly: true });
    expect((await readAll(image)).equals(model), 'we read the model').toBe(true);
    await image.close();
    const ours = await checkImage(child, { format: 'vhdx' });
    expect([ours.corruptions, ours.messages]).toEqual([0, []]);
    expect(sha(await readFile(parent)), 'the parent is not written').toBe(parentBefore);
  });
});
