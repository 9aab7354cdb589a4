/**
 * Idle clean through the mount: data written and fsync'd, then a short
 * --idle-clean passes without writes, then kill -9 of the daemon. The image's
 * need-check (QED) / dirty bit (qcow2, lazy refcounts) is clear on disk, as
 * read from the header bytes and (qcow2) by `qemu-img info`; `qemu-img check` exits 0
 * with no leaks (qcow2 without lazy refcounts too: its deferred L2 entries and
 * refcounts were written and flushed); the next mount repairs nothing; the data
 * reads back. A write after the idle time sets the bit again before its data
 * lands: kill -9 right after it leaves the bit set, and the next mount repairs
 * the image. `--idle-clean 0` keeps the bit set until the unmount, a read-write
 * mount that writes nothing leaves the file byte for byte as it was, and a bad
 * value is one line of error.
 */
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuConvertToRaw, qemuImg, readU64, run, seededBytes } from '../helpers/qemu.js';
import { imgmount, isAlive, MiB, MountLab, skipWithoutFuse, waitFor } from './fuse-helpers.js';

const KiB = 1024;

interface Shape {
  name: string;
  format: 'qed' | 'qcow2';
  options: string;
  /** Reads the bit a crash leaves set from the header; undefined for qcow2 without lazy refcounts (no such bit). */
  marked?: (path: string) => Promise<boolean>;
}

const qedNeedCheck = async (path: string): Promise<boolean> => ((await readU64(path, 16)) & 0x02n) !== 0n;
const qcow2Dirty = async (path: string): Promise<boolean> => ((await readFile(path)).readBigUInt64BE(72) & 1n) !== 0n;

const SHAPES: Shape[] = [
  { name: 'QED', format: 'qed', options: 'cluster_size=65536', marked: qedNeedCheck },
  { name: 'qcow2 with lazy refcounts', format: 'qcow2', options: 'lazy_refcounts=on', marked: qcow2Dirty },
  { name: 'qcow2', format: 'qcow2', options: 'compat=1.1' },
];

/** Writes through the mount and fsyncs. */
async function writeAndSync(mountpoint: string, offset: number, data: Buffer): Promise<void> {
  const handle = await open(join(mountpoint, 'disk.raw'), 'r+');
  try {
    await handle.write(data, 0, data.length, offset);
    await handle.datasync();
  } finally {
    await handle.close();
  }
}

async function kill9(pid: number): Promise<void> {
  process.kill(pid, 'SIGKILL');
  await waitFor('the killed daemon to be gone', () => !isAlive(pid));
}

async function qemuDirtyFlag(path: string): Promise<boolean> {
  const info = await run('qemu-img', ['info', '-U', '--output=json', path]);
  expect(info.code, info.stderr).toBe(0);
  return (JSON.parse(info.stdout) as { 'dirty-flag'?: boolean })['dirty-flag'] ?? false;
}

/** qemu-img check: exit 0, no leaks, no corruption. */
async function expectCheckClean(path: string, what: string): Promise<void> {
  const check = await run('qemu-img', ['check', '--output=json', path]);
  expect(check.code, `${what}: ${check.stdout}${check.stderr}`).toBe(0);
  const report = JSON.parse(check.stdout) as { leaks?: number; corruptions?: number };
  expect({ leaks: report.leaks ?? 0, corruptions: report.corruptions ?? 0 }, what).toEqual({ leaks: 0, corruptions: 0 });
}

