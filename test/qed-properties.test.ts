/**
 * Property tests (fast-check): every valid QED header survives a write and a
 * parse unchanged, every out-of-range cluster_size is refused naming the
 * field and value, and any sequence of writes to a small image, read back
 * after a reopen, equals the same writes applied to a plain buffer (shrunk to
 * a minimal sequence on failure).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlockError, createImage, openImage } from '../src/index.js';
import { maxImageSize, parseHeader, serializeHeader, type QedHeader } from '../src/formats/qed/header.js';

const powerOfTwo = (min: number, max: number) => fc.integer({ min, max }).map((exponent) => 2 ** exponent);

const validHeader = fc
  .record({
    clusterSize: powerOfTwo(12, 26),
    tableSize: powerOfTwo(0, 4),
    backingNameBytes: fc.integer({ min: 0, max: 300 }),
    features: fc.constantFrom(0n, 2n),
    compatFeatures: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
    sizeFraction: fc.double({ min: 0, max: 1, noNaN: true }),
  })
  .map(({ clusterSize, tableSize, backingNameBytes, features, compatFeatures, sizeFraction }): QedHeader => {
    const max = Math.min(maxImageSize({ clusterSize, tableSize }), 2 ** 50);
    const imageSize = Math.floor((max * sizeFraction) / 512) * 512;
    return {
      clusterSize,
      tableSize,
      headerSize: 1,
      features: backingNameBytes > 0 ? features | 1n : features,
      compatFeatures,
      autoclearFeatures: 0n,
      l1TableOffset: clusterSize,
      imageSize,
      backingFilenameOffset: backingNameBytes > 0 ? 64 : 0,
      backingFilenameSize: backingNameBytes,
    };
  });

describe('QED header', () => {
  it('every valid header parses back to the same fields', () => {
    fc.assert(
      fc.property(validHeader, (header) => {
        const fileSize = header.l1TableOffset + header.tableSize * header.clusterSize;
        expect(parseHeader(serializeHeader(header), fileSize, 'p.qed')).toEqual(header);
      }),
      { seed: 20261121, numRuns: 500 },
    );
  });

  it('every cluster_size that is not a power of two in [4096, 64M] is refused, naming it', () => {
    const badClusterSize = fc.integer({ min: 0, max: 2 ** 32 - 1 }).filter((value) => !(value >= 4096 && value <= 2 ** 26 && (value & (value - 1)) === 0));
    fc.assert(
      fc.property(validHeader, badClusterSize, (header, clusterSize) => {
        const bytes = serializeHeader({ ...header, clusterSize: 4096 });
        bytes.writeUInt32LE(clusterSize, 4);
        expect(() => parseHeader(bytes, 1 << 30, 'p.qed')).toThrow(new RegExp(`cluster_size ${clusterSize} is not a power of two`));
        try {
          parseHeader(bytes, 1 << 30, 'p.qed');
        } catch (error) {
          expect(error).toBeInstanceOf(BlockError);
        }
      }),
      { seed: 20261122, numRuns: 300 },
    );
  });
});

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'imgmount-prop-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('QED writes', () => {
  const imageSize = 3 * 1024 * 1024; // 4 KiB clusters, table_size 1: an L2 table every 2 MiB
  const write = fc
    .record({ offset: fc.integer({ min: 0, max: imageSize - 1 }), length: fc.integer({ min: 1, max: 20_000 }), byte: fc.integer({ min: 1, max: 255 }) })
    .map(({ offset, length, byte }) => ({ offset, length: Math.min(length, imageSize - offset), byte }));

  it('any sequence of writes reads back, after a reopen, like the same writes on a plain buffer', { timeout: 120_000 }, async () => {
    let run = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(write, { minLength: 1, maxLength: 25 }), async (writes) => {
        const path = join(dir, `p${run++}.qed`);
        await createImage(path, 'qed', { size: imageSize, options: { cluster_size: '4096', table_size: '1' } });
        const model = Buffer.alloc(imageSize);
        const image = await openImage(path);
        for (const { offset, length, byte } of writes) {
          model.fill(byte, offset, offset + length);
          await image.write(offset, Buffer.alloc(length, byte));
        }
        await image.close();
        const reopened = await openImage(path, { readOnly: true });
        const actual = Buffer.alloc(imageSize);
        await reopened.read(0, actual);
        await reopened.close();
        await rm(path);
        return actual.equals(model);
      }),
      { seed: 20261123, numRuns: 60 },
    );
  });
});
