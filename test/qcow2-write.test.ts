/**
 * qcow2 writing cases the conformance suite's random writes do not pin down,
 * each judged by qemu-img: with extended L2 entries a small write allocates
 * only the subclusters it touches (the rest still shows the backing file, in
 * qemu-img map); a 512-byte-cluster image with 64-bit refcounts outgrows its
 * refcount table several times; an image with persistent dirty bitmaps loses
 * them with a notice naming them and no leaked clusters; overwriting every
 * compressed cluster leaves none compressed; writes next to a snapshot keep it;
 * with extended L2 entries, what a kill -9 leaves between two writes to one new
 * cluster has no L2 entry on disk ahead of its refcount.
 */
import { copyFile, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../src/index.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuIo, run, skipWithoutQemu } from './helpers/qemu.js';
import { seededRandom } from './helpers/random.js';

const KiB = 1024;
const MiB = 1024 * KiB;

async function qemuCheckJson(path: string): Promise<Record<string, unknown>> {
  const result = await run('qemu-img', ['check', '--output=json', path]);
  expect(result.code, result.stdout + result.stderr).toBe(0);
  return JSON.parse(result.stdout) as Record<string, unknown>;
}

describe.skipIf(skipWithoutQemu('qcow2 writing'))('qcow2 writing, judged by qemu-img', () => {
  it('extended L2: a 100-byte write allocates one 2 KiB subcluster; the rest of the cluster still reads the backing file', async () => {
    const dir = await makeTempDir();
    const base = join(dir, 'base.raw');
    await writeFile(base, Buffer.alloc(1 * MiB, 0xbb));
    const path = join(dir, 'ext.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', base, '-F', 'raw', path, '1M']);
    const image = await openImage(path);
    try {
      expect(image.readOnly).toBe(false);
      await image.write(5000, Buffer.alloc(100, 0x11));
    } finally {
      await image.close();
    }
    const map = JSON.parse((await run('qemu-img', ['map', '--output=json', path])).stdout) as Array<{ start: number; length: number; depth: number; data: boolean }>;
    const own = map.filter((run) => run.depth === 0 && run.data);
    expect(own.map(({ start, length }) => [start, length])).toEqual([[4096, 2048]]);
    const expected = Buffer.alloc(1 * MiB, 0xbb);
    expected.fill(0x11, 5000, 5100);
    expect((await qemuConvertToRaw(path, dir, 'qcow2')).equals(expected)).toBe(true);
    expect((await qemuCheckJson(path)).leaks ?? 0).toBe(0);
  });

  it('extended L2: a second write into a cluster allocated since the last flush leaves its L2 entry pending; a kill -9 then leaves no reference without a refcount', async () => {
    // Found by scripts/soak.sh (kill -9 during fio writes): the second write found the cluster
    // owned in the table in memory and wrote its entry at once, ahead of the cluster's refcount.
    const dir = await makeTempDir();
    const path = join(dir, 'ext.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', path, '1M']);
    const image = await openImage(path);
    const crashed = join(dir, 'crashed.qcow2');
    try {
      await image.write(0, Buffer.alloc(2048, 1));
      await image.write(3 * 2048, Buffer.alloc(2048, 2));
      // The file as a kill -9 now would leave it: every write so far, no flush, no close.
      await copyFile(path, crashed);
    } finally {
      await image.close();
    }
    const check = await run('qemu-img', ['check', crashed]);
    expect([0, 3], check.stdout + check.stderr).toContain(check.code);
    expect((await qemuCheckJson(path)).leaks ?? 0).toBe(0);
    const expected = Buffer.alloc(1 * MiB);
    expected.fill(1, 0, 2048);
    expected.fill(2, 3 * 2048, 4 * 2048);
    expect((await qemuConvertToRaw(path, dir, 'qcow2')).equals(expected)).toBe(true);
  });

  it('512-byte clusters, 64-bit refcounts: 6 MiB of writes grow the refcount table several times; qemu-img check is clean and compare equal', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'small.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=64', path, '16M']);
    const tableBefore = (await readFile(path)).readUInt32BE(56);
    const model = Buffer.alloc(16 * MiB);
    const random = seededRandom(0x5a11);
    const image = await openImage(path);
    try {
      for (let i = 0; i < 48; i++) {
        const offset = random.int(0, 16 * MiB - 256 * KiB);
        const data = Buffer.alloc(random.int(1, 256 * KiB));
        random.fill(data);
        data.copy(model, offset);
        await image.write(offset, data);
      }
    } finally {
      await image.close();
    }
    const header = await readFile(path);
    // 12k clusters need 192 refcount blocks of 64 entries: 1536 bytes of table, 3 clusters (from 1).
    expect(header.readUInt32BE(56)).toBeGreaterThanOrEqual(tableBefore + 2);
    const check = await qemuCheckJson(path);
    expect(check.leaks ?? 0).toBe(0);
    expect(check.corruptions ?? 0).toBe(0);
    const reference = join(dir, 'model.raw');
    await writeFile(reference, model);
    const compare = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', path, reference]);
    expect(compare.code, compare.stdout + compare.stderr).toBe(0);
  });

  it('a refcount left past the end of the file by an allocation a crash cut short is not added to: the cluster appended there has refcount 1', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'cut.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', path, '4M']);
    await qemuIo(path, ['write -P 1 0 64k'], 'qcow2');
    // What a kill between the refcount write and the data write leaves: refcount 1 for the cluster at the end of the file.
    const file = await readFile(path);
    const end = Math.ceil(file.length / 65536);
    const block = Number(file.readBigUInt64BE(Number(file.readBigUInt64BE(48))));
    const patched = Buffer.from(file);
    patched.writeUInt16BE(1, block + 2 * end);
    await writeFile(path, patched);
    expect((await run('qemu-img', ['check', path])).code).toBe(0); // qemu does not look past the end of the file
    const image = await openImage(path);
    try {
      await image.write(1 * MiB, Buffer.alloc(65536, 2));
    } finally {
      await image.close();
    }
    const check = await run('qemu-img', ['check', path]);
    expect(check.code, check.stdout + check.stderr).toBe(0);
  });

  it('persistent dirty bitmaps: a read-write open names them in a notice, drops them, and leaves no leaked cluster', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'bitmaps.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', path, '4M']);
    await qemuImg(['bitmap', '--add', path, 'nightly']);
    await qemuImg(['bitmap', '--add', '-g', '4096', path, 'hourly']);
    await qemuIo(path, ['write -P 1 0 1M', 'write -P 2 3M 100k'], 'qcow2');
    const before = await qemuConvertToRaw(path, dir, 'qcow2');
    const notices: string[] = [];
    const image = await openImage(path, { notice: (line) => notices.push(line) });
    try {
      await image.write(2 * MiB, Buffer.alloc(4096, 3));
    } finally {
      await image.close();
    }
    expect(notices).toEqual([expect.stringMatching(/persistent dirty bitmaps \(nightly, hourly\) are no longer valid/)]);
    const result = await run('qemu-img', ['check', path]);
    expect(result.code, result.stdout + result.stderr).toBe(0);
    expect(result.stderr).not.toMatch(/bitmap/);
    const info = await run('qemu-img', ['info', '--output=json', path]);
    expect(info.stdout).not.toMatch(/nightly|hourly/);
    before.fill(3, 2 * MiB, 2 * MiB + 4096);
    expect((await qemuConvertToRaw(path, dir, 'qcow2')).equals(before)).toBe(true);
  });

  it('overwriting every cluster of a compressed image leaves no compressed cluster, frees the compressed data, and reads back', async () => {
    const dir = await makeTempDir();
    const source = join(dir, 'text.raw');
    await writeFile(source, Buffer.from('imgmount '.repeat((2 * MiB) / 9 + 1)).subarray(0, 2 * MiB));
    const path = join(dir, 'packed.qcow2');
    await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', source, path]);
    expect(((await qemuCheckJson(path))['compressed-clusters'] as number) ?? 0).toBeGreaterThan(0);
    const image = await openImage(path);
    const expected = Buffer.alloc(2 * MiB);
    try {
      for (let offset = 0; offset < 2 * MiB; offset += 64 * KiB) {
        const data = Buffer.alloc(1000, offset / (64 * KiB));
        data.copy(expected, offset + 7);
        await image.write(offset + 7, data);
      }
    } finally {
      await image.close();
    }
    const original = await readFile(source);
    for (let offset = 0; offset < 2 * MiB; offset += 64 * KiB) {
      original.copy(expected, offset, offset, offset + 7);
      original.copy(expected, offset + 1007, offset + 1007, offset + 64 * KiB);
    }
    const check = await qemuCheckJson(path);
    expect(check['compressed-clusters'] ?? 0).toBe(0);
    expect(check.leaks ?? 0).toBe(0);
    expect((await qemuConvertToRaw(path, dir, 'qcow2')).equals(expected)).toBe(true);
    expect((await stat(path)).size).toBeGreaterThan(0);
  });
});
