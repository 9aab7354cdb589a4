/**
 * Writing differencing VHDs and creating them with `-b`, which qemu 7.2
 * cannot do. The parent is made by qemu-img (from random bytes); the child by
 * our `create -b`. Oracles: a model (the parent's bytes as qemu-img convert
 * reads them, overlaid with the writes), vhdimount (libvhdi's FUSE mount) for
 * 4 KiB-aligned writes (libvhdi 20210425 misreads a clear bitmap bit that
 * follows a set one in the same byte, see test/vpc-differencing.test.ts),
 * vhdiinfo for the headers, and the header bytes decoded here from the
 * specification. The parent's bytes (sha-256) never change.
 */
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { BlockImage, convertImage, createImage, openImage } from '../src/index.js';
import { ImageFileGate } from '../src/block/gate.js';
import { vpc } from '../src/formats/vpc/index.js';
import { IMGMOUNT as BIN } from './helpers/bundle.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuIo, readAll, run } from './helpers/qemu.js';
import { seededRandom } from './helpers/random.js';
import { footerIdentity, SECTOR } from './helpers/vhd-layout.js';
import { recordingProtocol, subsets, type Recorded } from './helpers/recording-protocol.js';

const M = 1024 * 1024;
const TIMEOUT = { timeout: 120_000 };

async function sha(path: string): Promise<string> {
  return createHash('sha256').update(await readFile(path)).digest('hex');
}

/** A VHD parent made by qemu-img from `size` seeded random bytes; returns its bytes as qemu reads them. */
async function makeParent(dir: string, name: string, size: number, seed: number): Promise<{ path: string; bytes: Buffer }> {
  const raw = join(dir, `${name}.raw`);
  const data = Buffer.alloc(size);
  seededRandom(seed).fill(data);
  await writeFile(raw, data);
  const path = join(dir, name);
  await qemuImg(['convert', '-q', '-f', 'raw', '-O', 'vpc', '-o', 'force_size=on', raw, path]);
  await rm(raw);
  return { path, bytes: await qemuConvertToRaw(path, dir, 'vpc') };
}

/** Reads the top layer through vhdimount in a private directory, always unmounted. */
async function readThroughVhdimount(path: string, cwd: string): Promise<Buffer> {
  const mountPoint = await mkdtemp(join(tmpdir(), 'imgmount-vhdimount-'));
  try {
    const mounted = await run('vhdimount', [path, mountPoint], { cwd });
    if (mounted.code !== 0) throw new Error(`vhdimount exited ${mounted.code}: ${mounted.stdout}${mounted.stderr}`);
    try {
      const layers = (await readdir(mountPoint)).filter((name) => /^vhdi\d+$/.test(name)).sort((a, b) => Number(a.slice(4)) - Number(b.slice(4)));
      return await readFile(join(mountPoint, layers[layers.length - 1]!));
    } finally {
      await new Promise<void>((done) => execFile('fusermount', ['-u', mountPoint], () => done()));
    }
  } finally {
    await rm(mountPoint, { recursive: true, force: true });
  }
}

async function vhdiinfo(path: string): Promise<string> {
  const result = await run('vhdiinfo', [path]);
  if (result.code !== 0) throw new Error(`vhdiinfo ${path} exited ${result.code}: ${result.stdout}${result.stderr}`);
  return result.stdout;
}

