/**
 * VMDK beyond the conformance matrix, with qemu-img / qemu-io as the oracle:
 *
 * - multi-extent images (twoGbMaxExtentSparse / Flat, 2 GiB extents): reads
 *   across the extent boundary like qemu-img dd, map like qemu-img map, info
 *   (extents, actual-size over every file) like qemu-img info;
 * - the file gate for extents (CVE-2022-47951): a name that leaves the image's
 *   directory (.., absolute, a symbolic link out) or names a device is refused
 *   with one line naming it, and opens with --allow-files;
 * - a stream-optimized file whose grain directory is named in the footer;
 * - damaged headers, tables and descriptors: one case per checked field,
 *   each refused with its message (and, where qemu refuses it too, qemu agrees);
 * - check like qemu-img check; the CLI's info --output=json keys.
 */
import { mkdir, readFile, rm, symlink, writeFile, rename, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage, checkImage, defaultFormats } from '../src/index.js';
import type { BlockImage } from '../src/index.js';
import { mapForComparison } from './helpers/formats.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuInfo, qemuIo, qemuMap, readAll, run, skipWithoutQemu } from './helpers/qemu.js';
import { imgmount } from './fuse/fuse-helpers.js';
import { refusal } from './helpers/refusal.js';

const K = 1024;
const M = 1024 * K;
const G = 1024 * M;
const TIMEOUT = { timeout: 120_000 };

async function withImage<T>(path: string, options: Parameters<typeof openImage>[1], body: (image: BlockImage) => Promise<T>): Promise<T> {
  const image = await openImage(path, options);
  try {
    return await body(image);
  } finally {
    await image.close();
  }
}

/** qemu's bytes of [offset, offset + length): qemu-img convert of a raw node with offset and size over the vmdk node. */
async function qemuSlice(path: string, dir: string, offset: number, length: number): Promise<Buffer> {
  const out = join(dir, `slice-${offset}.raw`);
  const node = { driver: 'raw', offset, size: length, file: { driver: 'vmdk', file: { driver: 'file', filename: path } } };
  await qemuImg(['convert', '-O', 'raw', `json:${JSON.stringify(node)}`, out]);
  try {
    return await readFile(out);
  } finally {
    await rm(out, { force: true });
  }
}

async function read(image: BlockImage, offset: number, length: number): Promise<Buffer> {
  const buffer = Buffer.alloc(length, 0xee);
  await image.read(offset, buffer);
  return buffer;
}

async function patch(path: string, offset: number, bytes: Buffer): Promise<void> {
  const content = await readFile(path);
  bytes.copy(content, offset);
  await writeFile(path, content);
}

const u32 = (value: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(value);
  return b;
};
const u64 = (value: bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(value);
  return b;
};

/** What qemu-img info says, in the shape our info() is compared in. */
async function expectInfoLikeQemu(path: string): Promise<void> {
  const theirs = await qemuInfo(path, 'vmdk');
  await withImage(path, { readOnly: true }, async (image) => {
    const ours = await image.info();
    expect({ 'virtual-size': ours.virtualSize, 'actual-size': ours.actualSize, 'cluster-size': ours.clusterSize, 'format-specific': { type: 'vmdk', data: ours.formatSpecific } }).toEqual({
      'virtual-size': theirs['virtual-size'],
      'actual-size': theirs['actual-size'],
      'cluster-size': theirs['cluster-size'],
      'format-specific': theirs['format-specific'],
    });
  });
}

