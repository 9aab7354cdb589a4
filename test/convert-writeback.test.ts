/**
 * convert's early writeback (convert-copy.ts, BlockImage.writeBack): with more
 * than WRITE_BACK_EVERY bytes of data, fdatasyncs of DEST's files run while the
 * copy still writes. What a user sees must not change: for every target format,
 * DEST is identical to the source (`qemu-img compare`), `qemu-img check` of it
 * is clean, holes stay holes; also with -m 1 and with a DEST whose data lives in
 * another file (a qcow2 external data file, which writeBack syncs too). An
 * fdatasync failing during the copy fails the copy with its error, once the
 * writes in flight have settled (convertImage then removes DEST, as for a
 * write error: convert.test.ts).
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { convertImage } from '../src/index.js';
import { copy, WRITE_BACK_EVERY } from '../src/block/convert-copy.js';
import { BlockError } from '../src/block/errors.js';
import type { BlockImage } from '../src/block/image.js';
import { KiB, MiB, type BuiltImage } from './helpers/formats.js';
import { makeTempDir, qemuImg, qemuIo, run } from './helpers/qemu.js';
import { TARGETS, TIMEOUT, compare, expectCheckClean, expectHolesKept } from './helpers/convert.js';

const DATA = 3 * (WRITE_BACK_EVERY + 3 * MiB); // several writebacks, the last one while data is still written

/** A qcow2 source with DATA bytes of patterned data in three extents, a hole and a zero run between them. */
async function source(dir: string): Promise<string> {
  const path = join(dir, 'src.qcow2');
  await qemuImg(['create', '-f', 'qcow2', path, `${DATA + 64 * MiB}`]);
  const third = DATA / 3;
  await qemuIo(path, [
    `write -P 0x11 0 ${third}`,
    `write -P 0x22 ${third + 16 * MiB} ${third}`,
    `write -z ${2 * third + 16 * MiB} ${8 * MiB}`,
    `write -P 0x33 ${2 * third + 32 * MiB} ${third}`,
  ], 'qcow2');
  return path;
}

describe('convert with early writeback (more data than WRITE_BACK_EVERY)', () => {
  it('into every target, and with -m 1: identical, checks clean, holes kept', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-wb-');
    const src = await source(dir);
    const built = { path: src, format: 'qcow2' } as Pick<BuiltImage, 'path' | 'format'> as BuiltImage;
    for (const target of TARGETS) {
      const dest = join(dir, `dest.${target}`);
      const report = await convertImage(src, dest, { targetFormat: target });
      expect(report.bytesWritten, target).toBe(DATA);
      await compare(src, 'qcow2', dest, target);
      await expectCheckClean(dest, target);
      await expectHolesKept(built, dest, target);
    }
    const dest = join(dir, 'serial.qcow2');
    await convertImage(src, dest, { targetFormat: 'qcow2', parallel: 1, bufferSize: 256 * KiB });
    await compare(src, 'qcow2', dest, 'qcow2');
    await expectCheckClean(dest, 'qcow2');
  });

  it('into a qcow2 with an external data file: identical, checks clean', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-wb-');
    const src = await source(dir);
    const dest = join(dir, 'dest.qcow2');
    await convertImage(src, dest, { targetFormat: 'qcow2', options: { data_file: 'dest.data' } });
    // qemu resolves the relative data file name against its working directory.
    await compare(src, 'qcow2', dest, 'qcow2', dir);
    const checked = await run('qemu-img', ['check', '-f', 'qcow2', dest], { cwd: dir });
    expect(checked.code, checked.stdout + checked.stderr).toBe(0);
    expect((await stat(join(dir, 'dest.data'))).size).toBeGreaterThanOrEqual(DATA);
  });

  it('an fdatasync failing during the copy fails it (EIO), after the writes in flight settled', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-wb-');
    const src = await source(dir);
    const { openImage } = await import('../src/index.js');
    const input = await openImage(src, { readOnly: true });
    const dest = join(dir, 'dest.raw');
    await qemuImg(['create', '-f', 'raw', dest, `${input.length}`]);
    const output = await openImage(dest, { format: 'raw' });
    let pending = 0;
    let settledBeforeFailure = true;
    const failing = new Proxy(output, {
      get(target, name) {
        if (name === 'writeBack') return () => Promise.reject(new BlockError(`fdatasync ${dest}: input/output error`, 5));
        if (name === 'write') {
          return (offset: number, buffer: Buffer) => {
            pending++;
            return target.write(offset, buffer).finally(() => pending--);
          };
        }
        const value = Reflect.get(target, name, target) as unknown;
        return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
      },
    }) as BlockImage;
    try {
      const result = copy(input, failing, { sparseSize: 4096, parallel: 8, bufferSize: 2 * MiB, fresh: true, topOnly: false, writeBackEvery: WRITE_BACK_EVERY });
      await expect(result.finally(() => (settledBeforeFailure = pending === 0))).rejects.toThrow(/fdatasync .*: input\/output error/);
      expect(settledBeforeFailure).toBe(true);
    } finally {
      await output.close();
      await input.close();
    }
  });
});