function uuidText(bytes: Buffer): string {
  const hex = bytes.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** The dynamic header's parent fields, decoded from the specification's layout (not from src/). */
function parentFields(image: Buffer): { uuid: Buffer; timestamp: number; name: string; locators: Record<string, string> } {
  const header = image.subarray(Number(image.readBigUInt64BE(16)), Number(image.readBigUInt64BE(16)) + 1024);
  expect(header.subarray(0, 8).toString('latin1')).toBe('cxsparse');
  const name = Buffer.from(header.subarray(64, 576)).swap16().toString('utf16le').replace(/\0.*$/s, '');
  const locators: Record<string, string> = {};
  for (let i = 0; i < 8; i++) {
    const at = 576 + i * 24;
    const code = header.subarray(at, at + 4).toString('latin1');
    if (code === '\0\0\0\0') continue;
    const length = header.readUInt32BE(at + 8);
    const offset = Number(header.readBigUInt64BE(at + 16));
    const data = image.subarray(offset, offset + length);
    locators[code] = code === 'MacX' ? data.toString('utf8') : data.toString('utf16le');
  }
  return { uuid: Buffer.from(header.subarray(40, 56)), timestamp: header.readUInt32BE(56), name, locators };
}

interface Write {
  offset: number;
  data: Buffer;
}

/** Seeded writes: unaligned and sub-sector (or 4 KiB-aligned), some crossing block boundaries, some rewriting earlier ones. */
function randomWrites(size: number, blockSize: number, seed: number, aligned: boolean, count: number): Write[] {
  const random = seededRandom(seed);
  const writes: Write[] = [];
  for (let i = 0; i < count; i++) {
    let offset: number;
    let length: number;
    const kind = random.int(0, 3);
    if (kind === 0) {
      // across a block boundary
      const boundary = random.int(1, Math.floor((size - 1) / blockSize)) * blockSize;
      offset = boundary - random.int(1, 70_000);
      length = random.int(2, 140_000);
    } else if (kind === 1) {
      // inside one sector
      offset = random.int(0, size - 1);
      length = random.int(1, SECTOR - (offset % SECTOR));
    } else {
      offset = random.int(0, size - 1);
      length = random.int(1, 20_000);
    }
    if (aligned) {
      offset = Math.floor(offset / 4096) * 4096;
      length = Math.max(4096, Math.ceil(length / 4096) * 4096);
    }
    offset = Math.max(0, offset);
    length = Math.min(length, size - offset);
    const data = Buffer.alloc(length);
    random.fill(data);
    writes.push({ offset, data });
  }
  return writes;
}

describe('writing a differencing VHD made by create -b', () => {
  for (const aligned of [false, true]) {
    it(`${aligned ? '4 KiB-aligned' : 'unaligned and sub-sector'} seeded writes read like the model${aligned ? ' and like vhdimount' : ''}; the parent is never written`, TIMEOUT, async () => {
      const dir = await makeTempDir();
      const size = 9 * M + 7 * SECTOR; // the last block is partial
      const parent = await makeParent(dir, 'parent.vhd', size, aligned ? 11 : 12);
      const parentSha = await sha(parent.path);
      const child = join(dir, 'child.vhd');
      await createImage(child, 'vpc', { backingFile: 'parent.vhd' });
      const model = Buffer.from(parent.bytes);

      const writes = randomWrites(size, 2 * M, aligned ? 0xa11 : 0xb22, aligned, 150);
      let image = await openImage(child);
      expect([image.readOnly, image.length, image.backing?.path]).toEqual([false, size, parent.path]);
      for (const [i, write] of writes.entries()) {
        await image.write(write.offset, write.data);
        write.data.copy(model, write.offset);
        if (i % 50 === 49) {
          // reopened part-way: what is on disk (BAT, bitmaps) reads the same
          await image.close();
          image = await openImage(child);
        }
      }
      // concurrent writes into one block (disjoint ranges, some sharing a sector and a bitmap byte)
      const base = aligned ? 4 * M + 4096 : 4 * M + 1000;
      await Promise.all(
        Array.from({ length: 12 }, (_, i) => {
          const at = base + i * (aligned ? 8192 : 300);
          const data = Buffer.alloc(aligned ? 4096 : 200, 0xc0 + i);
          data.copy(model, at);
          return image.write(at, data);
        }),
      );
      // concurrent writes again, into the gaps: some only into sectors the child owns now (unlocked),
      // some claiming sectors next to owned ones (locked); no write may undo another's bytes
      await Promise.all(
        Array.from({ length: 12 }, (_, i) => {
          const at = base + i * (aligned ? 8192 : 300) + (aligned ? 4096 : 200) - (i % 2 === 0 ? 0 : aligned ? 4096 : 150);
          const data = Buffer.alloc(aligned ? 4096 : 100, 0xd0 + i);
          data.copy(model, at);
          return image.write(at, data);
        }),
      );
      expect((await readAll(image)).equals(model), 'ours reads the model before close').toBe(true);
      await image.close();

      image = await openImage(child, { readOnly: true });
      expect((await readAll(image, 65537)).equals(model), 'ours reads the model after reopening').toBe(true);
      // map: this layer holds only sectors some write touched
      const touched = new Set<number>();
      for (const write of writes) for (let s = Math.floor(write.offset / SECTOR); s < Math.ceil((write.offset + write.data.length) / SECTOR); s++) touched.add(s);
      for (const run of await image.map()) {
        if (run.depth !== 0 || !run.data) continue;
        for (let s = run.offset / SECTOR; s < (run.offset + run.length) / SECTOR; s++) {
          if (!touched.has(s) && !(s * SECTOR >= base && s * SECTOR < base + 12 * 8192)) throw new Error(`sector ${s} is in the child but no write touched it`);
        }
      }
      await image.close();
      if (aligned) {
        const theirs = await readThroughVhdimount(child, dir);
        expect(theirs.length).toBe(size);
        expect(theirs.equals(model), 'vhdimount reads the model').toBe(true);
      }
      expect(await sha(parent.path), 'the parent is never written').toBe(parentSha);
    });
  }

  it('a partly written sector keeps the parent\'s other bytes (never zeros); zeroing hides the parent; discard is not offered', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const size = 4 * M;
    const parent = await makeParent(dir, 'p.vhd', size, 5);
    const parentSha = await sha(parent.path);
    const child = join(dir, 'c.vhd');
    await createImage(child, 'vpc', { backingFile: parent.path });
    const model = Buffer.from(parent.bytes);
    const image = await openImage(child);
    // one byte in an unallocated block, then one byte in the same (now allocated) block's next sector
    for (const [at, byte] of [[1000, 0x01], [1600, 0x02], [2 * M - 1, 0x03], [2 * M, 0x04]] as const) {
      await image.write(at, Buffer.from([byte]));
      model[at] = byte;
    }
    await image.zero(3 * M + 100, 5000);
    model.fill(0, 3 * M + 100, 3 * M + 5100);
    expect((await readAll(image)).equals(model)).toBe(true);
    await expect(image.discard(0, 4096)).rejects.toMatchObject({ errno: 95, message: expect.stringMatching(/do not support discard/) });
    await image.close();
    const reopened = await openImage(child, { readOnly: true });
    const ours = await readAll(reopened);
    await reopened.close();
    expect(ours.equals(model)).toBe(true);
    // the sectors around the bytes hold the parent's bytes, not zeros (the parent has no zero sector there)
    expect(ours.subarray(512, 1024).equals(parent.bytes.subarray(512, 1024).fill(0x01, 1000 - 512, 1001 - 512))).toBe(true);
    expect(await sha(parent.path)).toBe(parentSha);
  });

  it('a child larger than its parent: partly written sectors past the parent\'s end keep zeros, below it the parent\'s bytes', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const parent = await makeParent(dir, 'small.vhd', 3 * M, 7);
    const child = join(dir, 'big.vhd');
    await createImage(child, 'vpc', { backingFile: 'small.vhd', size: 7 * M });
    const model = Buffer.alloc(7 * M);
    parent.bytes.copy(model);
    const image = await openImage(child);
    expect(image.length).toBe(7 * M);
    for (const [at, length] of [[3 * M - 300, 600], [4 * M + 77, 3], [2 * M - 5, 10]] as const) {
      const data = Buffer.alloc(length, 0xee);
      await image.write(at, data);
      data.copy(model, at);
    }
    // zeroing where the parent reads as zeros already (past its end: block 3) allocates nothing;
    // zeroing over the parent's data (sectors of block 0 the child does not own) writes zeros there
    const sizeBefore = (await stat(child)).size;
    await image.zero(6 * M, M);
    expect((await stat(child)).size, 'no block allocated for zeros over zeros').toBe(sizeBefore);
    await image.zero(100, 1000);
    model.fill(0, 100, 1100);
    expect((await readAll(image)).equals(model), 'the zeroed parent bytes read as zeros').toBe(true);
    await image.close();
    const reopened = await openImage(child, { readOnly: true });
    expect((await readAll(reopened)).equals(model)).toBe(true);
    await reopened.close();
  });
});

