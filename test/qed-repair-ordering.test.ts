/**
 * check -r on a QED image with a data cluster referenced twice: the copy is
 * written and flushed before the L2 table that points to it is rewritten, as
 * for allocating writes, so a crash in between loses nothing (seen through a
 * protocol that records every call).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage } from '../src/index.js';
import { qed } from '../src/formats/qed/index.js';
import { makeTempDir, openQedOver, qedEntryLocations, readU64, seededBytes, spyProtocol, writeU64 } from './helpers/qemu.js';

const CLUSTER = 4096;

async function newImage(name: string, size = 4 * 1024 * 1024): Promise<string> {
  const dir = await makeTempDir();
  const path = join(dir, name);
  await createImage(path, 'qed', { size, options: { cluster_size: String(CLUSTER), table_size: '1' } });
  return path;
}

describe('QED check -r orders a cluster copy before the table that points to it', () => {
  it('copies the cluster referenced twice, flushes, then rewrites the L2 table', async () => {
    const path = await newImage('shared.qed');
    const spy0 = await spyProtocol(path, false);
    const setup = await openQedOver(spy0);
    await setup.write(0, seededBytes(5, CLUSTER));
    await setup.write(CLUSTER, seededBytes(6, CLUSTER));
    await setup.close();
    // Point guest cluster 1 at guest cluster 0's data: one data cluster referenced twice.
    const first = await qedEntryLocations(path, 0);
    const second = await qedEntryLocations(path, CLUSTER);
    await writeU64(path, second.l2EntryOffset, await readU64(path, first.l2EntryOffset));
    const shared = Number(await readU64(path, first.l2EntryOffset));

    const spy = await spyProtocol(path, false);
    const result = await qed.check!(spy, { repair: true });
    await spy.close();
    expect(result.corruptionsFixed).toBe(1);

    const writeOfTable = spy.calls.findIndex((call) => call.startsWith(`write ${first.l2Offset} `));
    const copyRead = spy.calls.indexOf(`read ${shared} ${CLUSTER}`);
    expect(copyRead).toBeGreaterThanOrEqual(0);
    const copyWrite = spy.calls.findIndex((call, index) => index > copyRead && /^write \d+ 4096$/.test(call));
    expect(copyWrite).toBeGreaterThan(copyRead);
    expect(writeOfTable).toBeGreaterThan(copyWrite);
    // A flush between the copy and the table that points to it.
    expect(spy.calls.slice(copyWrite + 1, writeOfTable)).toContain('flush');
  });

  it('copies an L2 table referenced twice (and its clusters), flushes, then rewrites the L1 table', async () => {
    const path = await newImage('shared-table.qed');
    const setup = await openQedOver(await spyProtocol(path, false));
    const l2Span = (CLUSTER / 8) * CLUSTER;
    await setup.write(0, seededBytes(7, CLUSTER));
    await setup.write(l2Span, seededBytes(8, CLUSTER));
    await setup.close();
    const first = await qedEntryLocations(path, 0);
    const second = await qedEntryLocations(path, l2Span);
    await writeU64(path, second.l1EntryOffset, BigInt(first.l2Offset));
    const l1Offset = Number(await readU64(path, 40));

    const spy = await spyProtocol(path, false);
    const result = await qed.check!(spy, { repair: true });
    await spy.close();
    expect(result.corruptionsFixed).toBeGreaterThanOrEqual(1);
    const writeOfL1 = spy.calls.findIndex((call) => call.startsWith(`write ${l1Offset} `));
    expect(writeOfL1).toBeGreaterThan(0);
    const before = spy.calls.slice(0, writeOfL1).filter((call) => call.startsWith('write') || call === 'flush');
    expect(before[before.length - 1]).toBe('flush');
  });
});
