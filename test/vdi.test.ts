/**
 * VDI beyond the conformance suite (which reads, maps, infos and random-writes
 * the qemu-made shapes of test/helpers/formats-vdi.ts): block map markers,
 * `check` next to `qemu-img check` on images damaged on purpose, `create`
 * next to `qemu-img create`, and one damaged-header case per checked field,
 * each next to what qemu does with the same file. Offsets are the VDI 1.1
 * header layout (docs/formats/vdi.md), never the driver's parser.
 */
import { readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage, createImage, openImage } from '../src/index.js';
import { IMGMOUNT } from './helpers/bundle.js';
import {
  makeTempDir, normalizeMap, patchBytes, qemuCheck, qemuConvertToRaw, qemuImg, qemuInfo, qemuIo, qemuMap, readAll, readBytes, run,
  skipWithoutQemu, writeU32, writeU64,
} from './helpers/qemu.js';

const MiB = 1024 * 1024;
const H = {
  signature: 0x40, version: 0x44, imageType: 0x4c, offsetBmap: 0x154, offsetData: 0x158, sectorSize: 0x168, diskSize: 0x170,
  blockSize: 0x178, blockExtra: 0x17c, blocksInImage: 0x180, blocksAllocated: 0x184, uuidImage: 0x188, uuidLastSnap: 0x198,
  uuidLink: 0x1a8, uuidParent: 0x1b8,
} as const;
/** qemu-img create puts the block map right after the 512-byte header. */
const BMAP = 0x200;
const TIMEOUT = { timeout: 60_000 };

/** A dynamic image (qemu-img create + qemu-io): blocks 0, 1, 3 hold patterns (indexes 0, 1, 2), block 2 and 4.. unallocated. */
async function qemuImage(dir: string, name = 'disk.vdi', size = 6 * MiB): Promise<string> {
  const path = join(dir, name);
  await qemuImg(['create', '-q', '-f', 'vdi', path, String(size)]);
  await qemuIo(path, ['write -P 0x11 0 4096', `write -P 0x22 ${MiB + 5} 700`, `write -P 0x33 ${3 * MiB} ${MiB}`], 'vdi');
  return path;
}

async function ourBytes(path: string): Promise<Buffer> {
  const image = await openImage(path, { readOnly: true, format: 'vdi' });
  try {
    return await readAll(image);
  } finally {
    await image.close();
  }
}

async function ourMap(path: string) {
  const image = await openImage(path, { readOnly: true, format: 'vdi' });
  try {
    return normalizeMap(await image.map(), true);
  } finally {
    await image.close();
  }
}

