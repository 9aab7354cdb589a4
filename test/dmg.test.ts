/**
 * DMG (UDIF) images built by the test writer (helpers/dmg-writer.ts, from the
 * format's description): every chunk type reads like dmg2img (Debian's
 * dmg2img) converts it, and like qemu-img convert where qemu 7.2 can read it
 * (zlib, raw, zero, ignore; Debian's qemu has no dmg-bz2 module and qemu has
 * no ADC); the map matches the layout the writer made; the ADC decoder
 * matches dmg2img's on streams with every phrase kind. Then damaged images:
 * one test per checked field, each refused at open with a message naming the
 * field and its value, or (a damaged chunk, sectors in no chunk) an EIO for
 * that range only, as qemu answers; and seeded random damage that may only
 * ever give a BlockError, never a crash, a hang or other bytes.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { constants as osConstants } from 'node:os';
import { describe, expect, it } from 'vitest';
import { BlockError, openImage, type BlockImage } from '../src/index.js';
import { decodeAdc } from '../src/formats/dmg/adc.js';
import { buildDmg, encodeAdc, sampleContent, SECTOR, type DmgChunkSpec, type DmgOptions, type DmgPartitionSpec } from './helpers/dmg-writer.js';
import { BlockImage as BlockImageClass } from '../src/index.js';
import { ImageFileGate } from '../src/block/gate.js';
import { dmg as dmgDriver } from '../src/formats/dmg/index.js';
import { firstDifference, makeTempDir, qemuConvertToRaw, readAll, run, runOk, spyProtocol } from './helpers/qemu.js';
import { seededRandom } from './helpers/random.js';

const { EIO, ENOTSUP } = osConstants.errno;
const KiB = 1024;
const MiB = 1024 * KiB;
const TIMEOUT = { timeout: 60_000 };

async function writeDmg(name: string, partitions: DmgPartitionSpec[], options?: DmgOptions) {
  const written = buildDmg(partitions, options);
  const path = join(await makeTempDir('imgmount-dmg-'), name);
  await writeFile(path, written.image);
  return { ...written, path };
}

async function withDmg<T>(path: string, body: (image: BlockImage) => Promise<T>): Promise<T> {
  const image = await openImage(path, { readOnly: true });
  try {
    return await body(image);
  } finally {
    await image.close();
  }
}

async function dmg2img(path: string): Promise<Buffer> {
  const out = `${path}.dmg2img.img`;
  await runOk('dmg2img', ['-s', path, out]);
  return readFile(out);
}

function expectSame(actual: Buffer, expected: Buffer, what: string): void {
  const at = firstDifference(actual, expected);
  expect(at, `${what}: first difference at ${at} (lengths ${actual.length} / ${expected.length})`).toBe(-1);
}

/** Every chunk type, in two partitions, chunks of several sizes (one of 4 MiB, far larger than a 64 KiB cluster). */
function everyType(content: Buffer): DmgPartitionSpec[] {
  const at = (from: number, length: number) => content.subarray(from, from + length);
  return [
    {
      name: 'disk image (Apple_HFS : 0)',
      chunks: [
        { type: 'zlib', data: at(0, 4 * MiB) },
        { type: 'bzip2', data: at(4 * MiB, MiB) },
        { type: 'comment' },
        { type: 'adc', data: at(5 * MiB, 512 * KiB) },
        { type: 'raw', data: at(5 * MiB + 512 * KiB, 64 * KiB + 3 * SECTOR) },
        { type: 'zero', sectors: 777 },
        { type: 'ignore', sectors: 5 },
      ],
    },
    {
      name: 'second (Apple_Free : 1)',
      chunks: [
        { type: 'adc', data: at(6 * MiB, 9 * SECTOR) },
        { type: 'bzip2', data: at(6 * MiB + 9 * SECTOR, 300 * KiB) },
        { type: 'zlib', data: at(7 * MiB, SECTOR) },
      ],
    },
  ];
}

