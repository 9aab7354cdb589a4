/**
 * Creating and writing VHDs. Create: the same options as qemu-img
 * (subformat=dynamic|fixed, force_size=on|off) make the same file as
 * `qemu-img create -f vpc` (byte for byte but the UUID, timestamp and
 * checksum), and bad options are refused by name before anything is written.
 * Writing: every crash state of an allocating write (each prefix of the
 * writes, and within a flush epoch each subset of them) opens, here and in
 * qemu, and reads the old bytes until the BAT entry is written, the new ones
 * after; random writes against a model are in the conformance suite.
 */
import { copyFile, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockImage, createImage, InvalidArgumentError, openImage } from '../src/index.js';
import { FileProtocol } from '../src/block/file.js';
import { ImageFileGate } from '../src/block/gate.js';
import type { Protocol } from '../src/block/types.js';
import { vpc } from '../src/formats/vpc/index.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuInfo, qemuIo, readAll, run } from './helpers/qemu.js';
import { recordingProtocol, subsets, type Recorded } from './helpers/recording-protocol.js';

const M = 1024 * 1024;
const TIMEOUT = { timeout: 60_000 };

/** The bytes of a VHD with what differs between two creations blanked: timestamp, checksum, UUID of each footer copy. */
function comparable(image: Buffer): Buffer {
  const copy = Buffer.from(image);
  const footers = [copy.length - 512];
  if (copy.subarray(0, 8).toString('latin1') === 'conectix') footers.push(0);
  for (const at of footers) {
    copy.fill(0, at + 24, at + 28);
    copy.fill(0, at + 64, at + 84);
  }
  return copy;
}

describe('creating VHDs like qemu-img create -f vpc', () => {
  const cases: Array<[string, number, Record<string, string>]> = [
    ['dynamic 10M (rounded to CHS)', 10 * M, {}],
    ['dynamic 1000 bytes', 1000, { subformat: 'dynamic' }],
    ['dynamic 0 bytes', 0, {}],
    ['dynamic 5G', 5 * 1024 * M, {}],
    ['dynamic 200G (past the CHS limit of 127 GiB: current_size)', 200 * 1024 * M, {}],
    ['dynamic force_size 10M + 7', 10 * M + 7, { force_size: 'on' }],
    ['fixed 10M', 10 * M, { subformat: 'fixed' }],
    ['fixed force_size 3M + 512', 3 * M + 512, { subformat: 'fixed', force_size: 'on' }],
  ];
  for (const [title, size, options] of cases) {
    it(title, TIMEOUT, async () => {
      const dir = await makeTempDir();
      const ours = join(dir, 'ours.vhd');
      const theirs = join(dir, 'theirs.vhd');
      await createImage(ours, 'vpc', { size, options });
      const o = Object.entries(options).map(([k, v]) => `${k}=${v}`).join(',');
      await qemuImg(['create', '-q', '-f', 'vpc', ...(o ? ['-o', o] : []), theirs, String(size)]);
      expect((await stat(ours)).size).toBe((await stat(theirs)).size);
      const a = comparable(await readFile(ours));
      const b = comparable(await readFile(theirs));
      expect(a.equals(b), 'same bytes but UUID, timestamp, checksum').toBe(true);
      const info = await qemuInfo(ours, 'vpc');
      expect(info['virtual-size']).toBe((await qemuInfo(theirs, 'vpc'))['virtual-size']);
      const image = await openImage(ours);
      expect([image.format, image.length]).toEqual(['vpc', info['virtual-size']]);
      await image.close();
      // libvhdi agrees (another reader than qemu); it cannot open an empty dynamic disk, qemu's no more than ours
      if (size === 0) {
        expect((await run('vhdiinfo', [theirs])).code).not.toBe(0);
        return;
      }
      const described = await run('vhdiinfo', [ours]);
      expect(described.stdout).toMatch(new RegExp(`Disk type\\s*: ${options.subformat === 'fixed' ? 'Fixed' : 'Dynamic'}`));
      expect(described.stdout).toContain(`(${info['virtual-size']} bytes)`);
    });
  }

  it('bad options are refused by name, and nothing is created', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'x.vhd');
    const refusals: Array<[Parameters<typeof createImage>[2], RegExp]> = [
      [{ size: M, options: { subformat: 'sparse' } }, /subformat 'sparse' is not dynamic or fixed/],
      [{ size: M, options: { force_size: 'maybe' } }, /force_size 'maybe' is not on or off/],
      [{ size: M, options: { cluster_size: '64K' } }, /unknown vpc option cluster_size; vpc accepts subformat, force_size/],
      [{ size: 3 * 1024 * 1024 * M }, /size 3221225472 is larger than the 2040 GiB|larger than/],
      [{ size: 2100 * 1024 * M, options: { force_size: 'on' } }, /larger than the 2040 GiB \(2190433320960 bytes\) a VHD may have/],
    ];
    for (const [options, message] of refusals) {
      const error = await createImage(path, 'vpc', options).then(() => undefined, (reason: unknown) => reason);
      expect(error).toBeInstanceOf(InvalidArgumentError);
      expect((error as Error).message).toMatch(message);
      await expect(stat(path)).rejects.toThrow(/ENOENT/);
    }
  });
});

