/**
 * `imgmount map` prints what `qemu-img map` prints, byte for byte, in both
 * output modes: QED images with data, zero clusters (qemu-io write -z) and
 * unallocated ranges, with a QED backing file in another directory and with a
 * raw backing file, a raw image, and empty images; with relative names (run
 * from the image's directory, so backing files show as qemu names them) and
 * with absolute ones.
 */
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { qemuImg, qemuIo, run, seededBytes, skipWithoutQemu } from './helpers/qemu.js';

const IMGMOUNT = resolve(import.meta.dirname, '../bin/imgmount');
const MiB = 1024 * 1024;

describe.skipIf(skipWithoutQemu('imgmount map'))('imgmount map', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'imgmount-map-'));
    await mkdir(join(dir, 'sub'));
    // No backing file: data, zero clusters, unallocated, data in the last cluster.
    await qemuImg(['create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', join(dir, 'plain.qed'), '8M']);
    await qemuIo(join(dir, 'plain.qed'), ['write -P 1 0 12k', 'write -z 64k 128k', 'write -P 2 1M 5k', 'write -P 3 8188k 4k']);
    // A QED backing file in another directory, with its own data and zero clusters.
    await qemuImg(['create', '-q', '-f', 'qed', '-o', 'cluster_size=65536', join(dir, 'sub/base.qed'), '8M']);
    await qemuIo(join(dir, 'sub/base.qed'), ['write -P 4 0 1M', 'write -z 2M 256k', 'write -P 5 6M 64k']);
    await qemuImg(['create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', '-b', 'sub/base.qed', '-F', 'qed', join(dir, 'over-qed.qed'), '8M']);
    await qemuIo(join(dir, 'over-qed.qed'), ['write -P 6 512k 8k', 'write -z 2100k 4k', 'write -z 4M 64k', 'write -P 7 6M 4k']);
    // A raw backing file written whole (no holes: qemu maps holes with SEEK_HOLE, which Node cannot ask).
    await writeFile(join(dir, 'base.raw'), seededBytes(9, 8 * MiB));
    await qemuImg(['create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', '-b', 'base.raw', '-F', 'raw', join(dir, 'over-raw.qed'), '8M']);
    await qemuIo(join(dir, 'over-raw.qed'), ['write -P 8 100k 4k', 'write -z 3M 1M', 'write -P 9 8188k 4k']);
    await qemuImg(['create', '-q', '-f', 'qed', join(dir, 'empty.qed'), '0']);
    await writeFile(join(dir, 'empty.raw'), Buffer.alloc(0));
    // qcow2: v3 zero clusters that keep their allocation (qemu-img map shows their offset), extended L2 subclusters,
    // a raw external data file (run from dir: qemu resolves data file names against its working directory),
    // compressed clusters (data without an offset; the human table refuses them, as qemu's does), a qcow2 chain.
    await qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'plain.qcow2'), '8M']);
    await qemuIo(join(dir, 'plain.qcow2'), ['write -P 1 0 200k', 'write -z 64k 64k', 'write -z -u 128k 64k', 'write -P 2 5M 100k'], 'qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', join(dir, 'subclusters.qcow2'), '4M']);
    await qemuIo(join(dir, 'subclusters.qcow2'), ['write -P 3 1536 1000', 'write -z 70000 5000', 'write -P 4 1M 70k'], 'qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'data_file=data.raw,data_file_raw=on,extended_l2=on', join(dir, 'datafile.qcow2'), '2M'], { cwd: dir });
    await qemuIo(join(dir, 'datafile.qcow2'), ['write -P 5 0 4k', 'write -z 64k 64k'], 'qcow2', { cwd: dir });
    await writeFile(join(dir, 'compressible.raw'), Buffer.concat([Buffer.from('text '.repeat(400_000)), seededBytes(10, MiB)]));
    await qemuImg(['convert', '-c', '-O', 'qcow2', join(dir, 'compressible.raw'), join(dir, 'compressed.qcow2')]);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'plain.qcow2', '-F', 'qcow2', join(dir, 'over-qcow2.qcow2')], { cwd: dir });
    await qemuIo(join(dir, 'over-qcow2.qcow2'), ['write -P 6 100k 4k', 'write -z 5M 64k'], 'qcow2');
  });

  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const cases: Array<{ file: string; format?: string }> = [
    { file: 'plain.qed' },
    { file: 'over-qed.qed' },
    { file: 'over-raw.qed' },
    { file: 'sub/base.qed' },
    { file: 'base.raw', format: 'raw' },
    { file: 'base.raw' },
    { file: 'empty.qed' },
    { file: 'empty.raw', format: 'raw' },
    { file: 'plain.qcow2' },
    { file: 'subclusters.qcow2' },
    { file: 'datafile.qcow2' },
    { file: 'over-qcow2.qcow2' },
  ];
  for (const { file, format } of cases) {
    for (const output of ['json', 'human'] as const) {
      it(`${file}${format ? ` -f ${format}` : ''} --output=${output}, relative and absolute names`, async () => {
        for (const name of [file, join(dir, file)]) {
          const args = ['map', ...(format ? ['-f', format] : []), `--output=${output}`, name];
          const theirs = await run('qemu-img', args, { cwd: dir });
          expect(theirs.code, theirs.stderr).toBe(0);
          const ours = await run(IMGMOUNT, args, { cwd: dir });
          expect({ code: ours.code, stderr: ours.stderr }).toEqual({ code: 0, stderr: '' });
          expect(ours.stdout).toBe(theirs.stdout);
        }
      });
    }
  }

  it('compressed qcow2: JSON like qemu-img (data without offsets); the human table refuses it with one line, as qemu-img does', async () => {
    const json = await run(IMGMOUNT, ['map', '--output=json', 'compressed.qcow2'], { cwd: dir });
    expect(json.stdout).toBe((await run('qemu-img', ['map', '--output=json', 'compressed.qcow2'], { cwd: dir })).stdout);
    expect(json.stdout).toMatch(/"data": true}/);
    const human = await run(IMGMOUNT, ['map', 'compressed.qcow2'], { cwd: dir });
    expect(human.code).toBe(1);
    expect(human.stderr.trim().split('\n')).toHaveLength(1);
    expect(human.stderr).toMatch(/compressed/);
    expect((await run('qemu-img', ['map', 'compressed.qcow2'], { cwd: dir })).code).not.toBe(0);
  });

  it('shows what the backing chain holds: data at depth 1 and 0, zero clusters in both layers', async () => {
    const { stdout } = await run(IMGMOUNT, ['map', '--output=json', 'over-qed.qed'], { cwd: dir });
    const runs = JSON.parse(stdout) as Array<{ depth: number; zero: boolean; data: boolean; present: boolean }>;
    const kinds = new Set(runs.map((r) => `${r.depth}:${r.data ? 'data' : r.present ? 'zero' : 'unallocated'}`));
    for (const kind of ['0:data', '1:data', '0:zero', '1:zero', '1:unallocated']) expect(kinds).toContain(kind);
  });

  it('fails with one line for a missing file and for an unknown output', async () => {
    const missing = await run(IMGMOUNT, ['map', 'nothere.qed'], { cwd: dir });
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/^imgmount: .*nothere\.qed.*\n$/);
    const bad = await run(IMGMOUNT, ['map', '--output=xml', 'plain.qed'], { cwd: dir });
    expect(bad.code).toBe(1);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
  });
});