describe.skipIf(skipWithoutQemu('vdi'))('vdi', () => {
  describe('block map markers', () => {
    it('0xfffffffe (discarded) over a block with data reads as zeros and maps as zero, like qemu; 0xffffffff too', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const path = await qemuImage(dir);
      await writeU32(path, BMAP + 4 * 3, 0xfffffffe); // block 3 (0x33 pattern, index 2) is discarded
      const expected = await qemuConvertToRaw(path, dir, 'vdi');
      expect(expected.subarray(3 * MiB, 4 * MiB).equals(Buffer.alloc(MiB))).toBe(true);
      expect(expected[0]).toBe(0x11);
      expect((await ourBytes(path)).equals(expected)).toBe(true);
      const theirs = normalizeMap(await qemuMap(path, 'vdi'), true);
      expect(theirs.filter((run) => run.zero && run.present && !run.data).map((run) => run.start)).toEqual([2 * MiB]);
      expect(await ourMap(path)).toEqual(theirs);
    });
  });

  describe('check, next to qemu-img check', () => {
    async function both(path: string): Promise<{ ours: Awaited<ReturnType<typeof checkImage>>; qemu: { code: number; corruptions: number; stderr: string } }> {
      const ours = await checkImage(path, { format: 'vdi' });
      const json = await run('qemu-img', ['check', '-f', 'vdi', '--output=json', path]);
      const parsed = JSON.parse(json.stdout) as { corruptions?: number };
      return { ours, qemu: { code: json.code, corruptions: parsed.corruptions ?? 0, stderr: json.stderr } };
    }

    it('a clean image made by qemu is clean for both', TIMEOUT, async () => {
      const { ours, qemu } = await both(await qemuImage(await makeTempDir()));
      expect(qemu).toMatchObject({ code: 0, corruptions: 0 });
      expect(ours).toMatchObject({ corruptions: 0, leaks: 0, messages: [] });
    });

    it('a block used by two entries: one corruption for both, named by entry', TIMEOUT, async () => {
      const path = await qemuImage(await makeTempDir());
      await writeU32(path, BMAP + 4 * 1, 0); // block 1 points to index 0, as block 0 does; blocks_allocated stays 3 = entries
      const { ours, qemu } = await both(path);
      expect(qemu).toMatchObject({ code: 2, corruptions: 1 });
      expect(qemu.stderr).toMatch(/also used by/);
      expect(ours.corruptions).toBe(1);
      expect(ours.messages).toEqual(['ERROR: block map entry 1: block index 0 is also used by entry 0']);
    });

    it('an index past blocks_in_image: the index and the count mismatch, two corruptions for both; reading that block fails naming it', TIMEOUT, async () => {
      const path = await qemuImage(await makeTempDir());
      await writeU32(path, BMAP + 4 * 3, 1000);
      const { ours, qemu } = await both(path);
      expect(qemu).toMatchObject({ code: 2, corruptions: 2 });
      expect(qemu.stderr).toMatch(/too large/);
      expect(qemu.stderr).toMatch(/allocated blocks mismatch/);
      expect(ours.corruptions).toBe(2);
      expect(ours.messages).toEqual([
        'ERROR: block map entry 3: block index 1000 is too large (blocks_in_image 6)',
        "ERROR: allocated blocks mismatch: the block map has 2, the header's blocks_allocated says 3",
      ]);
      const image = await openImage(path, { readOnly: true });
      try {
        const good = Buffer.alloc(MiB);
        await image.read(0, good);
        expect(good.subarray(0, 4096).equals(Buffer.alloc(4096, 0x11))).toBe(true);
        await expect(image.read(3 * MiB + 10, Buffer.alloc(10))).rejects.toThrow(/VDI block map entry 3 .*index 1000 is not below blocks_in_image 6/);
      } finally {
        await image.close();
      }
    });

    it('blocks_allocated above the entries (what a crash between the header and the block map leaves): one corruption for both', TIMEOUT, async () => {
      const path = await qemuImage(await makeTempDir());
      await writeU32(path, H.blocksAllocated, 4);
      const { ours, qemu } = await both(path);
      expect(qemu).toMatchObject({ code: 2, corruptions: 1 });
      expect(ours.messages).toEqual(["ERROR: allocated blocks mismatch: the block map has 3, the header's blocks_allocated says 4"]);
    });

    it('a block past the end of a truncated file: a corruption here (qemu reads zeros there and finds none); reading it fails', TIMEOUT, async () => {
      const path = await qemuImage(await makeTempDir());
      const size = (await stat(path)).size;
      await truncate(path, size - 1000);
      const { ours, qemu } = await both(path);
      expect(qemu).toMatchObject({ code: 0, corruptions: 0 });
      expect(ours.corruptions).toBe(1);
      expect(ours.messages).toEqual([`ERROR: block map entry 3: block index 2 puts the block's bytes at ${1024 + 2 * MiB}..${1024 + 3 * MiB} past the end of the ${size - 1000}-byte file`]);
      const image = await openImage(path, { readOnly: true });
      try {
        await expect(image.read(3 * MiB, Buffer.alloc(512))).rejects.toMatchObject({ name: 'CorruptImageError' });
      } finally {
        await image.close();
      }
    });

    it('a last block stored only as far as disk_size reaches (not a whole block) is fine for both, and reads like qemu', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const path = join(dir, 'short.vdi');
      await qemuImg(['create', '-q', '-f', 'vdi', path, String(2 * MiB + 3072)]);
      await qemuIo(path, ['write -P 0x44 0 512', `write -P 0x45 ${2 * MiB} 3072`], 'vdi'); // block 2 at index 1
      await truncate(path, 1024 + MiB + 3072);
      const { ours, qemu } = await both(path);
      expect(qemu).toMatchObject({ code: 0, corruptions: 0 });
      expect(ours).toMatchObject({ corruptions: 0, messages: [] });
      const expected = await qemuConvertToRaw(path, dir, 'vdi');
      expect(expected.subarray(2 * MiB).equals(Buffer.alloc(3072, 0x45))).toBe(true);
      expect((await ourBytes(path)).equals(expected)).toBe(true);
    });

    it('repair is refused, as qemu-img check -r refuses VDI (exit 63)', TIMEOUT, async () => {
      const path = await qemuImage(await makeTempDir());
      expect((await run('qemu-img', ['check', '-r', 'all', '-f', 'vdi', path])).code).toBe(63);
      const before = await readFile(path);
      await expect(checkImage(path, { format: 'vdi', repair: true })).rejects.toThrow(/VDI images cannot be repaired/);
      expect((await readFile(path)).equals(before)).toBe(true);
    });
  });

  describe('create, next to qemu-img create', () => {
    /** The file with the two random UUIDs zeroed. */
    async function withoutUuids(path: string): Promise<Buffer> {
      const bytes = await readFile(path);
      bytes.fill(0, H.uuidImage, H.uuidLastSnap + 16);
      return bytes;
    }

    for (const [title, options, qemuOptions] of [
      ['dynamic', {}, []],
      ['static', { static: 'on' }, ['-o', 'static=on']],
    ] as const) {
      for (const size of [0, 1000, 5 * MiB, 5 * MiB + 3000]) {
        it(`${title}, ${size} bytes: the same bytes as qemu-img create but the UUIDs; qemu-img check is clean`, TIMEOUT, async () => {
          const dir = await makeTempDir();
          const ours = join(dir, 'ours.vdi');
          const theirs = join(dir, 'theirs.vdi');
          await createImage(ours, 'vdi', { size, options: { ...options } });
          await qemuImg(['create', '-q', '-f', 'vdi', ...qemuOptions, theirs, String(size)]);
          expect((await withoutUuids(ours)).equals(await withoutUuids(theirs))).toBe(true);
          expect((await readBytes(ours, H.uuidImage, 16)).equals(Buffer.alloc(16))).toBe(false);
          expect((await qemuCheck(ours, 'vdi')).code).toBe(0);
          expect(await qemuInfo(ours, 'vdi')).toMatchObject({ 'virtual-size': Math.ceil(size / 512) * 512, 'cluster-size': MiB });
        });
      }
    }

    it('bad options are refused by name, and nothing is written', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const path = join(dir, 'bad.vdi');
      await expect(createImage(path, 'vdi', { size: MiB, options: { static: 'maybe' } })).rejects.toThrow("static 'maybe' is not on or off");
      await expect(createImage(path, 'vdi', { size: MiB, options: { cluster_size: '65536' } })).rejects.toThrow('unknown vdi option cluster_size; vdi accepts static');
      await expect(createImage(path, 'vdi', { size: 2 ** 52 })).rejects.toThrow(/is above \d+, the largest VDI image/);
      await writeFile(join(dir, 'base.raw'), Buffer.alloc(MiB));
      await expect(createImage(path, 'vdi', { size: MiB, backingFile: 'base.raw' })).rejects.toThrow('VDI images cannot have a backing file');
      await expect(stat(path)).rejects.toThrow();
    });
  });

  describe('the command line (dist/, as npm run build makes it)', () => {
    const imgmount = (args: string[], cwd: string) => run(IMGMOUNT, args, { cwd });

    it('info --output=json has qemu-img info\'s keys and values; check exits like qemu-img check; create -o static=on makes what qemu-img checks clean', TIMEOUT, async () => {
      const dir = await makeTempDir();
      const path = await qemuImage(dir);
      const ours = JSON.parse((await imgmount(['info', '--output=json', 'disk.vdi'], dir)).stdout) as Record<string, unknown>;
      const theirs = await qemuInfo('disk.vdi', undefined, { cwd: dir });
      expect(theirs['dirty-flag']).toBe(false);
      expect(ours).toEqual(theirs);
      const clean = await imgmount(['check', 'disk.vdi'], dir);
      expect(clean.code).toBe(0);
      expect(clean.stdout).toContain('No errors were found on the image.');
      await writeU32(path, BMAP + 4, 0);
      const damaged = await imgmount(['check', 'disk.vdi'], dir);
      expect(damaged.code).toBe((await qemuCheck(path, 'vdi')).code);
      expect(damaged.code).toBe(2);
      expect(damaged.stderr).toContain('ERROR: block map entry 1: block index 0 is also used by entry 0');
      const created = await imgmount(['create', '-f', 'vdi', '-o', 'static=on', 'new.vdi', '3M'], dir);
      expect(created.code, created.stderr).toBe(0);
      expect((await qemuCheck(join(dir, 'new.vdi'), 'vdi')).code).toBe(0);
      expect(await qemuInfo(join(dir, 'new.vdi'), 'vdi')).toMatchObject({ 'virtual-size': 3 * MiB, 'cluster-size': MiB });
      const refused = await imgmount(['create', '-f', 'vdi', '-o', 'static=yes-please', 'bad.vdi', '3M'], dir);
      expect(refused.code).not.toBe(0);
      expect(refused.stderr.trim().split('\n')).toEqual([expect.stringMatching(/static 'yes-please' is not on or off/)]);
    });
  });

  describe('damaged headers: one clear error per checked field', () => {
    interface Damage {
      field: string;
      patch: (path: string) => Promise<void>;
      error: RegExp;
      /** Whether qemu-img info -f vdi refuses the same file (false: a check of this program only). */
      qemuRefuses: boolean;
    }
    const u32 = (offset: number, value: number) => (path: string) => writeU32(path, offset, value);
    const damages: Damage[] = [
      { field: 'signature', patch: u32(H.signature, 0x12345678), error: /VDI signature 0x12345678 is not 0xbeda107f/, qemuRefuses: true },
      { field: 'version', patch: u32(H.version, 0x00010000), error: /VDI version 1\.0 is not supported \(only 1\.1\)/, qemuRefuses: true },
      { field: 'image_type', patch: u32(H.imageType, 4), error: /VDI image_type 4 is not supported/, qemuRefuses: false },
      { field: 'offset_bmap (unaligned)', patch: u32(H.offsetBmap, 0x201), error: /VDI offset_bmap 513 is not a multiple of 512/, qemuRefuses: true },
      { field: 'offset_bmap (on the header)', patch: u32(H.offsetBmap, 0), error: /VDI offset_bmap 0 is not a multiple of 512 at or past the 512-byte header/, qemuRefuses: false },
      { field: 'offset_data (unaligned)', patch: u32(H.offsetData, 0x401), error: /VDI offset_data 1025 is not a multiple of 512/, qemuRefuses: true },
      { field: 'offset_data (on the block map)', patch: u32(H.offsetData, 0x200), error: /block map runs into the data area at offset_data 512/, qemuRefuses: false },
      { field: 'sector_size', patch: u32(H.sectorSize, 4096), error: /VDI sector_size 4096 is not supported \(only 512\)/, qemuRefuses: true },
      { field: 'disk_size (above the maximum)', patch: (path) => writeU64(path, H.diskSize, 1n << 60n), error: /VDI disk_size 1152921504606846976 is above the largest supported size/, qemuRefuses: true },
      { field: 'disk_size (above the block map)', patch: (path) => writeU64(path, H.diskSize, BigInt(6 * MiB + 512)), error: /VDI disk_size 6291968 is larger than blocks_in_image 6/, qemuRefuses: true },
      { field: 'block_size (not a power of two)', patch: u32(H.blockSize, 1_000_000), error: /VDI block_size 1000000 is not supported \(a power of two in \[512, 67108864\]/, qemuRefuses: true },
      { field: 'block_size (above 64 MiB)', patch: u32(H.blockSize, 128 * MiB), error: /VDI block_size 134217728 is not supported/, qemuRefuses: true },
      { field: 'block_extra', patch: u32(H.blockExtra, 512), error: /VDI block_extra 512 is not supported \(only 0\)/, qemuRefuses: false },
      { field: 'blocks_in_image (above the maximum)', patch: u32(H.blocksInImage, 0x40000000), error: /VDI blocks_in_image 1073741824 is above 1073741823/, qemuRefuses: true },
      { field: 'blocks_in_image (block map past the end of the file)', patch: async (path) => { await writeU32(path, H.blocksInImage, 1_000_000); await writeU32(path, H.offsetData, 0x200 + 4_000_256); }, error: /puts the 4000000-byte block map past the end of the \d+-byte file/, qemuRefuses: false },
      { field: 'blocks_allocated', patch: u32(H.blocksAllocated, 7), error: /VDI blocks_allocated 7 is above blocks_in_image 6/, qemuRefuses: false },
      { field: 'uuid_link', patch: u32(H.uuidLink, 1), error: /VDI uuid_link is set/, qemuRefuses: true },
      { field: 'uuid_parent', patch: u32(H.uuidParent + 12, 1), error: /VDI uuid_parent is set: differencing images are not supported/, qemuRefuses: true },
      { field: 'header (truncated file)', patch: (path) => truncate(path, 400), error: /VDI header is truncated: the file is 400 bytes, the header needs 512/, qemuRefuses: false },
    ];

    for (const damage of damages) {
      it(`${damage.field}: refused naming it${damage.qemuRefuses ? ', as qemu refuses it' : ' (qemu opens it)'}`, TIMEOUT, async () => {
        const dir = await makeTempDir();
        const path = await qemuImage(dir);
        await damage.patch(path);
        const before = await readFile(path);
        for (const readOnly of [true, false]) {
          const error = await openImage(path, { readOnly, format: 'vdi' }).then(
            async (image) => {
              await image.close();
              return undefined;
            },
            (reason: unknown) => reason as Error,
          );
          expect(error?.message).toMatch(damage.error);
          expect(error?.message).toMatch(new RegExp(`^${path.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: VDI `));
          expect(error?.message).not.toMatch(/\n/);
        }
        expect((await readFile(path)).equals(before)).toBe(true);
        const qemu = await run('qemu-img', ['info', '-f', 'vdi', path]);
        expect(qemu.code !== 0, qemu.stdout + qemu.stderr).toBe(damage.qemuRefuses);
      });
    }
  });
});
