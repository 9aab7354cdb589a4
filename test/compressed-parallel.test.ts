/**
 * Compressed qcow2 clusters decoded side by side: a read of many compressed
 * clusters sends some to decode worker threads (src/block/decode-pool.ts), and
 * sequential readers have the clusters ahead of them decoded in advance
 * (src/block/decode-ahead.ts). Whatever path a cluster takes, the bytes are
 * qemu-img's, a damaged cluster fails only the reads that cover it (every
 * time, with the guest offset named), and a close while clusters are still
 * decoding ahead ends cleanly.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { CorruptImageError, openImage } from '../src/index.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, seededBytes, skipWithoutQemu } from './helpers/qemu.js';
import { l2EntryLocation, readBE64, writeAt } from './helpers/qcow2-layout.js';

const execFileAsync = promisify(execFile);
const KiB = 1024;
const MiB = 1024 * KiB;
const CLUSTER = 64 * KiB;
const COMPRESSED_OFFSET_MASK = (1n << 54n) - 1n; // 64 KiB clusters: 62 - (16 - 8) offset bits

/** 6 MiB: text (compresses) and random bytes (stored plainly) in alternating 1.5 MiB stretches. */
async function compressedImage(compression: 'zlib' | 'zstd'): Promise<{ dir: string; path: string; reference: Buffer }> {
  const dir = await makeTempDir();
  const source = join(dir, 'source.raw');
  const text = Buffer.from('text for a compressed qcow2 image read in parallel\n'.repeat(40_000)).subarray(0, 1.5 * MiB);
  await writeFile(source, Buffer.concat([text, seededBytes(11, 1.5 * MiB), text, seededBytes(12, 1.5 * MiB)]));
  const path = join(dir, `disk-${compression}.qcow2`);
  await qemuImg(['convert', '-c', '-O', 'qcow2', '-o', `compression_type=${compression}`, source, path]);
  return { dir, path, reference: await qemuConvertToRaw(path, dir, 'qcow2') };
}

