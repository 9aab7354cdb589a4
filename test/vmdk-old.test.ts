/**
 * VMDK3 ("COWD", vmfsSparse) and seSparse extents beyond the conformance
 * matrix, with qemu-img as the oracle (images from test/helpers/vmdk-old-writer.ts):
 *
 * - damaged headers: one case per checked field, each refused at open with
 *   its field, value and range (and whether qemu refuses it too: where qemu
 *   opens it, it reads zeros or metadata there, or crashes);
 * - damaged table entries: the read of that range fails naming the entry
 *   (qemu fails it too, EIO, or reads past the end), check counts it like
 *   qemu-img check;
 * - a "COWD" file opened directly is refused, as qemu refuses it;
 * - the CLI's info --output=json has qemu-img info's keys and values;
 * - a differencing VMDK whose parentFileNameHint names a qcow2 or raw file:
 *   qemu 7.2 opens the parent as vmdk (never probed) and fails; here the
 *   parent is probed and the image reads (the parent's bytes under the grains).
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage, openImage } from '../src/index.js';
import { makeTempDir, qemuCheck, qemuConvertToRaw, qemuImg, qemuInfo, qemuIo, qemuMap, readAll, run, skipWithoutQemu } from './helpers/qemu.js';
import { buildCowd, buildSeSparse, descriptorFile, makeModel, mapDisagreements, SECTOR, type OldVmdkModel } from './helpers/vmdk-old-writer.js';
import { IMGMOUNT, imgmount } from './fuse/fuse-helpers.js';
import { refusal } from './helpers/refusal.js';

const K = 1024;
const M = 1024 * K;
const TIMEOUT = { timeout: 120_000 };

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

interface Made {
  dir: string;
  path: string;
  extent: string;
  model: Buffer;
  modelOf: OldVmdkModel;
}

/** A vmfsSparse image: 2 MiB + 512, 8 KiB grains, half of them data. */
async function cowd(patches: Array<[number, Buffer]> = []): Promise<Made & { layout: ReturnType<typeof buildCowd> }> {
  const dir = await makeTempDir();
  const model = makeModel(2 * M + 512, 8 * K, 0x3c0d);
  const layout = buildCowd(model);
  for (const [offset, bytes] of patches) bytes.copy(layout.file, offset);
  const extent = join(dir, 'x-delta.vmdk');
  await writeFile(extent, layout.file);
  const path = join(dir, 'x.vmdk');
  await writeFile(path, descriptorFile({ createType: 'vmfsSparse', extentType: 'VMFSSPARSE', extentFile: 'x-delta.vmdk', sectors: model.size / SECTOR }));
  return { dir, path, extent, model: model.content, modelOf: model, layout };
}

/** An seSparse image: 20 MiB + 1024 (two grain tables), data, zero, unmapped and unallocated grains. */
async function seSparse(patches: Array<[number, Buffer]> = []): Promise<Made & { layout: ReturnType<typeof buildSeSparse> }> {
  const dir = await makeTempDir();
  const model = makeModel(20 * M + 1024, 4 * K, 0x5e50, undefined, ['data', 'unallocated', 'zero', 'unmapped']);
  const layout = buildSeSparse(model);
  for (const [offset, bytes] of patches) bytes.copy(layout.file, offset);
  const extent = join(dir, 'x-sesparse.vmdk');
  await writeFile(extent, layout.file);
  const path = join(dir, 'x.vmdk');
  await writeFile(path, descriptorFile({ createType: 'seSparse', extentType: 'SESPARSE', extentFile: 'x-sesparse.vmdk', sectors: model.size / SECTOR }));
  return { dir, path, extent, model: model.content, modelOf: model, layout };
}

async function qemuOpens(path: string): Promise<boolean> {
  const dir = await makeTempDir();
  return (await run('qemu-img', ['convert', '-f', 'vmdk', '-O', 'raw', path, join(dir, 'out.raw')])).code === 0;
}

