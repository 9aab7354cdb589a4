/**
 * `imgmount check [-r leaks|all]` on qcow2 images against `qemu-img check`:
 * images made by qemu-img and qemu-io, damaged by hand from the specification
 * (refcounts raised or lowered, L2 entries pointed into metadata, past the end
 * of the file, unaligned, COPIED flags flipped, a refcount block dropped), in
 * several shapes (snapshots, compressed clusters, extended L2, refcount widths
 * 1 and 64). For each: the same JSON and exit status as qemu-img on an
 * identical copy; after our repair qemu-img check finds what it finds after its
 * own repair (nothing, where it can repair everything), and qemu-img compare
 * sees the same guest content as in the copy qemu-img repaired.
 */
import { copyFile, stat, truncate } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, patchBytes, qemuImg, qemuIo, readBytes, run, skipWithoutQemu } from './helpers/qemu.js';
import { l2EntryLocation, QCOW2, readBE32, readBE64, writeBE64 } from './helpers/qcow2-layout.js';

const bin = resolve(import.meta.dirname, '../bin/imgmount');

interface CheckRun {
  code: number;
  json: Record<string, unknown> | undefined;
  stderr: string;
}

async function check(tool: 'ours' | 'qemu', dir: string, file: string, repair?: 'leaks' | 'all'): Promise<CheckRun> {
  const args = ['check', '--output=json', ...(repair ? ['-r', repair] : []), file];
  const result = tool === 'ours' ? await run(bin, args, { cwd: dir }) : await run('qemu-img', args, { cwd: dir });
  return { code: result.code, json: result.stdout.trim() ? (JSON.parse(result.stdout) as Record<string, unknown>) : undefined, stderr: result.stderr };
}

/** Where the refcount of host cluster `cluster` lives, and its width, from the header (docs/interop/qcow2.txt). */
async function refcountEntry(path: string, cluster: number): Promise<{ blockOffset: number; index: number; bits: number; tableEntryOffset: number }> {
  const clusterBits = await readBE32(path, QCOW2.clusterBits);
  const version = await readBE32(path, QCOW2.version);
  const bits = version === 3 ? 2 ** (await readBE32(path, QCOW2.refcountOrder)) : 16;
  const perBlock = (2 ** clusterBits * 8) / bits;
  const table = Number(await readBE64(path, QCOW2.refcountTableOffset));
  const tableEntryOffset = table + Math.floor(cluster / perBlock) * 8;
  const blockOffset = Number((await readBE64(path, tableEntryOffset)) & 0xfffffffffffffe00n);
  return { blockOffset, index: cluster % perBlock, bits, tableEntryOffset };
}

async function getRefcountByHand(path: string, cluster: number): Promise<number> {
  const { blockOffset, index, bits } = await refcountEntry(path, cluster);
  if (bits >= 8) {
    const bytes = await readBytes(path, blockOffset + (index * bits) / 8, bits / 8);
    return bits === 64 ? Number(bytes.readBigUInt64BE(0)) : bytes.readUIntBE(0, bits / 8);
  }
  const byte = (await readBytes(path, blockOffset + Math.floor((index * bits) / 8), 1))[0]!;
  return (byte >> ((index * bits) % 8)) & ((1 << bits) - 1);
}

async function setRefcountByHand(path: string, cluster: number, value: number): Promise<void> {
  const { blockOffset, index, bits } = await refcountEntry(path, cluster);
  if (bits >= 8) {
    const bytes = Buffer.alloc(bits / 8);
    if (bits === 64) bytes.writeBigUInt64BE(BigInt(value));
    else bytes.writeUIntBE(value, 0, bits / 8);
    await patchBytes(path, blockOffset + (index * bits) / 8, bytes);
    return;
  }
  const at = blockOffset + Math.floor((index * bits) / 8);
  const shift = (index * bits) % 8;
  const byte = (await readBytes(path, at, 1))[0]!;
  const mask = ((1 << bits) - 1) << shift;
  await patchBytes(path, at, Buffer.from([(byte & ~mask) | (value << shift)]));
}

/** The host cluster of the data at guest `offset`, and its L2 entry's location. */
async function dataCluster(path: string, offset: number, extendedL2 = false): Promise<{ cluster: number; entryOffset: number; entry: bigint; clusterSize: number }> {
  const { l2EntryOffset, clusterSize } = await l2EntryLocation(path, offset, extendedL2);
  const entry = await readBE64(path, l2EntryOffset);
  return { cluster: Number((entry & 0x00fffffffffffe00n) / BigInt(clusterSize)), entryOffset: l2EntryOffset, entry, clusterSize };
}