describe.skipIf(skipWithoutFuse('idle clean through the mount'))('idle clean through the mount, and kill -9', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  for (const shape of SHAPES) {
    test(`${shape.name}: kill -9 after --idle-clean 1 leaves a clean image; a write after that marks it again first`, { timeout: 90_000 }, async () => {
      const image = lab.path(`disk.${shape.format}`);
      await qemuImg(['create', '-q', '-f', shape.format, '-o', shape.options, image, '16M']);
      const mnt = await lab.mountpoint();
      const expected = Buffer.alloc(16 * MiB);

      // 1. Written, fsync'd, idle for longer than --idle-clean, killed.
      const first = await lab.mount(['--idle-clean', '1', image], mnt);
      const data = seededBytes(1, 300 * KiB + 17);
      const written = Date.now();
      await writeAndSync(mnt, 3 * MiB + 5, data);
      data.copy(expected, 3 * MiB + 5);
      if (shape.marked) {
        const marked = await shape.marked(image);
        // Right after the write the bit is set (unless this machine stalled past the idle time).
        if (Date.now() - written < 800) expect(marked, 'set right after the write').toBe(true);
        await waitFor('the idle clean', async () => !(await shape.marked!(image)), 15_000);
        expect(Date.now() - written, 'not before the idle time').toBeGreaterThanOrEqual(1000);
      } else {
        await delay(2500);
      }
      await kill9(first.pid);
      if (shape.marked) expect(await shape.marked(image)).toBe(false);
      // qemu-img 7.2 reports the dirty bit of qcow2 only (its QED driver never sets dirty-flag).
      if (shape.format === 'qcow2') expect(await qemuDirtyFlag(image)).toBe(false);
      await expectCheckClean(image, 'after idle and kill -9');
      expect((await qemuConvertToRaw(image, lab.dir, shape.format)).equals(expected), 'the data after kill -9').toBe(true);

      // 2. The next mount repairs nothing; a write after the idle time, then kill -9 at once: the bit is set.
      const second = await lab.mount(['--idle-clean', '1', image], mnt);
      // (A line about the dead mount the kill left behind, which this mount takes away, is all it says.)
      expect(second.result.stderr).not.toMatch(/not closed cleanly|need-check|repaired/);
      expect(await readFile(second.log, 'utf8')).not.toMatch(/not closed cleanly|need-check|repaired/);
      const more = seededBytes(2, 64 * KiB);
      await writeAndSync(mnt, 9 * MiB, more);
      more.copy(expected, 9 * MiB);
      await kill9(second.pid);
      if (shape.marked) {
        expect(await shape.marked(image), 'marked again before the new data landed').toBe(true);
        if (shape.format === 'qcow2') expect(await qemuDirtyFlag(image)).toBe(true);
      }

      // 3. The next mount repairs (where there is a bit), the data is there, a clean unmount clears the bit.
      const third = await lab.mount(['--idle-clean', '1', image], mnt);
      if (shape.marked) expect(third.result.stderr).toMatch(/not closed cleanly/);
      const mounted = await readFile(join(mnt, 'disk.raw'));
      expect(mounted.equals(expected), 'the data after the second kill -9').toBe(true);
      const last = seededBytes(3, 10 * KiB);
      await writeAndSync(mnt, 12 * MiB + 3, last);
      last.copy(expected, 12 * MiB + 3);
      expect((await imgmount(['unmount', mnt])).code).toBe(0);
      if (shape.marked) expect(await shape.marked(image)).toBe(false);
      await expectCheckClean(image, 'after the clean unmount');
      expect((await qemuConvertToRaw(image, lab.dir, shape.format)).equals(expected), 'the data after the unmount').toBe(true);
    });
  }

  test('--idle-clean 0 (and -o idle_clean=0) keeps the bit set until the unmount, as before', { timeout: 60_000 }, async () => {
    for (const [format, options, marked, args] of [
      ['qed', 'cluster_size=65536', qedNeedCheck, ['--idle-clean', '0']],
      ['qcow2', 'lazy_refcounts=on', qcow2Dirty, ['-o', 'idle_clean=0']],
    ] as const) {
      const image = lab.path(`off.${format}`);
      await qemuImg(['create', '-q', '-f', format, '-o', options, image, '8M']);
      const mnt = await lab.mountpoint(`mnt-${format}`);
      const { pid } = await lab.mount([...args, '--name', 'disk.raw', image], mnt);
      await writeAndSync(mnt, MiB, seededBytes(4, 100 * KiB));
      await delay(2500);
      expect(await marked(image), format).toBe(true);
      await kill9(pid);
      expect(await marked(image), format).toBe(true);
      const again = await lab.mount([...args, '--name', 'disk.raw', image], mnt);
      expect(again.result.stderr, format).toMatch(/not closed cleanly/);
      expect((await imgmount(['unmount', mnt])).code).toBe(0);
      expect(await marked(image), format).toBe(false);
    }
  });

  test('a read-write mount that only reads leaves the image byte for byte as it was, past the idle time', { timeout: 60_000 }, async () => {
    for (const [format, options] of [['qed', 'cluster_size=65536'], ['qcow2', 'lazy_refcounts=on']] as const) {
      const image = lab.path(`untouched.${format}`);
      await qemuImg(['create', '-q', '-f', format, '-o', options, image, '8M']);
      await run('qemu-io', ['-f', format, '-c', 'write -P 0x42 0 64k', image]);
      const before = await readFile(image);
      const mnt = await lab.mountpoint(`mnt-${format}`);
      const { pid } = await lab.mount(['--idle-clean', '0.5', '--name', 'disk.raw', image], mnt);
      expect((await readFile(join(mnt, 'disk.raw'))).subarray(0, 65536).equals(Buffer.alloc(65536, 0x42))).toBe(true);
      const handle = await open(join(mnt, 'disk.raw'), 'r+');
      await handle.datasync();
      await handle.close();
      await delay(1500);
      expect((await readFile(image)).equals(before), `${format} while mounted`).toBe(true);
      await kill9(pid);
      expect((await readFile(image)).equals(before), `${format} after kill -9`).toBe(true);
      await lab.mount([image], mnt);
      expect((await imgmount(['unmount', mnt])).code).toBe(0);
      expect((await readFile(image)).equals(before), `${format} after the unmount`).toBe(true);
    }
  });

  test('a bad --idle-clean is one line of error and nothing is mounted', async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-q', '-f', 'qed', image, '8M']);
    const mnt = await lab.mountpoint();
    for (const args of [['--idle-clean', 'soon'], ['--idle-clean=-1'], ['--idle-clean', '1e3'], ['-o', 'idle_clean=5s'], ['--idle-clean', '1', '-o', 'idle_clean=2']]) {
      const result = await imgmount([...args, image, mnt]);
      expect(result.code, args.join(' ')).toBe(1);
      expect(result.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
      expect(result.stderr, args.join(' ')).toMatch(/idle.clean/);
    }
    expect((await run('mountpoint', ['-q', mnt])).code).not.toBe(0);
  });
});
