/**
 * The generic layer's handling of encoded (compressed) clusters, over a
 * format image written here for the purpose: a sequential read in small
 * requests decodes each cluster once, concurrent readers of one cluster share
 * one decode, a failed decode is not cached (the next read tries again and
 * fails again, it never returns stale bytes), a decode that returns the wrong
 * length is an EIO, and eviction never aborts a decode someone waits for.
 */
import { describe, expect, it } from 'vitest';
import { BlockImage, CorruptImageError, type EncodedCluster, type FormatImage, type Mapping, type Protocol } from '../src/index.js';
import { seededBytes } from './helpers/qemu.js';

const CLUSTER = 64 * 1024;

/** A format whose every cluster is "encoded": decoding cluster i yields seededBytes(i). */
class EncodedImage implements FormatImage {
  readonly backing = undefined;
  decodes = 0;
  failing = new Set<number>();
  wrongLength = new Set<number>();
  delayMs = 0;
  constructor(readonly virtualSize: number) {}

  async map(offset: number, length: number): Promise<Mapping[]> {
    const runs: Mapping[] = [];
    for (let pos = offset; pos < offset + length; ) {
      const start = pos - (pos % CLUSTER);
      const end = Math.min(offset + length, start + CLUSTER);
      const cluster: EncodedCluster = { key: String(start), guestStart: start, decodedLength: CLUSTER, hostOffset: start, hostLength: 100 };
      runs.push({ kind: 'encoded', guestOffset: pos, length: end - pos, cluster });
      pos = end;
    }
    return runs;
  }

  async decode(cluster: EncodedCluster): Promise<Buffer> {
    this.decodes += 1;
    const index = cluster.guestStart / CLUSTER;
    if (this.delayMs > 0) await new Promise((resolve) => setTimeout(resolve, this.delayMs));
    if (this.failing.has(index)) throw new CorruptImageError(`cluster ${index} does not decode`);
    return this.wrongLength.has(index) ? Buffer.alloc(100) : seededBytes(index, CLUSTER);
  }

  async flush(): Promise<void> {}
  async close(): Promise<void> {}
  info() {
    return {};
  }
}

const nullFile: Protocol = {
  path: 'encoded.test',
  readOnly: true,
  read: async () => {
    throw new Error('encoded clusters must not be read as data');
  },
  write: async () => undefined,
  flush: async () => undefined,
  size: async () => 0,
  allocatedSize: async () => 0,
  truncate: async () => undefined,
  close: async () => undefined,
};

function open(clusters: number, decodedCacheBytes?: number): { image: BlockImage; format: EncodedImage } {
  const format = new EncodedImage(clusters * CLUSTER);
  return { image: new BlockImage({ path: 'encoded.test', format: 'test', file: nullFile, image: format, decodedCacheBytes }), format };
}

function expected(clusters: number): Buffer {
  return Buffer.concat(Array.from({ length: clusters }, (_, i) => seededBytes(i, CLUSTER)));
}

describe('encoded clusters in the generic layer', () => {
  it('a sequential read in 4 KiB requests decodes each cluster once and returns the decoded bytes', async () => {
    const { image, format } = open(8);
    const out = Buffer.alloc(image.length);
    for (let offset = 0; offset < image.length; offset += 4096) await image.read(offset, out.subarray(offset, offset + 4096));
    expect(out.equals(expected(8))).toBe(true);
    expect(format.decodes).toBe(8);
  });

  it('unaligned reads across cluster boundaries get the right bytes', async () => {
    const { image } = open(4);
    const all = expected(4);
    for (const [offset, length] of [[CLUSTER - 7, 20], [1, 3 * CLUSTER], [2 * CLUSTER + 5, CLUSTER + 100]] as const) {
      const out = Buffer.alloc(length);
      await image.read(offset, out);
      expect(out.equals(all.subarray(offset, offset + length))).toBe(true);
    }
  });

  it('concurrent readers of one cluster share one decode, even when the cache is far smaller than a cluster', async () => {
    const { image, format } = open(4, 1);
    format.delayMs = 20;
    const reads = Array.from({ length: 16 }, (_, i) => {
      const out = Buffer.alloc(1000);
      return image.read(CLUSTER + i * 1000, out).then(() => out);
    });
    const results = await Promise.all(reads);
    results.forEach((out, i) => expect(out.equals(seededBytes(1, CLUSTER).subarray(i * 1000, i * 1000 + 1000))).toBe(true));
    expect(format.decodes).toBe(1);
  });

  it('with a cache of one byte, reads of many clusters at once all finish with the right bytes (eviction never aborts a decode)', async () => {
    const { image, format } = open(16, 1);
    format.delayMs = 5;
    const all = expected(16);
    const outs = Array.from({ length: 64 }, () => Buffer.alloc(4096));
    await Promise.all(outs.map((out, i) => image.read(((i * 7) % 16) * CLUSTER + (i % 4) * 4096, out)));
    outs.forEach((out, i) => {
      const offset = ((i * 7) % 16) * CLUSTER + (i % 4) * 4096;
      expect(out.equals(all.subarray(offset, offset + 4096))).toBe(true);
    });
  });

  it('a failed decode is not cached: every read of that cluster fails with EIO, the others read', async () => {
    const { image, format } = open(3);
    format.failing.add(1);
    for (let attempt = 0; attempt < 3; attempt++) {
      await expect(image.read(CLUSTER + 10, Buffer.alloc(10))).rejects.toMatchObject({ errno: 5 });
    }
    expect(format.decodes).toBe(3);
    const out = Buffer.alloc(CLUSTER);
    await image.read(2 * CLUSTER, out);
    expect(out.equals(seededBytes(2, CLUSTER))).toBe(true);
  });

  it('a decode that yields the wrong number of bytes is an EIO naming the cluster', async () => {
    const { image, format } = open(2);
    format.wrongLength.add(0);
    await expect(image.read(0, Buffer.alloc(10))).rejects.toThrow(/decodes to 100 bytes, not 65536/);
  });
});

describe('a request split into parts', () => {
  it('is answered only after every part has finished, even when one part fails first; close waits for it', async () => {
    const events: string[] = [];
    const file: Protocol = {
      ...nullFile,
      read: async (offset: number, buffer: Buffer) => {
        if (offset === 0) {
          events.push('fast part fails');
          throw new Error('EIO on the first part');
        }
        await new Promise((resolve) => setTimeout(resolve, 50));
        buffer.fill(1);
        events.push('slow part done');
      },
      close: async () => {
        events.push('file closed');
      },
    };
    const format: FormatImage = {
      virtualSize: 2 * CLUSTER,
      backing: undefined,
      map: async () => [
        { kind: 'data', guestOffset: 0, length: CLUSTER, hostOffset: 0 },
        { kind: 'data', guestOffset: CLUSTER, length: CLUSTER, hostOffset: 10 * CLUSTER },
      ],
      flush: async () => undefined,
      close: async () => {
        await file.close();
      },
      info: () => ({}),
    };
    const image = new BlockImage({ path: 'split.test', format: 'test', file, image: format });
    const read = image.read(0, Buffer.alloc(2 * CLUSTER)).catch((error: Error) => {
      events.push(`answered: ${error.message}`);
    });
    const closed = image.close();
    await Promise.all([read, closed]);
    expect(events).toEqual(['fast part fails', 'slow part done', 'answered: EIO on the first part', 'file closed']);
  });
});
