/**
 * Probing refuses every format we cannot read yet, by name, and opens a file
 * as raw only when nothing matches or with `format: 'raw'`. qemu-img is the
 * oracle: it makes an image of every format it can create (and for the
 * hand-built bochs and cloop files, it reads them as those formats). The
 * content decides, not the name: each image is refused again under a neutral
 * name. Then the raw write guard: an image probed as raw refuses (EPERM) a
 * write that would make it probe as another format next time.
 */
import { readFile, rename, stat, writeFile } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { dirname, join } from 'node:path';
import { deflateSync } from 'node:zlib';
import { describe, expect, test } from 'vitest';
import { BlockError, defaultFormats, openImage, PROBE_HEAD_BYTES, PROBE_TAIL_BYTES } from '../src/index.js';
import { buildDmg } from './helpers/dmg-writer.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuInfo, qemuIo, readAll, readBytes, run, seededBytes, skipWithoutQemu } from './helpers/qemu.js';

const MiB = 1024 * 1024;
const { EPERM, ENOTSUP } = osConstants.errno;

async function rejection(promise: Promise<unknown>): Promise<BlockError> {
  const error = await promise.then(
    () => undefined,
    (reason: unknown) => reason,
  );
  if (!(error instanceof BlockError)) throw new Error(`expected a BlockError, got ${String(error)}`);
  return error;
}

/** `path` is refused as `format` (read-write and read-only), and opens as raw with `format: 'raw'`. */
async function expectRefused(path: string, format: string): Promise<void> {
  for (const readOnly of [false, true]) {
    const error = await rejection(openImage(path, { readOnly }));
    expect(error.message).toBe(`${path}: ${format} images are not supported yet`);
    expect(error.errno).toBe(ENOTSUP);
  }
  const image = await openImage(path, { format: 'raw' });
  try {
    expect(image.format).toBe('raw');
    expect(image.length).toBe((await stat(path)).size);
  } finally {
    await image.close();
  }
}

/**
 * As expectRefused, then again after renaming the file (in its directory, where a VMDK descriptor's
 * extents are) to image.img and to a name without extension; returns the last name.
 */
async function expectRefusedUnderAnyName(path: string, format: string): Promise<string> {
  await expectRefused(path, format);
  let current = path;
  for (const name of ['image.img', 'image']) {
    const renamed = join(dirname(path), name);
    await rename(current, renamed);
    await expectRefused(renamed, format);
    current = renamed;
  }
  return current;
}

/** Opens (probing) as `format` under its name and neutral ones, read-only with a notice, reading `expected`. */
async function expectOpensUnderAnyName(path: string, format: string, expected: Buffer): Promise<void> {
  let current = path;
  for (const name of [undefined, 'image.img', 'image']) {
    if (name !== undefined) {
      const renamed = join(dirname(path), name);
      await rename(current, renamed);
      current = renamed;
    }
    const notices: string[] = [];
    const image = await openImage(current, { notice: (line) => notices.push(line) });
    try {
      expect(image.format).toBe(format);
      expect(image.readOnly).toBe(true);
      expect(notices.join('\n')).toContain(`${current}: opened read-only`);
      const bytes = Buffer.alloc(image.length);
      await image.read(0, bytes);
      expect(bytes.equals(expected)).toBe(true);
    } finally {
      await image.close();
    }
  }
}

/** Opens without a format: must be raw, the whole file. */
async function expectRaw(path: string): Promise<void> {
  const image = await openImage(path);
  try {
    expect(image.format).toBe('raw');
    expect(image.length).toBe((await stat(path)).size);
  } finally {
    await image.close();
  }
}

/** What probing concludes for a file with this content (ignoring its name). */
function probeContent(content: Buffer): string {
  const head = Buffer.alloc(PROBE_HEAD_BYTES);
  content.copy(head, 0, 0, Math.min(content.length, PROBE_HEAD_BYTES));
  const tail = content.subarray(content.length - Math.min(PROBE_TAIL_BYTES, content.length));
  return defaultFormats.best({ head, tail, fileSize: content.length, filename: 'x' }).name;
}

async function qemuFormat(path: string): Promise<string> {
  return (await qemuInfo(path)).format as string;
}

// ---- files qemu-img cannot create, built from each format's layout ----

