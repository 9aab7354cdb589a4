/**
 * imgmount convert / convertImage against qemu-img as the oracle:
 *
 * 1. every shape of every format of the conformance matrix (qemu-made images,
 *    backing chains across formats, compressed qcow2, external data files,
 *    internal snapshots with -l) converted into every format the library can
 *    create: `qemu-img compare` says the images are identical, `qemu-img check`
 *    of DEST is clean, and holes stay holes (`qemu-img map` of DEST shows data
 *    only where the source's map had data, at DEST's cluster granularity);
 * 2. -S: zeros written as data in the source are not written (and -S 0 fully
 *    allocates); du of a raw DEST;
 * 3. -n into an existing image holding other data; -B keeps a backing file;
 * 4. an existing DEST is refused without --force and left untouched; a source
 *    (or a file of its chain) is never a DEST;
 * 5. a read error of the source (blkdebug), a write error of DEST (EFBIG
 *    through a file size limit) or an abort removes the DEST it created (and a
 *    data file created with it), and says what it left after -n;
 * 6. the command line: -p, -l, and one-line errors for bad options.
 *
 * -c (compressed clusters) has its own file: convert-compressed.test.ts.
 */
import { copyFile, link, readdir, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { convertImage, formatDrivers } from '../src/index.js';
import { FORMATS, KiB, MiB, built, oracleRaw, randomBytes, type FormatEntry, type Shape } from './helpers/formats.js';
import { makeTempDir, qemuImg, qemuInfo, qemuIo, qemuMap, run } from './helpers/qemu.js';
import { TARGETS, TIMEOUT, bin, compare, dataRanges, destDataRanges, expectCheckClean, expectHolesKept, imgmount, qemuQcow2, sha } from './helpers/convert.js';

describe('convert: every readable format into every writable one', () => {
  it('covers every format the library reads', () => {
    // The matrix below runs over the conformance entries: each readable format needs one.
    const readable = formatDrivers.filter((driver) => !driver.recognizedOnly).map((driver) => driver.name).sort();
    expect(FORMATS.map((entry) => entry.name).sort()).toEqual(readable);
    expect(TARGETS).toContain('raw');
  });

  const cases: { entry: FormatEntry; shape: Shape }[] = FORMATS.flatMap((entry) => [...entry.shapes, ...entry.chains].map((shape) => ({ entry, shape })));
  for (const { entry, shape } of cases) {
    describe(`${entry.name} ${shape.name}`, () => {
      for (const target of TARGETS) {
        it(`to ${target}: identical (qemu-img compare), DEST checks clean, holes stay holes`, TIMEOUT, async () => {
          const image = await built(entry, shape);
          const dir = await makeTempDir('imgmount-convert-');
          const dest = join(dir, `dest.${target}`);
          const report = await convertImage(image.path, dest, { sourceFormat: entry.name, targetFormat: target });
          expect(report.created).toBe(true);
          await compare(image.path, entry.name, dest, target, image.qemuCwd);
          await expectCheckClean(dest, target);
          await expectHolesKept(image, dest, target);
          for (const snapshot of shape.snapshots ?? []) {
            const snapDest = join(dir, `snapshot-${snapshot.open}.${target}`);
            await convertImage(image.path, snapDest, { sourceFormat: entry.name, targetFormat: target, snapshot: snapshot.open });
            await compare(snapDest, target, await oracleRaw(image, snapshot.qemu), 'raw');
            await expectCheckClean(snapDest, target);
          }
        });
      }
    });
  }
});

describe('convert: holes and zeros', () => {
  it('leaves a raw DEST sparse: it occupies no more than the data qemu-img map shows', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    const dest = join(dir, 'dest.raw');
    await convertImage(source, dest, { targetFormat: 'raw' });
    await compare(source, 'qcow2', dest, 'raw');
    const { blocks, size } = await stat(dest);
    expect(size).toBe(16 * MiB);
    // 3 MiB + 100 KiB of data; the 1 MiB of zeros written as data at 6 MiB is not written (-S 4k).
    expect(blocks * 512).toBeLessThanOrEqual(3 * MiB + 128 * KiB);
    expect(blocks * 512).toBeGreaterThanOrEqual(3 * MiB + 100 * KiB);
    const data = dataRanges(await qemuMap(dest, 'raw'));
    expect(data.some(([start, end]) => start < 7 * MiB && end > 6 * MiB)).toBe(false);
  });

  it('with -S 0 writes everything: a raw DEST is fully allocated, a qcow2 DEST maps data everywhere', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    const raw = join(dir, 'full.raw');
    await convertImage(source, raw, { targetFormat: 'raw', sparseSize: 0 });
    await compare(source, 'qcow2', raw, 'raw');
    expect((await stat(raw)).blocks * 512).toBeGreaterThanOrEqual(16 * MiB);
    const qcow2 = join(dir, 'full.qcow2');
    await convertImage(source, qcow2, { targetFormat: 'qcow2', sparseSize: 0 });
    const runs = await qemuMap(qcow2, 'qcow2');
    expect(runs.every((run) => run.data)).toBe(true);
    await compare(source, 'qcow2', qcow2, 'qcow2');
  });

  it('with -S 64k keeps 4 KiB zero blocks inside data as data, and skips 64 KiB ones', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = join(dir, 'src.raw');
    const content = randomBytes(2 * MiB, 7);
    content.fill(0, 64 * KiB, 68 * KiB); // one 4 KiB zero block
    content.fill(0, 512 * KiB, 640 * KiB); // two aligned 64 KiB zero blocks
    await writeFile(source, content);
    const dest = join(dir, 'dest.raw');
    await convertImage(source, dest, { targetFormat: 'raw', sparseSize: 64 * KiB });
    await compare(source, 'raw', dest, 'raw');
    const data = dataRanges(await qemuMap(dest, 'raw'));
    expect(data.some(([start, end]) => start <= 64 * KiB && end >= 68 * KiB)).toBe(true);
    expect(data.some(([start, end]) => start < 640 * KiB && end > 512 * KiB)).toBe(false);
  });
});

