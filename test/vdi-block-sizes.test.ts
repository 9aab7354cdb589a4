/**
 * VDI block sizes other than 1 MiB: the specification allows any power of two,
 * qemu 7.2 refuses them all, VirtualBox makes only 1 MiB. They are read here,
 * read-only. With no tool to compare with, the oracle is a model: each image
 * is built by hand from the header layout of the specification (never with
 * the driver's code), blocks stored in a shuffled order past a gap after the
 * block map, and the test knows which guest bytes are where.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage, openImage, type MapRun } from '../src/index.js';
import { makeTempDir, normalizeMap, readAll, seededBytes, writeU32 } from './helpers/qemu.js';
import { seededRandom } from './helpers/random.js';

interface Built {
  path: string;
  content: Buffer;
  /** Expected map runs: data at host offsets, zeros elsewhere. */
  runs: MapRun[];
  offsetBmap: number;
}

/**
 * A dynamic VDI of `diskSize` bytes with `blockSize` blocks: about half the
 * blocks hold seeded random bytes, stored in a shuffled order; one more block
 * is marked 0xfffffffe (discarded) and the rest 0xffffffff.
 */
async function buildVdi(dir: string, blockSize: number, diskSize: number, seed: number): Promise<Built> {
  const random = seededRandom(seed);
  const blocks = Math.ceil(diskSize / blockSize);
  const guest = Array.from({ length: blocks }, (_, i) => i).filter(() => random.int(0, 1) === 1);
  const order = [...guest];
  for (let i = order.length - 1; i > 0; i--) {
    const j = random.int(0, i);
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  const offsetBmap = 512;
  const offsetData = offsetBmap + Math.ceil((blocks * 4) / 512) * 512 + 1024; // a gap, as VirtualBox leaves for alignment
  const header = Buffer.alloc(512);
  header.write('<<< Oracle VM VirtualBox Disk Image >>>\n', 0, 'latin1');
  header.writeUInt32LE(0xbeda107f, 0x40);
  header.writeUInt32LE(0x00010001, 0x44);
  header.writeUInt32LE(0x190, 0x48);
  header.writeUInt32LE(1, 0x4c);
  header.writeUInt32LE(offsetBmap, 0x154);
  header.writeUInt32LE(offsetData, 0x158);
  header.writeUInt32LE(512, 0x168);
  header.writeBigUInt64LE(BigInt(diskSize), 0x170);
  header.writeUInt32LE(blockSize, 0x178);
  header.writeUInt32LE(blocks, 0x180);
  header.writeUInt32LE(order.length, 0x184);
  seededBytes(seed + 1, 16).copy(header, 0x188);
  const bmap = Buffer.alloc(offsetData - offsetBmap, 0);
  for (let i = 0; i < blocks; i++) bmap.writeUInt32LE(0xffffffff, i * 4);
  const unallocated = Array.from({ length: blocks }, (_, i) => i).filter((i) => !guest.includes(i));
  if (unallocated.length > 0) bmap.writeUInt32LE(0xfffffffe, unallocated[0]! * 4);
  const data = Buffer.alloc(order.length * blockSize);
  const content = Buffer.alloc(Math.ceil(diskSize / 512) * 512);
  const runs: MapRun[] = [];
  order.forEach((block, index) => {
    bmap.writeUInt32LE(index, block * 4);
    const bytes = seededBytes(seed + 100 + block, blockSize);
    bytes.copy(data, index * blockSize);
    bytes.copy(content, block * blockSize);
  });
  for (let block = 0; block < blocks; block++) {
    const offset = block * blockSize;
    const length = Math.min(blockSize, content.length - offset);
    const index = order.indexOf(block);
    runs.push(
      index < 0
        ? { offset, length, data: false, zero: true, present: true, depth: 0 }
        : { offset, length, data: true, zero: false, present: true, depth: 0, hostOffset: offsetData + index * blockSize },
    );
  }
  const path = join(dir, `bs-${blockSize}.vdi`);
  await writeFile(path, Buffer.concat([header, bmap, data]));
  return { path, content, runs, offsetBmap };
}

describe('vdi block sizes other than 1 MiB (read-only, against a model)', () => {
  for (const [blockSize, diskSize] of [
    [512, 300 * 1024 + 512],
    [64 * 1024, 5 * 1024 * 1024 + 3000],
    [4 * 1024 * 1024, 21 * 1024 * 1024],
  ] as const) {
    it(`block_size ${blockSize}: reads, maps and checks like the model; a read-write open is read-only with a notice and writes nothing`, { timeout: 60_000 }, async () => {
      const dir = await makeTempDir();
      const built = await buildVdi(dir, blockSize, diskSize, blockSize % 977);
      const before = await readFile(built.path);
      const notices: string[] = [];
      const image = await openImage(built.path, { notice: (line) => notices.push(line) });
      try {
        expect(image.format).toBe('vdi');
        expect(image.readOnly).toBe(true);
        expect(notices).toEqual([`${built.path}: opened read-only: VDI block_size ${blockSize} is not 1048576; qemu refuses such images, so writes to them could not be checked against it`]);
        expect(image.length).toBe(built.content.length);
        expect((await readAll(image)).equals(built.content)).toBe(true);
        const random = seededRandom(blockSize);
        for (let i = 0; i < 64; i++) {
          const length = random.int(1, 3 * blockSize + 17);
          const offset = random.int(0, built.content.length - Math.min(length, built.content.length));
          const buffer = Buffer.alloc(Math.min(length, built.content.length - offset), 0xee);
          await image.read(offset, buffer);
          expect(buffer.equals(built.content.subarray(offset, offset + buffer.length)), `read of ${buffer.length} at ${offset}`).toBe(true);
        }
        expect(normalizeMap(await image.map(), true)).toEqual(normalizeMap(built.runs, true));
        expect((await image.info()).clusterSize).toBe(blockSize);
        await expect(image.write(0, Buffer.alloc(512, 1))).rejects.toMatchObject({ name: 'ReadOnlyError' });
      } finally {
        await image.close();
      }
      expect((await readFile(built.path)).equals(before)).toBe(true);
      expect(await checkImage(built.path)).toMatchObject({ corruptions: 0, messages: [] });
      // Two entries on one block: the check names it.
      const first = built.runs.findIndex((run) => run.data);
      const second = built.runs.findIndex((run, i) => run.data && i > first);
      const index = (await readFile(built.path)).readUInt32LE(built.offsetBmap + first * 4);
      await writeU32(built.path, built.offsetBmap + second * 4, index);
      const damaged = await checkImage(built.path);
      expect(damaged.messages).toEqual([`ERROR: block map entry ${second}: block index ${index} is also used by entry ${first}`]);
    });
  }
});