/** A Bochs "Growing" redolog image (bximage's layout) of 1 MiB, every extent unallocated. */
function bochsImage(options: { version?: number; type?: string; subtype?: string; magic?: string } = {}): Buffer {
  const version = options.version ?? 0x00020000;
  const diskSize = MiB;
  const extentSize = 64 * 1024;
  const catalogEntries = diskSize / extentSize;
  const header = Buffer.alloc(512);
  header.write(options.magic ?? 'Bochs Virtual HD Image', 0, 'latin1');
  header.write(options.type ?? 'Redolog', 32, 'latin1');
  header.write(options.subtype ?? 'Growing', 48, 'latin1');
  header.writeUInt32LE(version, 64);
  header.writeUInt32LE(512, 68); // header size: the catalog follows
  header.writeUInt32LE(catalogEntries, 72);
  header.writeUInt32LE(512, 76); // bitmap bytes per extent
  header.writeUInt32LE(extentSize, 80);
  header.writeBigUInt64LE(BigInt(diskSize), version === 0x00010000 ? 84 : 88);
  return Buffer.concat([header, Buffer.alloc(catalogEntries * 4, 0xff)]);
}

const CLOOP_SCRIPT = '#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n';

/** A cloop V2.0 file: the script header (128 bytes), block size and count, offsets, zlib blocks. */
function cloopImage(data: Buffer, blockSize = 64 * 1024, script = CLOOP_SCRIPT): Buffer {
  const header = Buffer.alloc(128 + 8);
  header.write(script, 0, 'latin1');
  const blocks: Buffer[] = [];
  for (let offset = 0; offset < data.length; offset += blockSize) blocks.push(deflateSync(data.subarray(offset, offset + blockSize)));
  header.writeUInt32BE(blockSize, 128);
  header.writeUInt32BE(blocks.length, 132);
  const offsets = Buffer.alloc((blocks.length + 1) * 8);
  let position = header.length + offsets.length;
  for (let i = 0; i <= blocks.length; i++) {
    offsets.writeBigUInt64BE(BigInt(position), i * 8);
    position += blocks[i]?.length ?? 0;
  }
  return Buffer.concat([header, offsets, ...blocks]);
}

/** An UDIF (DMG) file: data, then the 512-byte "koly" trailer. */
function dmgImage(data: Buffer): Buffer {
  const trailer = Buffer.alloc(512);
  trailer.write('koly', 0, 'latin1');
  trailer.writeUInt32BE(4, 4); // version
  trailer.writeUInt32BE(512, 8); // header size
  trailer.writeBigUInt64BE(0n, 24); // data fork offset
  trailer.writeBigUInt64BE(BigInt(data.length), 32); // data fork length
  trailer.writeBigUInt64BE(BigInt(data.length / 512), 492); // sector count
  return Buffer.concat([data, trailer]);
}

/** A VHD footer of a fixed disk of `size` bytes (big-endian fields). */
function vhdFooter(size: number): Buffer {
  const footer = Buffer.alloc(512);
  footer.write('conectix', 0, 'latin1');
  footer.writeUInt32BE(2, 8); // features: reserved bit
  footer.writeUInt32BE(0x00010000, 12); // version
  footer.writeBigUInt64BE(0xffffffffffffffffn, 16); // data offset: none (fixed)
  footer.write('d2v ', 28, 'latin1'); // disk2vhd: the size is current_size, not the (empty) geometry
  footer.writeBigUInt64BE(BigInt(size), 40);
  footer.writeBigUInt64BE(BigInt(size), 48);
  footer.writeUInt32BE(2, 60); // disk type: fixed
  let sum = 0;
  for (const byte of footer) sum = (sum + byte) >>> 0;
  footer.writeUInt32BE(~sum >>> 0, 64); // one's complement of the byte sum
  return footer;
}

/** A VMDK3 (ESX "COWD") sparse header. */
function cowdImage(): Buffer {
  const header = Buffer.alloc(2048);
  header.write('COWD', 0, 'latin1');
  header.writeUInt32LE(1, 4); // version
  header.writeUInt32LE(3, 8); // flags
  header.writeUInt32LE(2048, 12); // disk sectors
  header.writeUInt32LE(1, 16); // granularity
  header.writeUInt32LE(4, 20); // l1dir offset (sectors)
  header.writeUInt32LE(1, 24); // l1dir size
  return header;
}

function luksHeader(version: number): Buffer {
  const header = Buffer.alloc(4096);
  Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]).copy(header, 0);
  header.writeUInt16BE(version, 6);
  header.write('aes', 8, 'latin1');
  header.write('xts-plain64', 40, 'latin1');
  return header;
}

function qcowHeader(version: number): Buffer {
  const header = Buffer.alloc(512);
  Buffer.from([0x51, 0x46, 0x49, 0xfb]).copy(header, 0);
  header.writeUInt32BE(version, 4);
  return header;
}