describe.skipIf(skipWithoutQemu('vmdk-old'))('vmdk: VMDK3 (COWD) and seSparse extents', () => {
  it('the test images are what the writer meant: qemu-img convert reads the model; ours reads like qemu, check is clean like qemu-img check', TIMEOUT, async () => {
    for (const made of [await cowd(), await seSparse()]) {
      const expected = await qemuConvertToRaw(made.path, made.dir, 'vmdk');
      // zero and unmapped grains of the seSparse model read as zeros: the model holds zeros there
      expect(expected.equals(made.model), made.path).toBe(true);
      const image = await openImage(made.path, { readOnly: true });
      try {
        expect((await readAll(image, 4097)).equals(expected)).toBe(true);
      } finally {
        await image.close();
      }
      expect((await qemuCheck(made.path, 'vmdk')).code).toBe(0);
      expect(await checkImage(made.path)).toMatchObject({ corruptions: 0 });
      // qemu-img map shows the model's grains at the writer's offsets; a model that says otherwise is caught
      const runs = await qemuMap(made.path, 'vmdk');
      expect(mapDisagreements(made.modelOf, made.layout.hostOffsets, runs)).toEqual([]);
      const first = made.modelOf.kinds.indexOf('data');
      const wrong = { ...made.modelOf, kinds: made.modelOf.kinds.map((kind, i) => (i === first ? 'unallocated' : kind)) };
      expect(mapDisagreements(wrong, made.layout.hostOffsets, runs)).toEqual([`grain ${first}: qemu-img map says data, the model unallocated`]);
      const moved = made.layout.hostOffsets.map((offset, i) => (i === first ? offset + SECTOR : offset));
      expect(mapDisagreements(made.modelOf, moved, runs)).toHaveLength(1);
    }
  });

  describe('damaged COWD headers: each checked field refused by name', () => {
    // [what, offset, bytes, message, what qemu does]
    const cases: Array<[string, number, Buffer, RegExp, string]> = [
      ['version 2', 4, u32(2), /x-delta\.vmdk: VMDK3 \("COWD"\) extent header: version 2 is not supported \(only 1\)$/, 'reads it (it ignores the version)'],
      ['granularity 0', 16, u32(0), /: granularity 0 sectors is outside 1\.\.2097152$/, 'dies of a division by zero (SIGFPE)'],
      ['granularity 0x200001', 16, u32(0x200001), /: granularity 2097153 sectors is outside 1\.\.2097152$/, 'refuses it'],
      ['numGDEntries 0', 24, u32(0), /: numGDEntries 0 is too small for numSectors 4097 \(1 needed with 16-sector grains\)$/, 'opens it, then fails every read (EIO)'],
      ['numGDEntries 0x2000001', 24, u32(0x2000001), /: numGDEntries 33554433 is above 33554432$/, 'refuses it'],
      ['gdOffset past the end', 20, u32(100000), /: the grain directory \(gdOffset 100000 sectors, 1 entries\) must lie after the header's first sector and inside the file/, 'reads zeros'],
      ['gdOffset 0 (the header)', 20, u32(0), /: the grain directory \(gdOffset 0 sectors, 1 entries\) must lie after/, 'takes the magic for a grain table'],
    ];
    for (const [what, offset, bytes, message, qemuDoes] of cases) {
      it(`${what} (qemu ${qemuDoes})`, TIMEOUT, async () => {
        const made = await cowd([[offset, bytes]]);
        const error = await refusal(openImage(made.path, { readOnly: true }));
        expect(error.message).toMatch(message);
        expect(error.message.startsWith(`${made.extent}: `)).toBe(true);
        expect(await qemuOpens(made.path)).toBe(qemuDoes.startsWith('reads') || qemuDoes.startsWith('takes'));
      });
    }
  });

  describe('damaged seSparse headers: each checked field refused by name', () => {
    const vol = SECTOR; // the writer puts the volatile header in sector 1
    const cases: Array<[string, number, Buffer, RegExp, boolean]> = [
      ['const magic', 0, u64(0xcafebabfn), /const header: magic 0xcafebabf is not 0xcafebabe$/, true],
      ['version', 8, u64(0x200000002n), /const header: version 0x200000002 is not supported \(only 0x200000001\)$/, true],
      ['grain_size 16', 24, u64(16n), /const header: grain_size 16 sectors is not supported \(only 8\)$/, true],
      ['grain_table_size 128', 32, u64(128n), /const header: grain_table_size 128 sectors is not supported \(only 64\)$/, true],
      ['flags 1', 40, u64(1n), /const header: flags 0x1 are not supported \(only 0\)$/, true],
      ['reserved2', 56, u64(1n), /const header: reserved2 is 0x1 \(must be 0\)$/, true],
      ['const padding', 300, Buffer.from([1]), /const header: its padding \(bytes 208\.\.511\) is not zeros$/, true],
      ['capacity 2^54 sectors', 16, u64(1n << 54n), /const header: capacity 18014398509481984 is above 17592186044415 sectors \(the extent size\)$/, true],
      ['volatile_header_offset past the end', 80, u64(100000000n), /const header: volatile_header_offset 100000000 must be a sector after the const header inside the file/, true],
      ['volatile magic', vol, u64(0n), /volatile header: magic 0x0 is not 0xcafecafe$/, true],
      ['replay_journal 1', vol + 24, u64(1n), /volatile header: replay_journal is 1: the image is dirty, and replaying its journal is not supported$/, true],
      ['volatile padding', vol + 100, Buffer.from([1]), /volatile header: its padding \(bytes 32\.\.511\) is not zeros$/, true],
      ['grain_dir_size 0', 136, u64(0n), /const header: grain_dir_size 0 sectors holds 0 entries, too few for capacity 40962 sectors \(2 needed\)$/, true],
      ['grain_dir_size 2^19 sectors (2^25 + entries)', 136, u64(0x80001n), /const header: grain_dir_size 524289 sectors holds 33554496 entries, above 33554432$/, true],
      ['grain_dir_offset past the end', 128, u64(100000000n), /const header: the grain directory \(grain_dir_offset 100000000, grain_dir_size 1 sectors\) must lie after the const header inside the file/, false],
      ['grain_tables_offset past the end', 144, u64(100000000n), /const header: grain_tables_offset 100000000 lies outside the file/, false],
      ['grains_offset past the end', 192, u64(100000000n), /const header: grains_offset 100000000 lies outside the file/, false],
    ];
    for (const [what, offset, bytes, message, qemuRefuses] of cases) {
      it(`${what}${qemuRefuses ? ' (qemu refuses it too)' : ' (qemu reads zeros there)'}`, TIMEOUT, async () => {
        const made = await seSparse([[offset, bytes]]);
        const error = await refusal(openImage(made.path, { readOnly: true }));
        expect(error.message).toMatch(message);
        expect(error.message.startsWith(`${made.extent}: VMDK seSparse `)).toBe(true);
        expect(await qemuOpens(made.path)).toBe(!qemuRefuses);
      });
    }
  });

  describe('damaged table entries: that range fails naming the entry, other grains read; check counts it', () => {
    /** The read at badOffset fails with `message`; one at `goodOffset` (another grain table's range) reads the model. */
    async function expectEntryRefused(made: Made, badOffset: number, message: RegExp, qemuCheckFails: boolean, goodOffset?: number): Promise<void> {
      const image = await openImage(made.path, { readOnly: true });
      try {
        expect((await refusal(image.read(badOffset, Buffer.alloc(512)))).message).toMatch(message);
        if (goodOffset !== undefined) {
          const elsewhere = Buffer.alloc(4096);
          await image.read(goodOffset, elsewhere);
          expect(elsewhere.equals(made.model.subarray(goodOffset, goodOffset + 4096))).toBe(true);
        }
      } finally {
        await image.close();
      }
      const ours = await checkImage(made.path);
      expect(ours.corruptions).toBeGreaterThanOrEqual(1);
      expect(ours.messages.join('\n')).toMatch(message);
      expect((await qemuCheck(made.path, 'vmdk')).code !== 0).toBe(qemuCheckFails);
    }

    it('COWD: a grain table entry past the end of the file (qemu-img check: "points after EOF")', TIMEOUT, async () => {
      const base = await cowd();
      // the first data grain of table 0
      const table = base.layout.firstTable;
      let index = 0;
      while (base.layout.file.readUInt32LE(table + index * 4) === 0) index++;
      const made = await cowd([[table + index * 4, u32(1000000)]]);
      await expectEntryRefused(made, index * 8 * K, /x-delta\.vmdk: VMDK3 grain table 0 maps the grain at extent offset \d+ to sector 1000000, past the end of the file/, true, 8 * K * (index + 1));
    });

    it('COWD: a grain directory entry past the end of the file (qemu reads zeros)', TIMEOUT, async () => {
      const base = await cowd();
      const made = await cowd([[base.layout.gdOffset * SECTOR, u32(900000)]]);
      await expectEntryRefused(made, 0, /VMDK3 grain directory entry 0 \(sector 900000\) points to a grain table outside the file/, false);
    });

    it('seSparse: a grain directory entry without 0x10000000 in its high bits (qemu: EIO)', TIMEOUT, async () => {
      const base = await seSparse();
      const made = await seSparse([[base.layout.gdOffset * SECTOR + 8, u64(0x2000000000000000n)]]);
      await expectEntryRefused(made, 16 * M + 512, /VMDK seSparse grain directory entry 1 \(0x2000000000000000\) is neither 0 nor an allocated grain table/, true, 4 * M);
    });

    for (const [what, value, message] of [
      ['type 4', 0x4000000000000000n, /has type 4 \(0 unallocated with all bits 0, 1 unmapped, 2 zero, 3 allocated\)$/],
      ['type 0 with other bits set', 0x5n, /has type 0 \(0 unallocated with all bits 0/],
      ['an allocated grain past the end of the file', 0x3000000000100000n, /maps grain 4294967296 to sector \d+, past the end of the file/],
    ] as const) {
      it(`seSparse: a grain table entry of ${what}`, TIMEOUT, async () => {
        const base = await seSparse();
        // entry 5 of the first table
        const made = await seSparse([[base.layout.tablesOffset * SECTOR + 5 * 8, u64(value)]]);
        await expectEntryRefused(made, 5 * 4096, new RegExp(`x-sesparse\\.vmdk: VMDK seSparse grain table 0 entry 5 \\(0x${value.toString(16)}, the grain at extent offset 20480\\) ${message.source}`), true, 17 * M);
      });
    }
  });

  it('a SPARSE extent line naming a "COWD" file reads as qemu reads it (qemu takes either magic for SPARSE and VMFSSPARSE)', TIMEOUT, async () => {
    const made = await cowd();
    await writeFile(made.path, (await readFile(made.path, 'latin1')).replace(' VMFSSPARSE ', ' SPARSE '), 'latin1');
    const expected = await qemuConvertToRaw(made.path, made.dir, 'vmdk');
    expect(expected.equals(made.model)).toBe(true);
    const image = await openImage(made.path, { readOnly: true });
    try {
      expect((await readAll(image)).equals(expected)).toBe(true);
      const theirs = (await qemuInfo(made.path, 'vmdk'))['format-specific'] as { data: { extents: Array<{ format: string }> } };
      expect(theirs.data.extents[0]!.format).toBe('SPARSE');
      expect((await image.info()).formatSpecific).toEqual(theirs.data);
    } finally {
      await image.close();
    }
  });

  it('a "COWD" file opened directly is refused (qemu finds no CID in it and refuses it too)', TIMEOUT, async () => {
    const made = await cowd();
    expect((await refusal(openImage(made.extent, { readOnly: true }))).message).toBe(
      `${made.extent}: a VMDK3 ("COWD", ESX vmfsSparse) file opens only through the descriptor file naming it (a VMFSSPARSE extent line)`,
    );
    expect((await run('qemu-img', ['info', '-f', 'vmdk', made.extent])).code).not.toBe(0);
  });

  it('a read-write open is read-only with a notice naming the extent type', TIMEOUT, async () => {
    for (const [made, says] of [[await cowd(), /opened read-only: writing VMDK3 \("COWD", vmfsSparse\) extents is not supported$/], [await seSparse(), /opened read-only: writing VMDK seSparse extents is not supported \(qemu opens them read-only too\)$/]] as const) {
      const notices: string[] = [];
      const image = await openImage(made.path, { notice: (line) => notices.push(line) });
      try {
        expect(image.readOnly).toBe(true);
        expect(notices).toHaveLength(1);
        expect(notices[0]).toMatch(says);
      } finally {
        await image.close();
      }
    }
  });

  it('the CLI: info --output=json has qemu-img info\'s keys and values (extents as qemu-img names them from the same directory)', TIMEOUT, async () => {
    for (const made of [await cowd(), await seSparse()]) {
      const ours = JSON.parse((await imgmount(['info', '--output=json', made.path])).stdout) as Record<string, unknown>;
      const theirs = await qemuInfo(made.path, 'vmdk');
      for (const key of ['virtual-size', 'format', 'cluster-size', 'actual-size', 'format-specific', 'dirty-flag']) {
        expect(ours[key], key).toEqual(theirs[key]);
      }
      // opened by a relative name: qemu names the extent relative to it too
      const relative = JSON.parse((await run(IMGMOUNT, ['info', '--output=json', 'x.vmdk'], { cwd: made.dir })).stdout) as Record<string, unknown>;
      const qemuRelative = JSON.parse((await run('qemu-img', ['info', '--output=json', '-f', 'vmdk', 'x.vmdk'], { cwd: made.dir })).stdout) as Record<string, unknown>;
      expect(relative['format-specific']).toEqual(qemuRelative['format-specific']);
    }
  });

  describe('a differencing VMDK whose parentFileNameHint names another format (qemu 7.2 opens the parent as vmdk and fails; here it reads)', () => {
    for (const parentFormat of ['qcow2', 'raw']) {
      it(`over ${parentFormat}: reads the parent's bytes under the child's grains (library, CLI info), where qemu-img convert fails`, TIMEOUT, async () => {
        const dir = await makeTempDir();
        // a parent name as long as "base.vmdk", so nothing moves in the sparse file when the hint is edited
        const name = parentFormat === 'qcow2' ? 'bas.qcow2' : 'base1.raw';
        const parent = join(dir, name);
        await qemuImg(['create', '-q', '-f', parentFormat, parent, '4M']);
        await qemuIo(parent, ['write -P 0x61 0 1M', 'write -P 0x63 2M 128k'], parentFormat);
        await qemuImg(['create', '-q', '-f', 'vmdk', join(dir, 'base.vmdk'), '4M']);
        await qemuImg(['create', '-q', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', join(dir, 'top.vmdk')], { cwd: dir });
        await qemuIo(join(dir, 'top.vmdk'), ['write -P 0x62 2M 64k'], 'vmdk');
        const top = join(dir, 'top-over.vmdk');
        const bytes = await readFile(join(dir, 'top.vmdk'));
        const at = bytes.indexOf('parentFileNameHint="base.vmdk"');
        expect(at).toBeGreaterThan(0);
        bytes.write(`parentFileNameHint="${name}"`, at, 'latin1');
        await writeFile(top, bytes);
        expect(await qemuOpens(top)).toBe(false);
        // the parent as qemu reads it, with the child's one grain (64 KiB at 2 MiB) over it
        const expected = await qemuConvertToRaw(parent, dir, parentFormat);
        expected.fill(0x62, 2 * M, 2 * M + 64 * K);
        const image = await openImage(top, { readOnly: true });
        try {
          expect(image.backing?.format).toBe(parentFormat);
          expect((await readAll(image)).equals(expected)).toBe(true);
        } finally {
          await image.close();
        }
        // info names the parent's format vmdk, as qemu-img info does, until the chain is opened
        const cli = await imgmount(['info', '--output=json', top]);
        expect(cli.code, cli.stderr).toBe(0);
        expect(JSON.parse(cli.stdout)).toMatchObject({ 'backing-filename': name, 'backing-filename-format': 'vmdk' });
        const chain = await imgmount(['info', '--backing-chain', '--output=json', top]);
        expect(chain.code, chain.stderr).toBe(0);
        const [first, second] = JSON.parse(chain.stdout) as Record<string, unknown>[];
        expect(first).toMatchObject({ 'backing-filename': name, 'backing-filename-format': parentFormat });
        expect(second).toMatchObject({ format: parentFormat });
      });
    }
  });
});
