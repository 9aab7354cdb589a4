/**
 * `imgmount info` on qcow2 images shows what `qemu-img info` shows, with the
 * same keys and values (JSON) and the same layout (the snapshot table and the
 * format-specific section of the human output), for every shape of image:
 * v2 and v3, lazy refcounts, extended L2, zstd, refcount widths, external data
 * files, persistent bitmaps, snapshots, backing files.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, qemuImg, qemuIo, run, skipWithoutQemu } from './helpers/qemu.js';
import { IMGMOUNT } from './fuse/fuse-helpers.js';

const KEYS = ['virtual-size', 'format', 'cluster-size', 'actual-size', 'format-specific', 'dirty-flag', 'snapshots', 'backing-filename', 'backing-filename-format', 'full-backing-filename'];

async function infoBoth(path: string, cwd: string): Promise<{ ours: Record<string, unknown>; theirs: Record<string, unknown>; oursHuman: string; theirsHuman: string }> {
  const ours = await run(IMGMOUNT, ['info', '--output=json', path], { cwd });
  expect(ours.code, ours.stderr).toBe(0);
  expect(ours.stderr).toBe('');
  const theirs = await qemuImg(['info', '--output=json', path], { cwd });
  const oursHuman = await run(IMGMOUNT, ['info', path], { cwd });
  const theirsHuman = await qemuImg(['info', path], { cwd });
  return {
    ours: JSON.parse(ours.stdout) as Record<string, unknown>,
    theirs: JSON.parse(theirs.stdout) as Record<string, unknown>,
    oursHuman: oursHuman.stdout,
    theirsHuman: theirsHuman.stdout,
  };
}

/** The human output from "Snapshot list:" to the end, without our own extra lines. */
function humanTail(text: string): string {
  const from = text.search(/^(Snapshot list:|Format specific information:)/m);
  return text
    .slice(from < 0 ? text.length : from)
    .split('\n')
    .filter((line) => !/^(dirty \(need-check\)|external data file):/.test(line))
    .join('\n');
}

describe.skipIf(skipWithoutQemu('qcow2 info against qemu-img info'))('qcow2 info against qemu-img info', () => {
  const shapes: [string, (dir: string) => Promise<string>][] = [
    ['compat=0.10', async (dir) => create(dir, 'compat=0.10')],
    ['compat=1.1 with lazy refcounts', async (dir) => create(dir, 'compat=1.1,lazy_refcounts=on')],
    ['extended L2, 128 KiB clusters', async (dir) => create(dir, 'extended_l2=on,cluster_size=128k')],
    ['zstd, refcount_bits=1', async (dir) => create(dir, 'compression_type=zstd,refcount_bits=1')],
    ['refcount_bits=64, 512-byte clusters', async (dir) => create(dir, 'refcount_bits=64,cluster_size=512')],
    ['an external raw data file', async (dir) => create(dir, 'data_file=disk.data,data_file_raw=on')],
    [
      'persistent bitmaps',
      async (dir) => {
        const path = await create(dir, 'compat=1.1');
        await qemuImg(['bitmap', '--add', path, 'nightly']);
        await qemuImg(['bitmap', '--add', '-g', '1M', '--disable', path, 'weekly']);
        return path;
      },
    ],
    [
      'two snapshots, one with a long name',
      async (dir) => {
        const path = await create(dir, 'compat=1.1');
        await qemuImg(['snapshot', '-c', 'first', path]);
        await qemuIo(path, ['write -P 0x61 0 64k'], 'qcow2');
        await qemuImg(['snapshot', '-c', 'a-rather-long-snapshot-name-here', path]);
        return path;
      },
    ],
    [
      'a backing file with its format recorded',
      async (dir) => {
        await qemuImg(['create', '-q', '-f', 'qed', join(dir, 'base.qed'), '4M']);
        await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qed', '-F', 'qed', join(dir, 'disk.qcow2')], { cwd: dir });
        return join(dir, 'disk.qcow2');
      },
    ],
  ];

  async function create(dir: string, options: string): Promise<string> {
    const path = join(dir, 'disk.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', options, path, '4M'], { cwd: dir });
    await qemuIo(path, ['write -P 0x5a 1M 300k'], 'qcow2', { cwd: dir });
    return path;
  }

  it.each(shapes)('%s', async (_name, make) => {
    const dir = await makeTempDir();
    const path = await make(dir);
    const { ours, theirs, oursHuman, theirsHuman } = await infoBoth(path, dir);
    for (const key of KEYS) expect(ours[key], key).toEqual(theirs[key]);
    expect(humanTail(oursHuman)).toBe(humanTail(theirsHuman));
  });

  it('-s describes a snapshot (its size), and a snapshot that does not exist is one line and exit 1', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', path, '4M']);
    await qemuImg(['snapshot', '-c', 'small', path]);
    await qemuImg(['resize', path, '8M']);
    const current = JSON.parse((await run(IMGMOUNT, ['info', '--output=json', path])).stdout) as Record<string, unknown>;
    const snapshot = JSON.parse((await run(IMGMOUNT, ['info', '-s', 'small', '--output=json', path])).stdout) as Record<string, unknown>;
    expect(current['virtual-size']).toBe(8 * 1024 * 1024);
    expect(snapshot['virtual-size']).toBe(4 * 1024 * 1024);
    const missing = await run(IMGMOUNT, ['info', '-s', 'big', path]);
    expect(missing.code).toBe(1);
    expect(missing.stderr.trim().split('\n')).toHaveLength(1);
    expect(missing.stderr).toMatch(/no snapshot 'big'; the image has 1 \(small\)/);
  });
});