describe.skipIf(skipWithoutQemu('probing images qemu-img makes'))('probing images qemu-img makes', () => {
  interface Case {
    title: string;
    format: string;
    file: string;
    options: string[];
    /** What qemu-img info (probing) calls the file, when not `format`. */
    qemuSays?: string;
  }
  const SECRET = ['--object', 'secret,id=sec0,data=abc'];
  const cases: Case[] = [
    { title: 'luks', format: 'luks', file: 'disk.luks', options: ['-f', 'luks', ...SECRET, '-o', 'key-secret=sec0,iter-time=10'] },
  ];

  // Formats this library reads now: probed under any name and read like qemu-img convert -O raw.
  const readable: Case[] = [
    { title: 'qcow (version 1)', format: 'qcow', file: 'disk.qcow', options: ['-f', 'qcow'] },
    { title: 'parallels', format: 'parallels', file: 'disk.hdd', options: ['-f', 'parallels'] },
  ];

  test.each(readable)('$title: opens as $format under any name, read-only, and reads like qemu-img convert', async ({ format, file, options }) => {
    const dir = await makeTempDir();
    const path = join(dir, file);
    await qemuImg(['create', '-q', ...options, path, '4M']);
    expect(await qemuFormat(path)).toBe(format);
    await expectOpensUnderAnyName(path, format, await qemuConvertToRaw(path, dir, format));
  });

  // qemu-img create -f luks takes 2-5 s on a busy 2-core machine (key setup), past vitest's default 5 s.
  test.each(cases)('$title: refused by name under any name; qemu-img agrees on the format', { timeout: 30_000 }, async ({ format, file, options, qemuSays }) => {
    const dir = await makeTempDir();
    const path = join(dir, file);
    await qemuImg(['create', '-q', ...options, path, '4M']);
    expect(await qemuFormat(path)).toBe(qemuSays ?? format);
    const last = await expectRefusedUnderAnyName(path, format);
    expect(await qemuFormat(last)).toBe(qemuSays ?? format);
  });

  test('vhdx (now read): probed as vhdx under any name, as qemu-img does, and reads like qemu-img convert', async () => {
    const dir = await makeTempDir();
    let current = join(dir, 'disk.vhdx');
    await qemuImg(['create', '-q', '-f', 'vhdx', current, '4M']);
    await qemuIo(current, ['write -P 0x5a 1000 3000'], 'vhdx');
    const expected = await qemuConvertToRaw(current, dir, 'vhdx');
    for (const name of ['image.img', 'image', 'disk.vhdx']) {
      expect(await qemuFormat(current)).toBe('vhdx');
      const image = await openImage(current, { readOnly: true });
      try {
        expect(image.format).toBe('vhdx');
        expect((await readAll(image)).equals(expected)).toBe(true);
      } finally {
        await image.close();
      }
      const renamed = join(dir, name);
      await rename(current, renamed);
      current = renamed;
    }
  });

  test.each(['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat', 'streamOptimized'])(
    'vmdk %s: probes and opens as vmdk under any name (the descriptor, for the multi-file ones), reading like qemu-img convert',
    async (subformat) => {
      const dir = await makeTempDir();
      let path = join(dir, 'disk.vmdk');
      await qemuImg(['create', '-q', '-f', 'vmdk', '-o', `subformat=${subformat}`, path, '4M']);
      if (subformat !== 'streamOptimized') await qemuIo(path, ['write -P 0x5a 70000 5000'], 'vmdk');
      expect(await qemuFormat(path)).toBe('vmdk');
      const expected = await qemuConvertToRaw(path, dir, 'vmdk');
      for (const name of ['image.img', 'image', 'disk.vmdk']) {
        const image = await openImage(path, { readOnly: true });
        try {
          expect(image.format).toBe('vmdk');
          expect((await readAll(image)).equals(expected)).toBe(true);
        } finally {
          await image.close();
        }
        const renamed = join(dir, name);
        await rename(path, renamed);
        path = renamed;
      }
    },
  );

  test.each([
    { title: 'dynamic', options: [] as string[] },
    { title: 'static', options: ['-o', 'static=on'] },
  ])('vdi $title: probed as vdi under any name (as qemu-img does) and opened, reading like qemu-img convert', async ({ options }) => {
    const dir = await makeTempDir();
    let path = join(dir, 'disk.vdi');
    await qemuImg(['create', '-q', '-f', 'vdi', ...options, path, '4M']);
    for (const name of ['disk.vdi', 'image.img', 'image']) {
      const renamed = join(dir, name);
      if (renamed !== path) await rename(path, renamed);
      path = renamed;
      expect(await qemuFormat(path)).toBe('vdi');
      const image = await openImage(path, { readOnly: true });
      try {
        expect(image.format).toBe('vdi');
        const bytes = Buffer.alloc(image.length, 0xee);
        await image.read(0, bytes);
        expect(bytes.equals(await qemuConvertToRaw(path, dir, 'vdi'))).toBe(true);
      } finally {
        await image.close();
      }
    }
  });

  test('a fixed VHD that qemu probes as raw is a real VHD: qemu-img reads it with -f vpc', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'fixed.vhd');
    await qemuImg(['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', path, '4M']);
    const info = JSON.parse((await qemuImg(['info', '-f', 'vpc', '--output=json', path])).stdout) as Record<string, unknown>;
    expect(info.format).toBe('vpc');
    expect(info['virtual-size']).toBeLessThan((await stat(path)).size);
  });

  // vpc is a real format now (src/formats/vpc): qemu-made VHDs probe and open as vpc under any name.
  const vpcCases = [
    { title: 'vpc dynamic', file: 'disk.vhd', options: ['-o', 'subformat=dynamic'], qemuSays: 'vpc' },
    { title: 'vpc dynamic, force_size', file: 'disk.vpc', options: ['-o', 'subformat=dynamic,force_size=on'], qemuSays: 'vpc' },
    // qemu probes a fixed VHD (its only signature is the footer at the end) as raw; imgmount finds the footer.
    { title: 'vpc fixed', file: 'disk.vhd', options: ['-o', 'subformat=fixed'], qemuSays: 'raw' },
    { title: 'vpc fixed, force_size', file: 'disk.vhd', options: ['-o', 'subformat=fixed,force_size=on'], qemuSays: 'raw' },
  ];
  test.each(vpcCases)('$title: opens as vpc under any name, with the virtual size qemu-img -f vpc gives', async ({ file, options, qemuSays }) => {
    const dir = await makeTempDir();
    let path = join(dir, file);
    await qemuImg(['create', '-q', '-f', 'vpc', ...options, path, '4M']);
    expect(await qemuFormat(path)).toBe(qemuSays);
    const size = (await qemuInfo(path, 'vpc'))['virtual-size'];
    for (const name of [file, 'image.img', 'image']) {
      const renamed = join(dir, name);
      if (renamed !== path) await rename(path, renamed);
      path = renamed;
      const image = await openImage(path, { readOnly: true });
      expect([image.format, image.length]).toEqual(['vpc', size]);
      await image.close();
    }
  });

  test('a fixed VHD with a 511-byte footer (Virtual PC before 2004) probes as vpc and is refused by name', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'old.vhd');
    await qemuImg(['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', path, '4M']);
    const content = await readFile(path);
    await writeFile(path, content.subarray(0, content.length - 1));
    expect(probeContent(content.subarray(0, content.length - 1))).toBe('vpc');
    for (const readOnly of [false, true]) {
      const error = await rejection(openImage(path, { readOnly }));
      expect(error.message).toBe(`${path}: a 511-byte VHD footer (Virtual PC before 2004) is not supported`);
      expect(error.errno).toBe(ENOTSUP);
    }
  });

  test('the extents of multi-file VMDKs: a -flat extent is raw content under a .vmdk name, a -s001 extent alone is refused (it has no descriptor)', async () => {
    const dir = await makeTempDir();
    await qemuImg(['create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', join(dir, 'flat.vmdk'), '4M']);
    await qemuImg(['create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', join(dir, 'split.vmdk'), '4M']);
    const flatExtent = join(dir, 'flat-flat.vmdk');
    const error = await rejection(openImage(flatExtent));
    expect(error.message).toContain('the name says vmdk but the content is not a valid vmdk image (it probes as raw)');
    const image = await openImage(flatExtent, { format: 'raw' });
    expect(image.length).toBe(4 * MiB);
    await image.close();
    // an extent alone has no descriptor (no CID): qemu cannot open it either, and it is not shown as raw
    const extent = join(dir, 'split-s001.vmdk');
    expect((await rejection(openImage(extent))).message).toBe(`${extent}: the VMDK descriptor has no CID line`);
    expect((await run('qemu-img', ['info', extent])).code).not.toBe(0);
  });

  test('qemu reads the hand-built bochs and cloop files as bochs and cloop (the layouts the probe tests use)', async () => {
    const dir = await makeTempDir();
    for (const version of [0x00020000, 0x00010000]) {
      const path = join(dir, `v${version.toString(16)}.bochs`);
      await writeFile(path, bochsImage({ version }));
      const info = await qemuInfo(path);
      expect(info.format).toBe('bochs');
      expect(info['virtual-size']).toBe(MiB);
      expect((await qemuConvertToRaw(path, dir, 'bochs')).equals(Buffer.alloc(MiB))).toBe(true);
    }
    // qemu's bochs probe wants a growing redolog of a known version; anything else is raw to it, as to us.
    for (const [name, content] of [
      ['undoable', bochsImage({ subtype: 'Undoable' })],
      ['version3', bochsImage({ version: 0x00030000 })],
    ] as const) {
      const path = join(dir, `${name}.img`);
      await writeFile(path, content);
      expect(await qemuFormat(path)).toBe('raw');
      await expectRaw(path);
    }
    const data = seededBytes(3, 256 * 1024);
    const cloop = join(dir, 'disk.cloop');
    await writeFile(cloop, cloopImage(data));
    expect(await qemuFormat(cloop)).toBe('cloop');
    expect((await qemuConvertToRaw(cloop, dir, 'cloop')).equals(data)).toBe(true);
  });
});