describe('convert: large sparse images (the source map is read in 256 MiB windows)', () => {
  it('data across the window boundaries, plain and -c, into every target', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = join(dir, 'big.qcow2');
    await qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=4096', source, '1G']);
    await qemuIo(source, [`write -P 0x61 ${256 * MiB - 5000} 10000`, `write -z ${512 * MiB - 8192} 16384`, `write -P 0x62 ${512 * MiB + 100} 100`, `write -P 0x63 ${1024 * MiB - 3000} 3000`], 'qcow2');
    for (const target of TARGETS) {
      for (const compress of [false, true]) {
        const dest = join(dir, `big-${compress ? 'c' : 'plain'}.${target}`);
        const outcome = await convertImage(source, dest, { targetFormat: target, compress }).catch((error: Error) => error);
        if (outcome instanceof Error) {
          expect(compress && outcome.message, `${target}: ${outcome.message}`).toMatch(/-c: writing compressed clusters into .* images is not supported/);
          continue;
        }
        await compare(source, 'qcow2', dest, target);
        await expectCheckClean(dest, target);
        const data = await destDataRanges(dest, target);
        const bytes = data.reduce((sum, [start, end]) => sum + end - start, 0);
        // Six allocation units at most (of 64 KiB, or the target's own: VDI 1 MiB blocks, VHD 2 MiB blocks).
        const unit = Math.max(64 * KiB, Number((await qemuInfo(dest, target))['cluster-size'] ?? 0));
        expect(bytes, `${dest}: data bytes (allocation unit ${unit})`).toBeLessThanOrEqual(6 * unit);
      }
    }
  });
});

