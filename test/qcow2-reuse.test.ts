/**
 * qcow2: host clusters freed while the image is open are handed out again in
 * the same session (src/formats/qcow2/quarantine.ts), judged by qemu-img:
 * - a workload that discards and rewrites whole clusters round after round
 *   keeps the file at its high-water mark (size), its allocated size (`du`)
 *   drops after each discard and flush (freed clusters are punched), and
 *   qemu-img check is clean and compare equal to a model afterwards; with and
 *   without lazy refcounts;
 * - a read in flight over a freed cluster (held by the delay filter) still
 *   returns the old bytes while a discard, a flush and an allocating write
 *   happen; once it ended, the cluster is reused;
 * - from the log-writes record: a freed cluster gets another offset's data only
 *   after the L2 entry that dropped it and its refcount decrement were written
 *   and a flush that began after both ended (else a crash could leave two
 *   entries naming one cluster);
 * - compressed clusters' host clusters are reused too, and reading the new
 *   compressed data there never returns the old decoded cluster;
 * - without a guest flush, the idle clean gives discarded clusters' space back.
 */
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../src/index.js';
import { parseWriteLog, type WriteLog } from '../src/block/filters/write-log.js';
import { makeTempDir, qemuCheck, qemuCompare, qemuImg, readBytes, seededBytes, skipWithoutQemu } from './helpers/qemu.js';
import { seededRandom } from './helpers/random.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** Slack for the file system's own blocks in st_blocks (ext4 extent tree blocks), far below one 64 KiB cluster. */
const EXTENT_BLOCKS = 16 * KiB;

/** A big-endian u64 of the file (qcow2 fields). */
async function readU64(path: string, offset: number): Promise<bigint> {
  return (await readBytes(path, offset, 8)).readBigUInt64BE(0);
}

async function sizes(path: string): Promise<{ size: number; du: number }> {
  const s = await stat(path);
  return { size: s.size, du: s.blocks * 512 };
}

async function expectCleanAndEqual(path: string, model: Buffer, dir: string): Promise<void> {
  const check = await qemuCheck(path, 'qcow2');
  expect(check.code, check.stdout + check.stderr).toBe(0);
  const raw = join(dir, 'model.raw');
  await writeFile(raw, model);
  const compare = await qemuCompare(path, 'qcow2', raw, 'raw');
  expect(compare.code, compare.stdout + compare.stderr).toBe(0);
}

/** Whether a flush was issued after record `after` and ended before record `before`. */
function flushBetween(log: WriteLog, after: number, before: number): boolean {
  const issued = new Set<number>();
  for (const r of log.records.slice(after + 1, before)) {
    if (r.kind !== 'flush') continue;
    if (r.phase === 'issued') issued.add(r.id);
    else if (r.phase === 'ended' && issued.has(r.id)) return true;
  }
  return false;
}