describe('probing formats qemu-img cannot create (files built from their layouts)', () => {
  async function file(name: string, content: Buffer): Promise<string> {
    const path = join(await makeTempDir(), name);
    await writeFile(path, content);
    return path;
  }

  test('bochs: growing redolog images of versions 1 and 2 open as bochs (1 MiB of zeros, as qemu reads them); other subtypes, versions or magics are raw', async () => {
    await expectOpensUnderAnyName(await file('disk.img', bochsImage()), 'bochs', Buffer.alloc(MiB));
    await expectOpensUnderAnyName(await file('v1.img', bochsImage({ version: 0x00010000 })), 'bochs', Buffer.alloc(MiB));
    expect(probeContent(bochsImage({ subtype: 'Undoable' }))).toBe('raw');
    expect(probeContent(bochsImage({ type: 'Redo' }))).toBe('raw');
    expect(probeContent(bochsImage({ version: 0x00030000 }))).toBe('raw');
    expect(probeContent(bochsImage({ magic: 'Bochs Virtual HD Image!' }))).toBe('raw'); // not NUL-terminated where qemu's strcmp wants it
  });

  test('cloop: the V2.0 shell-script header opens as cloop (reading the data the file holds); another script is raw', async () => {
    await expectOpensUnderAnyName(await file('disk.cloop', cloopImage(seededBytes(4, 128 * 1024))), 'cloop', seededBytes(4, 128 * 1024));
    expect(probeContent(cloopImage(seededBytes(4, 64 * 1024), 64 * 1024, CLOOP_SCRIPT.replace('V2.0', 'V3.0')))).toBe('raw');
    expect(probeContent(Buffer.from('#!/bin/sh\necho hello\n'))).toBe('raw');
  });

  test('dmg: the koly trailer in the last 512 bytes (a DMG under any name opens as dmg); koly anywhere else is raw', async () => {
    const data = seededBytes(5, 64 * 1024);
    // a trailer without a chunk table is probed as dmg and refused naming what is missing, under any name
    let current = await file('disk.dmg', dmgImage(data));
    for (const name of ['image.img', 'image']) {
      const error = await rejection(openImage(current, { readOnly: true }));
      expect(error.message).toBe(`${current}: DMG trailer has no XML property list (XML plist length 0) and no resource fork: there is no chunk table`);
      const renamed = join(dirname(current), name);
      await rename(current, renamed);
      current = renamed;
    }
    const real = buildDmg([{ name: 'disk', chunks: [{ type: 'zlib', data }] }]);
    for (const name of ['real.dmg', 'real.img', 'real']) {
      const image = await openImage(await file(name, real.image), { readOnly: true });
      try {
        expect(image.format).toBe('dmg');
        expect((await readAll(image)).equals(data)).toBe(true);
      } finally {
        await image.close();
      }
    }
    const misplaced = Buffer.concat([dmgImage(data), Buffer.alloc(512)]);
    expect(probeContent(misplaced)).toBe('raw');
    // A .dmg name with other content is refused by the existing name check.
    const named = await file('other.dmg', misplaced);
    expect((await rejection(openImage(named))).message).toContain('the name says dmg but the content is not a valid dmg image');
  });

  test('vpc: a fixed VHD footer at the end of the file (512 or 511 bytes), or its copy at the start', async () => {
    const data = seededBytes(6, 64 * 1024);
    const opensAs = async (path: string, length: number, content?: Buffer) => {
      const image = await openImage(path, { readOnly: true });
      expect([image.format, image.length]).toEqual(['vpc', length]);
      if (content) {
        const read = Buffer.alloc(length);
        await image.read(0, read);
        expect(read.equals(content)).toBe(true);
      }
      await image.close();
    };
    await opensAs(await file('fixed.img', Buffer.concat([data, vhdFooter(data.length)])), data.length, data);
    expect(probeContent(Buffer.concat([data, vhdFooter(data.length).subarray(0, 511)]))).toBe('vpc');
    // A footer copy at the start that says fixed: the footer at the end is the disk's; here there is none.
    const copy = await file('copy.vhd', Buffer.concat([vhdFooter(data.length), data]));
    expect(probeContent(await readFile(copy))).toBe('vpc');
    expect((await rejection(openImage(copy))).message).toBe(`${copy}: no VHD footer (cookie "conectix") at offset 0 or at the end of the file`);
    // A footer that is not at the end is just data.
    expect(probeContent(Buffer.concat([data, vhdFooter(data.length), Buffer.alloc(1024)]))).toBe('raw');
    // A file no bigger than its footer: an empty fixed disk.
    await opensAs(await file('tiny.vhd', vhdFooter(0)), 0);
  });

  test('vmdk: COWD (ESX) sparse headers and text descriptors as qemu reads them', async () => {
    const esx = await file('esx.vmdk', cowdImage());
    for (const readOnly of [false, true]) {
      const error = await rejection(openImage(esx, { readOnly }));
      expect(error.message).toBe(`${esx}: a VMDK3 ("COWD", ESX vmfsSparse) file opens only through the descriptor file naming it (a VMFSSPARSE extent line)`);
      expect(error.errno).toBe(ENOTSUP);
    }
    // descriptors that probe as vmdk, each refused by what is wrong with it (never read as raw)
    const descriptors: Array<[string, RegExp]> = [
      ['# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 8192 FLAT "x-flat.vmdk" 0\n', /VMDK extent x-flat\.vmdk of .*: no such file/],
      ['# Disk DescriptorFile\r\nversion=1\r\nCID=fffffffe\r\nparentCID=ffffffff\r\ncreateType="vmfs"\r\n', /lists no extent/],
      ['# a comment\n   \n# another\nversion=3\ncreateType="vmfs"\n', /the VMDK descriptor has no CID line/],
      ['version=2\n', /invalid VMDK descriptor: it has no createType/],
      ['#\n\nversion=1\n', /invalid VMDK descriptor/], // an empty line: qemu would say raw, imgmount still says vmdk
    ];
    for (const [descriptor, message] of descriptors) {
      const path = await file('disk.img', Buffer.from(descriptor, 'latin1'));
      expect(probeContent(Buffer.from(descriptor, 'latin1'))).toBe('vmdk');
      expect((await rejection(openImage(path, { readOnly: true }))).message).toMatch(message);
    }
    for (const text of ['hello\nversion=1\n', '# only a comment\n', 'version=4\n', 'version=1', ' x\nversion=1\n']) {
      expect(probeContent(Buffer.from(text, 'latin1')), JSON.stringify(text)).toBe('raw');
    }
  });

  test('vdi: a damaged signature under the VirtualBox banner is still vdi, refused naming the signature, never raw', async () => {
    const vdi = Buffer.alloc(1024);
    vdi.write('<<< Oracle VM VirtualBox Disk Image >>>\n', 0, 'latin1');
    expect(probeContent(vdi)).toBe('vdi');
    const path = await file('disk.img', vdi);
    for (const readOnly of [false, true]) {
      expect((await rejection(openImage(path, { readOnly }))).message).toBe(`${path}: VDI signature 0x00000000 is not 0xbeda107f`);
    }
    expect((await readFile(path)).equals(vdi)).toBe(true);
  });

  test('luks version 1 (LUKS2 is raw, as in qemu); qcow version 1', async () => {
    await expectRefusedUnderAnyName(await file('disk.luks', luksHeader(1)), 'luks');
    expect(probeContent(luksHeader(2))).toBe('raw');
    // qcow version 1 is read now: this bare header (size 0) probes as qcow and is refused for its size field.
    expect(probeContent(qcowHeader(1))).toBe('qcow');
    await expect(openImage(await file('old.qcow', qcowHeader(1)))).rejects.toThrow('qcow size 0 is too small (at least 2 bytes)');
  });

  test('random bytes, zeros, tiny and empty files are raw; a .vhd name with random content is refused by the name check', async () => {
    await expectRaw(await file('random.img', seededBytes(7, MiB + 123)));
    await expectRaw(await file('zeros', Buffer.alloc(MiB)));
    await expectRaw(await file('tiny.img', Buffer.from('x')));
    await expectRaw(await file('empty.img', Buffer.alloc(0)));
    await expectRaw(await file('short', seededBytes(8, 700)));
    const named = await file('random.vhd', seededBytes(9, MiB));
    const error = await rejection(openImage(named));
    expect(error.message).toBe(
      `${named}: the name says vpc but the content is not a valid vpc image (it probes as raw); pass -f raw to open it as raw anyway`,
    );
    await expectRaw(await file('random.bin', seededBytes(9, MiB)));
    const image = await openImage(named, { format: 'raw' });
    await image.close();
  });
});

