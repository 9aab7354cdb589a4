/**
 * The DMG entry of the conformance matrix (test/helpers/formats.ts). qemu
 * cannot create DMGs, so the shapes are built by the test writer
 * (dmg-writer.ts, from the format's description) and qemu-img reads them as
 * the oracle. Only chunk types qemu 7.2 reads are used here: zlib, raw, zero,
 * ignore (and comments), tables in the XML property list or the resource
 * fork; bzip2 needs a qemu module Debian does not ship and
 * ADC is not in qemu at all, so test/dmg.test.ts checks those against
 * dmg2img. qemu's dmg driver has no block status, so qemu-img map says
 * "data" for every byte (QEMU_MAP_SEES_ALL_DATA in formats.ts); test/dmg.test.ts checks the
 * map against the layout the writer made.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { buildDmg, sampleContent, SECTOR, type DmgChunkSpec } from './dmg-writer.js';
import type { BuiltImage, FormatEntry, Shape } from './formats.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function dmgShape(name: string, description: string, clusterSize: number, make: () => ReturnType<typeof buildDmg>): Shape {
  return {
    name,
    description,
    async build(dir): Promise<BuiltImage> {
      const path = join(dir, `${name}.dmg`);
      const written = make();
      await writeFile(path, written.image);
      return {
        path,
        format: 'dmg',
        description,
        layers: ['dmg'],
        clusterSize,
        qemuSays: { info: { 'virtual-size': written.content.length } },
      };
    },
  };
}

/** `content` cut into chunks of `sectors` sectors, each of the type `typeAt(i)` picks (zero chunks where the content is zeros). */
function cut(content: Buffer, sectors: number, typeAt: (i: number) => 'raw' | 'zlib'): DmgChunkSpec[] {
  const chunks: DmgChunkSpec[] = [];
  for (let at = 0, i = 0; at < content.length; at += sectors * SECTOR, i++) {
    const data = content.subarray(at, Math.min(content.length, at + sectors * SECTOR));
    chunks.push(data.every((byte) => byte === 0) ? { type: i % 2 ? 'zero' : 'ignore', sectors: data.length / SECTOR } : { type: typeAt(i), data });
  }
  return chunks;
}

export const dmgShapes: Shape[] = [
  dmgShape(
    'udzo-1m',
    'two partitions of 1 MiB zlib chunks (as hdiutil UDZO makes them), raw chunks, zero and ignore chunks, a comment; 6 MiB + 7 sectors',
    64 * KiB,
    () => {
      const content = sampleContent(6 * MiB + 7 * SECTOR, 0xd3a);
      const first = cut(content.subarray(0, 4 * MiB), 2048, (i) => (i === 2 ? 'raw' : 'zlib'));
      first.splice(1, 0, { type: 'comment' });
      return buildDmg([
        { name: 'disk image (Apple_HFS : 0)', chunks: first },
        { name: 'free (Apple_Free : 1)', chunks: [{ type: 'zero', sectors: 300 }, ...cut(content.subarray(4 * MiB + 300 * SECTOR), 1000, () => 'zlib')] },
      ]);
    },
  ),
  dmgShape(
    'small-chunks',
    'one partition of 3 MiB in chunks of 9 sectors alternating zlib and raw, zero runs between, the data fork 4 KiB into the file',
    4 * KiB,
    () => {
      const content = sampleContent(3 * MiB, 0xd3b);
      content.fill(0, MiB, MiB + 200 * KiB);
      return buildDmg([{ name: 'disk image', chunks: cut(content, 9, (i) => (i % 3 === 0 ? 'raw' : 'zlib')) }], { dataForkOffset: 4 * KiB });
    },
  ),
  dmgShape(
    'resource-fork',
    'chunk tables only in the binary resource fork (no XML property list, as before Mac OS X 10.2): zlib, raw and zero chunks, 2 MiB + 1 sector',
    64 * KiB,
    () => {
      const content = sampleContent(2 * MiB + SECTOR, 0xd3c);
      return buildDmg(
        [
          { name: 'a', chunks: cut(content.subarray(0, MiB), 256, (i) => (i % 2 ? 'raw' : 'zlib')) },
          { name: 'b', chunks: [{ type: 'zero', sectors: 512 }, { type: 'zlib', data: content.subarray(MiB + 256 * KiB) }] },
        ],
        { resourceFork: 'only' },
      );
    },
  ),
];

export const dmgEntry: FormatEntry = {
  name: 'dmg',
  extension: '.dmg',
  writable: false,
  checkable: false,
  snapshots: false,
  shapes: dmgShapes,
  chains: [],
};
