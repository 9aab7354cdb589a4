/**
 * The log-writes filter: every write (with its data), flush, truncate and
 * hole punch that reaches the image file is in the log, issued before it goes
 * down and ended once the file answered, so concurrent requests' end records
 * come in the order they completed; marks land where they were added; and
 * replaying every write of a real qcow2 / QED run onto the file as it was
 * before gives exactly the file afterwards (nothing reaches the file unlogged).
 */
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage, parseFilterArgument } from '../src/index.js';
import { logWrites, markWriteLog } from '../src/block/filters/log-writes.js';
import { parseWriteLog, type WriteLog } from '../src/block/filters/write-log.js';
import type { FilterContext } from '../src/block/filters/types.js';
import type { Protocol } from '../src/block/types.js';
import { makeTempDir, seededBytes, skipWithoutQemu, qemuCheck } from './helpers/qemu.js';

/** An in-memory protocol whose writes end after the delay `delayOf` gives them. */
function memoryProtocol(path: string, delayOf: (offset: number) => number): Protocol & { bytes: Buffer } {
  let bytes = Buffer.alloc(8192, 0x11);
  return {
    path,
    readOnly: false,
    get bytes() {
      return bytes;
    },
    async read(offset, buffer) {
      buffer.fill(0);
      bytes.copy(buffer, 0, offset, offset + buffer.length);
    },
    async write(offset, buffer) {
      await new Promise((resolve) => setTimeout(resolve, delayOf(offset)));
      if (offset + buffer.length > bytes.length) bytes = Buffer.concat([bytes, Buffer.alloc(offset + buffer.length - bytes.length)]);
      buffer.copy(bytes, offset);
    },
    async flush() {},
    async size() {
      return bytes.length;
    },
    async allocatedSize() {
      return bytes.length;
    },
    async truncate(length) {
      bytes = length <= bytes.length ? bytes.subarray(0, length) : Buffer.concat([bytes, Buffer.alloc(length - bytes.length)]);
    },
    async punchHole(offset, length) {
      bytes.fill(0, offset, Math.min(bytes.length, offset + length));
    },
    async close() {},
  };
}

const context = (imagePath: string): FilterContext => ({ imagePath, layer: 0, readOnly: false, notice: () => undefined });

/** Records as short strings: "write issued 1 @4096+512". */
function summary(log: WriteLog): string[] {
  return log.records.map((r) => (r.kind === 'mark' || r.kind === 'event' ? `${r.kind} ${r.name}` : `${r.kind} ${r.phase} ${r.id} @${r.offset}+${r.length}`));
}

/** The file as it was, with every write, truncate and punch of the log applied in issue order. */
function replay(initial: Buffer, log: WriteLog): Buffer {
  let file = Buffer.from(initial);
  for (const record of log.records) {
    if (record.phase !== 'issued') continue;
    if (record.kind === 'write') {
      const end = record.offset + record.length;
      if (end > file.length) file = Buffer.concat([file, Buffer.alloc(end - file.length)]);
      record.data!.copy(file, record.offset);
    } else if (record.kind === 'truncate') {
      file = record.offset <= file.length ? file.subarray(0, record.offset) : Buffer.concat([file, Buffer.alloc(record.offset - file.length)]);
    } else if (record.kind === 'punch') {
      file.fill(0, record.offset, Math.min(file.length, record.offset + record.length));
    }
  }
  return file;
}

