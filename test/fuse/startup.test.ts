/**
 * Starting fast, seen from outside: a background daemon's process title names its
 * images and the mount point's full real path (a 200-character one included, which
 * Node.js could only show if the daemon's command line was made long enough), and
 * the command processes load only what they use (no yargs for --help and info; no
 * block layer and no FUSE code in the command process of a background mount, whose
 * daemon loads them). Speed itself is measured, not asserted (see the README).
 */
import { mkdir, realpath, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { modulesEvaluated } from '../helpers/bundle.js';
import { qemuImg, run } from '../helpers/qemu.js';
import { IMGMOUNT, MountLab, skipWithoutFuse } from './fuse-helpers.js';

async function title(pid: number): Promise<string> {
  const ps = await run('ps', ['-o', 'args=', '-p', String(pid)]);
  expect(ps.code).toBe(0);
  return ps.stdout.trim();
}

describe.skipIf(skipWithoutFuse('starting a mount', ['ps']))('starting a mount', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  test("the daemon's title names the image and the mount point's real path, however long", async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', image, '8M']);
    // A mount point about 200 characters long, reached through a symbolic link.
    const parts = Array.from({ length: 4 }, (_, index) => `${String(index).repeat(3)}-a-fairly-long-directory-name-${'x'.repeat(10)}`);
    const deep = lab.path(...parts, 'mnt');
    await mkdir(deep, { recursive: true });
    const real = await realpath(deep);
    expect(real.length).toBeGreaterThanOrEqual(200);
    await symlink(join(...parts), lab.path('link'));
    const { pid } = await lab.mount([image], lab.path('link', 'mnt'));
    expect(await title(pid)).toBe(`imgmount disk.qed on ${real}`);
    expect(await run('cat', [join(real, 'disk.raw')])).toMatchObject({ code: 0 });
    expect((await run(IMGMOUNT, ['unmount', real])).code).toBe(0);
  });

  test('several images: all their names', async () => {
    const first = lab.path('a.qed');
    const second = lab.path('b.qcow2');
    await qemuImg(['create', '-f', 'qed', first, '8M']);
    await qemuImg(['create', '-f', 'qcow2', second, '8M']);
    const mnt = await lab.mountpoint();
    const { pid } = await lab.mount(['-r', first, second], mnt);
    expect(await title(pid)).toBe(`imgmount a.qed b.qcow2 on ${await realpath(mnt)}`);
    expect((await run(IMGMOUNT, ['unmount', mnt])).code).toBe(0);
  });

  test('the command of a background mount loads neither the block layer nor FUSE; --help and info load no yargs', async () => {
    const image = lab.path('disk.qed');
    await qemuImg(['create', '-f', 'qed', image, '8M']);
    const mnt = await lab.mountpoint();
    // What each command process evaluated, as source modules (bin/imgmount runs a bundle, scripts/build-bundle.mjs).
    const mount = await modulesEvaluated(['--log', lab.path('daemon.log'), image, mnt], lab.dir);
    expect(mount.code).toBe(0);
    expect(mount.sources).toContain('src/cli/background.ts');
    expect(mount.sources.filter((source) => /^src\/(block\/(?!errors|size|idle-clean|filters\/spec)|formats|fuse|native|cache)|node_modules/.test(source))).toEqual([]);
    expect((await run(IMGMOUNT, ['unmount', mnt])).code).toBe(0);

    const help = await modulesEvaluated(['--help'], lab.dir);
    expect(help.code).toBe(0);
    const info = await modulesEvaluated(['info', image], lab.dir);
    expect(info.code).toBe(0);
    for (const { sources } of [help, info]) {
      expect(sources).toContain('src/cli/main.ts');
      expect(sources.filter((source) => /yargs|cliui|cli-progress|zstddec|^src\/fuse\//.test(source))).toEqual([]);
    }
  });
});
