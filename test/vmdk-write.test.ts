/**
 * Writing monolithicSparse VMDK images, with qemu as the oracle: the order of
 * an allocating write (grain, fdatasync, primary then redundant grain table
 * entry), the new CID qemu-img info then shows, concurrent writes into one
 * unallocated grain, zeroed grains for zero requests, and the forms that stay
 * read-only (each with its notice, the file unchanged). The random-write
 * comparison with qemu-img check / compare is in the conformance suite.
 */
import { createHash } from 'node:crypto';
import { mkdir, readFile, stat, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockImage as BlockImageClass, createImage, defaultFormats, openImage } from '../src/index.js';
import type { BlockImage } from '../src/index.js';
import { ImageFileGate } from '../src/block/gate.js';
import { vmdk } from '../src/formats/vmdk/index.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuInfo, qemuIo, qemuMap, readAll, run, skipWithoutQemu, spyProtocol } from './helpers/qemu.js';

const K = 1024;
const M = 1024 * K;
const GRAIN = 64 * K;
const TIMEOUT = { timeout: 60_000 };

async function sparse(dir: string, name = 'disk.vmdk', size = 4 * M, options: string[] = []): Promise<string> {
  const path = join(dir, name);
  await qemuImg(['create', '-q', '-f', 'vmdk', ...options, path, String(size)]);
  return path;
}

async function withImage<T>(path: string, options: Parameters<typeof openImage>[1], body: (image: BlockImage) => Promise<T>): Promise<T> {
  const image = await openImage(path, options);
  try {
    return await body(image);
  } finally {
    await image.close();
  }
}

const sha = async (path: string) => createHash('sha256').update(await readFile(path)).digest('hex');