describe.skipIf(skipWithoutQemu('compressed-parallel'))('compressed clusters decoded side by side', () => {
  it('this machine has a decode worker (the paths below are the parallel ones)', () => {
    expect(availableParallelism()).toBeGreaterThan(1);
  });

  for (const compression of ['zlib', 'zstd'] as const) {
    it(`${compression}: sequential 128 KiB and 1 MiB reads, 1 MiB reads out of order and 4 KiB reads all return qemu-img's bytes`, async () => {
      const { path, reference } = await compressedImage(compression);
      for (const chunk of [128 * KiB, MiB]) {
        const image = await openImage(path, { readOnly: true });
        try {
          for (let offset = 0; offset < image.length; offset += chunk) {
            const buffer = Buffer.alloc(chunk, 0xee);
            await image.read(offset, buffer);
            expect(buffer.equals(reference.subarray(offset, offset + chunk)), `${chunk}@${offset}`).toBe(true);
          }
        } finally {
          await image.close();
        }
      }
      const image = await openImage(path, { readOnly: true });
      try {
        // Several reads at once, backwards, off cluster boundaries: decodes ahead of no reader, shared decodes.
        const offsets = [5 * MiB - 1000, 3 * MiB + 7, 2 * MiB, MiB + 12345, 0];
        const buffers = offsets.map(() => Buffer.alloc(MiB - 1, 0xee));
        await Promise.all(offsets.map((offset, i) => image.read(offset, buffers[i]!)));
        offsets.forEach((offset, i) => expect(buffers[i]!.equals(reference.subarray(offset, offset + MiB - 1)), `at ${offset}`).toBe(true));
        for (const offset of [100, 2 * MiB + 4096, 4 * MiB + 60 * KiB]) {
          const small = Buffer.alloc(4 * KiB, 0xee);
          await image.read(offset, small);
          expect(small.equals(reference.subarray(offset, offset + 4 * KiB))).toBe(true);
        }
      } finally {
        await image.close();
      }
    });
  }

  it('a damaged cluster inside 1 MiB reads fails them with its guest offset, every time, by whichever path; its neighbours read', async () => {
    const { path, reference } = await compressedImage('zstd');
    const bad = 10 * CLUSTER; // inside the first text stretch, so compressed
    const hostOffset = Number((await readBE64(path, (await l2EntryLocation(path, bad)).l2EntryOffset)) & COMPRESSED_OFFSET_MASK);
    await writeAt(path, hostOffset, Buffer.from([0xde, 0xad, 0xbe, 0xef])); // its zstd magic: compressed text clusters are a few hundred bytes
    const image = await openImage(path, { readOnly: true });
    try {
      // Sequential 1 MiB reads: the bad cluster is met by the read that covers it (decoded here or on a worker)
      // after the read before it decoded ahead into it; it must fail each time and cache nothing.
      for (let attempt = 0; attempt < 3; attempt++) {
        for (let offset = 0; offset < 3 * MiB; offset += MiB) {
          const buffer = Buffer.alloc(MiB);
          const covers = offset <= bad && bad < offset + MiB;
          const result = await image.read(offset, buffer).then(
            () => undefined,
            (error: unknown) => error,
          );
          if (covers) {
            expect(result).toBeInstanceOf(CorruptImageError);
            expect((result as Error).message).toMatch(/compressed cluster for guest offset 655360/);
          } else {
            expect(result).toBeUndefined();
            expect(buffer.equals(reference.subarray(offset, offset + MiB))).toBe(true);
          }
        }
      }
      const before = Buffer.alloc(CLUSTER);
      await image.read(bad - CLUSTER, before);
      expect(before.equals(reference.subarray(bad - CLUSTER, bad))).toBe(true);
      const after = Buffer.alloc(CLUSTER);
      await image.read(bad + CLUSTER, after);
      expect(after.equals(reference.subarray(bad + CLUSTER, bad + 2 * CLUSTER))).toBe(true);
    } finally {
      await image.close();
    }
  });

  it('when the decode workers cannot start, 1 MiB reads still return qemu-img\'s bytes, decoded on the calling thread, promptly', async () => {
    const { dir, path, reference } = await compressedImage('zstd');
    const library = pathToFileURL(join(process.cwd(), 'dist', 'index.js')).href;
    const script = `
      import { createHash } from 'node:crypto';
      import { openImage } from ${JSON.stringify(library)};
      const image = await openImage(${JSON.stringify(path)}, { readOnly: true });
      const hash = createHash('sha256');
      for (let offset = 0; offset < image.length; offset += 1048576) {
        const buffer = Buffer.alloc(Math.min(1048576, image.length - offset));
        await image.read(offset, buffer);
        hash.update(buffer);
      }
      await image.close();
      console.log(hash.digest('hex'));`;
    const started = Date.now();
    const { stdout, stderr } = await execFileAsync(process.execPath, ['--input-type=module', '-e', script], {
      cwd: dir,
      env: { ...process.env, IMGMOUNT_TEST_DECODE_WORKER: join(dir, 'no-such-worker.js'), DEBUG: 'imgmount:decode-pool' },
      maxBuffer: 16 * MiB,
    });
    expect(stdout.trim()).toBe(createHash('sha256').update(reference).digest('hex'));
    expect(stderr).toMatch(/decode worker failed: .*no-such-worker\.js.*decoding on the calling thread/);
    expect(Date.now() - started).toBeLessThan(10_000);
  });

  it('closing right after sequential reads (clusters still decoding ahead) resolves, and later reads are refused', async () => {
    const { path } = await compressedImage('zlib');
    const image = await openImage(path, { readOnly: true });
    for (let offset = 0; offset < 512 * KiB; offset += 128 * KiB) await image.read(offset, Buffer.alloc(128 * KiB));
    await image.close();
    await expect(image.read(0, Buffer.alloc(4096))).rejects.toThrow(/is closed/);
  });
});