describe('convert into existing images and backing files', () => {
  it('-n writes into an existing image holding other data: afterwards identical, holes of the source zeroed', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    for (const target of TARGETS) {
      const dest = join(dir, `existing.${target}`);
      await qemuImg(['create', '-f', target, dest, '20M']);
      await qemuIo(dest, ['write -P 0x77 0 20M'], target);
      const report = await convertImage(source, dest, { targetFormat: target, existing: true });
      expect(report.created).toBe(false);
      // The first 16 MiB are the source's (holes of the source zeroed), the rest keeps the old content.
      const head = join(dir, `existing-${target}.raw`);
      await qemuImg(['convert', '-f', target, '-O', 'raw', dest, head]);
      await truncate(head, 16 * MiB);
      await compare(source, 'qcow2', head, 'raw');
      const tail = await run('qemu-io', ['-f', target, '-c', 'read -P 0x77 16M 4M', dest]);
      expect(tail.stdout, 'past the source the old content stays').toMatch(/read 4194304\/4194304/);
      expect(tail.stdout).not.toMatch(/Pattern verification failed/);
      await expectCheckClean(dest, target);
    }
  });

  it('-n refuses a DEST of another format than -O (it would overwrite its metadata), leaving it untouched', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    const dest = join(dir, 'existing.qcow2');
    await qemuImg(['create', '-f', 'qcow2', dest, '32M']);
    const before = await sha(dest);
    await expect(convertImage(source, dest, { targetFormat: 'raw', existing: true })).rejects.toThrow(/existing\.qcow2 is a qcow2 image, not raw; .*use -O qcow2/);
    await expect(convertImage(source, dest, { targetFormat: 'qed', existing: true })).rejects.toThrow(/is a qcow2 image, not qed/);
    expect(await sha(dest)).toBe(before);
  });

  it('-n refuses a DEST smaller than the source, and a missing one', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    const small = join(dir, 'small.qcow2');
    await qemuImg(['create', '-f', 'qcow2', small, '8M']);
    const before = await sha(small);
    await expect(convertImage(source, small, { targetFormat: 'qcow2', existing: true })).rejects.toThrow(/is smaller than .*src\.qcow2 \(16777216 bytes\)/);
    expect(await sha(small)).toBe(before);
    await expect(convertImage(source, join(dir, 'none.qcow2'), { targetFormat: 'qcow2', existing: true })).rejects.toThrow(/-n: .*none\.qcow2 does not exist/);
  });

  it('-B creates DEST over a backing file and copies only what the top image stores', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const base = await qemuQcow2(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    await qemuImg(['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    await qemuIo(top, ['write -P 0x11 2M 64k', 'write -z 1M 64k', 'write -P 0x12 10M 1M'], 'qcow2');
    const baseRaw = join(dir, 'base.raw');
    await qemuImg(['convert', '-O', 'raw', base, baseRaw]);
    // Targets that cannot have a raw backing file refuse -B by name (as their create does) and leave no DEST.
    const refusals: Record<string, RegExp> = {
      vdi: /VDI images cannot have a backing file/,
      vmdk: /the backing file of a VMDK image must be a vmdk image, not raw/,
      vpc: /vpc images cannot be created with a backing file/,
      vhdx: /a backing file \(a differencing VHDX\) cannot be created/,
    };
    const converted: string[] = [];
    for (const target of TARGETS.filter((name) => name !== 'raw')) {
      const dest = join(dir, `dest.${target}`);
      const refused = refusals[target];
      if (refused) {
        await expect(convertImage(top, dest, { targetFormat: target, backingFile: baseRaw, backingFormat: 'raw' }), target).rejects.toThrow(refused);
        await expect(stat(dest), `${target}: no DEST left`).rejects.toThrow(/ENOENT/);
        continue;
      }
      converted.push(target);
      await convertImage(top, dest, { targetFormat: target, backingFile: baseRaw, backingFormat: 'raw' });
      const info = await qemuInfo(dest, target);
      expect(info['backing-filename']).toBe(baseRaw);
      await compare(top, 'qcow2', dest, target);
      await expectCheckClean(dest, target);
      // DEST itself holds only what the top stores: its 64 KiB and 1 MiB of data and its zero cluster
      // (a zero cluster, or zeros written as data where the target's zeroing does that over a backing file).
      const own = (await qemuMap(dest, target)).filter((run) => run.depth === 0 && run.present);
      expect(own.map((run) => [run.start, run.length]), target).toEqual([[MiB, 64 * KiB], [2 * MiB, 64 * KiB], [10 * MiB, MiB]]);
    }
    expect(converted).toEqual(expect.arrayContaining(['qcow2', 'qed']));
  });
});

