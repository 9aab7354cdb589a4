/**
 * Every way a mount ends: `imgmount unmount`, `imgmount -u`, plain `umount`,
 * `fusermount -u`, SIGTERM and SIGINT each close the image cleanly (need-check
 * clear, qemu-img check clean, data intact) and the daemon exits 0, both for a
 * background daemon and a --foreground one; `imgmount unmount` returns only once the
 * daemon has exited. SIGKILL leaves need-check set and the next mount repairs it. A busy mount is never pulled away; a lazy unmount closes
 * the images only once the last user has let go.
 */
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuCheck, qemuConvertToRaw, qemuImg, run, seededBytes } from '../helpers/qemu.js';
import {
  backgroundExitStatus,
  IMGMOUNT,
  imgmount,
  isAlive,
  isImgmountMount,
  MiB,
  MountLab,
  needCheck,
  skipWithoutFuse,
  waitFor,
} from './fuse-helpers.js';

interface Route {
  name: string;
  /** Whether the route itself waits for the images to be closed. */
  waits: boolean;
  unmount(mountpoint: string, pid: number): Promise<void>;
}

async function succeeds(command: string, args: string[]): Promise<void> {
  const result = await run(command, args);
  if (result.code !== 0) throw new Error(`${command} ${args.join(' ')} exited ${result.code}: ${result.stderr}`);
}

const ROUTES: Route[] = [
  { name: 'imgmount unmount', waits: true, unmount: (mnt) => succeeds(IMGMOUNT, ['unmount', mnt]) },
  { name: 'imgmount -u', waits: true, unmount: (mnt) => succeeds(IMGMOUNT, ['-u', mnt]) },
  { name: 'umount', waits: false, unmount: (mnt) => succeeds('umount', [mnt]) },
  { name: 'fusermount -u', waits: false, unmount: (mnt) => succeeds('fusermount', ['-u', mnt]) },
  { name: 'SIGTERM', waits: false, unmount: async (_, pid) => void process.kill(pid, 'SIGTERM') },
  { name: 'SIGINT', waits: false, unmount: async (_, pid) => void process.kill(pid, 'SIGINT') },
];

/** A QED image with data written by qemu, and the raw bytes it should hold. */
async function sampleImage(lab: MountLab): Promise<string> {
  const image = lab.path('disk.qed');
  await qemuImg(['create', '-f', 'qed', image, '16M']);
  return image;
}

/** Writes through the mount without fsync (an allocating write: need-check gets set). */
async function writeThrough(mountpoint: string, offset: number, data: Buffer): Promise<void> {
  const handle = await open(join(mountpoint, 'disk.raw'), 'r+');
  try {
    await handle.write(data, 0, data.length, offset);
  } finally {
    await handle.close();
  }
}

async function expectClean(lab: MountLab, image: string, offset: number, data: Buffer): Promise<void> {
  expect(await needCheck(image)).toBe(false);
  const check = await qemuCheck(image);
  expect(check.stdout).toContain('No errors were found');
  expect(check.code).toBe(0);
  const raw = await qemuConvertToRaw(image, lab.dir);
  expect(raw.subarray(offset, offset + data.length).equals(data)).toBe(true);
}