describe('log-writes filter', () => {
  it('records writes with their data, flushes, truncates and punches, each issued then ended; marks and events in place', async () => {
    const dir = await makeTempDir();
    const logPath = join(dir, 'writes.log');
    const inner = memoryProtocol(join(dir, 'disk.img'), () => 0);
    const file = await logWrites.wrapProtocol!(inner, { log: logPath }, context(inner.path));
    const data = seededBytes(3, 512);
    await file.write(4096, data);
    file.event!('l2_update');
    await file.flush();
    await markWriteLog(logPath, 'after the flush');
    await file.truncate(16384);
    await file.punchHole!(0, 1024);
    await file.close();

    const log = parseWriteLog(await readFile(logPath));
    expect(log.initialSize).toBe(8192);
    expect(summary(log)).toEqual([
      'write issued 1 @4096+512',
      'write ended 1 @4096+512',
      'event l2_update',
      'flush issued 2 @0+0',
      'flush ended 2 @0+0',
      'mark after the flush',
      'truncate issued 3 @16384+0',
      'truncate ended 3 @16384+0',
      'punch issued 4 @0+1024',
      'punch ended 4 @0+1024',
    ]);
    expect(log.records[0]!.data!.equals(data)).toBe(true);
    expect(log.records[1]!.data).toBeUndefined();
  });

  it('concurrent writes: issue records in the order they were made, end records in the order they completed', async () => {
    const dir = await makeTempDir();
    const logPath = join(dir, 'writes.log');
    // The first write issued completes last.
    const inner = memoryProtocol(join(dir, 'disk.img'), (offset) => (offset === 0 ? 40 : offset === 512 ? 20 : 1));
    const file = await logWrites.wrapProtocol!(inner, { log: logPath }, context(inner.path));
    await Promise.all([0, 512, 1024].map((offset) => file.write(offset, seededBytes(offset + 1, 512))));
    await file.close();
    const log = parseWriteLog(await readFile(logPath));
    expect(summary(log)).toEqual([
      'write issued 1 @0+512',
      'write issued 2 @512+512',
      'write issued 3 @1024+512',
      'write ended 3 @1024+512',
      'write ended 2 @512+512',
      'write ended 1 @0+512',
    ]);
  });

  it('a failed request gets a failed record with its errno, and fails as it would without the filter', async () => {
    const dir = await makeTempDir();
    const logPath = join(dir, 'writes.log');
    const inner = memoryProtocol(join(dir, 'disk.img'), () => 0);
    inner.flush = async () => {
      throw Object.assign(new Error('injected'), { errno: 5 });
    };
    const file = await logWrites.wrapProtocol!(inner, { log: logPath }, context(inner.path));
    await expect(file.flush()).rejects.toThrow('injected');
    await file.close();
    const log = parseWriteLog(await readFile(logPath));
    expect(summary(log)).toEqual(['flush issued 1 @0+0', 'flush failed 1 @0+0']);
    expect(log.records[1]!.errno).toBe(5);
  });

  it('refuses a missing log=, the image file as its log, and a log another open image records into', async () => {
    const dir = await makeTempDir();
    expect(() => logWrites.validate({})).toThrow(/log= is needed/);
    const image = join(dir, 'disk.raw');
    await writeFile(image, Buffer.alloc(4096));
    await expect(openImage(image, { format: 'raw', filters: [{ name: 'log-writes', log: image }] })).rejects.toThrow(/is the image file itself/);
    const logPath = join(dir, 'writes.log');
    const inner = memoryProtocol(join(dir, 'a.img'), () => 0);
    const first = await logWrites.wrapProtocol!(inner, { log: logPath }, context(inner.path));
    await expect(logWrites.wrapProtocol!(memoryProtocol(join(dir, 'b.img'), () => 0), { log: logPath }, context('b.img'))).rejects.toThrow(/already recording/);
    await first.close();
    await expect(markWriteLog(logPath, 'x')).rejects.toThrow(/no open image is recording/);
    expect(parseFilterArgument('log-writes:log=w.log', dir)).toEqual({ name: 'log-writes', log: join(dir, 'w.log') });
  });
});

describe.skipIf(skipWithoutQemu('log-writes on real images'))('log-writes on real images', () => {
  for (const format of ['qcow2', 'qed'] as const) {
    it(`${format}: the file before the open plus every logged request is exactly the file after the close`, async () => {
      const dir = await makeTempDir();
      const path = join(dir, `disk.${format}`);
      await createImage(path, format, { size: 8 << 20, options: { cluster_size: '4096' } });
      const initial = await readFile(path);
      const logPath = join(dir, 'writes.log');
      const image = await openImage(path, { format, idleCleanSeconds: 0, filters: [{ name: 'log-writes', log: logPath }] });
      for (let batch = 0; batch < 8; batch++) {
        await Promise.all([0, 1, 2].map((i) => image.write(((batch * 3 + i) * 37 * 4096) % (8 << 20), seededBytes(batch * 3 + i, 4096 + i * 1000))));
        await image.flush();
        await markWriteLog(logPath, `ack ${batch}`);
      }
      await image.zero(0, 65536);
      await image.close();
      const log = parseWriteLog(await readFile(logPath));
      expect(log.initialSize).toBe(initial.length);
      expect(replay(initial, log).equals(await readFile(path))).toBe(true);
      // Each ack mark follows the end of a flush, with no write ended between them.
      for (const mark of log.records.filter((r) => r.kind === 'mark')) {
        const before = log.records.slice(0, mark.index).filter((r) => r.kind !== 'event' && r.phase !== 'issued');
        expect(before.at(-1)?.kind, mark.name).toBe('flush');
      }
      const check = await qemuCheck(path, format);
      expect(check.code, check.stdout + check.stderr).toBe(0);
      // The log of a copy opened again is recreated, not appended to.
      await copyFile(path, join(dir, 'again'));
      const again = await openImage(join(dir, 'again'), { format, filters: [{ name: 'log-writes', log: logPath }] });
      await again.close();
      expect(parseWriteLog(await readFile(logPath)).records.every((r) => r.kind !== 'mark')).toBe(true);
    });
  }
});