describe('convert refuses to destroy', () => {
  it('an existing DEST without --force (left untouched), and overwrites it with --force', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    const dest = join(dir, 'dest.qed');
    await writeFile(dest, 'precious');
    await expect(convertImage(source, dest, { targetFormat: 'qed' })).rejects.toThrow(/dest\.qed already exists; pass --force/);
    expect(await readFile(dest, 'utf8')).toBe('precious');
    await convertImage(source, dest, { targetFormat: 'qed', force: true });
    await compare(source, 'qcow2', dest, 'qed');
  });

  it('the source itself, or a file of its backing chain, as DEST (even with --force or -n)', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const base = await qemuQcow2(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    await qemuImg(['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
    const [baseSum, topSum] = [await sha(base), await sha(top)];
    await expect(convertImage(top, top, { targetFormat: 'qcow2', force: true })).rejects.toThrow(/is the source image itself/);
    await expect(convertImage(top, top, { targetFormat: 'qcow2', existing: true })).rejects.toThrow(/is the source image itself/);
    await expect(convertImage(top, base, { targetFormat: 'raw', force: true })).rejects.toThrow(/base\.qcow2 is in the source's backing chain \(.*base\.qcow2\)/);
    const alias = join(dir, 'alias.qcow2');
    await link(top, alias); // another name of the same file
    await expect(convertImage(top, alias, { targetFormat: 'qcow2', force: true })).rejects.toThrow(/alias\.qcow2 is the source image itself/);
    expect([await sha(base), await sha(top)]).toEqual([baseSum, topSum]);
    const withData = join(dir, 'with-data.qcow2');
    await qemuImg(['create', '-f', 'qcow2', '-o', 'data_file=with-data.data', withData, '1M'], { cwd: dir });
    await qemuIo(withData, ['write -P 0x31 0 64k'], 'qcow2', { cwd: dir });
    const dataSum = await sha(join(dir, 'with-data.data'));
    await expect(convertImage(withData, join(dir, 'with-data.data'), { targetFormat: 'raw', force: true })).rejects.toThrow(
      /with-data\.data is the external data file of .*with-data\.qcow2; writing it would destroy/,
    );
    expect(await sha(join(dir, 'with-data.data'))).toBe(dataSum);
  });
});

describe('convert failures', () => {
  const readError = [{ name: 'blkdebug', event: 'read_aio', errno: 'EIO', nth: '3' }];

  it('a read error of the source removes the DEST it created and says so', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    const dest = join(dir, 'dest.qcow2');
    await expect(convertImage(source, dest, { targetFormat: 'qcow2', filters: readError, parallel: 1, bufferSize: 64 * KiB })).rejects.toThrow(
      /^convert failed: .*; .*dest\.qcow2, which it had created, was removed$/,
    );
    await expect(stat(dest)).rejects.toThrow(/ENOENT/);
  });

  it('an abort (SIGINT of the command line) stops it like a failure: DEST removed', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    const dest = join(dir, 'dest.qed');
    const controller = new AbortController();
    const seen: number[] = [];
    const progress = (done: number) => {
      seen.push(done);
      if (done >= 2 * MiB) controller.abort();
    };
    await expect(convertImage(source, dest, { targetFormat: 'qed', signal: controller.signal, progress, parallel: 1 })).rejects.toThrow(
      /^convert failed: interrupted; .*dest\.qed, which it had created, was removed$/,
    );
    await expect(stat(dest)).rejects.toThrow(/ENOENT/);
    expect(seen.at(-1)!).toBeLessThan(16 * MiB);
  });

  it('reports progress from 0 to the virtual size, never going back', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    const seen: [number, number][] = [];
    await convertImage(source, join(dir, 'dest.raw'), { targetFormat: 'raw', progress: (done, total) => seen.push([done, total]) });
    expect(seen[0]).toEqual([0, 16 * MiB]);
    expect(seen.at(-1)).toEqual([16 * MiB, 16 * MiB]);
    for (let i = 1; i < seen.length; i++) expect(seen[i]![0]).toBeGreaterThanOrEqual(seen[i - 1]![0]);
  });

  it('a write error of DEST (file size limit: EFBIG, as a full disk gives ENOSPC) removes it, also when creating it fails', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    for (const target of TARGETS) {
      const dest = join(dir, `limited.${target}`);
      // bash: SIGXFSZ ignored (inherited through exec), so a write past 2 MiB fails with EFBIG.
      const result = await run('bash', ['-c', 'trap "" XFSZ; ulimit -f 2048; exec "$0" "$@"', process.execPath, bin, 'convert', '-O', target, source, dest]);
      expect(result.code, `${target}: ${result.stderr}`).toBe(1);
      expect(result.stderr, target).toMatch(/file too large/);
      expect(result.stderr, target).toMatch(/limited\.\w+, which it had created, was removed/);
      expect(result.stderr.trimEnd().split('\n'), target).toHaveLength(1);
      await expect(stat(dest), target).rejects.toThrow(/ENOENT/);
    }
  });

  it('converts into a qcow2 with an external data file (-o data_file=): qemu-img compare equal; a failure removes both files it created', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    const dest = join(dir, 'dest.qcow2');
    await convertImage(source, dest, { targetFormat: 'qcow2', options: { data_file: 'dest.data' } });
    // qemu resolves the relative data file name against its working directory.
    const compared = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', source, dest], { cwd: dir });
    expect(compared.code, compared.stdout + compared.stderr).toBe(0);
    expect((await run('qemu-img', ['check', '-f', 'qcow2', dest], { cwd: dir })).code).toBe(0);
    expect((await stat(join(dir, 'dest.data'))).size).toBeGreaterThan(0);

    const failing = join(dir, 'failing.qcow2');
    await expect(convertImage(source, failing, { targetFormat: 'qcow2', options: { data_file: 'failing.data' }, filters: readError, parallel: 1, bufferSize: 64 * KiB })).rejects.toThrow(
      /^convert failed: .*; .*failing\.qcow2 and .*failing\.data, which it had created, were removed$/,
    );
    await expect(stat(failing)).rejects.toThrow(/ENOENT/);
    await expect(stat(join(dir, 'failing.data'))).rejects.toThrow(/ENOENT/);
  });

  it('a failure into a new VMDK with extent files removes the descriptor and every extent it created; converting again then works', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    const dest = join(dir, 'split.vmdk');
    const options = { subformat: 'twoGbMaxExtentFlat' };
    await expect(convertImage(source, dest, { targetFormat: 'vmdk', options, filters: readError, parallel: 1, bufferSize: 64 * KiB })).rejects.toThrow(
      /^convert failed: .*; .*split\.vmdk and .*split-f001\.vmdk, which it had created, were removed$/,
    );
    expect((await readdir(dir)).filter((name) => name.startsWith('split'))).toEqual([]);
    await convertImage(source, dest, { targetFormat: 'vmdk', options });
    const compared = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'vmdk', source, dest]);
    expect(compared.code, compared.stdout + compared.stderr).toBe(0);
  });

  it('after -n, says DEST was left partly converted', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    const dest = join(dir, 'dest.qcow2');
    await qemuImg(['create', '-f', 'qcow2', dest, '16M']);
    await expect(convertImage(source, dest, { targetFormat: 'qcow2', existing: true, filters: readError, parallel: 1, bufferSize: 64 * KiB })).rejects.toThrow(
      /^convert failed: .*dest\.qcow2 \(written into with -n\) was left partly converted$/,
    );
    await expectCheckClean(dest, 'qcow2');
  });
});

