/**
 * The unmount notification channel (src/fuse/control.ts) accepts only the mount's
 * owner and root: its socket lies in a directory only the owner may enter, so the
 * user nobody can neither connect to a root daemon's channel nor unmount its mount,
 * and cannot keep `imgmount unmount` from waiting for the daemon, however many
 * connections it tries. The owner is not limited to a number of connections. Root
 * unmounting an ordinary user's mount finds that user's channel and waits for that
 * daemon too.
 */
import { execFile } from 'node:child_process';
import { chmod, chown, cp, lstat, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { createConnection, type Socket } from 'node:net';
import { join, resolve } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { controlDirectories, controlName } from '../../src/fuse/control.js';
import { qemuImg, run } from '../helpers/qemu.js';
import { IMGMOUNT, isAlive, isImgmountMount, MountLab, needCheck, skipWithoutFuse, waitFor } from './fuse-helpers.js';

const NOBODY = 65534;
const repository = resolve(import.meta.dirname, '../..');

function asNobody(command: string, cwd = '/'): ReturnType<typeof run> {
  return run('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', 'sh', '-c', `cd ${cwd} && ${command}`]);
}

/** A copy of imgmount that nobody can run, or the checkout itself when it already can. */
async function programForNobody(copies: string[]): Promise<string> {
  const check = await asNobody(`test -r ${repository}/dist/cli/main.js && test -r ${repository}/build/Release/imgmount.node`);
  if (check.code === 0) return join(repository, 'bin/imgmount');
  const copy = await mkdtemp('/tmp/imgmount-program-');
  copies.push(copy);
  await chmod(copy, 0o755);
  for (const part of ['bin', 'build', 'dist', 'node_modules', 'package.json']) await cp(join(repository, part), join(copy, part), { recursive: true });
  await promisify(execFile)('chmod', ['-R', 'a+rX', copy]);
  return join(copy, 'bin/imgmount');
}

/** The socket of the daemon of `uid` serving `mountpoint`, wherever it is. */
async function socketOf(uid: number, mountpoint: string): Promise<string> {
  for (const dir of controlDirectories(uid)) {
    const path = join(dir, controlName(mountpoint));
    if ((await lstat(path).catch(() => undefined))?.isSocket()) return path;
  }
  throw new Error(`no control socket of uid ${uid} for ${mountpoint}`);
}

/**
 * Node.js as nobody: tries connections to `path`, `count` at once, round after round
 * for at least `durationMs`, holding every one it gets; prints the outcomes by code.
 */
function connectAsNobody(path: string, count: number, durationMs = 0): ReturnType<typeof run> {
  const script = `
    const net = require('node:net');
    const codes = {};
    const until = Date.now() + ${durationMs};
    const round = () => {
      let left = ${count};
      for (let i = 0; i < ${count}; i++) {
        const s = net.createConnection(${JSON.stringify(path)});
        s.on('connect', () => { codes.connected = (codes.connected || 0) + 1; if (--left === 0) next(); });
        s.on('error', (e) => { codes[e.code] = (codes[e.code] || 0) + 1; if (--left === 0) next(); });
      }
    };
    const next = () => (Date.now() < until ? setTimeout(round, 5) : (console.log(JSON.stringify(codes)), process.exit(0)));
    round();`;
  return run('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', process.execPath, '-e', script]);
}

