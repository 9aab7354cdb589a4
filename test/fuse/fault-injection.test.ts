/**
 * Fault injection through a real mount (issue 10): blkdebug fails the request
 * after each named driver event in turn, with EIO and with ENOSPC,
 * while a user works on the mounted disk: a read, an allocating partial
 * write (copy-on-write from the backing file where there is one), a write
 * that needs a new L2 table, an overwrite in place, and three 1 MiB writes
 * that make qcow2 allocate a refcount block. Each request is fsync'd.
 *
 * What a user must see: the request that met the fault fails with that
 * errno (no crash, no hang), the daemon keeps serving (the failed request and
 * the rest succeed when retried), the unmount is clean, `qemu-img check`
 * finds no corruption (leaks allowed), and the disk holds exactly what was
 * acknowledged: qemu-io's data from before the mount, every request that
 * succeeded, and the retried ones.
 */
import { constants } from 'node:fs';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { firstDifference, qemuCheck, qemuConvertToRaw, qemuImg, qemuIo, seededBytes } from '../helpers/qemu.js';
import { backgroundExitStatus, imgmount, MiB, MountLab, skipWithoutFuse } from './fuse-helpers.js';

const KiB = 1024;
const SIZE = 16 * MiB;

type Operation = { kind: 'read'; offset: number; length: number } | { kind: 'write'; offset: number; data: Buffer };

const OPERATIONS: Operation[] = [
  { kind: 'read', offset: 64 * KiB, length: 64 * KiB },
  { kind: 'write', offset: 300 * KiB + 512, data: seededBytes(21, 3000) },
  { kind: 'write', offset: 8 * MiB + KiB, data: seededBytes(22, 8 * KiB) },
  { kind: 'write', offset: 0, data: seededBytes(23, 4 * KiB) },
  // One FUSE request each (1 MiB is the largest the mount takes): a request that fails
  // after others of the same write() succeeded would show only as a short write.
  { kind: 'write', offset: 12 * MiB, data: seededBytes(24, MiB) },
  { kind: 'write', offset: 13 * MiB, data: seededBytes(25, MiB) },
  { kind: 'write', offset: 14 * MiB, data: seededBytes(26, MiB) },
];

interface Variant {
  format: 'qed' | 'qcow2';
  backing: boolean;
  lazy?: boolean;
  /** The events this workload passes through, each of which must fail a request. */
  events: string[];
}

const QED_EVENTS = ['read_aio', 'l2_load', 'header_update', 'flush_to_disk', 'cow_write', 'l2_update', 'l2_alloc_write', 'l1_update', 'write_aio'];
const QCOW2_EVENTS = ['read_aio', 'l2_load', 'cluster_alloc', 'refblock_load', 'refblock_update', 'refblock_alloc', 'l2_update', 'l2_alloc_write', 'l1_update', 'write_aio', 'flush_to_disk'];

const VARIANTS: Variant[] = [
  { format: 'qed', backing: false, events: QED_EVENTS },
  { format: 'qed', backing: true, events: [...QED_EVENTS, 'cow_read'] },
  // Without a backing file the untouched part of a new qcow2 cluster is zeros it need not write: no COW.
  { format: 'qcow2', backing: false, events: QCOW2_EVENTS },
  { format: 'qcow2', backing: true, events: [...QCOW2_EVENTS, 'cow_read', 'cow_write'] },
  // Lazy refcounts: the dirty bit is a header write; refcount blocks are written only when the image is made clean.
  { format: 'qcow2', backing: true, lazy: true, events: [...QCOW2_EVENTS.filter((event) => event !== 'refblock_update'), 'cow_read', 'cow_write', 'header_update'] },
];

/** Runs one operation on the mounted file: its errno code, or undefined when it succeeded. */
async function perform(file: string, operation: Operation): Promise<string | undefined> {
  try {
    // Reads bypass the page cache: a failed buffered read is retried by the kernel itself.
    const handle = await open(file, operation.kind === 'read' ? constants.O_RDONLY | constants.O_DIRECT : 'r+');
    try {
      if (operation.kind === 'read') {
        const buffer = Buffer.alloc(operation.length);
        await handle.read(buffer, 0, buffer.length, operation.offset);
      } else {
        const { bytesWritten } = await handle.write(operation.data, 0, operation.data.length, operation.offset);
        if (bytesWritten !== operation.data.length) throw new Error(`short write: ${bytesWritten} of ${operation.data.length} bytes at ${operation.offset}`);
        await handle.sync();
      }
    } finally {
      await handle.close();
    }
    return undefined;
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === undefined) throw error;
    return code;
  }
}