/** Grows the file by one cluster and gives that cluster refcount 1: a leak. */
async function leakNewCluster(path: string): Promise<void> {
  const clusterSize = 2 ** (await readBE32(path, QCOW2.clusterBits));
  const size = (await stat(path)).size;
  const cluster = Math.ceil(size / clusterSize);
  await truncate(path, (cluster + 1) * clusterSize);
  await setRefcountByHand(path, cluster, 1);
}

interface Case {
  name: string;
  create: string[];
  writes: string[];
  damage: (path: string) => Promise<void>;
  /** L2 entries are 16 bytes. */
  extendedL2?: boolean;
  /** qemu-img 7.2 cannot repair this (it keeps entries pointing past the end of the file); we drop them. */
  beyondQemu?: boolean;
}

const COPIED = 1n << 63n;

/**
 * One 512-byte write every 64 KiB of a 64 MiB image with 512-byte clusters: 1024
 * L2 tables (several batches of them for the check) and a dozen refcount blocks.
 */
const MANY_TABLES = 1024;
const MANY_TABLE_WRITES = Array.from({ length: MANY_TABLES }, (_, index) => `write -P ${(index % 250) + 1} ${index * 64}k 512`);

const cases: Case[] = [
  {
    name: 'a refcount raised by hand (leak, refcount 2 reference 1)',
    create: [], writes: ['write -P 1 0 128k'],
    damage: async (p) => {
      const { cluster } = await dataCluster(p, 0);
      await setRefcountByHand(p, cluster, 2);
    },
  },
  {
    name: 'a free cluster given refcount 1 (leak, refcount 1 reference 0)',
    create: [], writes: ['write -P 1 0 64k'],
    damage: (p) => leakNewCluster(p),
  },
  {
    name: 'a refcount lowered to 0 (the refcount structure is rebuilt)',
    create: [], writes: ['write -P 2 0 128k'],
    damage: async (p) => {
      const { cluster } = await dataCluster(p, 64 * 1024);
      await setRefcountByHand(p, cluster, 0);
    },
  },
  {
    name: 'an L2 entry pointing into the L1 table (metadata)',
    create: [], writes: ['write -P 3 0 64k', 'write -P 4 1M 64k'],
    damage: async (p) => {
      const l1 = await readBE64(p, QCOW2.l1TableOffset);
      const { entryOffset } = await dataCluster(p, 1024 * 1024);
      await writeBE64(p, entryOffset, COPIED | l1);
    },
  },
  {
    name: 'an L2 entry pointing past the end of the file',
    beyondQemu: true,
    create: [], writes: ['write -P 5 0 64k', 'write -P 6 2M 64k'],
    damage: async (p) => {
      const { entryOffset } = await dataCluster(p, 2 * 1024 * 1024);
      await writeBE64(p, entryOffset, COPIED | (1n << 36n));
    },
  },
  {
    name: 'an unaligned L2 entry',
    create: [], writes: ['write -P 7 0 128k'],
    damage: async (p) => {
      const { entryOffset, entry } = await dataCluster(p, 0);
      await writeBE64(p, entryOffset, entry + 0x200n);
    },
  },
  {
    name: 'an unaligned preallocated zero cluster (repaired by qemu too)',
    create: [], writes: ['write -P 7 0 128k', 'write -z 0 64k'],
    damage: async (p) => {
      const { entryOffset } = await dataCluster(p, 0);
      const { entry } = await dataCluster(p, 64 * 1024);
      await writeBE64(p, entryOffset, (entry & ~COPIED) + 0x200n + 1n);
    },
  },
  {
    name: 'a COPIED flag cleared on an L2 entry and on an L1 entry',
    create: [], writes: ['write -P 8 0 64k'],
    damage: async (p) => {
      const { entryOffset, entry } = await dataCluster(p, 0);
      await writeBE64(p, entryOffset, entry & ~COPIED);
      const l1 = Number(await readBE64(p, QCOW2.l1TableOffset));
      await writeBE64(p, l1, (await readBE64(p, l1)) & ~COPIED);
    },
  },
  {
    name: 'a refcount block dropped from the refcount table',
    create: [], writes: ['write -P 9 0 64k'],
    damage: async (p) => {
      const { tableEntryOffset } = await refcountEntry(p, 0);
      await writeBE64(p, tableEntryOffset, 0n);
    },
  },
  {
    name: 'compressed clusters with a leak and a lowered refcount',
    create: [], writes: ['write -c -P 10 0 64k', 'write -c -P 11 64k 64k', 'write -P 12 1M 64k'],
    damage: async (p) => {
      const { cluster } = await dataCluster(p, 1024 * 1024);
      await setRefcountByHand(p, cluster + 2, 1);
      const first = await readBE64(p, (await l2EntryLocation(p, 0)).l2EntryOffset);
      const compressedCluster = Number((first & ((1n << 54n) - 1n)) / 65536n);
      await setRefcountByHand(p, compressedCluster, 0);
    },
  },
  {
    name: 'a snapshot whose shared cluster lost a reference (refcount 2 -> 1)',
    create: [], writes: ['write -P 13 0 64k', 'SNAPSHOT', 'write -P 14 1M 64k'],
    damage: async (p) => {
      const { cluster } = await dataCluster(p, 0);
      expect(await getRefcountByHand(p, cluster)).toBe(2);
      await setRefcountByHand(p, cluster, 1);
    },
  },
  {
    name: 'extended L2 entries: a leak and an unaligned entry',
    create: ['-o', 'extended_l2=on'], writes: ['write -P 15 0 64k', 'write -P 16 1M 64k'], extendedL2: true,
    damage: async (p) => {
      const { cluster } = await dataCluster(p, 0, true);
      await setRefcountByHand(p, cluster, 3);
      const second = await dataCluster(p, 1024 * 1024, true);
      await writeBE64(p, second.entryOffset, second.entry + 0x400n);
    },
  },
  {
    name: 'many L2 tables: a COPIED flag cleared in the last one, a refcount raised in the one before',
    create: ['-o', 'cluster_size=512'], writes: [],
    damage: async (p) => {
      await qemuIo(p, MANY_TABLE_WRITES, 'qcow2');
      const last = (MANY_TABLES - 1) * 64 * 1024;
      const { entryOffset, entry } = await dataCluster(p, last);
      await writeBE64(p, entryOffset, entry & ~COPIED);
      const { cluster } = await dataCluster(p, last - 64 * 1024);
      await setRefcountByHand(p, cluster, 2);
    },
  },
  {
    name: 'refcount_bits=1: a leak',
    create: ['-o', 'refcount_bits=1'], writes: ['write -P 17 0 64k'],
    damage: (p) => leakNewCluster(p),
  },
  {
    name: 'refcount_bits=64: a leak and a refcount too low',
    create: ['-o', 'refcount_bits=64'], writes: ['write -P 18 0 128k'],
    damage: async (p) => {
      const { cluster } = await dataCluster(p, 0);
      await setRefcountByHand(p, cluster, 5);
      await setRefcountByHand(p, cluster + 1, 0);
    },
  },
];

