/**
 * QEMU's byte-range locks, both ways, with real qemu processes: an image a
 * qemu-io (standing in for a running VM) holds read-write is refused
 * read-write here with EBUSY and still opens read-only; while we hold an image
 * read-write, qemu-io cannot open it for writing and qemu-img needs -U
 * (force-share) to read it, exactly as with a running VM; a read-only open
 * here leaves qemu free to write.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { openImage } from '../src/index.js';
import { makeTempDir, qemuImg, run, skipWithoutQemu } from './helpers/qemu.js';

/** Starts qemu-io holding `path` (read-write unless `readOnly`) for a few seconds; resolves once its locks are taken. */
async function qemuHolding(path: string, readOnly = false): Promise<{ stop: () => Promise<void> }> {
  const child = spawn('qemu-io', [...(readOnly ? ['-r'] : []), '-f', 'qed', '-c', 'sleep 10000', path], { stdio: 'ignore' });
  await delay(400);
  return {
    stop: async () => {
      child.kill('SIGKILL');
      await new Promise((resolve) => child.once('exit', resolve));
    },
  };
}

describe.skipIf(skipWithoutQemu("QEMU's image locks"))("QEMU's image locks", () => {
  it('an image qemu holds read-write is refused read-write (EBUSY, one line), opens read-only, and is free again once qemu exits', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qed');
    await qemuImg(['create', '-q', '-f', 'qed', path, '4M']);
    const qemu = await qemuHolding(path);
    try {
      await expect(openImage(path)).rejects.toMatchObject({ errno: 16, message: expect.stringMatching(/in use by another program .* that is writing it/) });
      const readOnly = await openImage(path, { readOnly: true });
      await readOnly.close();
    } finally {
      await qemu.stop();
    }
    const image = await openImage(path);
    await image.close();
  });

  it('while we hold an image read-write, qemu cannot open it for writing and qemu-img reads it only with -U', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qed');
    await qemuImg(['create', '-q', '-f', 'qed', path, '4M']);
    const image = await openImage(path);
    try {
      const write = await run('qemu-io', ['-f', 'qed', '-c', 'write 0 512', path]);
      expect(write.code).not.toBe(0);
      expect(write.stderr).toMatch(/Failed to get "write" lock/);
      expect((await run('qemu-img', ['info', path])).code).not.toBe(0);
      expect((await run('qemu-img', ['info', '-U', path])).code).toBe(0);
    } finally {
      await image.close();
    }
    expect((await run('qemu-io', ['-f', 'qed', '-c', 'write 0 512', path])).code).toBe(0);
  });

  it('a read-only open leaves qemu free to write the image', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qed');
    await qemuImg(['create', '-q', '-f', 'qed', path, '4M']);
    const image = await openImage(path, { readOnly: true });
    try {
      expect((await run('qemu-io', ['-f', 'qed', '-c', 'write 0 512', path])).code).toBe(0);
    } finally {
      await image.close();
    }
  });

  it('a qcow2 with an external data file held read-write: the data file is write-locked too (qemu-io cannot write it, qemu-img reads only with -U), and free again after close', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qcow2');
    const dataPath = join(dir, 'disk.data');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'data_file=disk.data', path, '4M'], { cwd: dir });
    const notices: string[] = [];
    const image = await openImage(path, { notice: (line) => notices.push(line) });
    try {
      expect(image.readOnly).toBe(false);
      expect(notices).toEqual([]);
      await image.write(0, Buffer.alloc(512, 0x11));
      const write = await run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', dataPath]);
      expect(write.code).not.toBe(0);
      expect(write.stderr).toMatch(/Failed to get "write" lock/);
      expect((await run('qemu-img', ['info', path], { cwd: dir })).code).not.toBe(0);
      expect((await run('qemu-img', ['info', '-U', path], { cwd: dir })).code).toBe(0);
    } finally {
      await image.close();
    }
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write 512 512', dataPath])).code).toBe(0);
    const readOnly = await openImage(path, { readOnly: true });
    try {
      expect((await run('qemu-io', ['-f', 'qcow2', '-c', 'write 0 512', path], { cwd: dir })).code).toBe(0);
    } finally {
      await readOnly.close();
    }
  });
});
