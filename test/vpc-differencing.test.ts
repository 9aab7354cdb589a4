/**
 * Differencing VHDs, which qemu 7.2 can neither make nor read (it reads one
 * as a dynamic disk without its parent). Images come from the spec-based
 * writer in test/helpers/vhd-layout.ts over a parent qemu-img made; vhdiinfo
 * (Debian libvhdi-utils) must describe each image as we meant it, and the
 * oracle for the bytes is vhdimount (libvhdi's read-only FUSE mount) and a
 * model (the parent as qemu-img convert reads it, overlaid with the sectors
 * the child holds).
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage } from '../src/index.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuIo, readAll, run } from './helpers/qemu.js';
import { seededRandom } from './helpers/random.js';
import { footerIdentity, SECTOR, writeSparseVhd, type ParentInfo } from './helpers/vhd-layout.js';

const M = 1024 * 1024;
const TIMEOUT = { timeout: 60_000 };

/** Geometry 4/16/17 sectors... chosen so C*H*S*512 is the size (qemu's CHS rule for creator "vpc "). */
function chsFor(size: number): [number, number, number] {
  const sectors = size / SECTOR;
  if (sectors % (16 * 63) !== 0) throw new Error(`${size} is not a whole number of 16x63 cylinders`);
  return [sectors / (16 * 63), 16, 63];
}

/**
 * Random sectors of the child, seeded: a whole block, scattered sectors, runs
 * across a block boundary; each write covers `group` aligned sectors (8: 4 KiB).
 */
function childSectors(size: number, blockSize: number, seed: number, group: number): Map<number, Buffer> {
  const random = seededRandom(seed);
  const sectors = new Map<number, Buffer>();
  const total = size / SECTOR;
  const put = (at: number) => {
    const first = Math.floor(at / group) * group;
    for (let sector = first; sector < first + group; sector++) {
      if (sector < 0 || sector >= total) continue;
      const data = Buffer.alloc(SECTOR);
      random.fill(data);
      sectors.set(sector, data);
    }
  };
  const perBlock = blockSize / SECTOR;
  for (let s = 0; s < perBlock; s++) put(perBlock + s); // block 1 whole
  for (let i = 0; i < 60; i++) put(random.int(0, total - 1)); // scattered
  for (let s = -5; s < 7; s++) put(3 * perBlock + s); // across the boundary of blocks 2 and 3
  put(total - 1);
  return sectors;
}

function model(parent: Buffer, size: number, sectors: Map<number, Buffer>): Buffer {
  const out = Buffer.alloc(size);
  parent.copy(out, 0, 0, Math.min(parent.length, size));
  for (const [sector, data] of sectors) data.copy(out, sector * SECTOR);
  return out;
}

function vhdiinfo(path: string): Promise<string> {
  return run('vhdiinfo', [path]).then((result) => {
    if (result.code !== 0) throw new Error(`vhdiinfo ${path} exited ${result.code}: ${result.stdout}${result.stderr}`);
    return result.stdout;
  });
}

/** Reads the image through vhdimount (FUSE) in a private directory, always unmounted. */
async function readThroughVhdimount(path: string, cwd: string): Promise<Buffer> {
  const mountPoint = await mkdtemp(join(tmpdir(), 'imgmount-vhdimount-'));
  try {
    const mounted = await run('vhdimount', [path, mountPoint], { cwd });
    if (mounted.code !== 0) throw new Error(`vhdimount exited ${mounted.code}: ${mounted.stdout}${mounted.stderr}`);
    try {
      // vhdimount shows every layer: vhdi1 is the parent, the highest number the image itself.
      const layers = (await readdir(mountPoint)).filter((name) => /^vhdi\d+$/.test(name)).sort((a, b) => Number(a.slice(4)) - Number(b.slice(4)));
      return await readFile(join(mountPoint, layers[layers.length - 1]!));
    } finally {
      await new Promise<void>((resolve) => execFile('fusermount', ['-u', mountPoint], () => resolve()));
    }
  } finally {
    await rm(mountPoint, { recursive: true, force: true });
  }
}

