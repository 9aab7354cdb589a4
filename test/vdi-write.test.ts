/**
 * Writing VDI images through the library, with qemu as the oracle: the order
 * of an allocation's I/O (data and header, flush, block map), static
 * images never allocating, concurrent writes to one unallocated block, zeroing,
 * a failed allocation leaving nothing behind, and every state a power loss
 * could leave during a short workload: each opens, each write reads all old or
 * all new (new once a flush followed it), qemu-img check finds nothing but the
 * documented blocks_allocated lead, qemu reads the same bytes, and writing on
 * afterwards never hands one block to two guest blocks.
 */
import { copyFile, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../src/index.js';
import { FileProtocol } from '../src/block/file.js';
import { ImageFileGate } from '../src/block/gate.js';
import type { FormatImage, Protocol } from '../src/block/types.js';
import { vdi } from '../src/formats/vdi/index.js';
import { makeTempDir, patchBytes, qemuCheck, qemuCompare, qemuConvertToRaw, qemuImg, qemuIo, readAll, readBytes, run, skipWithoutQemu, spyProtocol } from './helpers/qemu.js';

const MiB = 1024 * 1024;
const TIMEOUT = { timeout: 120_000 };
const BLOCKS_ALLOCATED = 0x184;
/** qemu-img create: block map at 512, data at 1024 for up to 128 blocks. */
const BMAP = 0x200;
const DATA = 0x400;

/** A 6 MiB dynamic image made by qemu: blocks 0, 1, 3 allocated at indexes 0, 1, 2. */
async function qemuImage(dir: string, options: string[] = []): Promise<string> {
  const path = join(dir, 'disk.vdi');
  await qemuImg(['create', '-q', '-f', 'vdi', ...options, path, String(6 * MiB)]);
  await qemuIo(path, ['write -P 0x11 0 4096', `write -P 0x22 ${MiB + 5} 700`, `write -P 0x33 ${3 * MiB} ${MiB}`], 'vdi');
  return path;
}

type WritableImage = FormatImage & { write: NonNullable<FormatImage['write']> };

/** Opens the VDI over `protocol` (the driver alone, no generic layer), for asserting on its I/O. */
async function openOver(protocol: Protocol): Promise<WritableImage> {
  const image = await vdi.open(protocol, { readOnly: protocol.readOnly, files: new ImageFileGate(protocol.path, {}, !protocol.readOnly) });
  if (!image.write) throw new Error('the VDI image has no write');
  return image as WritableImage;
}

/** qemu-img check's error lines (stderr), and whether they are only the harmless blocks_allocated lead. */
async function qemuErrors(path: string): Promise<{ code: number; errors: string[]; onlyLead: boolean }> {
  const result = await qemuCheck(path, 'vdi');
  const errors = result.stderr.split('\n').filter((line) => line.startsWith('ERROR'));
  const onlyLead = errors.every((line) => {
    const match = /^ERROR: allocated blocks mismatch, is (\d+), should be (\d+)$/.exec(line);
    return match !== null && Number(match[1]) < Number(match[2]);
  });
  return { code: result.code, errors, onlyLead };
}

describe.skipIf(skipWithoutQemu('vdi writes'))('vdi writes', () => {
  it('an allocation writes the whole block at the next index and the raised blocks_allocated, flushes, then writes the block map sector', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = await qemuImage(dir);
    const spy = await spyProtocol(path, false);
    const image = await openOver(spy);
    spy.calls.length = 0;
    await image.write(2 * MiB + 7, Buffer.alloc(100, 0x5e));
    expect(spy.calls).toEqual([`write ${DATA + 3 * MiB} ${MiB}`, 'write 0 512', 'flush', `write ${BMAP} 512`]);
    spy.calls.length = 0;
    await image.write(2 * MiB + 500, Buffer.alloc(10, 0x5f)); // now allocated: one write in place
    expect(spy.calls).toEqual([`write ${DATA + 3 * MiB + 500} 10`]);
    await image.close();
    expect((await readBytes(path, BLOCKS_ALLOCATED, 4)).readUInt32LE(0)).toBe(4);
    expect((await readBytes(path, BMAP + 8, 4)).readUInt32LE(0)).toBe(3);
    expect((await qemuCheck(path, 'vdi')).code).toBe(0);
    const raw = await qemuConvertToRaw(path, dir, 'vdi');
    expect(raw.subarray(2 * MiB, 2 * MiB + 7).equals(Buffer.alloc(7))).toBe(true);
    expect(raw.subarray(2 * MiB + 7, 2 * MiB + 107).equals(Buffer.alloc(100, 0x5e))).toBe(true);
    expect(raw.subarray(2 * MiB + 500, 2 * MiB + 510).equals(Buffer.alloc(10, 0x5f))).toBe(true);
  });

  it('a static image never allocates: writes go in place, the header and the file size stay', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = await qemuImage(dir, ['-o', 'static=on']);
    const size = (await stat(path)).size;
    const header = await readBytes(path, 0, 1024);
    const spy = await spyProtocol(path, false);
    const image = await openOver(spy);
    spy.calls.length = 0;
    await image.write(5 * MiB - 3, Buffer.alloc(6, 0x7a));
    expect(spy.calls).toEqual([`write ${DATA + 5 * MiB - 3} 6`]); // blocks 4 and 5 are neighbours in the file too: one write
    await image.close();
    expect((await stat(path)).size).toBe(size);
    expect((await readBytes(path, 0, 1024)).equals(header)).toBe(true);
    expect((await qemuCheck(path, 'vdi')).code).toBe(0);
    expect((await qemuConvertToRaw(path, dir, 'vdi')).subarray(5 * MiB - 3, 5 * MiB + 3).equals(Buffer.alloc(6, 0x7a))).toBe(true);
  });

  it('writes across several unallocated blocks, concurrent writes into one unallocated block, and zeroing: qemu-img check clean, qemu-img compare equal', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = await qemuImage(dir);
    const model = await qemuConvertToRaw(path, dir, 'vdi');
    const image = await openImage(path, { format: 'vdi' });
    const put = (offset: number, data: Buffer) => {
      data.copy(model, offset);
      return image.write(offset, data);
    };
    try {
      await put(MiB + MiB / 2, Buffer.alloc(3 * MiB, 0x61)); // blocks 1 (allocated), 2 (not), 3 (allocated), 4 (not)
      await Promise.all([put(5 * MiB + 10, Buffer.alloc(10, 0x62)), put(5 * MiB + 900_000, Buffer.alloc(20, 0x63)), put(5 * MiB + 500, Buffer.alloc(5, 0x64))]);
      await image.zero(3 * MiB + 100, 2 * MiB); // over allocated data, and over the block written just above
      model.fill(0, 3 * MiB + 100, 5 * MiB + 100);
      expect((await readAll(image)).equals(model)).toBe(true);
    } finally {
      await image.close();
    }
    // blocks 2, 4 and 5 got indexes 3, 4, 5: one each, none shared
    expect((await readBytes(path, BLOCKS_ALLOCATED, 4)).readUInt32LE(0)).toBe(6);
    expect((await qemuCheck(path, 'vdi')).code).toBe(0);
    await writeFile(join(dir, 'model.raw'), model);
    expect((await qemuCompare(path, 'vdi', join(dir, 'model.raw'), 'raw')).code).toBe(0);
  });

  it('a leaked index (blocks_allocated above the entries, as a crash leaves it) is reused first, which makes qemu-img check clean again', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = await qemuImage(dir);
    const header = Buffer.alloc(4);
    header.writeUInt32LE(4);
    await writeFile(path, Buffer.concat([await readFile(path), Buffer.alloc(MiB, 0xdd)])); // the leaked block's bytes at index 3
    await patchBytes(path, BLOCKS_ALLOCATED, header);
    expect((await qemuErrors(path)).errors).toEqual(['ERROR: allocated blocks mismatch, is 3, should be 4']);
    const image = await openImage(path, { format: 'vdi' });
    await image.write(4 * MiB + 3, Buffer.alloc(3, 0x4c)); // block 4
    await image.write(5 * MiB, Buffer.alloc(2, 0x4d)); // block 5: appended at index 4
    await image.close();
    expect((await readBytes(path, BMAP + 16, 8)).equals(Buffer.from([3, 0, 0, 0, 4, 0, 0, 0]))).toBe(true);
    expect((await readBytes(path, BLOCKS_ALLOCATED, 4)).readUInt32LE(0)).toBe(5);
    expect((await qemuCheck(path, 'vdi')).code).toBe(0);
    const raw = await qemuConvertToRaw(path, dir, 'vdi');
    expect(raw.subarray(4 * MiB, 4 * MiB + 6).equals(Buffer.from([0, 0, 0, 0x4c, 0x4c, 0x4c]))).toBe(true);
    expect(raw.subarray(4 * MiB + 6, 5 * MiB).equals(Buffer.alloc(MiB - 6))).toBe(true); // the leaked bytes are not shown
    expect(raw.subarray(5 * MiB, 5 * MiB + 2).equals(Buffer.alloc(2, 0x4d))).toBe(true);
  });

  it('qemu-io writes on after us, and we after it: both allocate at blocks_allocated without overlap; qemu-img check clean, qemu-img compare equal', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = await qemuImage(dir);
    const model = await qemuConvertToRaw(path, dir, 'vdi');
    const ours = async (offset: number, fill: number, length: number) => {
      const image = await openImage(path, { format: 'vdi' });
      await image.write(offset, Buffer.alloc(length, fill)).finally(() => image.close());
      model.fill(fill, offset, offset + length);
    };
    const theirs = async (offset: number, fill: number, length: number) => {
      await qemuIo(path, [`write -P 0x${fill.toString(16)} ${offset} ${length}`], 'vdi');
      model.fill(fill, offset, offset + length);
    };
    await ours(5 * MiB + 100, 0x81, 1000); // index 3
    await theirs(2 * MiB + 5, 0x82, 3000); // qemu: index 4
    await ours(4 * MiB, 0x83, 10); // index 5
    await theirs(5 * MiB + 50, 0x84, 100); // in place
    await writeFile(join(dir, 'model.raw'), model);
    expect((await qemuCheck(path, 'vdi')).code).toBe(0);
    expect((await qemuCompare(path, 'vdi', join(dir, 'model.raw'), 'raw')).code).toBe(0);
    expect((await readBytes(path, BMAP, 24)).equals(Buffer.from([0, 1, 4, 2, 5, 3].flatMap((index) => [index, 0, 0, 0])))).toBe(true);
    const image = await openImage(path, { readOnly: true });
    expect((await readAll(image).finally(() => image.close())).equals(model)).toBe(true);
  });

  it('a failed allocation (the data write fails) leaves the file as it was; the next write allocates the same index', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = await qemuImage(dir);
    const before = await readFile(path);
    const inner = await FileProtocol.open(path, false);
    let failNext = true;
    const failing: Protocol = {
      path,
      readOnly: false,
      read: (offset, buffer) => inner.read(offset, buffer),
      write: async (offset, buffer) => {
        if (failNext && buffer.length === MiB) {
          await inner.write(offset, buffer.subarray(0, 4096)); // a part reached the file
          failNext = false;
          throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
        }
        return inner.write(offset, buffer);
      },
      flush: () => inner.flush(),
      size: () => inner.size(),
      allocatedSize: () => inner.allocatedSize(),
      truncate: (length) => inner.truncate(length),
      close: () => inner.close(),
    };
    const image = await openOver(failing);
    await expect(image.write(2 * MiB, Buffer.alloc(10, 0x70))).rejects.toThrow(/ENOSPC/);
    expect((await readFile(path)).equals(before)).toBe(true);
    await image.write(2 * MiB, Buffer.alloc(10, 0x71));
    await image.close();
    expect((await readBytes(path, BMAP + 8, 4)).readUInt32LE(0)).toBe(3);
    expect((await qemuCheck(path, 'vdi')).code).toBe(0);
    expect((await qemuConvertToRaw(path, dir, 'vdi')).subarray(2 * MiB, 2 * MiB + 10).equals(Buffer.alloc(10, 0x71))).toBe(true);
  });

  describe('power loss', () => {
    type Op = { kind: 'write'; offset: number; data: Buffer } | { kind: 'flush' };

    /** Records every write and flush that reached the file, in order (the workload is sequential). */
    function recording(inner: Protocol, ops: Op[]): Protocol {
      return {
        path: inner.path,
        readOnly: false,
        read: (offset, buffer) => inner.read(offset, buffer),
        write: async (offset, data) => {
          await inner.write(offset, data);
          ops.push({ kind: 'write', offset, data: Buffer.from(data) });
        },
        flush: async () => {
          await inner.flush();
          ops.push({ kind: 'flush' });
        },
        size: () => inner.size(),
        allocatedSize: () => inner.allocatedSize(),
        truncate: () => Promise.reject(new Error('the workload never truncates')),
        close: () => inner.close(),
      };
    }

    function apply(file: Buffer, op: Op & { kind: 'write' }): Buffer {
      const end = op.offset + op.data.length;
      const out = end > file.length ? Buffer.concat([file, Buffer.alloc(end - file.length)]) : file;
      op.data.copy(out, op.offset);
      return out;
    }

    it('every state a crash could leave opens, keeps each write all old or all new (new once flushed), and stays consistent for qemu', { timeout: 300_000 }, async () => {
      const dir = await makeTempDir();
      const path = await qemuImage(dir);
      const initial = await readFile(path);
      const old = await qemuConvertToRaw(path, dir, 'vdi');
      const writes: Array<{ offset: number; data: Buffer }> = [
        { offset: 2 * MiB + 100, data: Buffer.alloc(5000, 0x41) }, // allocates block 2
        { offset: 100, data: Buffer.alloc(50, 0x42) }, // in place
        { offset: 4 * MiB - 10, data: Buffer.alloc(20, 0x43) }, // in place in block 3, then allocates block 4
        { offset: 5 * MiB + 1, data: Buffer.alloc(3, 0x44) }, // allocates block 5
        { offset: 2 * MiB + 200_000, data: Buffer.alloc(10, 0x45) }, // in place in block 2
      ];
      const flushAfter = new Set([1, 3]);
      const ops: Op[] = [];
      /** For each guest write: how many ops had reached the file when it finished; for each guest flush, likewise. */
      const writeDone: number[] = [];
      const flushDone: number[] = [];
      const image = await openOver(recording(await FileProtocol.open(path, false), ops));
      for (const [i, write] of writes.entries()) {
        await image.write(write.offset, write.data);
        writeDone.push(ops.length);
        if (flushAfter.has(i)) {
          await image.flush();
          flushDone.push(ops.length);
        }
      }
      await image.close();

      let states = 0;
      const statePath = join(dir, 'state.vdi');
      for (let k = 0; k <= ops.length; k++) {
        const lastFlush = ops.slice(0, k).map((op) => op.kind).lastIndexOf('flush');
        const pending = ops.slice(lastFlush + 1, k).filter((op): op is Op & { kind: 'write' } => op.kind === 'write');
        expect(pending.length).toBeLessThanOrEqual(3);
        for (let subset = 0; subset < 1 << pending.length; subset++) {
          let file: Buffer = Buffer.from(initial);
          for (const op of ops.slice(0, lastFlush + 1)) if (op.kind === 'write') file = apply(file, op);
          pending.forEach((op, i) => {
            if (subset & (1 << i)) file = apply(file, op);
          });
          const what = `state after ${k} of ${ops.length} ops, pending writes applied ${subset.toString(2)}`;
          await writeFile(statePath, file);
          states += 1;

          const opened = await openImage(statePath, { readOnly: true, format: 'vdi' });
          const ours = await readAll(opened).finally(() => opened.close());
          const untouched = Buffer.from(ours);
          for (const [i, write] of writes.entries()) {
            const flushed = flushDone.some((done) => done >= writeDone[i]! && done <= k);
            // A write not yet flushed may be torn between blocks (as on any disk), never inside the part of one block.
            for (let start = write.offset; start < write.offset + write.data.length; ) {
              const end = Math.min(write.offset + write.data.length, (Math.floor(start / MiB) + 1) * MiB);
              const got = ours.subarray(start, end);
              const wanted = write.data.subarray(start - write.offset, end - write.offset);
              if (flushed) expect(got.equals(wanted), `${what}: write ${i} was flushed`).toBe(true);
              else expect(got.equals(wanted) || got.equals(old.subarray(start, end)), `${what}: write ${i} at ${start} is neither old nor new`).toBe(true);
              start = end;
            }
            old.copy(untouched, write.offset, write.offset, write.offset + write.data.length);
          }
          expect(untouched.equals(old), `${what}: bytes no write touched changed`).toBe(true);
          const check = await qemuErrors(statePath);
          expect(check.onlyLead, `${what}: ${check.errors.join('; ')}`).toBe(true);
          expect((await qemuConvertToRaw(statePath, dir, 'vdi')).equals(ours), `${what}: qemu reads other bytes`).toBe(true);

          // Writing on: one byte in every block allocates whatever is unallocated; no block may be shared.
          const rw = await openImage(statePath, { format: 'vdi' });
          const expected = Buffer.from(ours);
          try {
            for (let block = 0; block < 6; block++) {
              await rw.write(block * MiB + 12345, Buffer.from([0xa0 + block]));
              expected[block * MiB + 12345] = 0xa0 + block;
            }
          } finally {
            await rw.close();
          }
          const after = await qemuErrors(statePath);
          expect(after.onlyLead, `${what}, written on: ${after.errors.join('; ')}`).toBe(true);
          expect((await qemuConvertToRaw(statePath, dir, 'vdi')).equals(expected), `${what}, written on: qemu reads other bytes`).toBe(true);
        }
      }
      expect(states).toBeGreaterThan(ops.length);
      // The workload itself ended consistent.
      await copyFile(path, statePath);
      expect((await run('qemu-img', ['check', '-f', 'vdi', statePath])).code).toBe(0);
    });
  });
});