describe('imgmount convert (command line)', () => {
  it('converts with -p (a progress bar on stderr) and -l snapshot.name=', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    await qemuImg(['snapshot', '-c', 'first', source]);
    await qemuIo(source, ['write -P 0x99 0 1M'], 'qcow2');
    const dest = join(dir, 'dest.qed');
    const result = await imgmount('convert', '-p', '-f', 'qcow2', '-O', 'qed', '-o', 'cluster_size=4096', source, dest);
    expect(result.stderr).toMatch(/100%/);
    expect(result.code, result.stderr).toBe(0);
    expect(result.stdout).toBe('');
    await compare(source, 'qcow2', dest, 'qed');
    expect((await qemuInfo(dest, 'qed'))['cluster-size']).toBe(4096);
    const snap = join(dir, 'snap.raw');
    expect((await imgmount('convert', '-l', 'snapshot.name=first', '-O', 'raw', source, snap)).code).toBe(0);
    const oracle = join(dir, 'oracle.raw');
    await qemuImg(['convert', '-l', 'snapshot.name=first', '-O', 'raw', source, oracle]);
    await compare(snap, 'raw', oracle, 'raw');
  });

  it('gives one line naming the problem for each bad option', TIMEOUT, async () => {
    const dir = await makeTempDir('imgmount-convert-');
    const source = await qemuQcow2(dir);
    const dest = join(dir, 'dest.qcow2');
    const cases: [string[], RegExp][] = [
      [['-S', '1000'], /-S 1000: the sparse size must be a multiple of 512 bytes/],
      [['-S', 'lots'], /invalid convert -S size 'lots'/],
      [['-m', '0'], /-m 0: the number of requests in flight must be from 1 to 16/],
      [['-m', '17'], /-m 17: .* from 1 to 16/],
      [['-m', 'x'], /-m x: expected a whole number/],
      [['-O', 'nosuch'], /unknown format 'nosuch'/],
      [['-O', 'qcow2', '-l', 'snapshot.foo=1'], /-l snapshot\.foo=1: expected snapshot\.id=ID, snapshot\.name=NAME/],
      [['-O', 'qcow2', '-l', 'nosnap'], /nosnap/],
      [['-O', 'qcow2', '-F', 'raw'], /-F\) was given without a backing file \(-B\)/],
      [['-O', 'qcow2', '-n', '-o', 'cluster_size=4096'], /-n writes into an existing image: -B and -o/],
      [['-O', 'qcow2', '-o', 'cluster_size=3'], /cluster_size/],
      [['-O', 'qcow2', '-o', 'bogus'], /invalid option 'bogus': expected name=value/],
      [['-O', 'qed', '-c'], /-c: writing compressed clusters into qed images is not supported/],
      [['-O', 'qcow2', '-c', '-o', 'compression_type=zstd'], /compression_type=zstd is read here but not written \(only zlib\); .*dest\.qcow2, which it had created, was removed/],
      [['-O', 'qcow2', '-c', '-n'], /-c cannot be used with -n/],
    ];
    for (const [options, message] of cases) {
      const result = await imgmount('convert', ...options, source, dest);
      expect(result.code, options.join(' ')).toBe(1);
      expect(result.stderr, options.join(' ')).toMatch(message);
      expect(result.stderr.trimEnd().split('\n'), options.join(' ')).toHaveLength(1);
      await expect(stat(dest), `${options.join(' ')} left ${dest}`).rejects.toThrow(/ENOENT/);
    }
    const missing = await imgmount('convert', '-O', 'raw', join(dir, 'missing.qcow2'), dest);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/missing\.qcow2/);
    await expect(copyFile(source, source)).resolves.toBeUndefined(); // the source is still there and readable
  });
});