interface Case {
  name: string;
  size: number;
  parentSize: number;
  blockSize: number;
  locators: (dir: string) => ParentInfo['locators'];
  /** The parent's file name in the directory. */
  parentFile: string;
  /** Sectors per write (see childSectors). */
  group: number;
  /** Whether vhdimount is an oracle for this case (see the sector-granular case). */
  vhdimount: boolean;
}

const CASES: Case[] = [
  {
    name: 'W2ru then W2ku, 2 MiB blocks',
    size: 16 * 63 * SECTOR * 20, // 20 cylinders of 16x63 sectors: 10.3 MB
    parentSize: 16 * 63 * SECTOR * 20,
    blockSize: 2 * M,
    parentFile: 'parent.vhd',
    group: 8,
    vhdimount: true,
    locators: () => [{ code: 'W2ku', text: 'C:\\vms\\parent.vhd' }, { code: 'W2ru', text: '.\\parent.vhd' }],
  },
  {
    name: 'MacX (file URL with a space) only, 512 KiB blocks',
    size: 16 * 63 * SECTOR * 18, // 18 cylinders: 9.3 MB
    parentSize: 16 * 63 * SECTOR * 18,
    blockSize: 512 * 1024,
    parentFile: 'base image.vhd',
    group: 8,
    vhdimount: true,
    locators: (dir) => [{ code: 'MacX', text: `file://${encodeURI(join(dir, 'base image.vhd'))}` }],
  },
  {
    // libvhdi 20210425 reads a sector whose bitmap bit is clear from the child, not the parent, when
    // an earlier bit of the same bitmap byte is set (sector 584 set, 585..591 clear: 585..591 read as
    // the child's zeros); and it fails (EIO) on a parent shorter than the child. The specification
    // gives one bit per sector, so here the model is the oracle (zeros past the parent's end).
    name: 'single sectors (one bitmap bit each), W2ru only, a parent shorter than the child: compared with the model',
    size: 16 * 63 * SECTOR * 12,
    parentSize: 16 * 63 * SECTOR * 5,
    blockSize: 2 * M,
    parentFile: 'parent.vhd',
    group: 1,
    vhdimount: false,
    locators: () => [{ code: 'W2ru', text: '.\\parent.vhd' }],
  },
];

