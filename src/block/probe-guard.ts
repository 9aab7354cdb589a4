/**
 * The guard of an image that was probed as raw (no `-f raw`): as in QEMU, a
 * write that would make the file probe as another format next time is
 * refused (EPERM), because that next open would read the guest's data as
 * image metadata. Only writes touching the bytes probing looks at (the head
 * and the tail of the file) are checked, so ordinary writes cost nothing.
 *
 * Concurrency: the guard runs the write itself. Writes that touch the head or
 * the tail are serialized (check, then write, one at a time), so two writes
 * that are harmless alone cannot together complete a signature.
 */
import { constants as osConstants } from 'node:os';
import { Mutex } from 'async-mutex';
import { BlockError } from './errors.js';
import { PROBE_HEAD_BYTES, PROBE_TAIL_BYTES, type FormatList } from './probe.js';
import type { GuestOffset, Protocol } from './types.js';

/** Checks a write and, when it is allowed, runs it (`write`). */
export type WriteGuard = (offset: GuestOffset, data: Buffer, write: () => Promise<void>) => Promise<void>;

/**
 * A guard for `file` (raw: guest offset = host offset), whose size is
 * `fileSize` (a raw image's virtual size: fixed while it is open, so the hot
 * path needs no stat).
 */
export function rawProbeGuard(formats: FormatList, file: Protocol, fileSize: number): WriteGuard {
  const probedBytes = new Mutex();
  return async (offset, data, write) => {
    const tailLength = Math.min(PROBE_TAIL_BYTES, fileSize);
    const tailStart = fileSize - tailLength;
    const end = offset + data.length;
    const touchesHead = offset < PROBE_HEAD_BYTES;
    const touchesTail = end > tailStart && tailLength > 0;
    if (!touchesHead && !touchesTail) return write();
    await probedBytes.runExclusive(async () => {
      await check(formats, file, fileSize, offset, data);
      await write();
    });
  };
}

async function check(formats: FormatList, file: Protocol, fileSize: number, offset: GuestOffset, data: Buffer): Promise<void> {
  {
    const tailLength = Math.min(PROBE_TAIL_BYTES, fileSize);
    const tailStart = fileSize - tailLength;
    const head = Buffer.alloc(PROBE_HEAD_BYTES);
    await file.read(0, head);
    const tail = Buffer.alloc(tailLength);
    await file.read(tailStart, tail);
    overlay(head, 0, offset, data);
    overlay(tail, tailStart, offset, data);
    const after = formats.best({ head, tail, fileSize, filename: file.path });
    if (after.name !== 'raw') {
      throw new BlockError(
        `${file.path} was probed as raw; refusing a write at ${offset} that would make it look like a ${after.name} image (open it with -f raw to write it)`,
        osConstants.errno.EPERM,
      );
    }
  }
}

/** Copies the part of `data` (at `offset`) that falls inside `target` (which holds bytes from `targetStart`). */
function overlay(target: Buffer, targetStart: number, offset: number, data: Buffer): void {
  const from = Math.max(offset, targetStart);
  const to = Math.min(offset + data.length, targetStart + target.length);
  if (from < to) data.copy(target, from - targetStart, from - offset, to - offset);
}