describe('crash states of an allocating write into a differencing VHD', () => {
  it('every crash state opens (here and in vhdiinfo) and reads each block wholly old or wholly new', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const parent = await makeParent(dir, 'parent.vhd', 9 * M, 21);
    const parentSha = await sha(parent.path);
    const before = join(dir, 'before.vhd');
    await createImage(before, 'vpc', { backingFile: 'parent.vhd' });
    const first = await openImage(before);
    await first.write(100, Buffer.alloc(4000, 0x21)); // block 0 allocated, sectors 0..8 owned
    await first.close();
    const reader = await openImage(before, { readOnly: true });
    const oldBytes = await readAll(reader);
    await reader.close();
    const working = join(dir, 'working.vhd');
    await copyFile(before, working);

    const { protocol, log } = await recordingProtocol(working);
    const files = new ImageFileGate(working, {}, true);
    const backing = await openImage(parent.path, { readOnly: true });
    const image = new BlockImage({ path: working, format: 'vpc', file: protocol, image: await vpc.open(protocol, { readOnly: false, files }), gate: files, backing });
    // into allocated block 0 (unowned sectors), blocks 1 and 2 whole, block 3 in part, unaligned at both ends
    const data = Buffer.alloc(5 * M + 1234, 0x5c);
    const at = 2 * M - 777;
    await image.write(at, data);
    await image.close();
    await backing.close();
    const newBytes = Buffer.from(oldBytes);
    data.copy(newBytes, at);

    const epochs: Recorded[][] = [[]];
    for (const entry of log) {
      if (entry === 'flush') epochs.push([]);
      else epochs[epochs.length - 1]!.push(entry);
    }
    let states = 0;
    const base = await readFile(before);
    for (let e = 0; e < epochs.length; e++) {
      const epoch = epochs[e]!;
      for (const kept of epoch.length <= 6 ? subsets(epoch) : [epoch]) {
        let file = Buffer.from(base);
        for (const write of [...epochs.slice(0, e).flat(), ...kept]) {
          if (write.offset + write.data.length > file.length) file = Buffer.concat([file, Buffer.alloc(write.offset + write.data.length - file.length)]);
          write.data.copy(file, write.offset);
        }
        const state = join(dir, `state-${states++}.vhd`);
        await writeFile(state, file);
        expect(await vhdiinfo(state)).toMatch(/Disk type\s*:\s*Differential/);
        const opened = await openImage(state, { readOnly: true });
        const ours = await readAll(opened);
        await opened.close();
        for (let block = 0; block * 2 * M < ours.length; block++) {
          const range = [block * 2 * M, Math.min(ours.length, (block + 1) * 2 * M)] as const;
          const piece = ours.subarray(...range);
          const isOld = piece.equals(oldBytes.subarray(...range));
          const isNew = piece.equals(newBytes.subarray(...range));
          expect(isOld || isNew, `state ${states - 1}, block ${block}: old or new bytes`).toBe(true);
        }
        if (e === epochs.length - 1 && kept.length === epoch.length) expect(ours.equals(newBytes), 'the last state reads the new bytes').toBe(true);
        await rm(state);
      }
    }
    expect(states).toBeGreaterThan(10);
    expect(await sha(parent.path)).toBe(parentSha);
  });
});