describe.skipIf(skipWithoutFuse('the unmount notification channel', ['setpriv']))('the unmount notification channel', () => {
  let lab: MountLab;
  let copies: string[];
  beforeEach(async () => {
    lab = await MountLab.create();
    await chmod(lab.dir, 0o755);
    copies = [];
  });
  afterEach(async () => {
    await lab.cleanup();
    for (const copy of copies) await rm(copy, { recursive: true, force: true });
  });

  test("a root mount's channel lies in a directory only root may enter; nobody can neither connect nor unmount", { timeout: 60_000 }, async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', image, '8M']);
    const mnt = await lab.mountpoint();
    const { pid } = await lab.mount([image], mnt);
    const socket = await socketOf(0, mnt);
    const dir = await lstat(resolve(socket, '..'));
    expect({ uid: dir.uid, mode: dir.mode & 0o777, directory: dir.isDirectory() }).toEqual({ uid: 0, mode: 0o700, directory: true });

    const attempts = await connectAsNobody(socket, 100);
    expect(JSON.parse(attempts.stdout)).toEqual({ EACCES: 100 });

    const program = await programForNobody(copies);
    const refused = await asNobody(`${program} unmount ${mnt}`);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/^imgmount: .+\n$/);
    expect(await isImgmountMount(mnt)).toBe(true);
    expect(isAlive(pid)).toBe(true);

    // While nobody keeps trying, root's unmount waits for the daemon as usual.
    const hammering = connectAsNobody(socket, 200, 1500);
    await delay(200);
    const unmounted = await run(IMGMOUNT, ['unmount', mnt]);
    expect(unmounted).toMatchObject({ code: 0, stderr: '' });
    expect(isAlive(pid)).toBe(false);
    const outcomes = JSON.parse((await hammering).stdout) as Record<string, number>;
    expect(Object.keys(outcomes)).toEqual(['EACCES']);
    await expect(lstat(socket)).rejects.toThrow(); // the daemon took its socket away
  });

  test('the owner is not limited to a number of connections', async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', image, '8M']);
    const mnt = await lab.mountpoint();
    const { pid } = await lab.mount([image], mnt);
    const socket = await socketOf(0, mnt);
    const held: Socket[] = [];
    try {
      const greetings = await Promise.all(
        Array.from(
          { length: 100 },
          () =>
            new Promise<string>((resolvePid, reject) => {
              const connection = createConnection(socket);
              held.push(connection);
              connection.once('data', (data) => resolvePid(data.toString()));
              connection.once('error', reject);
            }),
        ),
      );
      expect(new Set(greetings)).toEqual(new Set([`${JSON.stringify({ pid })}\n`]));
      const unmounted = await run(IMGMOUNT, ['unmount', mnt]);
      expect(unmounted).toMatchObject({ code: 0, stderr: '' });
      expect(isAlive(pid)).toBe(false);
    } finally {
      for (const connection of held) connection.destroy();
    }
  });

  test("root unmounting an ordinary user's mount waits for that user's daemon", { timeout: 60_000 }, async () => {
    const fuseMode = (await lstat('/dev/fuse')).mode & 0o777;
    await chmod('/dev/fuse', 0o666);
    try {
      const program = await programForNobody(copies);
      const home = lab.path('home');
      await mkdir(join(home, 'mnt'), { recursive: true });
      await qemuImg(['create', '-f', 'qed', join(home, 'disk.qed'), '8M']);
      for (const path of [home, join(home, 'mnt'), join(home, 'disk.qed')]) await chown(path, NOBODY, NOBODY);
      lab.track(join(home, 'mnt'));
      // nobody's daemon lingers 400 ms after closing the image: root's unmount waits for it.
      const mounted = await asNobody(`IMGMOUNT_TEST_EXIT_DELAY_MS=400 ${program} disk.qed mnt && printf 'owned' | dd of=mnt/disk.raw bs=1 seek=512 conv=notrunc status=none`, home);
      expect(mounted).toMatchObject({ code: 0, stderr: '' });
      const socket = await socketOf(NOBODY, join(home, 'mnt'));
      const dir = await lstat(resolve(socket, '..'));
      expect({ uid: dir.uid, mode: dir.mode & 0o777 }).toEqual({ uid: NOBODY, mode: 0o700 });
      const pid = Number((await run('pgrep', ['-f', `imgmount disk.qed on ${join(home, 'mnt')}`])).stdout.trim());
      expect(isAlive(pid)).toBe(true);

      const started = Date.now();
      const unmounted = await run(IMGMOUNT, ['unmount', join(home, 'mnt')]);
      expect(unmounted).toMatchObject({ code: 0, stderr: '' });
      expect(isAlive(pid)).toBe(false);
      expect(Date.now() - started).toBeGreaterThanOrEqual(400);
      expect(await needCheck(join(home, 'disk.qed'))).toBe(false);
    } finally {
      await chmod('/dev/fuse', fuseMode);
      await waitFor('nothing mounted', async () => !(await isImgmountMount(join(lab.dir, 'home', 'mnt'))), 2000).catch(() => undefined);
    }
  });
});