describe('DMG chunks read like dmg2img and qemu-img convert', () => {
  it('every chunk type (zlib, bzip2, ADC, raw, zero, ignore, comment) reads like dmg2img, whole and in 4097-byte pieces', TIMEOUT, async () => {
    const content = sampleContent(8 * MiB, 0xd1);
    const dmg = await writeDmg('every-type.dmg', everyType(content));
    const theirs = await dmg2img(dmg.path);
    expectSame(theirs, dmg.content, 'dmg2img against the content the writer was given');
    await withDmg(dmg.path, async (image) => {
      expect(image.format).toBe('dmg');
      expect(image.length).toBe(theirs.length);
      expectSame(await readAll(image), theirs, 'one read');
      expectSame(await readAll(image, 4097), theirs, '4097-byte reads');
    });
  });

  it('reads at seeded offsets, 8 in flight, across chunk boundaries, like dmg2img', TIMEOUT, async () => {
    const content = sampleContent(8 * MiB, 0xd2);
    const dmg = await writeDmg('seeded.dmg', everyType(content));
    const theirs = await dmg2img(dmg.path);
    const boundaries = dmg.chunks.map((chunk) => chunk.guestOffset);
    const random = seededRandom(0xd2);
    await withDmg(dmg.path, async (image) => {
      for (let round = 0; round < 12; round++) {
        const reads = Array.from({ length: 8 }, (_, i) => {
          const near = boundaries[random.int(0, boundaries.length - 1)]!;
          const offset = Math.max(0, Math.min(image.length - 1, i % 2 ? near + random.int(-700, 700) : random.int(0, image.length - 1)));
          const length = Math.min(image.length - offset, random.int(1, 3 * 64 * KiB));
          return { offset, buffer: Buffer.alloc(length, 0xee) };
        });
        await Promise.all(reads.map(({ offset, buffer }) => image.read(offset, buffer)));
        for (const { offset, buffer } of reads) expectSame(buffer, theirs.subarray(offset, offset + buffer.length), `read of ${buffer.length} at ${offset}`);
      }
    });
  });

  it('zlib, raw, zero and ignore chunks read like qemu-img convert -O raw', TIMEOUT, async () => {
    const content = sampleContent(5 * MiB, 0xd3);
    const dmg = await writeDmg('qemu.dmg', [
      { name: 'a', chunks: [{ type: 'zlib', data: content.subarray(0, 2 * MiB) }, { type: 'raw', data: content.subarray(2 * MiB, 3 * MiB) }, { type: 'ignore', sectors: 100 }] },
      { name: 'b', chunks: [{ type: 'zero', sectors: 9 }, { type: 'zlib', data: content.subarray(4 * MiB, 5 * MiB) }] },
    ]);
    const qemu = await qemuConvertToRaw(dmg.path, await makeTempDir(), 'dmg');
    expectSame(qemu, dmg.content, 'qemu-img convert against the content the writer was given');
    await withDmg(dmg.path, async (image) => expectSame(await readAll(image, 65537), qemu, 'reads'));
  });

  it('map: zero and ignore chunks are zeros, raw chunks data at their offset in the file, compressed chunks compressed data', TIMEOUT, async () => {
    const content = sampleContent(8 * MiB, 0xd4);
    const dmg = await writeDmg('map.dmg', everyType(content), { dataForkOffset: 8192 });
    const expected = dmg.chunks
      .filter((chunk) => chunk.guestLength > 0)
      .map((chunk) => {
        const run: Record<string, unknown> = { offset: chunk.guestOffset, length: chunk.guestLength };
        if (chunk.type === 'zero' || chunk.type === 'ignore') Object.assign(run, { data: false, zero: true });
        else if (chunk.type === 'raw') Object.assign(run, { data: true, zero: false, hostOffset: chunk.hostOffset });
        else Object.assign(run, { data: true, zero: false, compressed: true });
        return run;
      });
    // neighbouring runs of one kind are one run in map's answer (zero + ignore; compressed + compressed)
    const merged: Record<string, unknown>[] = [];
    for (const run of expected) {
      const last = merged[merged.length - 1];
      if (last && last['data'] === run['data'] && last['compressed'] === run['compressed'] && run['hostOffset'] === undefined && last['hostOffset'] === undefined) {
        last['length'] = (last['length'] as number) + (run['length'] as number);
      } else merged.push({ ...run });
    }
    await withDmg(dmg.path, async (image) => {
      const ours = (await image.map()).map((run) => {
        const shape: Record<string, unknown> = { offset: run.offset, length: run.length, data: run.data, zero: run.zero };
        if (run.hostOffset !== undefined) shape['hostOffset'] = run.hostOffset;
        if (run.compressed) shape['compressed'] = true;
        expect(run.present).toBe(true);
        return shape;
      });
      expect(ours).toEqual(merged);
    });
  });
});

