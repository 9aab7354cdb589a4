/**
 * VMDK images made of a descriptor file and extent files (monolithicFlat,
 * twoGbMaxExtentFlat, twoGbMaxExtentSparse), created and written, with qemu as
 * the oracle: `imgmount create` makes the files qemu-img create makes (names,
 * 2 GiB split, bytes but the CID, qemu-img info), seeded random writes and zero
 * requests across extent boundaries of 5 GiB images (sparse host files: no
 * disk cost) leave qemu-img check clean and qemu-img compare equal to a raw
 * model written alongside, convert writes them, and the refusals are one line.
 * Also: which files an allocating write and a flush touch, in which order; a
 * twoGbMaxExtentSparse child over a parent (partial grains at the boundary);
 * an ESX vmfs descriptor (VMFS flat extent) written in place.
 */
import { mkdir, open as openFile, readFile, readdir, stat, truncate, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { convertImage, createImage, defaultFormats, openImage } from '../src/index.js';
import { ImageFileGate } from '../src/block/gate.js';
import { vmdk } from '../src/formats/vmdk/index.js';
import { makeTempDir, qemuCheck, qemuCompare, qemuImg, qemuInfo, run, skipWithoutQemu, spyProtocol } from './helpers/qemu.js';
import { seededRandom } from './helpers/random.js';

const K = 1024;
const M = 1024 * K;
const G = 1024 * M;
const TIMEOUT = { timeout: 120_000 };
const SPLIT_FORMS = ['monolithicFlat', 'twoGbMaxExtentFlat', 'twoGbMaxExtentSparse'] as const;

/** The descriptor text without its CID line (random in both). */
const withoutCid = (text: string) => text.replace(/^CID=[0-9a-f]+$/m, 'CID=');

/** qemu-img info, minus what differs between two images of the same shape (CID, names, actual size). */
async function infoShape(path: string): Promise<Record<string, unknown>> {
  const info = await qemuInfo(path, 'vmdk');
  const data = (info['format-specific'] as { data: Record<string, unknown> }).data;
  const extents = (data['extents'] as Array<Record<string, unknown>>).map((extent) => ({ ...extent, filename: String(extent['filename']).split('/').pop() }));
  return { ...info, filename: undefined, 'actual-size': undefined, 'format-specific': { ...data, cid: undefined, extents } };
}

/** Applies `data` at `offset` to the raw model file. */
async function modelWrite(model: string, offset: number, data: Buffer): Promise<void> {
  const handle = await openFile(model, 'r+');
  try {
    await handle.write(data, 0, data.length, offset);
  } finally {
    await handle.close();
  }
}

describe.skipIf(skipWithoutQemu('vmdk descriptor-file writes'))('vmdk descriptor-file forms: create and write', () => {
  for (const [subformat, options, size] of [
    ['monolithicFlat', {}, 5 * M + 512],
    ['monolithicFlat', { adapter_type: 'lsilogic', hwversion: '7', toolsversion: '10240' }, 3 * M],
    ['twoGbMaxExtentFlat', { adapter_type: 'legacyESX', compat6: 'on' }, 5 * G + 1536],
    ['twoGbMaxExtentSparse', {}, 5 * G],
    ['twoGbMaxExtentSparse', { zeroed_grain: 'on', adapter_type: 'buslogic' }, 4 * G + 100],
  ] as const) {
    it(`create ${subformat} ${JSON.stringify(options)} ${size} bytes: the files qemu-img create makes, byte for byte but the CID; qemu-img info and check agree`, TIMEOUT, async () => {
      const dir = await makeTempDir();
      const ours = join(dir, 'ours');
      const theirs = join(dir, 'theirs');
      await Promise.all([ours, theirs].map((d) => mkdir(d)));
      await createImage(join(ours, 'disk.vmdk'), 'vmdk', { formats: defaultFormats, size, options: { subformat, ...options } });
      const o = Object.entries({ subformat, ...options }).map(([k, v]) => `${k}=${v}`).join(',');
      await qemuImg(['create', '-q', '-f', 'vmdk', '-o', o, join(theirs, 'disk.vmdk'), String(size)]);
      const names = (await readdir(theirs)).sort();
      expect((await readdir(ours)).sort()).toEqual(names);
      expect(names.length).toBe(1 + (subformat === 'monolithicFlat' ? 1 : Math.ceil(size / (2 * G))));
      for (const name of names) {
        const [a, b] = [join(ours, name), join(theirs, name)];
        // the descriptor's size follows the CID's hex digits
        if (name !== 'disk.vmdk') expect((await stat(a)).size, name).toBe((await stat(b)).size);
        if (name === 'disk.vmdk') expect(withoutCid(await readFile(a, 'utf8'))).toBe(withoutCid(await readFile(b, 'utf8')));
        else if (subformat === 'twoGbMaxExtentSparse') expect((await readFile(a)).equals(await readFile(b)), name).toBe(true);
        else expect((await stat(a)).blocks, `${name} is a sparse file`).toBe(0);
      }
      expect(await infoShape(join(ours, 'disk.vmdk'))).toEqual(await infoShape(join(theirs, 'disk.vmdk')));
      expect((await qemuCheck(join(ours, 'disk.vmdk'), 'vmdk')).code).toBe(0);
    });
  }

  for (const subformat of SPLIT_FORMS) {
    it(`${subformat}: seeded random writes and zeros across extent boundaries, twice reopened; qemu-img check clean, compare equal to the model`, TIMEOUT, async () => {
      const dir = await makeTempDir();
      const path = join(dir, 'disk.vmdk');
      const model = join(dir, 'model.raw');
      const size = subformat === 'monolithicFlat' ? 9 * M + 512 : 5 * G - 512;
      await createImage(path, 'vmdk', { formats: defaultFormats, size, options: { subformat } });
      const cid = ((await qemuInfo(path, 'vmdk'))['format-specific'] as { data: { cid: number } }).data.cid;
      const original = await readFile(path, 'utf8');
      await writeFile(model, '');
      await truncate(model, size);
      const random = seededRandom(0x5eed + subformat.length);
      // near the extent boundaries (2 GiB, 4 GiB) and the ends; the flat one near its 1 MiB marks
      const marks = subformat === 'monolithicFlat' ? [0, 3 * M, 6 * M, size] : [0, 2 * G, 4 * G, size];
      for (let round = 0; round < 2; round++) {
        const image = await openImage(path, { formats: defaultFormats, readOnly: false });
        try {
          expect(image.readOnly).toBe(false);
          for (let i = 0; i < 30; i++) {
            const mark = marks[random.int(0, marks.length - 1)]!;
            const length = random.int(1, 300 * K);
            const offset = Math.min(Math.max(0, mark - random.int(0, 200 * K)), size - length);
            if (random.int(0, 5) === 0) {
              await image.zero(offset, length);
              await modelWrite(model, offset, Buffer.alloc(length));
            } else {
              const data = Buffer.alloc(length);
              random.fill(data);
              await image.write(offset, data);
              await modelWrite(model, offset, data);
            }
          }
          // a write straddling a boundary reads back whole
          const across = marks[1]! - 1000;
          const data = Buffer.alloc(3000, 0x3c + round);
          await image.write(across, data);
          await modelWrite(model, across, data);
          const back = Buffer.alloc(3000);
          await image.read(across, back);
          expect(back.equals(data)).toBe(true);
          await image.flush();
        } finally {
          await image.close();
        }
      }
      const check = await qemuCheck(path, 'vmdk');
      expect(check.code, check.stdout + check.stderr).toBe(0);
      const compare = await qemuCompare(path, 'vmdk', model, 'raw');
      expect(compare.code, compare.stdout + compare.stderr).toBe(0);
      // the descriptor got a new CID (as qemu gives one on the first write) and is still qemu's descriptor otherwise
      const info = await qemuInfo(path, 'vmdk');
      const data = (info['format-specific'] as { data: { 'create-type': string; cid: number } }).data;
      expect(data['create-type']).toBe(subformat);
      expect(data.cid).not.toBe(cid);
      expect(withoutCid((await readFile(path, 'utf8')).replace(/\0+$/, ''))).toBe(withoutCid(original));
    });
  }

  it('twoGbMaxExtentSparse: a write into an unallocated grain of the second extent appends a grain to that extent file only', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.vmdk');
    await createImage(path, 'vmdk', { formats: defaultFormats, size: 3 * G, options: { subformat: 'twoGbMaxExtentSparse' } });
    const before = await Promise.all(['disk-s001.vmdk', 'disk-s002.vmdk'].map(async (name) => (await stat(join(dir, name))).size));
    const image = await openImage(path, { formats: defaultFormats, readOnly: false });
    try {
      await image.write(2 * G + 5 * 64 * K + 7, Buffer.alloc(10, 0x77));
    } finally {
      await image.close();
    }
    expect((await stat(join(dir, 'disk-s001.vmdk'))).size).toBe(before[0]);
    expect((await stat(join(dir, 'disk-s002.vmdk'))).size).toBe(before[1]! + 64 * K);
    const { stdout } = await qemuImg(['map', '-f', 'vmdk', '--output=json', path]);
    const runs = (JSON.parse(stdout) as Array<{ start: number; length: number; data: boolean; offset?: number }>).filter((run) => run.data);
    // the grain at the old end of disk-s002.vmdk (qemu-img map gives offsets in the extent file)
    expect(runs).toMatchObject([{ start: 2 * G + 5 * 64 * K, length: 64 * K, offset: before[1] }]);
  });

  it('twoGbMaxExtentSparse over a parent (-b): the descriptor qemu-img makes; partial grains across the 2 GiB boundary keep the parent\'s bytes around them', TIMEOUT, async () => {
    const dir = await makeTempDir();
    await qemuImg(['create', '-q', '-f', 'vmdk', join(dir, 'base.vmdk'), String(3 * G)]);
    const edge = 2 * G;
    const io = await run('qemu-io', ['-f', 'vmdk', '-c', `write -P 0x21 ${edge - 3 * 64 * K} ${6 * 64 * K}`, join(dir, 'base.vmdk')]);
    expect(io.code, io.stderr).toBe(0);
    await createImage(join(dir, 'ours.vmdk'), 'vmdk', { formats: defaultFormats, options: { subformat: 'twoGbMaxExtentSparse' }, backingFile: 'base.vmdk', backingFormat: 'vmdk' });
    await qemuImg(['create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', '-b', 'base.vmdk', '-F', 'vmdk', join(dir, 'theirs.vmdk')], { cwd: dir });
    expect(withoutCid(await readFile(join(dir, 'ours.vmdk'), 'utf8'))).toBe(withoutCid(await readFile(join(dir, 'theirs.vmdk'), 'utf8')).replace(/theirs-s00/g, 'ours-s00'));
    // the model: the parent's bytes (qemu-img convert), then the writes. Not qemu-io writes into the child:
    // qemu 7.2 fills the rest of a partial grain of the second extent from the parent at the offset
    // inside the extent, not the guest offset (the parent's bytes there are lost; zeros here)
    const model = join(dir, 'model.raw');
    await qemuImg(['convert', '-f', 'vmdk', '-O', 'raw', join(dir, 'base.vmdk'), model]);
    const writes: Array<[number, number]> = [[edge - 64 * K - 100, 300], [edge - 10, 20], [edge + 64 * K + 5, 1000]];
    const image = await openImage(join(dir, 'ours.vmdk'), { formats: defaultFormats, readOnly: false });
    try {
      for (const [i, [offset, length]] of writes.entries()) {
        await image.write(offset, Buffer.alloc(length, 0x50 + i));
        await modelWrite(model, offset, Buffer.alloc(length, 0x50 + i));
      }
    } finally {
      await image.close();
    }
    expect((await qemuCheck(join(dir, 'ours.vmdk'), 'vmdk')).code).toBe(0);
    const compare = await qemuCompare(join(dir, 'ours.vmdk'), 'vmdk', model, 'raw');
    expect(compare.code, compare.stdout + compare.stderr).toBe(0);
    // the four grains written (the first write touches two) are the child's own now (qemu-img map)
    const child = JSON.parse((await qemuImg(['map', '-f', 'vmdk', '--output=json', join(dir, 'ours.vmdk')])).stdout) as Array<{ start: number; length: number; depth: number; data: boolean }>;
    const own = child.filter((r) => r.depth === 0 && r.data);
    expect([own[0]?.start, own.reduce((sum, r) => sum + r.length, 0)]).toEqual([edge - 2 * 64 * K, 4 * 64 * K]);
  });

  it('twoGbMaxExtentSparse: the CID goes to the descriptor file first, then the grain of the second extent and its fdatasync, then its entries; flush syncs only the files written', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.vmdk');
    await createImage(path, 'vmdk', { formats: defaultFormats, size: 5 * G, options: { subformat: 'twoGbMaxExtentSparse' } });
    const events: string[] = [];
    const spied = async (file: string, readOnly: boolean) => {
      const spy = await spyProtocol(file, readOnly);
      const name = basename(file);
      return { ...spy, write: (o: number, b: Buffer) => (events.push(`${name} write ${o} ${b.length}`), spy.write(o, b)), flush: () => (events.push(`${name} flush`), spy.flush()) };
    };
    const files = new ImageFileGate(path, {}, true);
    const opened: Array<{ close(): Promise<void> }> = [];
    const gate = {
      async open(name: string, role: string, options: { readOnly: boolean; confined?: boolean }) {
        const real = await files.open(name, role, options);
        await real.close();
        const spy = await spied(real.path, options.readOnly);
        opened.push(spy);
        return spy;
      },
    };
    const own = await spied(path, false);
    const image = await vmdk.open(own, { readOnly: false, files: gate });
    const s002Size = (await stat(join(dir, 'disk-s002.vmdk'))).size;
    try {
      await image.write!(2 * G + 3 * 64 * K + 100, Buffer.alloc(200, 0x44));
      await image.flush!();
      expect(events[0]).toMatch(/^disk\.vmdk write 0 512$/); // the new CID: the descriptor's sector
      expect(events[1]).toBe('disk.vmdk flush');
      expect(events.slice(2, 4)).toEqual([`disk-s002.vmdk write ${s002Size} ${64 * K}`, 'disk-s002.vmdk flush']);
      // the entry in the primary table, then the redundant one (each its 512-byte sector)
      expect(events.slice(4, 6).every((e) => /^disk-s002\.vmdk write \d+ 512$/.test(e))).toBe(true);
      expect(events.slice(6).sort()).toEqual(['disk-s002.vmdk flush', 'disk.vmdk flush']);
    } finally {
      await image.close!();
      await Promise.all(opened.map((file) => file.close()));
    }
  });

  it('vmfs (a VMFS flat extent, ESX): written in place as qemu writes it; qemu-img compare equals the model', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'esx.vmdk');
    await writeFile(path, '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="vmfs"\n\n# Extent description\nRW 4096 VMFS "esx-flat.vmdk"\n');
    await writeFile(join(dir, 'esx-flat.vmdk'), Buffer.alloc(2 * M, 0x11));
    const model = Buffer.alloc(2 * M, 0x11);
    const image = await openImage(path, { formats: defaultFormats, readOnly: false });
    try {
      expect(image.readOnly).toBe(false);
      await image.write(M - 7, Buffer.alloc(5000, 0x22));
      Buffer.alloc(5000, 0x22).copy(model, M - 7);
      await image.zero(100, 70 * K);
      model.fill(0, 100, 100 + 70 * K);
    } finally {
      await image.close();
    }
    await writeFile(join(dir, 'model.raw'), model);
    const compare = await qemuCompare(path, 'vmdk', join(dir, 'model.raw'), 'raw');
    expect(compare.code, compare.stdout + compare.stderr).toBe(0);
    expect((await stat(join(dir, 'esx-flat.vmdk'))).size).toBe(2 * M);
  });

  for (const subformat of SPLIT_FORMS) {
    it(`convert -O vmdk -o subformat=${subformat}: qemu-img compare equals the source`, TIMEOUT, async () => {
      const dir = await makeTempDir();
      const source = join(dir, 'source.raw');
      const content = Buffer.alloc(3 * M + 512);
      seededRandom(77).fill(content.subarray(M, 2 * M));
      content.fill(0x42, 3 * M);
      await writeFile(source, content);
      const dest = join(dir, 'dest.vmdk');
      await convertImage(source, dest, { formats: defaultFormats, targetFormat: 'vmdk', options: { subformat } });
      expect((await qemuCompare(dest, 'vmdk', source, 'raw')).code).toBe(0);
      expect((await qemuCheck(dest, 'vmdk')).code).toBe(0);
    });
  }

  describe('refusals, one line each, before anything is written', () => {
    it('an extent file that exists already is named and left alone (qemu-img overwrites it)', async () => {
      const dir = await makeTempDir();
      await writeFile(join(dir, 'disk-s002.vmdk'), 'precious');
      await expect(createImage(join(dir, 'disk.vmdk'), 'vmdk', { formats: defaultFormats, size: 3 * G, options: { subformat: 'twoGbMaxExtentSparse' } })).rejects.toThrow(
        `VMDK extent file ${join(dir, 'disk-s002.vmdk')} already exists; remove it first (it is not overwritten)`,
      );
      expect((await readdir(dir)).sort()).toEqual(['disk-s002.vmdk']);
      expect(await readFile(join(dir, 'disk-s002.vmdk'), 'utf8')).toBe('precious');
    });

    it('a create that fails after the extent files (FILE is a directory) removes the extent files it made', async () => {
      const dir = await makeTempDir();
      await mkdir(join(dir, 'disk.vmdk'));
      await expect(createImage(join(dir, 'disk.vmdk'), 'vmdk', { formats: defaultFormats, size: 5 * G, force: true, options: { subformat: 'twoGbMaxExtentSparse' } })).rejects.toThrow(/cannot create .*disk\.vmdk: /);
      expect(await readdir(dir)).toEqual(['disk.vmdk']);
    });

    it('bad subformat, zeroed grains or a backing file on a flat image, size 0', async () => {
      const dir = await makeTempDir();
      const path = join(dir, 'disk.vmdk');
      await qemuImg(['create', '-q', '-f', 'vmdk', join(dir, 'base.vmdk'), String(M)]);
      const create = (options: Record<string, string>, size = M, more: { backingFile?: string } = {}) => createImage(path, 'vmdk', { formats: defaultFormats, size, options, ...more });
      await expect(create({ subformat: 'twoGbMaxExtent' })).rejects.toThrow('unknown VMDK subformat twoGbMaxExtent (one of monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized)');
      await expect(create({ subformat: 'monolithicFlat', zeroed_grain: 'on' })).rejects.toThrow('VMDK subformat monolithicFlat with zeroed_grain=on: a flat image cannot have zeroed grains');
      await expect(create({ subformat: 'twoGbMaxExtentFlat' }, M, { backingFile: 'base.vmdk' })).rejects.toThrow('VMDK subformat twoGbMaxExtentFlat cannot have a backing file (only sparse ones can)');
      await expect(create({ subformat: 'twoGbMaxExtentSparse' }, 0)).rejects.toThrow('size 0: a twoGbMaxExtentSparse VMDK image needs at least one sector (it would have no extent)');
      expect(await readdir(dir)).toEqual(['base.vmdk']);
    });
  });
});
