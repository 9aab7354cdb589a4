/**
 * Who may open the files: by default only the mounting user (the kernel refuses
 * everyone else, root included); with --allow-other (or -o allow_other) others may,
 * and the files' mode (0644, owned by the mounting user) is enforced by the kernel.
 */
import { chmod } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { run } from '../helpers/qemu.js';
import { MiB, MountLab, skipWithoutFuse } from './fuse-helpers.js';

/** Runs a shell command as the user nobody (65534). */
function asNobody(command: string): ReturnType<typeof run> {
  return run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'sh', '-c', command]);
}

describe.skipIf(skipWithoutFuse('who may open the files', ['setpriv']))('who may open the files', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
    await chmod(lab.dir, 0o755);
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  test('only the mounting user by default', async () => {
    const image = await lab.file('disk.img', Buffer.alloc(MiB, 1));
    const mnt = await lab.mountpoint();
    await lab.mount([image], mnt);
    const denied = await asNobody(`head -c 1 ${join(mnt, 'disk.raw')}`);
    expect(denied.code).not.toBe(0);
    expect(denied.stderr).toMatch(/Permission denied/);
  });

  test('others with --allow-other or -o allow_other, within the file mode', async () => {
    for (const [name, options] of [['long', ['--allow-other']], ['o', ['-o', 'allow_other']]] as const) {
      // One image per mount: an image has one read-write opener at a time.
      const image = await lab.file(`disk-${name}.img`, Buffer.alloc(MiB, 0x61));
      const mnt = await lab.mountpoint(`mnt-${name}`);
      await lab.mount([...options, image], mnt);
      const read = await asNobody(`head -c 3 ${join(mnt, `disk-${name}.raw`)}`);
      expect(read).toMatchObject({ code: 0, stdout: 'aaa' });
      const write = await asNobody(`echo x | dd of=${join(mnt, `disk-${name}.raw`)} conv=notrunc status=none`);
      expect(write.code).not.toBe(0);
      expect(write.stderr).toMatch(/Permission denied/);
    }
  });
});