describe.skipIf(skipWithoutFuse('fault injection through the mount'))('fault injection through the mount', () => {
  let lab: MountLab;
  beforeEach(async () => {
    lab = await MountLab.create();
  });
  afterEach(async () => {
    await lab.cleanup();
  });

  async function prepare(variant: Variant): Promise<{ image: string; expected: Buffer }> {
    const expected = variant.backing ? seededBytes(20, SIZE) : Buffer.alloc(SIZE);
    const image = lab.path(`disk.${variant.format}`);
    const options = variant.format === 'qed' ? 'cluster_size=4096' : `cluster_size=4096,refcount_bits=64,lazy_refcounts=${variant.lazy ? 'on' : 'off'}`;
    const backing: string[] = [];
    if (variant.backing) {
      const base = lab.path('base.raw');
      await writeFile(base, expected);
      backing.push('-b', base, '-F', 'raw');
    }
    await qemuImg(['create', '-f', variant.format, '-o', options, ...backing, image, String(SIZE)]);
    await qemuIo(image, ['write -P 0x11 0 256k'], variant.format);
    expected.fill(0x11, 0, 256 * KiB);
    return { image, expected };
  }

  /** Mounts with the rule, runs the workload, retries from the failed request on; returns what failed. */
  async function runWorkload(variant: Variant, rule: string, errno: string): Promise<{ failed: { index: number; code: string } | undefined; expected: Buffer; image: string; log: string }> {
    const { image, expected } = await prepare(variant);
    const mnt = await lab.mountpoint();
    const { pid, log } = await lab.mount(['--filter', `blkdebug:${rule},errno=${errno},once=on`, image], mnt);
    const file = join(mnt, `disk.raw`);
    let failed: { index: number; code: string } | undefined;
    for (const [index, operation] of OPERATIONS.entries()) {
      const code = await perform(file, operation);
      if (code !== undefined && failed === undefined) {
        failed = { index, code };
        // The daemon keeps serving: the same request succeeds now that the rule is spent.
        expect(await perform(file, operation), `retry of request ${index}`).toBeUndefined();
      } else {
        expect(code, `request ${index} after the failure of request ${failed?.index}`).toBeUndefined();
      }
      if (operation.kind === 'write') operation.data.copy(expected, operation.offset);
    }
    const unmounted = await imgmount(['unmount', mnt]);
    expect(unmounted.code, unmounted.stderr).toBe(0);
    expect(await backgroundExitStatus(pid, log)).toBe(0);
    return { failed, expected, image, log };
  }

  async function expectConsistent(variant: Variant, image: string, expected: Buffer): Promise<void> {
    const check = await qemuCheck(image, variant.format);
    // 0: clean; 3: leaked clusters only (a failed allocation may leave some).
    expect([0, 3], check.stdout + check.stderr).toContain(check.code);
    const content = await qemuConvertToRaw(image, lab.dir, variant.format);
    const difference = firstDifference(content, expected);
    expect(difference, `first difference at ${difference}`).toBe(-1);
  }

  for (const variant of VARIANTS) {
    const name = `${variant.format}${variant.backing ? ' over a backing file' : ''}${variant.lazy ? ' with lazy refcounts' : ''}`;
    for (const errno of ['EIO', 'ENOSPC']) {
      test.each(variant.events)(`${name}: ${errno} after %s fails that request with ${errno}; the daemon keeps serving; the image keeps all acknowledged data`, async (event) => {
        const { failed, expected, image, log } = await runWorkload(variant, `event=${event}`, errno);
        expect(failed, `no request failed after ${event}; the daemon's log:\n${await readFile(log, 'utf8')}`).toBeDefined();
        expect(failed!.code).toBe(errno);
        await expectConsistent(variant, image, expected);
      });
    }
  }
});