describe('the decoded-chunk cache', () => {
  it('a sequential read in 4 KiB pieces reads (and decodes) each compressed chunk once, raw chunks only where asked', TIMEOUT, async () => {
    const content = sampleContent(8 * MiB, 0xcac);
    const dmg = await writeDmg('cache.dmg', everyType(content));
    const file = await spyProtocol(dmg.path, true);
    const files = new ImageFileGate(dmg.path, {}, false);
    const image = new BlockImageClass({ path: dmg.path, format: 'dmg', file, image: await dmgDriver.open(file, { readOnly: true, files }), gate: files });
    try {
      file.calls.length = 0;
      expectSame(await readAll(image, 4096), dmg.content, 'reads');
    } finally {
      await image.close();
    }
    const reads = file.calls.filter((call) => call.startsWith('read '));
    for (const chunk of dmg.chunks.filter((c) => ['zlib', 'bzip2', 'adc'].includes(c.type))) {
      expect(reads.filter((call) => call === `read ${chunk.hostOffset} ${chunk.hostLength}`), `${chunk.type} chunk at ${chunk.hostOffset}`).toHaveLength(1);
    }
    const raw = dmg.chunks.find((c) => c.type === 'raw')!;
    const rawReads = reads.filter((call) => Number(call.split(' ')[1]) >= raw.hostOffset && Number(call.split(' ')[1]) < raw.hostOffset + raw.hostLength);
    expect(rawReads, JSON.stringify({ raw, rawReads })).toHaveLength(Math.ceil(raw.hostLength / 4096));
  });
});

describe('ADC (UDCO) decoding', () => {
  /** The phrase kinds of an ADC stream: literal, short copy, long copy. */
  function phrases(stream: Buffer): Set<string> {
    const kinds = new Set<string>();
    for (let i = 0; i < stream.length; ) {
      const b = stream[i]!;
      if (b & 0x80) {
        kinds.add('literal');
        i += (b & 0x7f) + 2;
      } else if (b & 0x40) {
        kinds.add('long');
        i += 3;
      } else {
        kinds.add('short');
        i += 2;
      }
    }
    return kinds;
  }

  it('streams with literal, short-copy and long-copy phrases decode like dmg2img', TIMEOUT, async () => {
    const content = sampleContent(1024 * KiB, 0xadc);
    // a long run of one byte (copies that overlap what they write) and a repeat 2000 bytes back (long copies)
    content.fill(0x5a, 1000, 9000);
    content.copy(content, 300 * KiB, 290 * KiB, 296 * KiB);
    const chunks: DmgChunkSpec[] = [];
    for (let at = 0; at < content.length; at += 128 * KiB) chunks.push({ type: 'adc', data: content.subarray(at, at + 128 * KiB) });
    const streams = chunks.map((chunk) => encodeAdc((chunk as { data: Buffer }).data));
    expect([...new Set(streams.flatMap((stream) => [...phrases(stream)]))].sort()).toEqual(['literal', 'long', 'short']);
    const dmg = await writeDmg('adc.dmg', [{ name: 'adc', chunks }]);
    const theirs = await dmg2img(dmg.path);
    expectSame(theirs, content, 'dmg2img against the content');
    await withDmg(dmg.path, async (image) => expectSame(await readAll(image, 4097), theirs, 'reads'));
  });

  it('a copy reaching before the start of the chunk, or a stream that ends early, is refused with a message', () => {
    expect(() => decodeAdc(Buffer.from([0x00, 0x05]), 3)).toThrow(/before the start of the chunk/);
    expect(() => decodeAdc(Buffer.from([0x81, 1, 2]), 3)).toThrow(/ends after 2 of 3 bytes/);
    expect(() => decodeAdc(Buffer.from([0x83, 1, 2]), 4)).toThrow(/runs past the end of the data/);
    expect(() => decodeAdc(Buffer.from([0x80, 7, 0x40, 0x00, 0x00]), 3)).toThrow(/runs past the 3 decoded bytes/);
    expect(decodeAdc(Buffer.from([0x80, 7, 0x04, 0x00]), 5)).toEqual(Buffer.from([7, 7, 7, 7, 7]));
  });
});

// ---------------------------------------------------------------------------
// Damaged images
// ---------------------------------------------------------------------------