describe.skipIf(skipWithoutQemu('qcow2 cluster reuse'))('qcow2: freed clusters are reused while open', () => {
  for (const lazy of ['off', 'on']) {
    it(`lazy_refcounts=${lazy}: discarding and rewriting clusters for 12 rounds keeps the file at its high-water mark; qemu-img check clean, compare equal`, async () => {
      const dir = await makeTempDir();
      const path = join(dir, 'disk.qcow2');
      const cluster = 64 * KiB;
      const clusters = 48;
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `lazy_refcounts=${lazy}`, path, '8M']);
      const model = Buffer.alloc(8 * MiB);
      const random = seededRandom(lazy === 'on' ? 7 : 3);
      const image = await openImage(path, { format: 'qcow2', idleCleanSeconds: 0 });
      try {
        // Round 0 fills the region: the high-water mark.
        const fill = seededBytes(1, clusters * cluster);
        await image.write(0, fill);
        fill.copy(model, 0);
        await image.flush();
        const high = await sizes(path);
        for (let round = 1; round <= 12; round++) {
          // Discard a few runs of whole clusters, and a partial range (written as zeros in place).
          const discarded: number[] = [];
          for (let n = 0; n < 4; n++) {
            const first = random.int(0, clusters - 4);
            const count = random.int(1, 3);
            await image.discard(first * cluster, count * cluster);
            model.fill(0, first * cluster, (first + count) * cluster);
            for (let c = first; c < first + count; c++) if (!discarded.includes(c)) discarded.push(c);
          }
          const partial = random.int(0, clusters * cluster - 5000);
          await image.discard(partial, 4000);
          model.fill(0, partial, partial + 4000);
          await image.flush();
          const afterDiscard = await sizes(path);
          // The freed clusters are punched: at least all but one of the discarded clusters' space is gone.
          expect(afterDiscard.du, `round ${round}: du after discarding ${discarded.length} clusters`).toBeLessThanOrEqual(high.du - (discarded.length - 1) * cluster);
          // Rewrite them one cluster at a time (partly: the rest of each cluster is zeros).
          for (const c of discarded) {
            const length = random.int(1, cluster / 512) * 512;
            const data = seededBytes(round * 1000 + c, length);
            await image.write(c * cluster, data);
            data.copy(model, c * cluster);
          }
          await image.flush();
          const after = await sizes(path);
          expect(after.size, `round ${round}: file size`).toBeLessThanOrEqual(high.size);
          // ext4 counts extent tree blocks in st_blocks: punched holes split the file into more extents (4 KiB each, a few at most here).
          expect(after.du, `round ${round}: du`).toBeLessThanOrEqual(high.du + EXTENT_BLOCKS);
        }
        const got = Buffer.alloc(model.length);
        await image.read(0, got);
        expect(got.equals(model)).toBe(true);
      } finally {
        await image.close();
      }
      await expectCleanAndEqual(path, model, dir);
    });
  }

  it('a read in flight over a cluster that is discarded returns the old bytes; the cluster is reused only after it ended', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qcow2');
    const cluster = 64 * KiB;
    await qemuImg(['create', '-q', '-f', 'qcow2', path, '4M']);
    const old = seededBytes(11, cluster);
    const image = await openImage(path, { format: 'qcow2', idleCleanSeconds: 0, filters: [{ name: 'delay', read: 800 }] });
    try {
      // Allocates the L2 table and loads the refcount block (so the steps below read nothing more).
      await image.write(0, old);
      await image.write(cluster, seededBytes(12, cluster));
      await image.flush();
      const [first] = await image.map(0, cluster);
      const freed = first!.hostOffset!;
      const got = Buffer.alloc(cluster);
      const reading = image.read(0, got);
      await image.discard(0, cluster);
      await image.flush();
      await image.flush();
      const fresh = seededBytes(13, cluster);
      await image.write(4 * cluster, fresh);
      await image.flush();
      const [during] = await image.map(4 * cluster, cluster);
      expect(during!.hostOffset, 'the allocation made while the read was in flight').not.toBe(freed);
      await reading;
      expect(got.equals(old), 'the read in flight returned the bytes that were there when it began').toBe(true);
      // The read is over: the next allocation takes the freed cluster.
      await image.write(6 * cluster, seededBytes(14, cluster));
      const [after] = await image.map(6 * cluster, cluster);
      expect(after!.hostOffset, 'the allocation after the read ended').toBe(freed);
      const model = Buffer.alloc(4 * MiB);
      seededBytes(12, cluster).copy(model, cluster);
      fresh.copy(model, 4 * cluster);
      seededBytes(14, cluster).copy(model, 6 * cluster);
      await image.close();
      await expectCleanAndEqual(path, model, dir);
    } finally {
      await image.close();
    }
  }, 20_000);

  for (const lazy of ['off', 'on']) {
    it(`lazy_refcounts=${lazy}: a freed cluster gets new data only after its dropped L2 entry and refcount decrement were written and flushed`, async () => {
      const dir = await makeTempDir();
      const path = join(dir, 'disk.qcow2');
      const cluster = 4 * KiB;
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cluster},lazy_refcounts=${lazy}`, path, '4M']);
      const logPath = join(dir, 'writes.log');
      const image = await openImage(path, { format: 'qcow2', idleCleanSeconds: 0, filters: [{ name: 'log-writes', log: logPath }] });
      await image.write(0, seededBytes(21, 4 * cluster));
      await image.flush();
      const [run] = await image.map(2 * cluster, cluster);
      const freed = run!.hostOffset!;
      await image.discard(2 * cluster, cluster);
      // Before a flush the free is not durable: the cluster is not taken yet.
      await image.write(30 * cluster, seededBytes(23, cluster));
      const [early] = await image.map(30 * cluster, cluster);
      expect(early!.hostOffset, 'an allocation before the free was flushed').not.toBe(freed);
      await image.flush();
      await image.write(40 * cluster, seededBytes(22, cluster));
      const [reused] = await image.map(40 * cluster, cluster);
      await image.close();
      expect(reused!.hostOffset, 'the freed cluster was reused').toBe(freed);

      const log = parseWriteLog(await readFile(logPath));
      const l1 = Number(await readU64(path, 40));
      const l2 = Number((await readU64(path, l1)) & ((1n << 56n) - 512n));
      const entryAt = l2 + 2 * 8;
      const table = Number(await readU64(path, 48));
      const block = Number(await readU64(path, table));
      const refcountAt = block + (freed / cluster) * 2;
      const covers = (at: number) => (r: { kind: string; phase: string; offset: number; length: number }) => r.kind === 'write' && r.phase === 'issued' && r.offset <= at && at < r.offset + r.length;
      const dataWrites = log.records.filter(covers(freed));
      expect(dataWrites.length, 'writes to the freed cluster: the first owner, then the new one').toBeGreaterThanOrEqual(2);
      const reuse = dataWrites[dataWrites.length - 1]!;
      const entryWrites = log.records.filter((r) => covers(entryAt)(r) && r.index < reuse.index);
      const dropped = entryWrites[entryWrites.length - 1];
      expect(dropped, 'the write of the dropped L2 entry, before the reuse').toBeDefined();
      expect(dropped!.data?.subarray(entryAt - dropped!.offset, entryAt - dropped!.offset + 8).readBigUInt64BE(), 'the dropped entry is a zero cluster').toBe(1n);
      const decrement = log.records.filter((r) => covers(refcountAt)(r) && r.index > dropped!.index && r.index < reuse.index);
      expect(decrement.length, 'the refcount decrement, after the entry and before the reuse').toBeGreaterThan(0);
      const last = decrement[decrement.length - 1]!;
      const lastEnd = log.records.find((r) => r.kind === 'write' && r.phase === 'ended' && r.id === last.id)!;
      expect(last.data?.readUInt16BE(refcountAt - last.offset), 'the decrement writes refcount 0').toBe(0);
      expect(flushBetween(log, lastEnd.index, reuse.index), `a flush between the decrement (record ${lastEnd.index}) and the reuse (record ${reuse.index})`).toBe(true);
      const check = await qemuCheck(path, 'qcow2');
      expect(check.code, check.stdout + check.stderr).toBe(0);
    });
  }

  it('compressed clusters: their host clusters are reused once overwritten, and the new compressed data reads back (not the old decoded cluster)', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qcow2');
    const cluster = 64 * KiB;
    await qemuImg(['create', '-q', '-f', 'qcow2', path, '4M']);
    const model = Buffer.alloc(4 * MiB);
    const image = await openImage(path, { format: 'qcow2', idleCleanSeconds: 0 });
    try {
      // Compressible, distinct per round: the same compressed length, so the same key without a generation.
      const pattern = (round: number): Buffer => Buffer.alloc(cluster, round + 1);
      await image.writeCompressed(0, pattern(0));
      await image.flush();
      const got = Buffer.alloc(cluster);
      await image.read(0, got);
      expect(got.equals(pattern(0))).toBe(true);
      const high = await sizes(path);
      for (let round = 1; round <= 5; round++) {
        await image.discard(0, cluster);
        await image.flush();
        await image.writeCompressed(0, pattern(round));
        await image.flush();
        // The host cluster of the compressed data was freed and taken again: the file does not grow.
        expect((await sizes(path)).size, `round ${round}: file size`).toBeLessThanOrEqual(high.size);
        await image.read(0, got);
        expect(got.equals(pattern(round)), `round ${round}: reads the new compressed data`).toBe(true);
      }
      pattern(5).copy(model, 0);
    } finally {
      await image.close();
    }
    await expectCleanAndEqual(path, model, dir);
  });

  it('discarded clusters are punched by the idle clean when the guest never flushes', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qcow2');
    const cluster = 64 * KiB;
    await qemuImg(['create', '-q', '-f', 'qcow2', path, '4M']);
    const image = await openImage(path, { format: 'qcow2', idleCleanSeconds: 1 });
    try {
      await image.write(0, seededBytes(31, 8 * cluster));
      await image.flush();
      const before = await sizes(path);
      await image.discard(2 * cluster, 4 * cluster);
      await new Promise((resolve) => setTimeout(resolve, 2500));
      expect((await sizes(path)).du, 'du once the image was idle').toBeLessThanOrEqual(before.du - 3 * cluster);
    } finally {
      await image.close();
    }
    const model = Buffer.alloc(4 * MiB);
    seededBytes(31, 8 * cluster).copy(model);
    model.fill(0, 2 * cluster, 6 * cluster);
    await expectCleanAndEqual(path, model, dir);
  });
});