describe('the raw write guard', () => {
  const SIZE = MiB;
  const from = (text: string) => Buffer.from(text, 'latin1');
  const vdiSignature = Buffer.alloc(4);
  vdiSignature.writeUInt32LE(0xbeda107f);
  const parallels = Buffer.alloc(20);
  parallels.write('WithoutFreeSpace', 0, 'latin1');
  parallels.writeUInt32LE(2, 16);

  /** Writes that would make the file probe as `format`: offset (negative: from the end) and bytes. */
  const dangerous: { what: string; offset: number; data: Buffer; format: string }[] = [
    { what: 'a qcow2 magic and version 3 at 0', offset: 0, data: qcowHeader(3).subarray(0, 8), format: 'qcow2' },
    { what: 'a qcow (version 1) header at 0', offset: 0, data: qcowHeader(1), format: 'qcow' },
    { what: 'a QED magic at 0', offset: 0, data: from('QED\0'), format: 'qed' },
    { what: '"conectix" at the start of the last 512 bytes', offset: -512, data: from('conectix'), format: 'vpc' },
    { what: '"conectix" at size - 511', offset: -511, data: from('conectix'), format: 'vpc' },
    { what: 'a whole VHD footer at the end', offset: -512, data: vhdFooter(SIZE - 512), format: 'vpc' },
    { what: '"conectix" at 0', offset: 0, data: from('conectix'), format: 'vpc' },
    { what: '"koly" at size - 512', offset: -512, data: from('koly'), format: 'dmg' },
    { what: '"KDMV" at 0', offset: 0, data: from('KDMV'), format: 'vmdk' },
    { what: 'a VMDK descriptor at 0', offset: 0, data: from('# Disk DescriptorFile\nversion=1\n'), format: 'vmdk' },
    { what: '"vhdxfile" at 0', offset: 0, data: from('vhdxfile'), format: 'vhdx' },
    { what: 'the VDI signature at 0x40', offset: 0x40, data: vdiSignature, format: 'vdi' },
    { what: 'a Parallels header at 0', offset: 0, data: parallels, format: 'parallels' },
    { what: 'a Bochs header at 0', offset: 0, data: bochsImage().subarray(0, 512), format: 'bochs' },
    { what: 'a cloop header at 0', offset: 0, data: from(CLOOP_SCRIPT), format: 'cloop' },
    { what: 'a LUKS header at 0', offset: 0, data: luksHeader(1).subarray(0, 8), format: 'luks' },
  ];

  const where = (offset: number) => (offset < 0 ? SIZE + offset : offset);

  async function rawFile(size = SIZE): Promise<{ path: string; original: Buffer }> {
    const original = seededBytes(11, size);
    const path = join(await makeTempDir(), 'disk.img');
    await writeFile(path, original);
    return { path, original };
  }

  test('a probed-raw image refuses, with EPERM, each write that would make it probe as another format; the file is unchanged', async () => {
    const { path, original } = await rawFile();
    const image = await openImage(path);
    try {
      expect(image.format).toBe('raw');
      for (const { what, offset, data, format } of dangerous) {
        expect(probeContent(Buffer.concat([original.subarray(0, where(offset)), data, original.subarray(where(offset) + data.length)])), what).toBe(format);
        const error = await rejection(image.write(where(offset), data));
        expect(error.errno, what).toBe(EPERM);
        expect(error.message, what).toBe(
          `${path} was probed as raw; refusing a write at ${where(offset)} that would make it look like a ${format} image (open it with -f raw to write it)`,
        );
      }
    } finally {
      await image.close();
    }
    expect((await readFile(path)).equals(original)).toBe(true);
  });

  test('a signature completed by a second write is refused; the same bytes in an order that never makes one are not', async () => {
    const { path } = await rawFile();
    const image = await openImage(path);
    try {
      await image.write(4, Buffer.from([0, 0, 0, 3])); // a qcow2 version, no magic yet
      expect((await rejection(image.write(0, from('QFI\xfb')))).errno).toBe(EPERM);
      await image.write(SIZE - 510, from('nectix')); // the end of a VHD cookie
      expect((await rejection(image.write(SIZE - 512, from('co')))).errno).toBe(EPERM);
      await image.write(SIZE - 512, from('xo')); // harmless
      expect((await readBytes(path, SIZE - 512, 8)).toString('latin1')).toBe('xonectix');
    } finally {
      await image.close();
    }
  });

  test('two concurrent writes that together make a signature: one of them is refused, and the file never probes as qcow2', async () => {
    for (let round = 0; round < 20; round++) {
      const { path } = await rawFile();
      const image = await openImage(path);
      try {
        const results = await Promise.allSettled([image.write(4, Buffer.from([0, 0, 0, 3])), image.write(0, from('QFI\xfb'))]);
        expect(results.filter((result) => result.status === 'rejected')).toHaveLength(1);
      } finally {
        await image.close();
      }
      const reopened = await openImage(path, { readOnly: true });
      expect(reopened.format).toBe('raw');
      await reopened.close();
    }
  });

  test('ordinary writes succeed: the middle of the file, zeros over the head and the tail, random data at both ends', async () => {
    const { path, original } = await rawFile();
    const expected = Buffer.from(original);
    const image = await openImage(path);
    const writes: [number, Buffer][] = [
      [SIZE / 2, seededBytes(12, 64 * 1024)],
      [0, Buffer.alloc(PROBE_HEAD_BYTES)],
      [SIZE - PROBE_TAIL_BYTES, Buffer.alloc(PROBE_TAIL_BYTES)],
      [0, seededBytes(13, 8192)],
      [SIZE - 700, seededBytes(14, 700)],
      [PROBE_HEAD_BYTES - 10, seededBytes(15, 20)],
      [0, seededBytes(16, SIZE)],
    ];
    try {
      for (const [offset, data] of writes) {
        await image.write(offset, data);
        data.copy(expected, offset);
      }
      await image.flush();
    } finally {
      await image.close();
    }
    expect((await readFile(path)).equals(expected)).toBe(true);
  });

  test('with format: raw the same writes go through, and the file then probes as that format', async () => {
    for (const { what, offset, data, format } of dangerous) {
      const { path } = await rawFile();
      const image = await openImage(path, { format: 'raw' });
      try {
        await image.write(where(offset), data);
      } finally {
        await image.close();
      }
      expect((await readBytes(path, where(offset), data.length)).equals(data), what).toBe(true);
      expect(probeContent(await readFile(path)), what).toBe(format);
      if (what === 'a whole VHD footer at the end') {
        // vpc is a real format: a valid footer makes the file a fixed VHD of the bytes before it.
        const vhd = await openImage(path);
        expect([vhd.format, vhd.length], what).toEqual(['vpc', SIZE - 512]);
        await vhd.close();
      } else {
        // refused, or (a format read now, whose header here is followed by random bytes) opened as that format: never raw
        const opened = await openImage(path).then(
          async (image) => {
            await image.close();
            return image.format;
          },
          () => 'refused',
        );
        expect(['refused', format], what).toContain(opened);
      }
    }
  });

  test('a file smaller than the probed head and tail: head and tail overlap', async () => {
    const { path, original } = await rawFile(1000);
    const image = await openImage(path);
    try {
      expect((await rejection(image.write(0, from('conectix')))).errno).toBe(EPERM);
      expect((await rejection(image.write(1000 - 512, from('koly')))).errno).toBe(EPERM);
      expect((await rejection(image.write(1000 - 511, from('conectix')))).errno).toBe(EPERM);
      await image.write(100, Buffer.alloc(800));
      original.fill(0, 100, 900);
    } finally {
      await image.close();
    }
    expect((await readFile(path)).equals(original)).toBe(true);
  });

  test('a read-only probed-raw open refuses writes as read-only, not through the guard', async () => {
    const { path } = await rawFile();
    const image = await openImage(path, { readOnly: true });
    try {
      expect((await rejection(image.write(0, from('QFI\xfb\0\0\0\x03')))).errno).toBe(osConstants.errno.EROFS);
    } finally {
      await image.close();
    }
  });
});