async function rejection(promise: Promise<unknown>): Promise<BlockError> {
  const error = await promise.then(
    () => undefined,
    (reason: unknown) => reason,
  );
  if (!(error instanceof BlockError)) throw new Error(`expected a BlockError, got ${String(error)}`);
  return error;
}

/** A small image of two partitions: zlib, raw, zero, bzip2, ADC chunks. */
function small(content = sampleContent(256 * KiB, 0xbad)): DmgPartitionSpec[] {
  return [
    { name: 'one', chunks: [{ type: 'zlib', data: content.subarray(0, 64 * KiB) }, { type: 'raw', data: content.subarray(64 * KiB, 96 * KiB) }, { type: 'zero', sectors: 64 }] },
    { name: 'two', chunks: [{ type: 'bzip2', data: content.subarray(128 * KiB, 192 * KiB) }, { type: 'adc', data: content.subarray(192 * KiB, 256 * KiB) }] },
  ];
}

/** Byte offset of chunk `i`'s field at `field` inside a mish block. */
const chunkField = (i: number, field: number) => 0xcc + 40 * i + field;

async function damagedTrailer(patch: (koly: Buffer) => void): Promise<string> {
  const dmg = await writeDmg('damaged.dmg', small());
  const koly = dmg.image.subarray(dmg.trailerOffset);
  patch(koly);
  await writeFile(dmg.path, dmg.image);
  return dmg.path;
}

async function expectRefused(path: string, message: RegExp, errno = EIO): Promise<void> {
  const error = await rejection(openImage(path, { readOnly: true, format: 'dmg' }));
  expect(error.message).toMatch(message);
  expect(error.message).toContain(path);
  expect(error.errno).toBe(errno);
}

