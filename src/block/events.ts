/**
 * Named points in a format driver's work that filters can act on (blkdebug
 * fails the request that follows one). A driver announces a point with
 * `announce(file, 'l2_update')` right before the I/O it names; without a filter
 * the protocol has no `event` method and the call does nothing.
 *
 * The names are QEMU's blkdebug event names where QEMU has one, so rules
 * written for QEMU's blkdebug read the same here.
 */
import type { Protocol } from './types.js';

export const BLOCK_EVENTS = [
  'l1_update',
  'l2_load',
  'l2_update',
  'l2_alloc_write',
  'write_aio',
  'read_aio',
  'cow_read',
  'cow_write',
  'flush_to_disk',
  'header_update',
  'refblock_load',
  'refblock_update',
  'refblock_alloc',
  'cluster_alloc',
] as const;

export type BlockEvent = (typeof BLOCK_EVENTS)[number];

/** Tells the filters over `file` (if any) that the driver is at `event`. */
export function announce(file: Protocol, event: BlockEvent): void {
  file.event?.(event);
}

/** A driver's flush of its file, announced as `flush_to_disk`. */
export function flushToDisk(file: Protocol): Promise<void> {
  file.event?.('flush_to_disk');
  return file.flush();
}
