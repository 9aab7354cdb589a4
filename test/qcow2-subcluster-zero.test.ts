/**
 * qcow2 with extended L2 entries: zeroing and discard set subcluster zero bits
 * as qemu does (src/formats/qcow2/subcluster-zero.ts), judged against qemu-io
 * doing the same requests (`write -z -u`) on a copy of the image: the same
 * qemu-img map (flags per 2 KiB subcluster, over a backing file whose bytes
 * would show through an unallocated subcluster), qemu-img compare equal, and
 * qemu-img check clean (no leak: whole clusters that became zero were freed).
 */
import { copyFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../src/index.js';
import { makeTempDir, normalizeMap, qemuCheck, qemuCompare, qemuImg, qemuIo, qemuMap, skipWithoutQemu } from './helpers/qemu.js';

const KiB = 1024;
const CLUSTER = 64 * KiB;

/** [offset, length, what the library is asked: zero or discard] */
const REQUESTS: [number, number, 'zero' | 'discard'][] = [
  // A whole cluster: freed, every zero bit set.
  [1 * CLUSTER, CLUSTER, 'zero'],
  // Whole subclusters 4..6: their zero bits.
  [2 * CLUSTER + 4 * 2 * KiB, 3 * 2 * KiB, 'zero'],
  // Unaligned: subcluster 1 gets its zero bit, the parts of 0 and 2 are written as zeros.
  [3 * CLUSTER + 1000, 5000, 'discard'],
  // A cluster zeroed in two halves: every subcluster zero, then freed.
  [4 * CLUSTER, CLUSTER / 2, 'zero'],
  [4 * CLUSTER + CLUSTER / 2, CLUSTER / 2, 'discard'],
  // Never written in the top image (the backing file shows): zero bits in an entry without a host cluster.
  [5 * CLUSTER, 4 * 2 * KiB, 'zero'],
  // Across two clusters, subcluster-aligned.
  [6 * CLUSTER + 16 * KiB, 96 * KiB, 'discard'],
  // Inside one subcluster only: written as zeros.
  [8 * CLUSTER + 100, 200, 'zero'],
  // Over subclusters already zero and unallocated ones: nothing to write.
  [2 * CLUSTER, 16 * KiB, 'zero'],
];

describe.skipIf(skipWithoutQemu('qcow2 subcluster zero'))('qcow2 extended L2: zeroing sets subcluster zero bits, as qemu', () => {
  it('zero and discard give the qemu-img map, contents and check of qemu-io write -z -u', async () => {
    const dir = await makeTempDir();
    const base = join(dir, 'base.qcow2');
    const ours = join(dir, 'ours.qcow2');
    const theirs = join(dir, 'theirs.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);
    await qemuIo(base, ['write -q -P 0x5a 0 1M'], 'qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', base, '-F', 'qcow2', ours, '1M']);
    // Clusters 0-4 and 6-8 written whole; 5 left to the backing file; 9 only partly (subclusters 0-1).
    await qemuIo(ours, ['write -q -P 0x11 0 320k', 'write -q -P 0x22 384k 192k', 'write -q -P 0x33 576k 4k'], 'qcow2');
    await copyFile(ours, theirs);

    const image = await openImage(ours, { format: 'qcow2', idleCleanSeconds: 0 });
    try {
      for (const [offset, length, what] of REQUESTS) await (what === 'zero' ? image.zero(offset, length) : image.discard(offset, length));
    } finally {
      await image.close();
    }
    await qemuIo(theirs, REQUESTS.map(([offset, length]) => `write -q -z -u ${offset} ${length}`), 'qcow2');

    expect(normalizeMap(await qemuMap(ours, 'qcow2'), false)).toEqual(normalizeMap(await qemuMap(theirs, 'qcow2'), false));
    const compare = await qemuCompare(ours, 'qcow2', theirs, 'qcow2');
    expect(compare.code, compare.stdout + compare.stderr).toBe(0);
    const check = await qemuCheck(ours, 'qcow2');
    expect(check.code, check.stdout + check.stderr).toBe(0);
    // The freed clusters (1, and 4 once both halves were zero) are not part of the file's use any more.
    expect((await stat(ours)).blocks * 512).toBeLessThan((await stat(theirs)).blocks * 512 + CLUSTER);
  });
});
