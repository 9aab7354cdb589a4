/**
 * The byte-range locks QEMU takes on its image files, taken the same way, so
 * an image a running VM (or qemu-img, qemu-nbd) is writing is never opened
 * read-write here, and a VM cannot open for writing an image we are writing.
 *
 * QEMU's scheme (block/file-posix.c, raw_apply_lock_bytes): open-file-
 * description read locks on single bytes. Byte 100 + n means "I hold
 * permission n", byte 200 + n "I do not let others have permission n"; n is 0
 * for consistent read and 1 for write. A holder conflicts with someone who
 * wants a permission it does not share, and the other way round. OFD locks
 * belong to the open file description: they go with the descriptor's close
 * (even on SIGKILL), and never conflict with our own other opens' checks of
 * the same description.
 *
 * Here: a read-only open holds byte 100 (consistent read) and refuses when
 * someone does not share reading (200). A read-write open also holds 101 (write)
 * and 201 (we do not share write), and refuses when someone else holds write
 * (101) or does not share it (201). Locks are taken first and checked after,
 * so two openers racing both see each other.
 */
import { constants as osConstants } from 'node:os';
import { constants as native, ofdLock, ofdTest } from '../native/index.js';
import { BlockError } from './errors.js';

const PERM_CONSISTENT_READ = 0;
const PERM_WRITE = 1;
const PERM_BASE = 100;
const SHARED_BASE = 200;

/** Takes our locks on `fd` and refuses (EBUSY) when another program's locks forbid this open. */
export function takeQemuLocks(fd: number, readOnly: boolean, path: string): void {
  const held = readOnly ? [PERM_BASE + PERM_CONSISTENT_READ] : [PERM_BASE + PERM_CONSISTENT_READ, PERM_BASE + PERM_WRITE, SHARED_BASE + PERM_WRITE];
  for (const byte of held) ofdLock(fd, native.F_RDLCK, byte, 1);
  const conflicts = readOnly ? [SHARED_BASE + PERM_CONSISTENT_READ] : [SHARED_BASE + PERM_CONSISTENT_READ, PERM_BASE + PERM_WRITE, SHARED_BASE + PERM_WRITE];
  for (const byte of conflicts) {
    if (ofdTest(fd, native.F_WRLCK, byte, 1) === native.F_UNLCK) continue;
    const why = byte === PERM_BASE + PERM_WRITE ? 'is writing it' : byte === SHARED_BASE + PERM_WRITE ? 'lets nobody else write it' : 'lets nobody else read it';
    throw new BlockError(
      `${path} is in use by another program (a running VM, qemu-img or qemu-nbd) that ${why}; close it first, or open ${readOnly ? 'it later' : 'it read-only'}`,
      osConstants.errno.EBUSY,
    );
  }
}

/** Drops the write permission and the refusal to share it (a read-write open that stays read-only). */
export function releaseWriteLocks(fd: number): void {
  for (const byte of [PERM_BASE + PERM_WRITE, SHARED_BASE + PERM_WRITE]) ofdLock(fd, native.F_UNLCK, byte, 1);
}