describe('differencing VHDs read like vhdimount and like the model', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'imgmount-vpc-diff-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  for (const [index, c] of CASES.entries()) {
    it(c.name, TIMEOUT, async () => {
      const caseDir = join(dir, `case${index}`);
      await run('mkdir', ['-p', caseDir]);
      const parentPath = join(caseDir, c.parentFile);
      await qemuImg(['create', '-q', '-f', 'vpc', '-o', 'force_size=on', parentPath, String(c.parentSize)]);
      await qemuIo(parentPath, [`write -P 0x5a 0 ${c.parentSize}`, `write -P 0x17 ${c.blockSize - 1000} 3000`], 'vpc');
      const parent = await qemuConvertToRaw(parentPath, caseDir, 'vpc');
      const identity = await footerIdentity(parentPath);
      const childPath = join(caseDir, 'child.vhd');
      const sectors = childSectors(c.size, c.blockSize, 0x5eed + index, c.group);
      await writeSparseVhd(childPath, {
        size: c.size,
        blockSize: c.blockSize,
        chs: chsFor(c.size),
        creatorApp: 'vpc ',
        sectors,
        parent: { uuid: identity.uuid, timestamp: identity.timestamp, name: c.parentFile, locators: c.locators(caseDir) },
      });

      const described = await vhdiinfo(childPath);
      expect(described).toMatch(/Disk type\s*:\s*Differential/);
      expect(described).toContain(`Media size\t\t: `);
      expect(described).toContain(`(${c.size} bytes)`);
      const uuidHex = identity.uuid.toString('hex');
      const uuidText = `${uuidHex.slice(0, 8)}-${uuidHex.slice(8, 12)}-${uuidHex.slice(12, 16)}-${uuidHex.slice(16, 20)}-${uuidHex.slice(20)}`;
      expect(described).toContain(uuidText);
      expect(described).toMatch(new RegExp(`Parent filename\\s*: ${c.parentFile.replace('.', '\\.')}\n`));

      const expected = model(parent, c.size, sectors);
      if (c.vhdimount) {
        const theirs = await readThroughVhdimount(childPath, caseDir);
        expect(theirs.length).toBe(c.size);
        expect(theirs.equals(expected), 'vhdimount reads the model').toBe(true);
      }

      const notices: string[] = [];
      const childBefore = await readFile(childPath);
      const image = await openImage(childPath, { notice: (line) => notices.push(line) });
      try {
        expect(image.format).toBe('vpc');
        expect(image.readOnly, 'differencing VHDs open read-write (test/vpc-differencing-write.test.ts)').toBe(false);
        expect(notices).toEqual([]);
        expect(image.backing?.path).toBe(parentPath);
        expect(image.length).toBe(c.size);
        const ours = await readAll(image, 4097);
        expect(ours.equals(expected), 'ours reads the model (and so what vhdimount reads)').toBe(true);
        const info = await image.info();
        expect(info.backingFilename).toBeDefined();
        expect(info.backingFormat).toBe('vpc');
        // map: every written sector is this layer's data, the rest the parent's (or zeros past it)
        const runs = await image.map();
        for (const run of runs) {
          for (let s = run.offset / SECTOR; s < (run.offset + run.length) / SECTOR; s++) {
            const inChild = sectors.has(s);
            if (run.depth === 0 && run.data) expect(inChild, `sector ${s}`).toBe(true);
            else expect(inChild, `sector ${s}`).toBe(false);
          }
        }
      } finally {
        await image.close();
      }
      expect((await readFile(childPath)).equals(childBefore), 'a read-write open without writes changed nothing').toBe(true);
    });
  }
});

describe('differencing VHD parents', () => {
  it('a missing parent is named; a VHD that is not the parent (its UUID) is refused; a parent that is not a VHD is refused as one', TIMEOUT, async () => {
    const work = await makeTempDir();
    const childPath = join(work, 'child.vhd');
    const size = 16 * 63 * SECTOR * 8;
    const plan = {
      size,
      blockSize: 2 * M,
      chs: chsFor(size),
      sectors: new Map([[3, Buffer.alloc(SECTOR, 7)]]),
      parent: { uuid: Buffer.alloc(16, 1), timestamp: 1, name: 'gone.vhd', locators: [{ code: 'W2ru' as const, text: '.\\gone.vhd' }] },
    };
    await writeSparseVhd(childPath, plan);
    await expect(openImage(childPath, { readOnly: true })).rejects.toThrow(/gone\.vhd/);
    // A VHD at the parent's name that is not the parent (another UUID): refused, naming both UUIDs.
    await qemuImg(['create', '-q', '-f', 'vpc', '-o', 'force_size=on', join(work, 'gone.vhd'), String(size)]);
    const other = (await footerIdentity(join(work, 'gone.vhd'))).uuid.toString('hex');
    const error = await openImage(childPath, { readOnly: true }).then(() => undefined, (reason: unknown) => reason as Error);
    expect(error?.message).toContain(`its parent ${join(work, 'gone.vhd')} is not the VHD it was made over: the dynamic header's parent_unique_id is 01010101-0101-0101-0101-010101010101, the parent's footer has ${other.slice(0, 8)}-`);
    await rm(join(work, 'gone.vhd'));
    await qemuImg(['create', '-q', '-f', 'raw', join(work, 'gone.vhd'), String(size)]);
    await expect(openImage(childPath, { readOnly: true })).rejects.toThrow(/no VHD footer \(cookie "conectix"\) at offset 0 or at the end of the file/);
  });
});