async function makeImage(dir: string, name: string, testCase: Case): Promise<string> {
  const path = join(dir, name);
  await qemuImg(['create', '-q', '-f', 'qcow2', ...testCase.create, path, '64M']);
  for (const command of testCase.writes) {
    if (command === 'SNAPSHOT') await qemuImg(['snapshot', '-c', 'snap1', path]);
    else await qemuIo(path, [command], 'qcow2');
  }
  await testCase.damage(path);
  return path;
}

function without(json: Record<string, unknown> | undefined, ...keys: string[]): Record<string, unknown> | undefined {
  if (!json) return json;
  const copy = { ...json };
  for (const key of keys) delete copy[key];
  return copy;
}

describe.skipIf(skipWithoutQemu('qcow2 check'))('qcow2 check against qemu-img check', () => {
  for (const testCase of cases) {
    it(`${testCase.name}: same findings, and repairs qemu-img agrees with`, async () => {
      const dir = await makeTempDir('imgmount-qcow2-check-');
      const original = await makeImage(dir, 'damaged.qcow2', testCase);
      for (const name of ['ours.qcow2', 'theirs.qcow2', 'ours-leaks.qcow2', 'theirs-leaks.qcow2']) await copyFile(original, join(dir, name));

      // Same JSON, key by key and in the same order, and the same exit status.
      const theirs = await check('qemu', dir, 'damaged.qcow2');
      const ours = await check('ours', dir, 'damaged.qcow2');
      expect(theirs.code).not.toBe(0);
      expect(ours.code).toBe(theirs.code);
      expect(JSON.stringify(ours.json)).toBe(JSON.stringify(theirs.json));

      // -r all: whatever qemu-img finds after its own repair, it finds after ours (nothing where it can repair).
      const repairedTheirs = await check('qemu', dir, 'theirs.qcow2', 'all');
      const repairedOurs = await check('ours', dir, 'ours.qcow2', 'all');
      const afterTheirs = await check('qemu', dir, 'theirs.qcow2');
      const afterOurs = await check('qemu', dir, 'ours.qcow2');
      if (testCase.beyondQemu) {
        // qemu-img leaves the entry (and 1 corruption); after ours nothing is left, and the guest reads the same zeros.
        expect(afterTheirs.code).toBe(2);
        expect(repairedOurs.code).toBe(0);
        expect(afterOurs.code).toBe(0);
        const compared = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', join(dir, 'ours.qcow2'), join(dir, 'theirs.qcow2')]);
        expect(compared.stdout).toMatch(/Images are identical/);
        return;
      }
      expect(repairedOurs.code).toBe(repairedTheirs.code);
      expect(afterOurs.code).toBeLessThanOrEqual(afterTheirs.code);
      expect(afterOurs.json?.leaks).toBeUndefined();
      expect(afterOurs.json?.corruptions).toBe(afterTheirs.json?.corruptions);
      if (afterTheirs.code === 0) {
        expect(without(repairedOurs.json, 'filename', 'image-end-offset', 'corruptions-fixed', 'leaks-fixed', 'allocated-clusters', 'fragmented-clusters'))
          .toEqual(without(repairedTheirs.json, 'filename', 'image-end-offset', 'corruptions-fixed', 'leaks-fixed', 'allocated-clusters', 'fragmented-clusters'));
        const compared = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', join(dir, 'ours.qcow2'), join(dir, 'theirs.qcow2')]);
        expect(compared.stdout + compared.stderr).toMatch(/Images are identical/);
        expect(compared.code).toBe(0);
      }

      // -r leaks: the same outcome as qemu-img's (including failing where a rebuild would be needed).
      const leaksTheirs = await check('qemu', dir, 'theirs-leaks.qcow2', 'leaks');
      const leaksOurs = await check('ours', dir, 'ours-leaks.qcow2', 'leaks');
      expect(leaksOurs.code).toBe(leaksTheirs.code);
      const afterLeaksTheirs = await check('qemu', dir, 'theirs-leaks.qcow2');
      const afterLeaksOurs = await check('qemu', dir, 'ours-leaks.qcow2');
      expect(without(afterLeaksOurs.json, 'filename')).toEqual(without(afterLeaksTheirs.json, 'filename'));
      expect(afterLeaksOurs.code).toBe(afterLeaksTheirs.code);
    }, 60_000);
  }
});

