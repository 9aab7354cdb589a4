/**
 * Busy polling through a real mount (src/fuse/kernel/poll-window.ts): reads
 * picked up while polling are answered with the image's bytes, a daemon that
 * has been busy goes quiet (no CPU) once requests stop, and --busy-poll 0
 * turns polling off (said in the log).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { run, seededBytes } from '../helpers/qemu.js';
import { MiB, MountLab, skipWithoutFuse } from './fuse-helpers.js';

/** User + system CPU of a process so far, in clock ticks. */
async function cpuTicks(pid: number): Promise<number> {
  const fields = (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1]!.split(' ');
  return Number(fields[11]) + Number(fields[12]);
}

describe.skipIf(skipWithoutFuse('busy polling', ['dd']))('busy polling', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  /** 4 KiB O_DIRECT reads one after another (each waits for the last): what polling is for. */
  async function readOneByOne(file: string): Promise<Buffer> {
    const copy = lab.path('copy.raw');
    const result = await run('dd', [`if=${file}`, `of=${copy}`, 'bs=4k', 'iflag=direct', 'status=none']);
    expect(result.code, result.stderr).toBe(0);
    return readFile(copy);
  }

  test('queue-depth-1 reads get the image bytes, and the daemon uses no CPU once they stop', async () => {
    const content = seededBytes(7, 8 * MiB);
    const image = await lab.file('disk.img', content);
    const mnt = await lab.mountpoint();
    const { pid, log } = await lab.mount(['-f', 'raw', image], mnt);
    expect(await readFile(log, 'utf8')).toContain('busy polling up to 50 µs after the last reply');
    for (let pass = 0; pass < 3; pass++) expect((await readOneByOne(join(mnt, 'disk.raw'))).equals(content)).toBe(true);
    await new Promise((resolve) => setTimeout(resolve, 200));
    const before = await cpuTicks(pid);
    await new Promise((resolve) => setTimeout(resolve, 1500));
    const used = (await cpuTicks(pid)) - before;
    // A daemon that kept spinning would use about 150 ticks (100 per second); idle, it uses none.
    expect(used).toBeLessThanOrEqual(5);
  });

  test('--busy-poll 0: the log says so and reads still get the image bytes', async () => {
    const content = seededBytes(8, 2 * MiB);
    const image = await lab.file('disk.img', content);
    const mnt = await lab.mountpoint();
    const { log } = await lab.mount(['-f', 'raw', '--busy-poll', '0', image], mnt);
    expect(await readFile(log, 'utf8')).toContain('busy polling off');
    expect((await readOneByOne(join(mnt, 'disk.raw'))).equals(content)).toBe(true);
  });
});
