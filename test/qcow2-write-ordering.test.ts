/**
 * qcow2 write ordering, read from the log-writes filter's record of what
 * reached the image file: an L2 entry that makes a cluster visible reaches
 * the file only after a flush that began once the cluster's data had been
 * written, unless the cluster, unwritten, reads as what the guest saw there
 * before. Both cases here were found by scripts/power-loss.sh as crash
 * states where a write not yet acknowledged read back as neither the old
 * bytes nor the new ones:
 *  - lazy refcounts over a backing file: a whole-cluster write's entry went
 *    to disk at once, before its data (the cluster read as zeros, not as the
 *    backing file);
 *  - a "zero, allocated" cluster (qemu-io write -z) rewritten in place: its
 *    zero flag was cleared on disk before the new data (the cluster showed
 *    the bytes it held before it was zeroed).
 * And the other way round: a refcount decrement reaches the file only after
 * a flush that began once the L2 change dropping the reference had been
 * written (else a power loss could keep a cluster referenced but free, and
 * hand it out twice): overwriting a compressed cluster, and zeroing a
 * cluster shared with an internal snapshot.
 */
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../src/index.js';
import { parseWriteLog, type WriteLog } from '../src/block/filters/write-log.js';
import { expectDataFlushedFirst, flushBetween } from './helpers/write-order.js';
import { makeTempDir, qemuImg, qemuIo, seededBytes, skipWithoutQemu } from './helpers/qemu.js';

const CLUSTER = 4096;

/** Writes `data` at guest `offset` through log-writes; returns the log and where the cluster landed. */
async function writeLogged(path: string, dir: string, offset: number, data: Buffer): Promise<{ log: WriteLog; hostOffset: number }> {
  const logPath = join(dir, 'writes.log');
  const image = await openImage(path, { format: 'qcow2', idleCleanSeconds: 0, filters: [{ name: 'log-writes', log: logPath }] });
  await image.write(offset, data);
  const [run] = await image.map(offset - (offset % CLUSTER), CLUSTER);
  await image.close();
  expect(run!.hostOffset).toBeDefined();
  return { log: parseWriteLog(await readFile(logPath)), hostOffset: run!.hostOffset! };
}

describe.skipIf(skipWithoutQemu('qcow2 write ordering'))('qcow2 write ordering (log-writes)', () => {
  it('lazy refcounts over a backing file: a whole-cluster allocation is flushed before its L2 entry is written', async () => {
    const dir = await makeTempDir();
    const base = join(dir, 'base.qcow2');
    const path = join(dir, 'top.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, base, '4M']);
    await qemuIo(base, ['write -q -P 0x5a 0 1M'], 'qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER},lazy_refcounts=on`, '-b', base, '-F', 'qcow2', path]);
    const { log, hostOffset } = await writeLogged(path, dir, 8 * CLUSTER, seededBytes(1, 2 * CLUSTER));
    expectDataFlushedFirst(log, hostOffset);
  });

  it('a zero-allocated cluster rewritten in place: its zero flag is cleared on disk only after the data is flushed', async () => {
    for (const lazy of ['off', 'on']) {
      const dir = await makeTempDir();
      const path = join(dir, 'disk.qcow2');
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER},lazy_refcounts=${lazy}`, path, '4M']);
      await qemuIo(path, ['write -q -P 0xa5 0 64k', 'write -q -z 0 64k'], 'qcow2');
      const { log, hostOffset } = await writeLogged(path, dir, 4 * CLUSTER + 100, seededBytes(2, 1000));
      expectDataFlushedFirst(log, hostOffset);
    }
  });

  for (const [what, prepare, change] of [
    [
      'overwriting a compressed cluster',
      async (dir: string, path: string) => {
        const raw = join(dir, 'src.qcow2');
        await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, raw, '4M']);
        await qemuIo(raw, ['write -q -P 0x33 0 64k'], 'qcow2');
        await qemuImg(['convert', '-q', '-c', '-f', 'qcow2', '-O', 'qcow2', '-o', `cluster_size=${CLUSTER}`, raw, path]);
      },
      (image: Awaited<ReturnType<typeof openImage>>) => image.write(2 * CLUSTER, seededBytes(3, CLUSTER)),
    ],
    [
      'zeroing a cluster shared with a snapshot',
      async (_dir: string, path: string) => {
        await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, path, '4M']);
        await qemuIo(path, ['write -q -P 0x44 0 64k'], 'qcow2');
        await qemuImg(['snapshot', '-c', 'before', path]);
      },
      (image: Awaited<ReturnType<typeof openImage>>) => image.zero(2 * CLUSTER, CLUSTER),
    ],
  ] as const) {
    it(`${what}: the refcount decrement is written only after a flush that follows the L2 change`, async () => {
      const dir = await makeTempDir();
      const path = join(dir, 'disk.qcow2');
      await prepare(dir, path);
      const header = Buffer.alloc(64);
      const file = await open(path, 'r');
      await file.read(header, 0, 64, 0);
      const table = Buffer.alloc(8);
      await file.read(table, 0, 8, Number(header.readBigUInt64BE(48)));
      await file.close();
      const block = Number(table.readBigUInt64BE(0));
      const logPath = join(dir, 'writes.log');
      const image = await openImage(path, { format: 'qcow2', idleCleanSeconds: 0, filters: [{ name: 'log-writes', log: logPath }] });
      await change(image);
      await image.close();
      const log = parseWriteLog(await readFile(logPath));
      const l2Writes = log.records.filter((r) => r.kind === 'write' && r.phase === 'issued' && r.length === 8 && !(r.offset >= block && r.offset < block + CLUSTER));
      expect(l2Writes.length, 'the L2 entry writes').toBeGreaterThan(0);
      const lastEntry = log.records.find((r) => r.kind === 'write' && r.phase === 'ended' && r.id === l2Writes[l2Writes.length - 1]!.id)!;
      const refblockWrites = log.records.filter((r) => r.kind === 'write' && r.phase === 'issued' && r.index > lastEntry.index && r.offset >= block && r.offset < block + CLUSTER);
      expect(refblockWrites.length, 'a refcount write after the L2 change (the decrement)').toBeGreaterThan(0);
      expect(flushBetween(log, lastEntry.index, refblockWrites[0]!.index), `a flush between the L2 change (record ${lastEntry.index}) and the decrement (record ${refblockWrites[0]!.index})`).toBe(true);
    });
  }
});