const cleanShapes: { name: string; create: string[]; writes: string[]; extra?: (dir: string, path: string) => Promise<void> }[] = [
  { name: 'v2 (compat=0.10)', create: ['-o', 'compat=0.10'], writes: ['write -P 1 0 1M', 'write -z 2M 64k'] },
  { name: 'v3, 512-byte clusters', create: ['-o', 'cluster_size=512'], writes: ['write -P 1 0 300k', 'write -P 2 10M 4k'] },
  { name: 'v3, 4 KiB clusters', create: ['-o', 'cluster_size=4096'], writes: ['write -P 1 100k 1M'] },
  { name: 'v3, 2 MiB clusters', create: ['-o', 'cluster_size=2M'], writes: ['write -P 1 0 5M'] },
  { name: 'empty', create: [], writes: [] },
  { name: 'many L2 tables', create: ['-o', 'cluster_size=512'], writes: [], extra: (_dir, path) => qemuIo(path, MANY_TABLE_WRITES, 'qcow2') },
  { name: 'snapshots', create: [], writes: ['write -P 1 0 1M', 'SNAPSHOT', 'write -P 2 512k 1M', 'SNAPSHOT', 'write -P 3 0 64k'] },
  { name: 'compressed clusters', create: [], writes: ['write -c -P 1 0 64k', 'write -c -P 2 64k 64k', 'write -c 1M 192k'] },
  { name: 'extended L2', create: ['-o', 'extended_l2=on'], writes: ['write -P 1 4k 8k', 'write -P 2 1M 1M'] },
  { name: 'refcount_bits=1', create: ['-o', 'refcount_bits=1'], writes: ['write -P 1 0 1M'] },
  { name: 'refcount_bits=8', create: ['-o', 'refcount_bits=8'], writes: ['write -P 1 0 1M', 'SNAPSHOT'] },
  { name: 'refcount_bits=64', create: ['-o', 'refcount_bits=64'], writes: ['write -P 1 0 1M', 'SNAPSHOT'] },
  { name: 'lazy refcounts', create: ['-o', 'lazy_refcounts=on'], writes: ['write -P 1 0 1M'] },
  {
    name: 'bitmaps', create: [], writes: ['write -P 1 0 1M'],
    extra: async (_dir, path) => {
      await qemuImg(['bitmap', '--add', path, 'b0']);
      await qemuImg(['bitmap', '--add', '-g', '64k', path, 'b1']);
      await qemuIo(path, ['write -P 4 4M 1M'], 'qcow2');
    },
  },
  {
    name: 'a backing file', create: [], writes: ['write -P 1 0 64k'],
    extra: async (dir, path) => {
      const base = join(dir, 'base.qcow2');
      await qemuImg(['create', '-q', '-f', 'qcow2', base, '64M']);
      await qemuIo(base, ['write -P 9 0 4M'], 'qcow2');
      await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', path]);
      await qemuIo(path, ['write -P 8 1M 64k'], 'qcow2');
    },
  },
];