describe('crash states of an allocating write', () => {
  for (const [title, options] of [['dynamic', {}], ['dynamic force_size', { force_size: 'on' }]] as const) {
    it(`${title}: every crash state opens here and in qemu and reads the old or the new bytes`, TIMEOUT, async () => {
      const dir = await makeTempDir();
      const before = join(dir, 'before.vhd');
      await createImage(before, 'vpc', { size: 9 * M, options });
      await qemuIo(before, ['write -P 0x21 0 5000'], 'vpc'); // block 0 allocated by qemu
      const working = join(dir, 'working.vhd');
      await copyFile(before, working);
      const oldBytes = await qemuConvertToRaw(before, dir, 'vpc');

      const { protocol, log } = await recordingProtocol(working);
      const files = new ImageFileGate(working, {}, true);
      const image = new BlockImage({ path: working, format: 'vpc', file: protocol, image: await vpc.open(protocol, { readOnly: false, files }), gate: files });
      const data = Buffer.alloc(3 * M + 1234, 0x5c); // blocks 1, 2 (whole) and 3 (part), and into allocated block 0's neighbour
      const at = 2 * M - 777;
      await image.write(at, data);
      await image.close();
      const newBytes = Buffer.from(oldBytes);
      data.copy(newBytes, at);
      expect((await readFile(working)).length).toBeGreaterThan((await readFile(before)).length);

      // Split the log into flush epochs; a crash keeps every earlier epoch and any subset of the current one.
      const epochs: Recorded[][] = [[]];
      for (const entry of log) {
        if (entry === 'flush') epochs.push([]);
        else epochs[epochs.length - 1]!.push(entry);
      }
      let states = 0;
      const base = await readFile(before);
      for (let e = 0; e < epochs.length; e++) {
        const epoch = epochs[e]!;
        const choices = epoch.length <= 6 ? subsets(epoch) : [epoch];
        for (const kept of choices) {
          let file = Buffer.from(base);
          for (const write of [...epochs.slice(0, e).flat(), ...kept]) {
            if (write.offset + write.data.length > file.length) file = Buffer.concat([file, Buffer.alloc(write.offset + write.data.length - file.length)]);
            write.data.copy(file, write.offset);
          }
          const state = join(dir, `state-${states++}.vhd`);
          await writeFile(state, file);
          const opened = await openImage(state, { readOnly: true, format: 'vpc' });
          const ours = await readAll(opened);
          await opened.close();
          const qemu = await qemuConvertToRaw(state, dir, 'vpc');
          expect(ours.equals(qemu), `state ${states - 1}: ours reads what qemu reads`).toBe(true);
          // Each block reads wholly old or wholly new: never garbage (the old footer, another block's bytes).
          for (let block = 0; block * 2 * M < ours.length; block++) {
            const range = [block * 2 * M, Math.min(ours.length, (block + 1) * 2 * M)] as const;
            const piece = ours.subarray(...range);
            const isOld = piece.equals(oldBytes.subarray(...range));
            const isNew = piece.equals(newBytes.subarray(...range));
            expect(isOld || isNew, `state ${states - 1}, block ${block}: old or new bytes`).toBe(true);
          }
          if (e === epochs.length - 1 && kept.length === epoch.length) expect(ours.equals(newBytes), 'the last state reads the new bytes').toBe(true);
        }
      }
      expect(states).toBeGreaterThan(10);
    });
  }

  it('writes after reopening allocate past every block, never over one; qemu reads the result', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'grow.vhd');
    await createImage(path, 'vpc', { size: 12 * M });
    const model = Buffer.alloc((await qemuInfo(path, 'vpc'))['virtual-size'] as number);
    for (const [round, offset] of [[1, 5 * M], [2, 100], [3, 9 * M + 3], [4, 2 * M - 1]] as const) {
      const image = await openImage(path);
      const data = Buffer.alloc(300_000, round);
      await image.write(offset, data);
      data.copy(model, offset);
      await image.close();
      expect((await qemuConvertToRaw(path, dir, 'vpc')).equals(model), `after round ${round}`).toBe(true);
    }
    const image = await openImage(path, { readOnly: true });
    expect((await readAll(image)).equals(model)).toBe(true);
    await image.close();
  });

  it('concurrent writes into one unallocated block allocate it once; zeroing punches allocated bytes; qemu reads the same', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'race.vhd');
    await createImage(path, 'vpc', { size: 8 * M, options: { force_size: 'on' } });
    const sizeBefore = (await stat(path)).size;
    const model = Buffer.alloc(8 * M);
    const image = await openImage(path);
    await Promise.all(
      Array.from({ length: 16 }, (_, i) => {
        const data = Buffer.alloc(10_000, i + 1);
        data.copy(model, 2 * M + i * 100_000);
        return image.write(2 * M + i * 100_000, data);
      }),
    );
    await image.zero(2 * M + 100_000 + 17, 5000);
    model.fill(0, 2 * M + 100_000 + 17, 2 * M + 100_000 + 17 + 5000);
    await image.zero(6 * M, 4096); // unallocated: stays unallocated
    await image.close();
    // one block (a 512-byte bitmap and 2 MiB of data) was added
    expect((await stat(path)).size).toBe(sizeBefore + 512 + 2 * M);
    expect((await qemuConvertToRaw(path, dir, 'vpc')).equals(model)).toBe(true);
    const map = await openImage(path, { readOnly: true });
    expect((await map.map()).filter((run) => run.data).map((run) => [run.offset, run.length])).toEqual([[2 * M, 2 * M]]);
    await map.close();
  });

  it('a BAT write that fails after reaching the disk never lets a second block share the space', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'eio.vhd');
    await createImage(path, 'vpc', { size: 8 * M, options: { force_size: 'on' } });
    const inner = await FileProtocol.open(path, false);
    let failed = false;
    const protocol: Protocol = {
      path,
      readOnly: false,
      read: (offset, buffer) => inner.read(offset, buffer),
      async write(offset, buffer) {
        await inner.write(offset, buffer);
        // the first BAT entry write lands, then reports EIO
        if (!failed && buffer.length === 4 && offset >= 1536 && offset < 2048) {
          failed = true;
          throw Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO' });
        }
      },
      flush: () => inner.flush(),
      size: () => inner.size(),
      allocatedSize: () => inner.allocatedSize(),
      truncate: (length) => inner.truncate(length),
      close: () => inner.close(),
    };
    const files = new ImageFileGate(path, {}, true);
    const image = new BlockImage({ path, format: 'vpc', file: protocol, image: await vpc.open(protocol, { readOnly: false, files }), gate: files });
    await expect(image.write(0, Buffer.alloc(4096, 0xa1))).rejects.toThrow(/EIO/);
    await image.write(4 * M, Buffer.alloc(4096, 0xb2));
    await image.close();
    expect(failed).toBe(true);
    const raw = await qemuConvertToRaw(path, dir, 'vpc');
    expect(raw.subarray(4 * M, 4 * M + 4096).equals(Buffer.alloc(4096, 0xb2))).toBe(true);
    // block 0's entry reached the disk: it shows its own data, not the second write's
    expect(raw.subarray(0, 4096).equals(Buffer.alloc(4096, 0xa1))).toBe(true);
    const reopened = await openImage(path, { readOnly: true });
    expect((await readAll(reopened)).equals(raw)).toBe(true);
    await reopened.close();
  });
});
