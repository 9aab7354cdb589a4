/**
 * imgmount convert -c: compressed clusters where the target format writes
 * them (qcow2, src/formats/qcow2/compressed-write.ts), refused by name
 * elsewhere; qemu-img is the oracle (compare, check, map shows compressed
 * clusters, qemu reads them back with its own inflate).
 */
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { convertImage, openImage } from '../src/index.js';
import { FORMATS, KiB, MiB, built, oracleRaw, randomBytes, type FormatEntry, type Shape } from './helpers/formats.js';
import { makeTempDir, qemuImg, qemuIo, qemuMap, run } from './helpers/qemu.js';
import { TARGETS, TIMEOUT, compare, compressedRuns, dataRanges, expectCheckClean, expectHolesKept, qemuQcow2 } from './helpers/convert.js';

describe('convert -c: compressed clusters', () => {
  const cases: { entry: FormatEntry; shape: Shape }[] = FORMATS.flatMap((entry) => [...entry.shapes, ...entry.chains].map((shape) => ({ entry, shape })));
  for (const { entry, shape } of cases) {
    it(`${entry.name} ${shape.name} into every target: compressed where the target can (identical, check clean, map shows compressed), else refused by name`, TIMEOUT, async () => {
      const image = await built(entry, shape);
      const dir = await makeTempDir('imgmount-convert-');
      for (const target of TARGETS) {
        const dest = join(dir, `compressed.${target}`);
        const outcome = await convertImage(image.path, dest, { sourceFormat: entry.name, targetFormat: target, compress: true }).then(
          () => undefined,
          (error: Error) => error,
        );
        if (outcome !== undefined) {
          expect(outcome.message, target).toMatch(new RegExp(`-c: writing compressed clusters into ${target} images is not supported`));
          await expect(stat(dest)).rejects.toThrow(/ENOENT/);
          continue;
        }
        await compare(image.path, entry.name, dest, target, image.qemuCwd);
        await expectCheckClean(dest, target);
        await expectHolesKept(image, dest, target);
        // Data that is not all zeros (qemu-img map calls every byte of a bochs or vhdx image data, zeros too; zeros are not compressed).
        const sourceHasData = (await readFile(await oracleRaw(image))).some((byte) => byte !== 0);
        if (sourceHasData) expect(compressedRuns(await qemuMap(dest, target)).length, `${dest} shows no compressed cluster`).toBeGreaterThan(0);
      }
    });
  }

  it('into qcow2 of every cluster size, extended L2, version 2, lazy refcounts: identical, check clean, as small as qemu-img convert -c makes it', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = join(dir, 'text.raw');
    // Compressible: text with some random bytes, and a last cluster cut short by the virtual size.
    const content = Buffer.alloc(3 * MiB + 1536);
    const line = Buffer.from('compressible line of text for convert -c; ');
    for (let i = 0; i < content.length; i++) content[i] = line[i % line.length]!;
    randomBytes(64 * KiB, 11).copy(content, MiB);
    content.fill(0, 2 * MiB, 2 * MiB + 256 * KiB);
    await writeFile(source, content);
    for (const options of ['cluster_size=512', 'cluster_size=4096', 'cluster_size=65536', 'cluster_size=2M', 'extended_l2=on', 'compat=0.10', 'lazy_refcounts=on']) {
      const plain = join(dir, `plain-${options}.qcow2`);
      const dest = join(dir, `c-${options}.qcow2`);
      await convertImage(source, plain, { targetFormat: 'qcow2', options: Object.fromEntries([options.split('=')]) });
      await convertImage(source, dest, { targetFormat: 'qcow2', compress: true, options: Object.fromEntries([options.split('=')]) });
      await compare(source, 'raw', dest, 'qcow2');
      await expectCheckClean(dest, 'qcow2');
      expect(compressedRuns(await qemuMap(dest, 'qcow2')).length, options).toBeGreaterThan(0);
      // About as small as qemu-img convert -c makes it (and, but for the metadata of 2 MiB clusters, far smaller than without -c).
      const qemuMade = join(dir, `qemu-${options}.qcow2`);
      await qemuImg(['convert', '-c', '-O', 'qcow2', '-o', options, source, qemuMade]);
      expect((await stat(dest)).blocks * 512, `${options}: bytes on disk`).toBeLessThanOrEqual((await stat(qemuMade)).blocks * 512 * 1.1 + 64 * KiB);
      if (options !== 'cluster_size=2M') expect((await stat(dest)).blocks, `${options}: blocks on disk`).toBeLessThan((await stat(plain)).blocks / 2);
      // qemu reads every compressed cluster back (its own inflate, 4 KiB window).
      const back = join(dir, `back-${options}.raw`);
      await qemuImg(['convert', '-O', 'raw', dest, back]);
      expect((await readFile(back)).equals(content), options).toBe(true);
    }
  });

  it('over a backing file (-B): only the top is written, compressed', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const base = await qemuQcow2(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    await qemuImg(['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    await qemuIo(top, ['write -P 0x11 2M 64k', 'write -z 1M 64k', 'write -P 0x12 10M 1M', 'write -P 0x13 3M 100'], 'qcow2');
    const dest = join(dir, 'dest.qcow2');
    await convertImage(top, dest, { targetFormat: 'qcow2', compress: true, backingFile: base, backingFormat: 'qcow2' });
    await compare(top, 'qcow2', dest, 'qcow2');
    await expectCheckClean(dest, 'qcow2');
    const own = (await qemuMap(dest, 'qcow2')).filter((run) => run.depth === 0 && run.present);
    expect(own.map((run) => [run.start, run.length, run.data])).toEqual([[MiB, 64 * KiB, false], [2 * MiB, 64 * KiB, true], [3 * MiB, 64 * KiB, true], [10 * MiB, MiB, true]]);
    expect(compressedRuns(own).length).toBe(3);
  });

  it('writes a compressed cluster only into an unallocated cluster', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const path = join(dir, 'a.qcow2');
    await qemuImg(['create', '-f', 'qcow2', path, '1M']);
    await qemuIo(path, ['write -P 0x21 64k 64k'], 'qcow2');
    const before = await qemuMap(path, 'qcow2');
    expect(before.some((run) => run.data)).toBe(true);
    const image = await openImage(path);
    try {
      const cluster = Buffer.alloc(64 * KiB, 0x42);
      await expect(image.writeCompressed(64 * KiB, cluster)).rejects.toThrow(/guest offset 65536 is already allocated; compressed clusters can only be written into unallocated clusters/);
      await expect(image.writeCompressed(1000, cluster)).rejects.toThrow(/must cover one whole cluster/);
      await image.writeCompressed(0, cluster);
      await expect(image.writeCompressed(0, cluster)).rejects.toThrow(/already allocated/);
      // Overwriting a compressed cluster frees its host cluster; allocating and compressing go on around it.
      await image.write(0, Buffer.alloc(100, 0x43));
      await image.flush(); // the compressed cluster's host cluster is freed here
      await image.write(192 * KiB, Buffer.alloc(64 * KiB, 0x44)); // and may be handed out again here
      await image.flush();
      await image.writeCompressed(128 * KiB, Buffer.alloc(64 * KiB, 0x45));
    } finally {
      await image.close();
    }
    await expectCheckClean(path, 'qcow2');
    const result = await run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x43 0 100', '-c', 'read -P 0x42 100 65436', '-c', 'read -P 0x21 64k 64k', '-c', 'read -P 0x45 128k 64k', '-c', 'read -P 0x44 192k 64k', path]);
    expect(result.stdout).not.toMatch(/Pattern verification failed/);
    expect(result.code).toBe(0);
  });
});