describe('a damaged DMG is refused at open, naming the field', () => {
  it('a file shorter than the trailer', async () => {
    const path = join(await makeTempDir(), 'short.dmg');
    await writeFile(path, Buffer.from('koly'));
    await expectRefused(path, /file is 4 bytes: too small for the 512-byte koly trailer/);
  });

  it('the trailer signature', async () => {
    await expectRefused(await damagedTrailer((k) => k.write('kolz', 0, 'latin1')), /trailer signature .* is 6b6f6c7a, not 6b6f6c79/);
  });

  it('the trailer version and header size', async () => {
    await expectRefused(await damagedTrailer((k) => k.writeUInt32BE(5, 4)), /trailer version 5 is not 4/);
    await expectRefused(await damagedTrailer((k) => k.writeUInt32BE(1024, 8)), /trailer header size 1024 is not 512/);
  });

  it('the data fork offset: past the trailer, or above 2^53 - 1', async () => {
    await expectRefused(await damagedTrailer((k) => k.writeBigUInt64BE(10n * 1024n * 1024n, 0x18)), /data fork offset 10485760 is past the trailer/);
    await expectRefused(await damagedTrailer((k) => k.writeBigUInt64BE(1n << 60n, 0x18)), /data fork offset 1152921504606846976 is above the largest supported value 9007199254740991/);
  });

  it('the sector count: above what a safe byte size holds', async () => {
    await expectRefused(await damagedTrailer((k) => k.writeBigUInt64BE(1n << 50n, 0x1ec)), /sector count 1125899906842624 is above the largest supported value 17592186044415/);
  });

  it('a segmented image (segment count 2) is refused by name', async () => {
    await expectRefused(await damagedTrailer((k) => k.writeUInt32BE(2, 0x3c)), /segmented DMG images are not supported \(segment 1 of 2/, ENOTSUP);
  });

  it('the XML plist offset and length: none (and no resource fork), above 16 MiB, outside the file', async () => {
    await expectRefused(await damagedTrailer((k) => k.writeBigUInt64BE(0n, 0xe0)), /no XML property list \(XML plist length 0\) and no resource fork/);
    await expectRefused(await damagedTrailer((k) => k.writeBigUInt64BE(16n * 1024n * 1024n + 1n, 0xe0)), /XML plist length 16777217 is above the limit 16777216/);
    await expectRefused(await damagedTrailer((k) => k.writeBigUInt64BE(k.readBigUInt64BE(0xe0) + 1n, 0xe0)), /XML plist \[\d+, \d+\) is not inside the file before the trailer/);
    await expectRefused(await damagedTrailer((k) => k.writeBigUInt64BE(1n << 40n, 0xd8)), /XML plist \[1099511627776, \d+\) is not inside the file/);
  });

  it('an XML plist that does not parse, or has no blkx array', async () => {
    const broken = await writeDmg('broken.dmg', small(), { mutateXml: (xml) => xml.replace('</dict>', '') });
    await expectRefused(broken.path, /XML property list does not parse/);
    const noBlkx = await writeDmg('noblkx.dmg', small(), { mutateXml: (xml) => xml.replace('<key>blkx</key>', '<key>plst</key>') });
    await expectRefused(noBlkx.path, /no resource-fork \/ blkx array/);
  });

  it('a blkx Data that is not a mish block, or too short for one', async () => {
    const magic = await writeDmg('magic.dmg', small(), { mutateMish: (p, mish) => p === 1 && mish.write('mash', 0, 'latin1') });
    await expectRefused(magic.path, /blkx entry 1 \("two"\): its Data starts with 6d617368, not 6d697368/);
    const short = await writeDmg('short.dmg', small(), { mutateXml: (xml) => xml.replace(/<data>[^<]*<\/data>/, '<data>bWlzaA==</data>') });
    await expectRefused(short.path, /blkx entry 0 \("one"\): its Data is 4 bytes, a mish block needs at least 204/);
  });

  it('a mish chunk count larger than its block', async () => {
    const dmg = await writeDmg('count.dmg', small(), { mutateMish: (p, mish) => p === 0 && mish.writeUInt32BE(1000, 0xc8) });
    await expectRefused(dmg.path, /blkx entry 0 \("one"\): chunk count 1000 does not fit in its 364-byte mish block \(at most 4\)/);
  });

  it('lzfse, lzma and unknown chunk types are refused by name', async () => {
    for (const [type, name] of [[0x80000007, /lzfse \(ULFO\), which is not supported: no maintained decoder/], [0x80000008, /lzma \(ULMO\)/], [0x12345, /0x00012345, which is not supported/]] as const) {
      const dmg = await writeDmg('type.dmg', small(), { mutateMish: (p, mish) => p === 1 && mish.writeUInt32BE(type, chunkField(0, 0)) });
      await expectRefused(dmg.path, new RegExp(`blkx entry 1 \\("two"\\) chunk 0 has chunk type ${name.source}`), ENOTSUP);
    }
  });

  it("a chunk's sector count above qemu's 64 MiB cap (zero chunks excepted), and a stored length above 64 MiB", async () => {
    const sectors = await writeDmg('sectors.dmg', small(), { sectorCount: 1 << 20, mutateMish: (p, mish) => p === 1 && mish.writeBigUInt64BE(131073n, chunkField(1, 0x10)) });
    await expectRefused(sectors.path, /chunk 1 \(ADC \(UDCO\)\): sector count 131073 is above the limit 131072/);
    const zero = await writeDmg('zero.dmg', small(), { sectorCount: 1 << 20, mutateMish: (p, mish) => p === 0 && mish.writeBigUInt64BE(200000n, chunkField(2, 0x10)) });
    await expectRefused(zero.path, /overlaps/); // a big zero chunk is allowed, as in qemu; this one then overlaps the next partition
    const length = await writeDmg('length.dmg', small(), { mutateMish: (p, mish) => p === 0 && mish.writeBigUInt64BE(64n * 1024n * 1024n + 1n, chunkField(0, 0x20)) });
    await expectRefused(length.path, /chunk 0 \(zlib \(UDZO\)\): stored length 67108865 is above the limit 67108864/);
  });

  it("a chunk's sectors outside the virtual disk", async () => {
    const dmg = await writeDmg('outside.dmg', small(), { sectorCount: 400 });
    await expectRefused(dmg.path, /blkx entry 1 \("two"\) chunk 1 \(ADC \(UDCO\)\): sectors \[384, 512\) are outside the virtual disk of 400 sectors/);
  });

  it("a chunk's bytes outside the file", async () => {
    const dmg = await writeDmg('bytes.dmg', small(), { mutateMish: (p, mish) => p === 1 && mish.writeBigUInt64BE(1n << 40n, chunkField(1, 0x18)) });
    await expectRefused(dmg.path, /chunk 1 \(ADC \(UDCO\)\): its bytes \[1099511627776, \d+\) are not inside the file before the trailer at \d+/);
  });

  it('a raw chunk shorter than its sectors', async () => {
    const dmg = await writeDmg('raw.dmg', small(), { mutateMish: (p, mish) => p === 0 && mish.writeBigUInt64BE(32n * 1024n - 1n, chunkField(1, 0x20)) });
    await expectRefused(dmg.path, /chunk 1 \(raw \(UDRW\)\): stored length 32767 is shorter than its 64 sectors \(32768 bytes\)/);
  });

  it('overlapping chunks', async () => {
    const parts = small();
    parts[1]!.firstSector = 100;
    const dmg = await writeDmg('overlap.dmg', parts, { sectorCount: 512 });
    await expectRefused(dmg.path, /blkx entry 1 \("two"\) chunk 0 \(sectors from 100\) overlaps blkx entry 0 \("one"\) chunk 0 \(sectors \[0, 128\)\)/);
  });
});

describe('the binary resource fork (images without an XML property list)', () => {
  it('chunk tables only in a resource fork read like qemu-img convert and dmg2img; with both, the XML is read', TIMEOUT, async () => {
    const content = sampleContent(3 * MiB, 0x4f);
    const parts: DmgPartitionSpec[] = [
      { name: 'a', chunks: [{ type: 'zlib', data: content.subarray(0, MiB) }, { type: 'zero', sectors: 2048 }] },
      { name: 'b', chunks: [{ type: 'raw', data: content.subarray(2 * MiB, 2 * MiB + 64 * KiB) }, { type: 'zlib', data: content.subarray(2 * MiB + 64 * KiB) }] },
    ];
    for (const resourceFork of ['only', 'both'] as const) {
      const dmg = await writeDmg(`rsrc-${resourceFork}.dmg`, parts, { resourceFork });
      expect(dmg.xmlLength === 0).toBe(resourceFork === 'only');
      const qemu = await qemuConvertToRaw(dmg.path, await makeTempDir(), 'dmg'); // qemu reads the resource fork whenever there is one
      expectSame(qemu, dmg.content, `${resourceFork}: qemu-img convert against the content`);
      expectSame(await dmg2img(dmg.path), dmg.content, `${resourceFork}: dmg2img against the content`);
      await withDmg(dmg.path, async (image) => expectSame(await readAll(image, 4097), qemu, `${resourceFork}: reads`));
    }
    // with both, a damaged resource fork does not matter: the XML property list is read
    const both = await writeDmg('rsrc-damaged.dmg', parts, { resourceFork: 'both', mutateResourceFork: (fork) => fork.writeUInt32BE(0xffffffff, 8) });
    await withDmg(both.path, async (image) => expectSame(await readAll(image), both.content, 'XML read'));
  });

  const damagedFork = async (patch: (fork: Buffer) => void) => (await writeDmg('fork.dmg', small(), { resourceFork: 'only', mutateResourceFork: patch })).path;

  it('a damaged resource fork is refused naming the field: data offset, data length, a resource length, no mish block', async () => {
    await expectRefused(await damagedFork((f) => f.writeUInt32BE(1 << 20, 0)), /DMG resource fork data offset 1048576 is past its end \(\d+ bytes\)/);
    await expectRefused(await damagedFork((f) => f.writeUInt32BE(0, 8)), /DMG resource fork data length 0 is not in \[1, \d+\]/);
    await expectRefused(await damagedFork((f) => f.writeUInt32BE(1 << 20, 8)), /DMG resource fork data length 1048576 is not in \[1, \d+\]/);
    await expectRefused(await damagedFork((f) => f.writeUInt32BE(0x7fffffff, 256)), /DMG resource fork resource at 256 has length 2147483647, not in \[1, \d+\]/);
    await expectRefused(await damagedFork((f) => f.write('mosh', 260, 'latin1') && f.write('mosh', 260 + 4 + f.readUInt32BE(256), 'latin1')), /DMG resource fork holds no mish \(blkx\) block/);
    const path = await damagedTrailer((k) => {
      k.writeBigUInt64BE(0n, 0xe0);
      k.writeBigUInt64BE(1n << 30n, 0x28);
      k.writeBigUInt64BE(4096n, 0x30);
    });
    await expectRefused(path, /DMG resource fork \[1073741824, 1073745920\) is not inside the file before the trailer/);
  });
});

describe('damage inside the image gives EIO for that range only, naming it', () => {
  it('sectors in no chunk: EIO naming them (qemu-img convert fails there too), the rest reads', TIMEOUT, async () => {
    const parts = small();
    parts[1]!.firstSector = 300; // a gap of 44 sectors after the first partition's 256
    const dmg = await writeDmg('gap.dmg', parts);
    const qemu = await run('qemu-img', ['convert', '-f', 'dmg', '-O', 'raw', dmg.path, `${dmg.path}.raw`]);
    expect(qemu.code).not.toBe(0);
    await withDmg(dmg.path, async (image) => {
      const error = await rejection(image.read(250 * SECTOR, Buffer.alloc(20 * SECTOR)));
      expect(error.errno).toBe(EIO);
      expect(error.message).toMatch(/DMG sectors \[256, 300\) \(bytes 131072\.\.153599\) are in no chunk of the blkx table/);
      // an unaligned read inside the gap names the sectors it starts in
      expect((await rejection(image.read(260 * SECTOR + 7, Buffer.alloc(10)))).message).toMatch(/DMG sectors \[260, 300\) \(bytes 133127\.\.153599\)/);
      expect((await rejection(image.map(0, image.length))).message).toMatch(/DMG sectors \[256, 300\)/);
      const before = Buffer.alloc(256 * SECTOR);
      await image.read(0, before);
      expectSame(before, dmg.content.subarray(0, before.length), 'before the gap');
      const after = Buffer.alloc(image.length - 300 * SECTOR);
      await image.read(300 * SECTOR, after);
      expectSame(after, dmg.content.subarray(300 * SECTOR), 'after the gap');
    });
  });

  for (const [kind, index, message] of [
    ['zlib', 0, /chunk 0 \(zlib, \d+ bytes at offset 0, guest offset 0\): zlib data does not decode/],
    ['bzip2', 2 + 1, /chunk 0 \(bzip2, .*\): bzip2 data does not decode/],
    ['ADC', 4, /chunk 1 \(adc, .*\): ADC/],
  ] as const) {
    it(`a damaged ${kind} chunk: EIO naming the chunk, the other chunks read`, TIMEOUT, async () => {
      const dmg = await writeDmg('chunk.dmg', small());
      const chunk = dmg.chunks[index]!;
      expect(chunk.type.toLowerCase()).toBe(kind.toLowerCase());
      // ADC: a copy phrase reaching far back at the start; others: garbage over the middle of the stream
      if (kind === 'ADC') Buffer.from([0x7f, 0xff, 0xff]).copy(dmg.image, chunk.hostOffset);
      else dmg.image.fill(0x55, chunk.hostOffset + 8, chunk.hostOffset + Math.min(chunk.hostLength - 4, 200));
      await writeFile(dmg.path, dmg.image);
      await withDmg(dmg.path, async (image) => {
        const error = await rejection(image.read(chunk.guestOffset, Buffer.alloc(4096)));
        expect(error.errno).toBe(EIO);
        expect(error.message).toMatch(message);
        for (const other of dmg.chunks.filter((c) => c !== chunk && c.guestLength > 0)) {
          const part = Buffer.alloc(other.guestLength);
          await image.read(other.guestOffset, part);
          expectSame(part, dmg.content.subarray(other.guestOffset, other.guestOffset + part.length), `chunk at ${other.guestOffset}`);
        }
      });
    });
  }

  it('a zlib chunk whose stream is shorter or longer than its sectors: EIO naming both sizes (qemu-img convert fails too)', TIMEOUT, async () => {
    const content = sampleContent(64 * KiB, 0x2);
    for (const [sectors, message] of [[129, /decodes to 65536 bytes, not the chunk's 66048/], [127, /zlib data does not decode \(.*\)|decodes to more/]] as const) {
      const dmg = await writeDmg('size.dmg', [{ name: 'z', chunks: [{ type: 'zlib', data: content }] }], {
        sectorCount: 129,
        mutateMish: (_, mish) => mish.writeBigUInt64BE(BigInt(sectors), chunkField(0, 0x10)),
      });
      await withDmg(dmg.path, async (image) => {
        const error = await rejection(image.read(0, Buffer.alloc(512)));
        expect(error.message).toMatch(message);
      });
      expect((await run('qemu-img', ['convert', '-f', 'dmg', '-O', 'raw', dmg.path, `${dmg.path}.raw`])).code).not.toBe(0);
    }
  });
});

describe('seeded random damage', () => {
  it('300 damaged images (XML plist or resource fork): open and reads give a BlockError or bytes, never a crash, hang or other error', { timeout: 120_000 }, async () => {
    const content = sampleContent(256 * KiB, 0xf);
    const pristines = [buildDmg(small(content)), buildDmg(small(content), { resourceFork: 'only' })];
    const dir = await makeTempDir();
    const random = seededRandom(0xf022);
    const outcomes = { refused: 0, opened: 0, readErrors: 0 };
    for (let i = 0; i < 300; i++) {
      const pristine = pristines[i % 2]!;
      const image = Buffer.from(pristine.image);
      const region = random.int(0, 2);
      // the trailer, the XML plist (its base64 mish blocks included) or the resource fork, or the chunks' data
      const [from, to] = region === 0 ? [pristine.trailerOffset, image.length] : region === 1 ? [pristine.xmlOffset, pristine.trailerOffset] : [0, pristine.xmlOffset];
      for (let k = random.int(1, 4); k > 0; k--) image[random.int(from, to - 1)] = random.int(0, 255);
      const path = join(dir, `fuzz-${i}.dmg`);
      await writeFile(path, image);
      const started = Date.now();
      let opened: BlockImage;
      try {
        opened = await openImage(path, { readOnly: true, format: 'dmg' });
      } catch (error) {
        expect(error, `case ${i}: ${String(error)}`).toBeInstanceOf(BlockError);
        outcomes.refused += 1;
        continue;
      }
      outcomes.opened += 1;
      try {
        // the image's first 512 KiB (a damaged sector count may make it huge) and its last 64 KiB
        const starts = [...Array.from({ length: 8 }, (_, k) => k * 64 * KiB), Math.max(0, opened.length - 64 * KiB)];
        for (const at of starts.filter((start) => start < opened.length)) {
          const part = Buffer.alloc(Math.min(64 * KiB, opened.length - at));
          try {
            await opened.read(at, part);
          } catch (error) {
            expect(error, `case ${i}: ${String(error)}`).toBeInstanceOf(BlockError);
            outcomes.readErrors += 1;
            continue;
          }
        }
      } finally {
        await opened.close();
      }
      expect(Date.now() - started, `case ${i} took too long`).toBeLessThan(5_000);
    }
    expect(outcomes.refused).toBeGreaterThan(0);
    expect(outcomes.opened).toBeGreaterThan(0);
  });
});

describe('the XML property list is bounded before it is parsed', () => {
  it('a property list of more than 100000 elements is refused without building them', async () => {
    const many = '<string>x</string>'.repeat(120_000);
    const dmg = await writeDmg('many.dmg', small(), { mutateXml: (xml) => xml.replace('<key>plst</key>', '').replace('\t\t</array>', `${many}\n\t\t</array>`) });
    await expectRefused(dmg.path, /XML property list does not parse \(it has more than 100000 elements\)/);
  });
});

describe('the command line (bin/imgmount, built dist/)', () => {
  const bin = resolve(import.meta.dirname, '../bin/imgmount');

  it('info --output=json says what qemu-img info --output=json says; check exits 63 like qemu-img check', TIMEOUT, async () => {
    const dmg = await writeDmg('cli.dmg', small());
    const ours = await runOk(bin, ['info', '--output=json', dmg.path]);
    const theirs = await runOk('qemu-img', ['info', '--output=json', '-f', 'dmg', dmg.path]);
    expect(JSON.parse(ours.stdout)).toEqual(JSON.parse(theirs.stdout));
    const check = await run(bin, ['check', dmg.path]);
    const qemuCheck = await run('qemu-img', ['check', '-f', 'dmg', dmg.path]);
    expect([check.code, qemuCheck.code]).toEqual([63, 63]);
    expect(check.stderr).toMatch(/does not support checks/);
  });

  it('a damaged image: one line naming the field, exit 1', TIMEOUT, async () => {
    const path = await damagedTrailer((k) => k.writeUInt32BE(3, 4));
    const result = await run(bin, ['info', path]);
    expect(result.code).toBe(1);
    expect(result.stderr.trim()).toBe(`imgmount: ${path}: DMG trailer version 3 is not 4 (the only UDIF version)`);
  });
});
