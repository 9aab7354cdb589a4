/**
 * An ordinary user mounts through fusermount, not only root: as the user nobody,
 * mount a QED image, write through the mount with fsync, unmount with
 * `imgmount unmount`; the image is consistent and need-check is clear.
 *
 * /dev/fuse is 0600 on some machines (0666 on a normal Debian/Ubuntu install):
 * the test opens it to everyone for its duration and restores the mode after.
 * When the checkout is not readable by nobody (a clone under /root), the
 * program is copied to a world-readable temporary directory first.
 */
import { execFile } from 'node:child_process';
import { chmod, chown, cp, mkdir, mkdtemp, rm, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { qemuImg, run } from '../helpers/qemu.js';
import { MountLab, needCheck, skipWithoutFuse } from './fuse-helpers.js';

const NOBODY = 65534;
const repository = resolve(import.meta.dirname, '../..');

function asNobody(command: string, cwd: string): ReturnType<typeof run> {
  return run('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', 'sh', '-c', `cd ${cwd} && ${command}`]);
}

/** A copy of imgmount that nobody can run, or the checkout itself when it already can. */
async function programForNobody(): Promise<string> {
  const check = await asNobody(`test -r ${repository}/dist/cli/main.js && test -r ${repository}/build/Release/imgmount.node`, '/');
  if (check.code === 0) return join(repository, 'bin/imgmount');
  const copy = await mkdtemp('/tmp/imgmount-program-');
  await chmod(copy, 0o755);
  for (const part of ['bin', 'build', 'dist', 'node_modules', 'package.json']) await cp(join(repository, part), join(copy, part), { recursive: true });
  await promisify(execFile)('chmod', ['-R', 'a+rX', copy]);
  return join(copy, 'bin/imgmount');
}

describe.skipIf(skipWithoutFuse('mounting as an ordinary user', ['setpriv']))('mounting as an ordinary user', () => {
  let lab: MountLab;
  let fuseMode: number;
  let copies: string[] = [];
  beforeEach(async () => {
    lab = await MountLab.create();
    fuseMode = (await stat('/dev/fuse')).mode & 0o777;
    await chmod('/dev/fuse', 0o666);
    copies = [];
  });
  afterEach(async () => {
    await chmod('/dev/fuse', fuseMode);
    await lab.cleanup();
    for (const copy of copies) await rm(copy, { recursive: true, force: true });
  });

  test('nobody mounts, writes with fsync and unmounts cleanly', { timeout: 60_000 }, async () => {
    const program = await programForNobody();
    if (!program.startsWith(repository)) copies.push(resolve(program, '../..'));
    await chmod(lab.dir, 0o755);
    const home = lab.path('home');
    await mkdir(join(home, 'mnt'), { recursive: true });
    await qemuImg(['create', '-f', 'qed', join(home, 'disk.qed'), '8M']);
    await chown(home, NOBODY, NOBODY);
    await chown(join(home, 'mnt'), NOBODY, NOBODY);
    await chown(join(home, 'disk.qed'), NOBODY, NOBODY);
    lab.track(join(home, 'mnt'));

    const session = await asNobody(
      `${program} disk.qed mnt && printf 'ordinary' | dd of=mnt/disk.raw bs=1 seek=5000 conv=notrunc,fsync status=none && ${program} unmount mnt`,
      home,
    );
    expect(session.stderr).toBe('');
    expect(session.code).toBe(0);
    expect(await needCheck(join(home, 'disk.qed'))).toBe(false);
    await qemuImg(['check', join(home, 'disk.qed')]);
    const read = await run('qemu-io', ['-f', 'qed', '-c', 'read -v 5000 8', join(home, 'disk.qed')]);
    expect(read.stdout).toMatch(/ordinary/);
  });
});