describe.skipIf(skipWithoutQemu('vmdk writes'))('vmdk writes', () => {
  it('an allocating write: CID first (once), then the whole grain, fdatasync, the primary grain table sector, the redundant one; in place afterwards', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = await sparse(dir, 'disk.vmdk', 16 * M);
    const file = await readFile(path);
    const gdSector = Number(file.readBigUInt64LE(56));
    const rgdSector = Number(file.readBigUInt64LE(48));
    const primaryGt = file.readUInt32LE(gdSector * 512);
    const redundantGt = file.readUInt32LE(rgdSector * 512);
    const end = file.length; // qemu-img create: grains start at the end
    const protocol = await spyProtocol(path, false);
    const gate = new ImageFileGate(path, {}, true);
    const image = await vmdk.open(protocol, { readOnly: false, files: gate });
    const opened = new BlockImageClass({ path, format: 'vmdk', file: protocol, image, gate });
    try {
      protocol.calls.length = 0;
      await opened.write(3 * GRAIN + 10, Buffer.alloc(100, 0x5a)); // grain 3
      await opened.write(130 * GRAIN, Buffer.alloc(GRAIN, 0x5b)); // grain 130: entry 130 is in the second sector of the table
      await opened.write(3 * GRAIN + 500, Buffer.alloc(10, 0x5c)); // in place
      const changes = protocol.calls.filter((call) => !call.startsWith('read'));
      expect(changes).toEqual([
        'write 512 10240', // the descriptor with its new CID
        'flush',
        `write ${end} ${GRAIN}`,
        'flush',
        `write ${primaryGt * 512} 512`,
        `write ${redundantGt * 512} 512`,
        `write ${end + GRAIN} ${GRAIN}`,
        'flush',
        `write ${primaryGt * 512 + 512} 512`,
        `write ${redundantGt * 512 + 512} 512`,
        `write ${end + 500} 10`,
      ]);
    } finally {
      await opened.close();
    }
    const after = await readFile(path);
    expect(after.readUInt32LE(primaryGt * 512 + 3 * 4)).toBe(end / 512);
    expect(after.readUInt32LE(redundantGt * 512 + 3 * 4)).toBe(end / 512);
    expect(after.readUInt32LE(redundantGt * 512 + 130 * 4)).toBe(end / 512 + 128);
    expect((await run('qemu-img', ['check', '-f', 'vmdk', path])).code).toBe(0);
    const raw = await qemuConvertToRaw(path, dir, 'vmdk');
    expect(raw.subarray(3 * GRAIN + 10, 3 * GRAIN + 110).every((byte) => byte === 0x5a)).toBe(true);
    expect(raw.subarray(3 * GRAIN + 500, 3 * GRAIN + 510).every((byte) => byte === 0x5c)).toBe(true);
    expect(raw[3 * GRAIN + 9]).toBe(0);
    expect(raw.subarray(130 * GRAIN, 131 * GRAIN).every((byte) => byte === 0x5b)).toBe(true);
  });

  it('the first change gives the image a new CID, which qemu-img info shows; a differencing child keeps its parentCID', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = await sparse(dir, 'base.vmdk');
    await qemuImg(['create', '-q', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', join(dir, 'child.vmdk')], { cwd: dir });
    const before = ((await qemuInfo(path, 'vmdk'))['format-specific'] as { data: { cid: number } }).data.cid;
    await withImage(path, {}, async (image) => {
      expect(image.readOnly).toBe(false);
      await image.write(0, Buffer.alloc(512, 1));
      await image.write(GRAIN, Buffer.alloc(512, 2));
    });
    const info = await qemuInfo(path, 'vmdk');
    const after = (info['format-specific'] as { data: { cid: number } }).data.cid;
    expect(after).not.toBe(before);
    await withImage(path, { readOnly: true }, async (image) => expect((await image.info()).formatSpecific).toEqual((info['format-specific'] as { data: unknown }).data));
    const child = (await qemuInfo(join(dir, 'child.vmdk'), 'vmdk'))['format-specific'] as { data: { 'parent-cid': number } };
    expect(child.data['parent-cid']).toBe(before);
  });

  it('concurrent writes into one unallocated grain allocate it once and all land', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = await sparse(dir);
    const size = (await stat(path)).size;
    await withImage(path, {}, async (image) => {
      await Promise.all(Array.from({ length: 16 }, (_, i) => image.write(5 * GRAIN + i * 4000, Buffer.alloc(100, 0x10 + i))));
    });
    expect((await stat(path)).size).toBe(size + GRAIN);
    const raw = await qemuConvertToRaw(path, dir, 'vmdk');
    for (let i = 0; i < 16; i++) expect(raw.subarray(5 * GRAIN + i * 4000, 5 * GRAIN + i * 4000 + 100).every((byte) => byte === 0x10 + i)).toBe(true);
    expect((await run('qemu-img', ['check', '-f', 'vmdk', path])).code).toBe(0);
  });

  it('zero requests on a zeroed_grain image: whole grains become zeroed grains (qemu-img map: zero), partial ones are written as zeros; over a parent they hide it', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const base = await sparse(dir, 'base.vmdk');
    await qemuIo(base, [`write -P 0x77 0 ${M}`], 'vmdk');
    // qemu-img create -b cannot take -o zeroed_grain: a zeroed-grain child is made by setting the flag bit
    const path = join(dir, 'child.vmdk');
    await qemuImg(['create', '-q', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', path], { cwd: dir });
    const header = await readFile(path);
    header.writeUInt32LE(header.readUInt32LE(8) | 4, 8);
    header.writeUInt32LE(2, 4);
    await writeFile(path, header);
    await withImage(path, {}, async (image) => {
      await image.write(2 * GRAIN, Buffer.alloc(GRAIN, 0x33));
      await image.zero(GRAIN, 3 * GRAIN); // grains 1..3 whole: 1 over the parent, 2 over data, 3 over the parent
      await image.zero(6 * GRAIN + 100, 50); // partial: written
    });
    const raw = await qemuConvertToRaw(path, dir, 'vmdk');
    expect(raw.subarray(GRAIN, 4 * GRAIN).every((byte) => byte === 0)).toBe(true);
    expect(raw.subarray(6 * GRAIN + 100, 6 * GRAIN + 150).every((byte) => byte === 0)).toBe(true);
    expect(raw[6 * GRAIN + 99]).toBe(0x77);
    expect(raw[0]).toBe(0x77);
    const map = await qemuMap(path, 'vmdk', { start: GRAIN, length: 3 * GRAIN });
    expect(map).toEqual([{ start: GRAIN, length: 3 * GRAIN, depth: 0, present: true, zero: true, data: false }]);
    await withImage(path, { readOnly: true }, async (image) => expect((await readAll(image)).equals(raw)).toBe(true));
    expect((await run('qemu-img', ['check', '-f', 'vmdk', path])).code).toBe(0);
  });

  describe('forms that stay read-only: the notice says why, writes are refused, the file is unchanged', () => {
    const cases: Array<[string, (dir: string) => Promise<string>, RegExp]> = [
      ['version 3 (changed block tracking; qemu also opens it read-only)', async (dir) => {
        const path = await sparse(dir);
        const bytes = await readFile(path);
        bytes.writeUInt32LE(3, 4);
        await writeFile(path, bytes);
        return path;
      }, /VMDK version 3 image/],
      ['a grain directory entry 0 (no grain table to write into)', async (dir) => {
        const path = await sparse(dir);
        const bytes = await readFile(path);
        bytes.writeUInt32LE(0, Number(bytes.readBigUInt64LE(56)) * 512);
        await writeFile(path, bytes);
        return path;
      }, /a grain table is not allocated/],
      ['a redundant grain directory entry 0', async (dir) => {
        const path = await sparse(dir);
        const bytes = await readFile(path);
        bytes.writeUInt32LE(0, Number(bytes.readBigUInt64LE(48)) * 512);
        await writeFile(path, bytes);
        return path;
      }, /redundant grain directory entry 0 .* names no grain table/],
      ['a grain table inside the descriptor area (writing its entries would overwrite the descriptor)', async (dir) => {
        const path = await sparse(dir);
        const bytes = await readFile(path);
        bytes.writeUInt32LE(2, Number(bytes.readBigUInt64LE(56)) * 512);
        await writeFile(path, bytes);
        return path;
      }, /grain table 0 \(sector 2\) does not lie between the header and grain_offset 128, clear of the descriptor/],
      ['twoGbMaxExtentSparse whose second extent has an unallocated grain table', async (dir) => {
        const path = await sparse(dir, 'split.vmdk', 2 * 1024 * M + 4 * M, ['-o', 'subformat=twoGbMaxExtentSparse']);
        const extent = join(dir, 'split-s002.vmdk');
        const bytes = await readFile(extent);
        bytes.writeUInt32LE(0, Number(bytes.readBigUInt64LE(56)) * 512);
        await writeFile(extent, bytes);
        return path;
      }, /a grain table is not allocated/],
      ['a descriptor whose flat extent is the descriptor file itself (guest writes would overwrite the descriptor)', async (dir) => {
        const path = join(dir, 'self.vmdk');
        const text = '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\nRW 8 FLAT "self.vmdk" 0\n';
        await writeFile(path, text.padEnd(4096, '#'));
        return path;
      }, /the extent self\.vmdk is the descriptor file itself \(writes would overwrite the descriptor\)/],
      ['twoGbMaxExtentSparse whose second extent line names the first file through a symbolic link (allocations in one would overwrite the other\'s grains)', async (dir) => {
        const path = await sparse(dir, 'twice.vmdk', 4 * M, ['-o', 'subformat=twoGbMaxExtentSparse']);
        await symlink('twice-s001.vmdk', join(dir, 'again.vmdk'));
        const text = (await readFile(path, 'utf8')).replace(/^(RW \d+ SPARSE "twice-s001.vmdk")$/m, '$1\nRW 8192 SPARSE "again.vmdk"');
        await writeFile(path, text);
        return path;
      }, /the extent file again\.vmdk is named by more than one extent line \(writes through one would overwrite the other\)/],
    ];
    for (const [what, make, notice] of cases) {
      it(what, TIMEOUT, async () => {
        const dir = await makeTempDir();
        const path = await make(dir);
        const before = await sha(path);
        const notices: string[] = [];
        await withImage(path, { notice: (line) => notices.push(line) }, async (image) => {
          expect(image.readOnly).toBe(true);
          expect(notices.join('\n')).toMatch(new RegExp(`${path.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: opened read-only: .*`));
          expect(notices.join('\n')).toMatch(notice);
          await expect(image.write(0, Buffer.alloc(512, 1))).rejects.toMatchObject({ name: 'ReadOnlyError' });
        });
        expect(await sha(path)).toBe(before);
      });
    }
  });

  it('a grain table entry past the end of the file is not written through (the file would grow under later grains)', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = await sparse(dir);
    const bytes = await readFile(path);
    const gt = bytes.readUInt32LE(Number(bytes.readBigUInt64LE(56)) * 512) * 512;
    bytes.writeUInt32LE(100000, gt + 4); // grain 1, far past the end
    await writeFile(path, bytes);
    await withImage(path, {}, async (image) => {
      await expect(image.write(GRAIN, Buffer.alloc(512, 0xff))).rejects.toThrow(`${path}: VMDK grain at extent offset ${GRAIN} is at sector 100000, past the end of the file (${bytes.length} bytes); not written`);
    });
    expect((await stat(path)).size).toBe(bytes.length);
  });

  it('a grain table entry pointing into the metadata is not written through (the header and tables stay intact)', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = await sparse(dir);
    const bytes = await readFile(path);
    const gt = bytes.readUInt32LE(Number(bytes.readBigUInt64LE(56)) * 512) * 512;
    bytes.writeUInt32LE(1, gt); // grain 0 at sector 1: the descriptor (no zeroed grains in this image)
    await writeFile(path, bytes);
    await withImage(path, {}, async (image) => {
      await expect(image.write(0, Buffer.alloc(512, 0xff))).rejects.toThrow(`${path}: VMDK grain at extent offset 0 is at sector 1, inside the metadata (grains start at 128); not written`);
    });
    const after = await readFile(path);
    expect(after.subarray(0, 512).equals(bytes.subarray(0, 512))).toBe(true);
    expect(after.subarray(21 * 512, gt + 2048).equals(bytes.subarray(21 * 512, gt + 2048))).toBe(true);
  });

  describe('create, as qemu-img create -f vmdk', () => {
    /** The file with its descriptor's CID value blanked (it is random on both sides, of 1 to 8 digits) and the area's NUL padding dropped. */
    const masked = (bytes: Buffer): Buffer => {
      const text = bytes.subarray(512, 512 + 10240).toString('latin1').replace(/CID=[0-9a-f]+\n/, 'CID=\n').replace(/\0+$/, '');
      return Buffer.concat([bytes.subarray(0, 512), Buffer.from(text, 'latin1'), bytes.subarray(512 + 10240)]);
    };
    const cases: Array<[string, number]> = [
      ['', 4 * M],
      ['zeroed_grain=on', 3147264],
      ['adapter_type=lsilogic,hwversion=6', 5_000_000_000],
      ['compat6=on,adapter_type=buslogic', 40 * M + 512],
      ['toolsversion=10240,subformat=monolithicSparse,zeroed_grain=off', 1000],
    ];
    for (const [options, size] of cases) {
      it(`-o ${options || '(defaults)'}, ${size} bytes: the same bytes as qemu-img's but the random CID; check clean; written here, qemu reads it`, TIMEOUT, async () => {
        const dir = await makeTempDir();
        const ours = join(dir, 'same.vmdk');
        const theirs = join(dir, 'qemu', 'same.vmdk');
        await mkdir(join(dir, 'qemu'));
        const parsed = options ? Object.fromEntries(options.split(',').map((pair) => pair.split('=') as [string, string])) : undefined;
        await createImage(ours, 'vmdk', { formats: defaultFormats, size, options: parsed });
        await qemuImg(['create', '-q', '-f', 'vmdk', ...(options ? ['-o', options] : []), theirs, String(size)]);
        expect(masked(await readFile(ours)).equals(masked(await readFile(theirs)))).toBe(true);
        expect((await run('qemu-img', ['check', '-f', 'vmdk', ours])).code).toBe(0);
        const data = Buffer.alloc(Math.min(size, 3 * GRAIN + 1000), 0x6d);
        await withImage(ours, {}, async (image) => {
          await image.write(0, data);
          await image.write(Math.ceil(size / 512) * 512 - 100, Buffer.alloc(100, 0x6e));
        });
        await qemuIo(ours, ['read -P 0x6d 0 100', `read -P 0x6e ${Math.ceil(size / 512) * 512 - 100} 100`], 'vmdk');
        expect((await run('qemu-img', ['check', '-f', 'vmdk', ours])).code).toBe(0);
      });
    }

    it('-b base.vmdk: parentCID is the parent\'s CID, parentFileNameHint its name; qemu reads the child through the parent', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const base = await sparse(dir, 'base.vmdk', 2 * M);
      await qemuIo(base, ['write -P 0x21 0 1M'], 'vmdk');
      const child = join(dir, 'child.vmdk');
      await createImage(child, 'vmdk', { formats: defaultFormats, backingFile: 'base.vmdk' });
      const info = await qemuInfo(child, 'vmdk');
      const baseCid = ((await qemuInfo(base, 'vmdk'))['format-specific'] as { data: { cid: number } }).data.cid;
      expect(info).toMatchObject({ 'virtual-size': 2 * M, 'backing-filename': 'base.vmdk', 'backing-filename-format': 'vmdk', 'format-specific': { data: { 'parent-cid': baseCid } } });
      await withImage(child, {}, async (image) => image.write(100, Buffer.alloc(10, 0x22)));
      await qemuIo(child, ['read -P 0x21 0 100', 'read -P 0x22 100 10', 'read -P 0x21 110 65426'], 'vmdk');
    });

    it('options qemu refuses, or that are not supported, are refused by name and nothing is written', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const path = join(dir, 'x.vmdk');
      const create = (options: Record<string, string>, more: { backingFile?: string; backingFormat?: string } = {}) => createImage(path, 'vmdk', { formats: defaultFormats, size: M, options, ...more });
      await expect(create({ subformat: 'sparse' })).rejects.toThrow(/unknown VMDK subformat sparse/);
      await expect(create({ adapter_type: 'scsi' })).rejects.toThrow(/unknown VMDK adapter_type scsi/);
      await expect(create({ compat6: 'on', hwversion: '7' })).rejects.toThrow('VMDK compat6 cannot be enabled with hwversion set');
      await expect(create({ cluster_size: '4096' })).rejects.toThrow(/unknown vmdk option cluster_size/);
      await expect(create({ zeroed_grain: 'maybe' })).rejects.toThrow('VMDK option zeroed_grain=maybe: use on or off');
      await writeFile(join(dir, 'base.raw'), Buffer.alloc(M));
      await expect(create({}, { backingFile: 'base.raw', backingFormat: 'raw' })).rejects.toThrow('the backing file of a VMDK image must be a vmdk image, not raw');
      await expect(stat(path)).rejects.toMatchObject({ code: 'ENOENT' });
    });
  });
});