describe.skipIf(skipWithoutFuse('unmounting by every route'))('unmounting by every route', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  describe.each(ROUTES)('$name', (route) => {
    test('background daemon: the image is closed cleanly and the daemon exits 0', async () => {
      const image = await sampleImage(lab);
      const mnt = await lab.mountpoint();
      const { pid, log } = await lab.mount([image], mnt);
      const data = seededBytes(1, 3 * 65536 + 100);
      await writeThrough(mnt, MiB - 50, data);
      expect(await needCheck(image)).toBe(true);

      await route.unmount(mnt, pid);
      if (route.waits) expect(await needCheck(image)).toBe(false);
      expect(await backgroundExitStatus(pid, log)).toBe(0);
      expect(await isImgmountMount(mnt)).toBe(false);
      await expectClean(lab, image, MiB - 50, data);
    });

    test('foreground daemon: the image is closed cleanly and the process exits 0', async () => {
      const image = await sampleImage(lab);
      const mnt = await lab.mountpoint();
      const daemon = await lab.foreground([image], mnt);
      const data = seededBytes(2, 200_000);
      await writeThrough(mnt, 5 * MiB + 1, data);
      expect(await needCheck(image)).toBe(true);

      await route.unmount(mnt, daemon.pid);
      if (route.waits) expect(await needCheck(image)).toBe(false);
      const { code, signal } = await daemon.exited;
      expect({ code, signal }).toEqual({ code: 0, signal: null });
      // A foreground daemon's log goes to its stderr.
      expect(daemon.stderr).toMatch(/closed .*disk\.qed\n.*exiting with status 0\n$/);
      expect(await isImgmountMount(mnt)).toBe(false);
      await expectClean(lab, image, 5 * MiB + 1, data);
    });
  });

  test('SIGKILL leaves need-check set; the next mount repairs the image, says so, and the data is intact', async () => {
    const image = await sampleImage(lab);
    const mnt = await lab.mountpoint();
    // --idle-clean 0: the bit must still be set at the kill, however slow this machine is.
    const first = await lab.mount(['--idle-clean', '0', image], mnt);
    const data = seededBytes(3, 512 * 1024);
    await writeThrough(mnt, 1234, data);
    const handle = await open(join(mnt, 'disk.raw'), 'r+');
    await handle.datasync();
    await handle.close();
    process.kill(first.pid, 'SIGKILL');
    await waitFor('the killed daemon to be gone', () => !isAlive(first.pid));
    expect(await needCheck(image)).toBe(true);

    // The dead mount is still in the table; mounting again takes it away.
    const second = await lab.mount([image], mnt);
    expect(second.result.stderr).toMatch(/need-check|not closed cleanly/i);
    expect(await readFile(second.log, 'utf8')).toMatch(/need-check|not closed cleanly/i);
    expect(await needCheck(image)).toBe(false);
    const mounted = await readFile(join(mnt, 'disk.raw'));
    expect(mounted.subarray(1234, 1234 + data.length).equals(data)).toBe(true);

    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    await expectClean(lab, image, 1234, data);
  });

  test('imgmount unmount takes away the dead mount of a killed daemon', async () => {
    const image = await sampleImage(lab);
    const mnt = await lab.mountpoint();
    const { pid } = await lab.mount([image], mnt);
    process.kill(pid, 'SIGKILL');
    await waitFor('the killed daemon to be gone', () => !isAlive(pid));
    expect(await isImgmountMount(mnt)).toBe(true);
    const result = await imgmount(['unmount', mnt]);
    expect(result).toMatchObject({ code: 0, stderr: '' });
    expect(await isImgmountMount(mnt)).toBe(false);
  });

  test('a busy mount survives SIGTERM and imgmount unmount, and unmounts once released', async () => {
    const image = await sampleImage(lab);
    const mnt = await lab.mountpoint();
    const { pid, log } = await lab.mount([image], mnt);
    const data = seededBytes(4, 70_000);
    await writeThrough(mnt, 0, data);
    const busy = await open(join(mnt, 'disk.raw'), 'r');
    try {
      process.kill(pid, 'SIGTERM');
      await waitFor('the daemon to log the refused unmount', async () => /still serving/.test(await readFile(log, 'utf8')));
      const refused = await imgmount(['unmount', mnt]);
      expect(refused.code).toBe(1);
      expect(refused.stderr).toMatch(/^imgmount: .*busy.*\n$/);
      expect(isAlive(pid)).toBe(true);
      expect(await isImgmountMount(mnt)).toBe(true);
      const buffer = Buffer.alloc(100);
      await busy.read(buffer, 0, 100, 0);
      expect(buffer.equals(data.subarray(0, 100))).toBe(true);
    } finally {
      await busy.close();
    }
    expect((await imgmount(['unmount', mnt])).code).toBe(0);
    expect(await backgroundExitStatus(pid, log)).toBe(0);
    await expectClean(lab, image, 0, data);
  });

  test('a lazy unmount closes the image only when the last user lets go', async () => {
    const image = await sampleImage(lab);
    const mnt = await lab.mountpoint();
    const { pid, log } = await lab.mount([image], mnt);
    const user = await open(join(mnt, 'disk.raw'), 'r+');
    const data = seededBytes(5, 100_000);
    try {
      expect((await run('umount', ['-l', mnt])).code).toBe(0);
      expect(await isImgmountMount(mnt)).toBe(false);
      await delay(300);
      expect(isAlive(pid)).toBe(true);
      // Still served: the open file keeps working.
      await user.write(data, 0, data.length, 3 * MiB);
      await user.datasync();
    } finally {
      await user.close();
    }
    expect(await backgroundExitStatus(pid, log)).toBe(0);
    await expectClean(lab, image, 3 * MiB, data);
  });

  test('imgmount unmount and -u return only once the daemon has exited', async () => {
    const image = await sampleImage(lab);
    // The daemons of this test linger 400 ms between closing their images and exiting.
    process.env.IMGMOUNT_TEST_EXIT_DELAY_MS = '400';
    try {
      for (const [index, args] of [['unmount'], ['-u']].entries()) {
        const mnt = await lab.mountpoint(`mnt${index}`);
        const { pid } = await lab.mount([image], mnt);
        await writeThrough(mnt, index * MiB, seededBytes(10 + index, 4096));
        const started = Date.now();
        const result = await imgmount([...args, mnt]);
        expect(result).toMatchObject({ code: 0, stderr: '' });
        expect(isAlive(pid), `daemon ${pid} after imgmount ${args[0]}`).toBe(false);
        expect(Date.now() - started).toBeGreaterThanOrEqual(400);
      }
    } finally {
      delete process.env.IMGMOUNT_TEST_EXIT_DELAY_MS;
    }
    const daemon = await lab.foreground([image], await lab.mountpoint('fg'));
    expect((await imgmount(['unmount', lab.path('fg')])).code).toBe(0);
    expect(isAlive(daemon.pid)).toBe(false);
    expect(await needCheck(image)).toBe(false);
  });

  test('imgmount unmount refuses what is not an imgmount mount', async () => {
    const plain = await lab.mountpoint('plain');
    const notMounted = await imgmount(['unmount', plain]);
    expect(notMounted.code).toBe(1);
    expect(notMounted.stderr).toBe(`imgmount: ${plain} is not mounted\n`);
    const proc = await imgmount(['unmount', '/proc']);
    expect(proc.code).toBe(1);
    expect(proc.stderr).toMatch(/^imgmount: \/proc is not an imgmount mount \(it is proc/);
  });
});