describe('create -f vpc -b', () => {
  it('names the parent as vhdiinfo reads it: UUID, file name, mtime, W2ku/W2ru/MacX locators; reopened by us over the parent', TIMEOUT, async () => {
    const dir = await makeTempDir();
    await mkdir(join(dir, 'base dir'));
    await mkdir(join(dir, 'kids'));
    const parent = await makeParent(join(dir, 'base dir'), 'parent.vhd', 6 * M + 512, 31);
    const parentSha = await sha(parent.path);
    const child = join(dir, 'kids', 'child.vhd');
    const created = await run(BIN, ['create', '-f', 'vpc', '-b', '../base dir/parent.vhd', '-F', 'vpc', child]);
    expect(created.code, created.stderr).toBe(0);

    const described = await vhdiinfo(child);
    const identity = await footerIdentity(parent.path);
    expect(described).toMatch(/Disk type\s*:\s*Differential/);
    expect(described).toContain(`(${6 * M + 512} bytes)`);
    expect(described).toMatch(new RegExp(`Parent identifier\\s*: ${uuidText(identity.uuid)}`));
    expect(described).toMatch(/Parent filename\s*: parent\.vhd\n/);

    const fields = parentFields(await readFile(child));
    expect(fields.uuid.equals(identity.uuid)).toBe(true);
    expect(fields.name).toBe('parent.vhd');
    expect(fields.timestamp).toBe(Math.floor((await stat(parent.path)).mtimeMs / 1000) - 946684800);
    expect(fields.locators).toEqual({
      W2ku: parent.path.replace(/\//g, '\\'),
      W2ru: '..\\base dir\\parent.vhd',
      MacX: pathToFileURL(parent.path).href,
    });

    const info = await run(BIN, ['info', '--output=json', child]);
    expect(info.code, info.stderr).toBe(0);
    const json = JSON.parse(info.stdout) as Record<string, unknown>;
    expect([json['format'], json['virtual-size'], json['backing-filename-format'], json['full-backing-filename']]).toEqual(['vpc', 6 * M + 512, 'vpc', parent.path]);

    const image = await openImage(child);
    expect((await readAll(image)).equals(parent.bytes), 'a new child reads its parent').toBe(true);
    await image.write(5, Buffer.from('hello'));
    await image.close();
    expect(await sha(parent.path)).toBe(parentSha);
  });

  it('convert -O vpc -B PARENT.vhd writes only what the top stores into a differencing VHD; vhdimount and qemu agree', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const parent = await makeParent(dir, 'base.vhd', 6 * M, 41);
    const parentSha = await sha(parent.path);
    const top = join(dir, 'top.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.vhd', '-F', 'vpc', top]);
    await qemuIo(top, ['write -P 0x61 64k 192k', 'write -z 2M 64k', 'write -P 0x62 5M 1M'], 'qcow2');
    const expected = await qemuConvertToRaw(top, dir, 'qcow2');
    const dest = join(dir, 'dest.vhd');
    await convertImage(top, dest, { targetFormat: 'vpc', backingFile: 'base.vhd', backingFormat: 'vpc' });
    const image = await openImage(dest, { readOnly: true });
    expect(image.backing?.path).toBe(parent.path);
    expect((await readAll(image)).equals(expected), 'ours reads what qemu reads of the top').toBe(true);
    const own = (await image.map()).filter((run) => run.depth === 0 && run.data).map((run) => [run.offset, run.length]);
    await image.close();
    expect(own).toEqual([[64 * 1024, 192 * 1024], [2 * M, 64 * 1024], [5 * M, M]]);
    expect((await readThroughVhdimount(dest, dir)).equals(expected), 'vhdimount reads the same').toBe(true);
    expect(await sha(parent.path)).toBe(parentSha);
  });

  it('refuses a parent that is not a VHD, a fixed subformat and a wrong -F by name, creating nothing', TIMEOUT, async () => {
    const dir = await makeTempDir();
    const raw = join(dir, 'disk.raw');
    await writeFile(raw, Buffer.alloc(M));
    const parent = await makeParent(dir, 'p.vhd', M, 1);
    const child = join(dir, 'c.vhd');
    const refusals: Array<[Parameters<typeof createImage>[2], RegExp]> = [
      [{ backingFile: raw }, /vpc images cannot be created with a backing file of format raw .*a differencing VHD's parent must be a VHD \(vpc\)/],
      [{ backingFile: parent.path, options: { subformat: 'fixed' } }, /subformat fixed cannot have a backing file/],
      [{ backingFile: parent.path, backingFormat: 'qcow2' }, /qcow2|not a/],
      [{ backingFile: join(dir, 'missing.vhd') }, /missing\.vhd/],
    ];
    for (const [options, message] of refusals) {
      await expect(createImage(child, 'vpc', options)).rejects.toThrow(message);
      await expect(stat(child)).rejects.toThrow(/ENOENT/);
    }
  });
});