describe.skipIf(skipWithoutQemu('qcow2 check, clean images'))('qcow2 check of clean images made by qemu-img', () => {
  for (const shape of cleanShapes) {
    it(`${shape.name}: clean, with qemu-img's JSON`, async () => {
      const dir = await makeTempDir('imgmount-qcow2-clean-');
      const path = join(dir, 'clean.qcow2');
      await qemuImg(['create', '-q', '-f', 'qcow2', ...shape.create, path, '64M']);
      for (const command of shape.writes) {
        if (command === 'SNAPSHOT') await qemuImg(['snapshot', '-c', `s${Math.random().toString(36).slice(2, 8)}`, path]);
        else await qemuIo(path, [command], 'qcow2');
      }
      await shape.extra?.(dir, path);
      const theirs = await check('qemu', dir, 'clean.qcow2');
      const ours = await check('ours', dir, 'clean.qcow2');
      expect(theirs.code).toBe(0);
      expect(ours.code).toBe(0);
      expect(JSON.stringify(ours.json)).toBe(JSON.stringify(theirs.json));
      const human = await run(bin, ['check', 'clean.qcow2'], { cwd: dir });
      const humanTheirs = await run('qemu-img', ['check', 'clean.qcow2'], { cwd: dir });
      expect(human.stdout).toBe(humanTheirs.stdout);
    }, 60_000);
  }
});

describe.skipIf(skipWithoutQemu('qcow2 check, human output'))('qcow2 check human output', () => {
  it("prints qemu-img's summary and double check after a repair", async () => {
    const dir = await makeTempDir('imgmount-qcow2-human-');
    const original = await makeImage(dir, 'h.qcow2', cases[0]!);
    await copyFile(original, join(dir, 'q.qcow2'));
    const ours = await run(bin, ['check', '-r', 'all', 'h.qcow2'], { cwd: dir });
    const theirs = await run('qemu-img', ['check', '-r', 'all', 'q.qcow2'], { cwd: dir });
    expect(ours.stdout).toBe(theirs.stdout);
    expect(ours.stderr).toBe(theirs.stderr);
    expect(ours.code).toBe(theirs.code);
  });

  it('a bare -r repairs everything, as -r all', async () => {
    const dir = await makeTempDir('imgmount-qcow2-bare-');
    await makeImage(dir, 'b.qcow2', cases[2]!);
    const ours = await run(bin, ['check', '-r', 'b.qcow2'], { cwd: dir });
    expect(ours.code).toBe(0);
    expect((await check('qemu', dir, 'b.qcow2')).code).toBe(0);
  });
});

describe.skipIf(skipWithoutQemu('qed check JSON'))('qed check JSON as qemu-img prints it', () => {
  it('clean and leaking QED images', async () => {
    const dir = await makeTempDir('imgmount-qed-json-');
    const path = join(dir, 'x.qed');
    await qemuImg(['create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', path, '4M']);
    const cleanTheirs = await check('qemu', dir, 'x.qed');
    expect(without((await check('ours', dir, 'x.qed')).json, 'fragmented-clusters')).toEqual(without(cleanTheirs.json, 'fragmented-clusters'));
    await qemuIo(path, ['write -P 1 0 4k'], 'qed');
    await run('truncate', ['-s', '+8192', path]);
    const theirs = await check('qemu', dir, 'x.qed');
    const ours = await check('ours', dir, 'x.qed');
    expect(ours.code).toBe(theirs.code);
    expect(Object.keys(ours.json!).filter((key) => key !== 'fragmented-clusters')).toEqual(Object.keys(theirs.json!).filter((key) => key !== 'fragmented-clusters'));
    expect(without(ours.json, 'fragmented-clusters')).toEqual(without(theirs.json, 'fragmented-clusters'));
  });
});