describe.skipIf(skipWithoutQemu('vmdk'))('vmdk', () => {
  describe('multi-extent images: 2 GiB extents, reads across the boundary', () => {
    for (const subformat of ['twoGbMaxExtentSparse', 'twoGbMaxExtentFlat']) {
      it(`${subformat}: reads like qemu around and across the extent boundary, maps and infos like qemu`, TIMEOUT, async () => {
        const dir = await makeTempDir();
        const path = join(dir, 'split.vmdk');
        const size = 2 * G + 3 * M;
        await qemuImg(['create', '-q', '-f', 'vmdk', '-o', `subformat=${subformat}`, path, String(size)]);
        await qemuIo(path, ['write -P 0x61 0 70000', `write -P 0x62 ${2 * G - 3000} 9000`, `write -P 0x63 ${2 * G + 20000} 1`, `write -P 0x64 ${size - 700} 700`, `write -z ${2 * G + M} 65536`], 'vmdk');
        await withImage(path, { readOnly: true }, async (image) => {
          expect(image.length).toBe(size);
          for (const [offset, length] of [[0, M], [2 * G - M, 2 * M], [size - M, M]] as const) {
            const expected = await qemuSlice(path, dir, offset, length);
            expect((await read(image, offset, length)).equals(expected), `bytes at ${offset}`).toBe(true);
          }
          // one request across the boundary, unaligned
          const across = await read(image, 2 * G - 3001, 9002);
          expect(across[0]).toBe(0);
          expect(across.subarray(1, 9001).every((byte) => byte === 0x62)).toBe(true);
          expect(across[9001]).toBe(0);
          expect(mapForComparison(await image.map(), ['vmdk'])).toEqual(mapForComparison(await qemuMap(path, 'vmdk'), ['vmdk']));
          const part = await qemuMap(path, 'vmdk', { start: 2 * G - 5000, length: 20000 });
          expect(mapForComparison(await image.map(2 * G - 5000, 20000), ['vmdk'])).toEqual(mapForComparison(part, ['vmdk']));
        });
        await expectInfoLikeQemu(path);
      });
    }
  });

  describe('the file gate for extents (CVE-2022-47951)', () => {
    /** A monolithicFlat image in dir/images whose descriptor is rewritten to name its extent `name`; the extent is moved to `extentPath`. */
    async function flatImage(dir: string, name: string, extentPath: string): Promise<{ image: string; expected: Buffer }> {
      await mkdir(join(dir, 'images'), { recursive: true });
      await mkdir(join(dir, 'outside'), { recursive: true });
      const image = join(dir, 'images', 'disk.vmdk');
      await qemuImg(['create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', image, '1M']);
      await qemuIo(image, ['write -P 0x7a 1000 5000'], 'vmdk');
      const expected = await qemuConvertToRaw(image, dir, 'vmdk');
      const text = (await readFile(image, 'latin1')).replace('"disk-flat.vmdk"', `"${name}"`);
      await writeFile(image, text, 'latin1');
      if (extentPath !== join(dir, 'images', 'disk-flat.vmdk')) await rename(join(dir, 'images', 'disk-flat.vmdk'), extentPath);
      return { image, expected };
    }

    it('a relative name inside the image directory opens (the default qemu-img makes)', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const { image, expected } = await flatImage(dir, 'disk-flat.vmdk', join(dir, 'images', 'disk-flat.vmdk'));
      await withImage(image, { readOnly: true }, async (opened) => expect((await readAll(opened)).equals(expected)).toBe(true));
    });

    it('a name escaping with .. is refused with one line naming it; qemu reads it (the CVE); --allow-files opens it', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const { image, expected } = await flatImage(dir, '../outside/disk-flat.vmdk', join(dir, 'outside', 'disk-flat.vmdk'));
      expect((await qemuConvertToRaw(image, dir, 'vmdk')).equals(expected)).toBe(true);
      const error = await refusal(openImage(image, { readOnly: true }));
      expect(error.message).toBe(
        `${image}: VMDK extent ../outside/disk-flat.vmdk resolves to ${join(dir, 'outside', 'disk-flat.vmdk')}, outside the image's directory ${join(dir, 'images')}; allow it with --allow-files`,
      );
      await withImage(image, { readOnly: true, allowFiles: [join(dir, 'outside')] }, async (opened) => expect((await readAll(opened)).equals(expected)).toBe(true));
      // the CLI: one line on stderr, a non-zero exit; with --allow-files it works
      const cli = await imgmount(['info', image]);
      expect(cli.code).not.toBe(0);
      expect(cli.stderr.trim().split('\n')).toHaveLength(1);
      expect(cli.stderr).toContain('../outside/disk-flat.vmdk');
      expect((await imgmount(['info', '--allow-files', join(dir, 'outside'), image])).code).toBe(0);
    });

    it('an absolute name is refused, even inside the image directory, unless allowed', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const extent = join(dir, 'images', 'disk-flat.vmdk');
      const { image, expected } = await flatImage(dir, extent, extent);
      const error = await refusal(openImage(image, { readOnly: true }));
      expect(error.message).toBe(`${image}: VMDK extent ${extent} is an absolute path; only names inside the image's directory open unless allowed with --allow-files`);
      await withImage(image, { readOnly: true, allowFiles: [join(dir, 'images')] }, async (opened) => expect((await readAll(opened)).equals(expected)).toBe(true));
    });

    it('a symbolic link inside the directory that points out of it is refused', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const { image } = await flatImage(dir, 'link-flat.vmdk', join(dir, 'outside', 'disk-flat.vmdk'));
      await symlink(join(dir, 'outside', 'disk-flat.vmdk'), join(dir, 'images', 'link-flat.vmdk'));
      expect((await refusal(openImage(image, { readOnly: true }))).message).toContain(`VMDK extent link-flat.vmdk resolves to ${join(dir, 'outside', 'disk-flat.vmdk')}, outside the image's directory`);
    });

    it('a device is refused: by name (absolute), through a link, and by the file protocol even where allowed', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const { image } = await flatImage(dir, '/dev/zero', join(dir, 'outside', 'disk-flat.vmdk'));
      expect((await refusal(openImage(image, { readOnly: true }))).message).toContain('VMDK extent /dev/zero is an absolute path');
      const allowed = await refusal(openImage(image, { readOnly: true, allowFiles: ['/dev'] }));
      expect(allowed.message).toMatch(/\/dev\/zero.*character device|character device.*\/dev\/zero/);
      await writeFile(image, (await readFile(image, 'latin1')).replace('"/dev/zero"', '"zero-flat.vmdk"'), 'latin1');
      await symlink('/dev/zero', join(dir, 'images', 'zero-flat.vmdk'));
      expect((await refusal(openImage(image, { readOnly: true }))).message).toContain('VMDK extent zero-flat.vmdk resolves to /dev/zero, outside the image');
    });
  });

  it('streamOptimized with its grain directory named in the footer (gd_offset = GD_AT_END): reads like qemu', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const source = join(dir, 'source.raw');
    const content = Buffer.alloc(2 * M + 1536);
    for (let i = 0; i < content.length; i += 7) content[i] = (i * 31) & 0xff;
    content.fill(0, M, M + 3 * 64 * K);
    await writeFile(source, content);
    const path = join(dir, 'stream.vmdk');
    await qemuImg(['convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', source, path]);
    const original = await readFile(path);
    const header = Buffer.from(original.subarray(0, 512));
    const footer = Buffer.alloc(1536);
    footer.writeBigUInt64LE(1n, 0); // footer marker: one sector of metadata, size 0, type 3 (footer)
    footer.writeUInt32LE(3, 12);
    header.copy(footer, 512); // the header copy keeps the real gd_offset
    await writeFile(path, Buffer.concat([original, footer])); // then the end-of-stream marker: zeros
    await patch(path, 56, u64(0xffffffffffffffffn));
    const expected = await qemuConvertToRaw(path, dir, 'vmdk');
    expect(expected.subarray(0, content.length).equals(content)).toBe(true);
    await withImage(path, { readOnly: true }, async (image) => expect((await readAll(image, 4097)).equals(expected)).toBe(true));
    // a footer without its end-of-stream marker is refused, as qemu refuses it
    await patch(path, original.length + 1536 - 512 + 12, u32(9));
    expect((await refusal(openImage(path, { readOnly: true }))).message).toContain('are not a footer marker');
    expect((await run('qemu-img', ['info', '-f', 'vmdk', path])).code).not.toBe(0);
  });

  describe('damaged headers: each checked field refused by name', () => {
    async function sparse(dir: string): Promise<string> {
      const path = join(dir, 'disk.vmdk');
      await qemuImg(['create', '-q', '-f', 'vmdk', path, '4M']);
      await qemuIo(path, ['write -P 0x11 0 200000'], 'vmdk');
      return path;
    }
    // [what, offset, bytes, message, qemu refuses it too]
    const cases: Array<[string, number, Buffer, RegExp, boolean]> = [
      ['version 4', 4, u32(4), /: VMDK version 4 is not supported \(versions 1 to 3 are\)$/, true],
      ['num_gtes_per_gt 0', 44, u32(0), /: VMDK num_gtes_per_gt 0 is out of range \(1 to 512\)$/, true],
      ['num_gtes_per_gt 513', 44, u32(513), /: VMDK num_gtes_per_gt 513 is out of range \(1 to 512\)$/, true],
      ['granularity 0', 20, u64(0n), /: VMDK granularity 0 sectors is out of range \(1 to 2097152\)$/, true],
      ['granularity 0x200001', 20, u64(0x200001n), /: VMDK granularity 2097153 sectors is out of range/, true],
      ['capacity 2^62 sectors', 12, u64(1n << 62n), /: VMDK capacity 4611686018427387904 is too large \(at most 17592186044415 sectors\)$/, false],
      ['capacity 2^43 sectors (2^27 grain directory entries)', 12, u64(1n << 43n), /: VMDK capacity 8796093022208 sectors needs 134217728 grain directory entries, more than 33554432$/, true],
      ['gd_offset past the end', 56, u64(1000000n), /: VMDK gd_offset 1000000 sectors: its 1-entry grain directory does not lie inside the file/, false],
      ['rgd_offset past the end', 48, u64(1000000n), /: VMDK rgd_offset 1000000 sectors: its 1-entry grain directory does not lie inside the file/, false],
      ['grain_offset past the end', 64, u64(1000000n), /: VMDK grain_offset 1000000 sectors lies past the end of the file .*: the file is truncated$/, true],
      ['compressAlgorithm 2', 77, Buffer.from([2, 0]), /: VMDK compressAlgorithm 2 is unknown \(0 none, 1 deflate\)$/, false],
      ['gd_offset GD_AT_END without a footer', 56, u64(0xffffffffffffffffn), /: VMDK gd_offset says the grain directory is in a footer, but the last 1536 bytes are not/, true],
    ];
    for (const [what, offset, bytes, message, qemuRefuses] of cases) {
      it(`${what}${qemuRefuses ? ' (qemu refuses it too)' : ''}`, TIMEOUT, async () => {
        const dir = await makeTempDir();
        const path = await sparse(dir);
        await patch(path, offset, bytes);
        const error = await refusal(openImage(path, { readOnly: true }));
        expect(error.message).toMatch(message);
        expect(error.message.startsWith(`${path}: `)).toBe(true);
        if (qemuRefuses) expect((await run('qemu-img', ['info', '-f', 'vmdk', path])).code).not.toBe(0);
      });
    }

    it('a grain directory entry outside the file: reads of its range fail naming it (qemu would read zeros)', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const path = await sparse(dir);
      const gd = Number((await readFile(path)).readBigUInt64LE(56)) * 512;
      await patch(path, gd, u32(0x7fffffff));
      await withImage(path, { readOnly: true }, async (image) => {
        expect((await refusal(image.read(0, Buffer.alloc(512)))).message).toBe(
          `${path}: VMDK grain directory entry 0 (sector 2147483647) points to a grain table outside the file (${(await stat(path)).size} bytes)`,
        );
      });
      const ours = await checkImage(path, { formats: defaultFormats });
      expect(ours.corruptions).toBe(1);
    });

    it('a grain table entry past the end of the file: that grain fails naming it, others read; check reports it like qemu-img check', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const path = await sparse(dir);
      const expected = await qemuConvertToRaw(path, dir, 'vmdk');
      const file = await readFile(path);
      const gt = file.readUInt32LE(Number(file.readBigUInt64LE(56)) * 512) * 512;
      await patch(path, gt + 4, u32(0x10000000)); // grain 1
      await withImage(path, { readOnly: true }, async (image) => {
        expect((await refusal(image.read(65536, Buffer.alloc(100)))).message).toBe(
          `${path}: VMDK grain table 0 maps the grain at extent offset 65536 to sector 268435456, past the end of the file (${file.length} bytes)`,
        );
        expect((await read(image, 0, 65536)).equals(expected.subarray(0, 65536))).toBe(true);
        expect((await read(image, 131072, 65536)).equals(expected.subarray(131072, 196608))).toBe(true);
      });
      const theirs = await run('qemu-img', ['check', '-f', 'vmdk', path]);
      expect(theirs.code, theirs.stdout + theirs.stderr).not.toBe(0);
      expect(theirs.stderr + theirs.stdout).toContain('points after EOF');
      const ours = await checkImage(path, { formats: defaultFormats });
      expect(ours.corruptions).toBe(1);
      expect(ours.messages).toEqual([`grain 1 (guest offset 65536): sector 268435456 points after the end of the file (${file.length} bytes)`]);
    });

    it('check of a descriptor file checks its sparse extents: a grain past the end of s002 is found, as qemu-img check finds it', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const path = join(dir, 'split.vmdk');
      await qemuImg(['create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', path, String(2 * G + M)]);
      await qemuIo(path, ['write -P 0x41 0 1000', `write -P 0x42 ${2 * G} 1000`], 'vmdk');
      expect((await run('qemu-img', ['check', '-f', 'vmdk', path])).code).toBe(0);
      expect(await checkImage(path, { formats: defaultFormats })).toMatchObject({ corruptions: 0, messages: [] });
      const extent = join(dir, 'split-s002.vmdk');
      const file = await readFile(extent);
      const gt = file.readUInt32LE(Number(file.readBigUInt64LE(56)) * 512) * 512;
      expect(file.readUInt32LE(gt)).not.toBe(0);
      await patch(extent, gt, u32(0x01000000));
      const theirs = await run('qemu-img', ['check', '-f', 'vmdk', path]);
      expect(theirs.code).not.toBe(0);
      expect(theirs.stdout + theirs.stderr).toContain('points after EOF');
      const ours = await checkImage(path, { formats: defaultFormats });
      expect(ours.messages).toEqual([`${extent}: grain 0 (guest offset 0): sector 16777216 points after the end of the file (${file.length} bytes)`]);
      expect(ours.corruptions).toBe(1);
    });

    it('a grain table entry into the metadata (sector 1, the descriptor): reads of that grain fail naming it (qemu would show the descriptor), check counts it', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const path = await sparse(dir);
      const file = await readFile(path);
      const gt = file.readUInt32LE(Number(file.readBigUInt64LE(56)) * 512) * 512;
      await patch(path, gt + 8, u32(1)); // grain 2; this image has no zeroed grains, so 1 is sector 1
      await withImage(path, { readOnly: true }, async (image) => {
        expect((await refusal(image.read(2 * 65536 + 5, Buffer.alloc(10)))).message).toBe(
          `${path}: VMDK grain table 0 maps the grain at extent offset 131072 to sector 1, inside the metadata (grains start at sector 128)`,
        );
      });
      const ours = await checkImage(path, { formats: defaultFormats });
      expect(ours.messages).toEqual(['grain 2 (guest offset 131072): sector 1 is inside the metadata (grains start at sector 128)']);
    });

    it('qemu-made images check clean, as qemu-img check says', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const path = await sparse(dir);
      expect((await run('qemu-img', ['check', '-f', 'vmdk', path])).code).toBe(0);
      expect(await checkImage(path, { formats: defaultFormats })).toMatchObject({ corruptions: 0, leaks: 0, messages: [] });
    });

    it('a compressed grain whose marker size is 0 or whose data does not inflate fails that read, as in qemu', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const source = join(dir, 'source.raw');
      await writeFile(source, Buffer.alloc(M, 'compressible text '));
      const path = join(dir, 'stream.vmdk');
      await qemuImg(['convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', source, path]);
      const file = await readFile(path);
      const gt = file.readUInt32LE(Number(file.readBigUInt64LE(56)) * 512) * 512;
      const grain0 = file.readUInt32LE(gt) * 512;
      const grain1 = file.readUInt32LE(gt + 4) * 512;
      await patch(path, grain0 + 8, u32(0)); // marker size 0
      await patch(path, grain1 + 12, Buffer.alloc(8, 0xff)); // the zlib header and first bytes
      await withImage(path, { readOnly: true }, async (image) => {
        expect((await refusal(image.read(0, Buffer.alloc(10)))).message).toContain(`VMDK compressed grain at sector ${grain0 / 512} (guest offset 0): its marker gives 0 bytes of compressed data`);
        expect((await refusal(image.read(65536, Buffer.alloc(10)))).message).toMatch(new RegExp(`VMDK compressed grain at sector ${grain1 / 512} \\(guest offset 65536\\) does not decode`));
        expect((await read(image, 131072, 65536)).equals(Buffer.alloc(M, 'compressible text ').subarray(131072, 196608))).toBe(true);
      });
      expect((await run('qemu-img', ['convert', '-f', 'vmdk', '-O', 'raw', path, join(dir, 'out.raw')])).code).not.toBe(0);
    });
  });

  describe('damaged descriptors', () => {
    async function flat(dir: string, edit: (text: string) => string): Promise<string> {
      const path = join(dir, 'disk.vmdk');
      await qemuImg(['create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', path, '1M']);
      await writeFile(path, edit(await readFile(path, 'latin1')), 'latin1');
      return path;
    }
    const cases: Array<[string, (text: string) => string, RegExp, boolean]> = [
      ['a FLAT extent line without an offset', (t) => t.replace('"disk-flat.vmdk" 0', '"disk-flat.vmdk"'), /: invalid VMDK extent line: RW 2048 FLAT "disk-flat.vmdk"$/, true],
      ['a SPARSE extent line with an offset', (t) => t.replace('FLAT "disk-flat.vmdk" 0', 'SPARSE "disk-flat.vmdk" 0'), /: invalid VMDK extent line: RW 2048 SPARSE "disk-flat.vmdk" 0$/, true],
      ['createType monolithicSparse in a descriptor file', (t) => t.replace('"monolithicFlat"', '"monolithicSparse"'), /: VMDK descriptor createType "monolithicSparse" cannot be a descriptor file/, true],
      ['no createType', (t) => t.replace('createType=', 'kind='), /: invalid VMDK descriptor: it has no createType$/, true],
      ['no CID', (t) => t.replace(/CID=/g, 'XYZ='), /: the VMDK descriptor has no CID line$/, true],
      ['a parentFileNameHint without its closing quote', (t) => `${t}parentFileNameHint="base.vmdk\n`, /: the VMDK descriptor's parentFileNameHint has no closing quote$/, true],
      ['an SESPARSE extent that is a flat file', (t) => t.replace('FLAT "disk-flat.vmdk" 0', 'SESPARSE "disk-flat.vmdk"'), /disk-flat.vmdk: VMDK seSparse const header: magic 0x0 is not 0xcafebabe$/, true],
      ['a SPARSE extent that is a flat file', (t) => t.replace('FLAT "disk-flat.vmdk" 0', 'SPARSE "disk-flat.vmdk"'), /disk-flat.vmdk: VMDK SPARSE extent of .* starts with neither "KDMV" nor "COWD"$/, true],
    ];
    for (const [what, edit, message, qemuRefuses] of cases) {
      it(`${what}${qemuRefuses ? ' (qemu refuses it too)' : ''}`, TIMEOUT, async () => {
        const dir = await makeTempDir();
        const path = await flat(dir, edit);
        expect((await refusal(openImage(path, { readOnly: true }))).message).toMatch(message);
        if (qemuRefuses) expect((await run('qemu-img', ['info', '-f', 'vmdk', path])).code).not.toBe(0);
      });
    }

    it('RDONLY and NOACCESS extents are skipped, as qemu skips them (the size shrinks to the RW extents)', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const path = await flat(dir, (t) => t.replace('RW 2048 FLAT "disk-flat.vmdk" 0', 'RW 1024 FLAT "disk-flat.vmdk" 0\nRDONLY 1024 FLAT "disk-flat.vmdk" 1024\nRW 512 VMFS "disk-flat.vmdk"'));
      await qemuIo(join(dir, 'disk-flat.vmdk'), ['write -P 0x42 0 1M'], 'raw');
      expect((await qemuInfo(path, 'vmdk'))['virtual-size']).toBe(1536 * 512);
      const expected = await qemuConvertToRaw(path, dir, 'vmdk');
      await withImage(path, { readOnly: true }, async (image) => expect((await readAll(image)).equals(expected)).toBe(true));
      await expectInfoLikeQemu(path);
    });
  });

  it('a differencing image whose parent was written since (a new CID): info works, reads and writes are refused, as qemu refuses reads', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const base = join(dir, 'base.vmdk');
    const top = join(dir, 'top.vmdk');
    await qemuImg(['create', '-q', '-f', 'vmdk', base, '4M']);
    await qemuIo(base, ['write -P 0x11 0 64k'], 'vmdk');
    await qemuImg(['create', '-q', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', top], { cwd: dir });
    await qemuIo(top, ['write -P 0x22 1M 64k'], 'vmdk');
    // Made over this parent: reads like qemu.
    const expected = await qemuConvertToRaw(top, dir, 'vmdk');
    await withImage(top, { readOnly: true }, async (image) => expect((await readAll(image)).equals(expected)).toBe(true));

    await qemuIo(base, ['write -P 0x33 2M 64k'], 'vmdk'); // qemu gives the parent a new CID
    expect((await qemuImg(['convert', '-f', 'vmdk', '-O', 'raw', top, join(dir, 'after.raw')]).catch((error: Error) => error)) instanceof Error, 'qemu-img refuses to read it too').toBe(true);
    const before = await readFile(top);
    const image = await openImage(top);
    try {
      expect((await image.info()).backingFilename).toBe('base.vmdk');
      const read = await refusal(image.read(0, Buffer.alloc(4096)));
      expect(read.message).toMatch(/its parent .*base\.vmdk is not the image it was made over, or was written since: parentCID is [0-9a-f]+, its CID is [0-9a-f]+/);
      await refusal(image.write(0, Buffer.alloc(512, 0x44)));
    } finally {
      await image.close();
    }
    expect((await readFile(top)).equals(before), 'nothing written into the image').toBe(true);
  });

  it('the CLI: info --output=json has qemu-img info\'s keys and values for a differencing sparse image', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const base = join(dir, 'base.vmdk');
    const top = join(dir, 'top.vmdk');
    await qemuImg(['create', '-q', '-f', 'vmdk', '-o', 'zeroed_grain=on', base, '2M']);
    await qemuImg(['create', '-q', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', top], { cwd: dir });
    const ours = JSON.parse((await imgmount(['info', '--output=json', top])).stdout) as Record<string, unknown>;
    const theirs = await qemuInfo(top, 'vmdk');
    for (const key of ['virtual-size', 'format', 'cluster-size', 'backing-filename', 'backing-filename-format', 'full-backing-filename', 'format-specific', 'dirty-flag']) {
      expect(ours[key], key).toEqual(theirs[key]);
    }
  });
});
