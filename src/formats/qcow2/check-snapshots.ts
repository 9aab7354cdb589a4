/**
 * qcow2 check, part 0: reading the snapshot table as `qemu-img check` 7.2
 * does (qemu's qcow2_check_read_snapshot_table), before anything else. A
 * normal open refuses a broken table; the check reads what it can and reports
 * the rest, with qemu's words and counts:
 *
 * - more than 65536 entries (QCOW_MAX_SNAPSHOTS): with `-r all` the overhang
 *   is discarded ("Discarding N overhanging snapshots") and nb_snapshots is
 *   cut in the header at once (4 bytes, flushed: the dropped entries, their
 *   L1 tables and the rest of the table become leaks the refcount pass
 *   frees); otherwise the check fails (exit 1), as qemu's;
 * - an unaligned table offset (or one no 64-bit offset can hold): the check
 *   fails, with or without a repair, as qemu's;
 * - an entry with more than 1024 bytes of extra data: `-r all` keeps the
 *   first 1024 (one corruption, fixed when the table is rewritten);
 *   otherwise the check fails;
 * - a table longer than 64 MiB (QCOW_MAX_SNAPSHOTS_SIZE): `-r all` discards
 *   the entries from the one that crosses the limit on; otherwise it fails;
 * - on version 3, an entry with less than 16 bytes of extra data is
 *   "incomplete" (one corruption; the rewrite gives it the disk size).
 *
 * Bytes past the end of the file read as zeros, as qemu's reads do there (an
 * entry cut by the end of the file is read, not refused). Memory is bounded
 * by the 64 MiB limit: entries are read through a 1 MiB window, extra data
 * beyond 1024 bytes is skipped, never allocated.
 *
 * The entries returned keep every field the rewrite (check-snapshot-write.ts)
 * needs; the L1 tables they name are checked by the refcount pass
 * (check-refs.ts), which reports unaligned or oversized ones as qemu does.
 *
 * Concurrency: runs first in a check, on an image nobody else writes.
 */
import { constants } from 'node:os';
import { HostIoError } from '../../block/errors.js';
import type { Protocol } from '../../block/types.js';
import type { CheckSnapshot } from './check-refs.js';
import { MAX_SNAPSHOTS } from './header.js';

/** qemu's limits: extra data per entry, and the whole table's length. */
export const MAX_EXTRA_DATA = 1024;
export const MAX_TABLE_BYTES = 1024 * MAX_SNAPSHOTS;
/** The fixed part of an entry, and the extra data qemu 7.2 knows (vm_state_size_large, disk_size, icount). */
export const ENTRY_HEADER_BYTES = 40;
export const KNOWN_EXTRA_BYTES = 24;
/** Where nb_snapshots (u32) and snapshots_offset (u64) live in the header. */
export const SNAPSHOT_POINTER_AT = 60;
const WINDOW_BYTES = 1024 * 1024;
/** qemu's INT_MAX bound on the distance from the table's start. */
const INT_MAX = 2 ** 31 - 1;
const INT64_MAX = (1n << 63n) - 1n;

/** One snapshot table entry, as the check read it (extra data cut to 1024 bytes where it was longer). */
export interface SnapshotEntry extends CheckSnapshot {
  /** l1_table_offset as stored (it may be above 2^53 in a damaged entry; `l1TableOffset` is then 1, reported unaligned). */
  rawL1Offset: bigint;
  idBytes: Buffer;
  nameBytes: Buffer;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  /** The 32-bit vm_state_size of the fixed part. */
  vmStateSize32: number;
  /** extra_data_size after a cut to 1024; `extra` holds that many bytes. */
  extraDataSize: number;
  extra: Buffer;
}

/** What reading the table found, in qemu's counting (corruptions here are those left to fix). */
export interface SnapshotTableRead {
  entries: SnapshotEntry[];
  /** snapshots_offset and the table's length on disk (entries padded to 8), for the refcount pass. */
  offset: number;
  size: number;
  corruptions: number;
  corruptionsFixed: number;
}

/** The check cannot go on (qemu-img: "Check failed", exit status 1); `lines` are what qemu prints before. */
export class SnapshotTableError extends HostIoError {
  constructor(path: string, readonly lines: string[], reason: string, errnoValue: number) {
    super(`${path}: ${lines.join('; ')}; Check failed: ${reason}`, errnoValue);
  }
}

/** Reads a file through a window, with zeros past its end (qemu's reads past the end of a file). */
class ZeroPaddedReader {
  private start = 0;
  private window = Buffer.alloc(0);

  constructor(private readonly file: Protocol, private readonly fileSize: number) {}

  async read(offset: number, length: number): Promise<Buffer> {
    if (offset < this.start || offset + length > this.start + this.window.length) {
      const size = Math.max(WINDOW_BYTES, length);
      const window = Buffer.alloc(size);
      const inFile = Math.max(0, Math.min(size, this.fileSize - offset));
      if (inFile > 0) await this.file.read(offset, window.subarray(0, inFile));
      this.start = offset;
      this.window = window;
    }
    return this.window.subarray(offset - this.start, offset - this.start + length);
  }
}

export interface ReadOptions {
  version: 2 | 3;
  clusterSize: number;
  fileSize: number;
  /** A repair of any kind will follow (-r leaks or -r all). */
  repair: boolean;
  /** -r all: what can be fixed in the table is. */
  fixErrors: boolean;
  /** Receives qemu's lines. */
  messages: string[];
}

/**
 * Reads the table the header names. With `fixErrors`, an overlong table is
 * cut in the header before this returns.
 */
export async function readSnapshotTableForCheck(file: Protocol, headerBytes: Buffer, options: ReadOptions): Promise<SnapshotTableRead> {
  const { version, clusterSize, fileSize, fixErrors, messages } = options;
  let count = headerBytes.readUInt32BE(SNAPSHOT_POINTER_AT);
  const rawOffset = headerBytes.readBigUInt64BE(SNAPSHOT_POINTER_AT + 4);
  let reduced = 0;
  if (count > MAX_SNAPSHOTS && fixErrors) {
    messages.push(`Discarding ${count - MAX_SNAPSHOTS} overhanging snapshots`);
    reduced += count - MAX_SNAPSHOTS;
    count = MAX_SNAPSHOTS;
  }
  if (count > MAX_SNAPSHOTS) {
    throw new SnapshotTableError(file.path, [
      `ERROR snapshot table too large (nb_snapshots ${count}, at most ${MAX_SNAPSHOTS})`,
      `You can force-remove all ${count - MAX_SNAPSHOTS} overhanging snapshots with imgmount check -r all`,
    ], 'File too large', constants.errno.EFBIG);
  }
  // qemu's qcow2_validate_table; offsets past 2^53 (never inside a file) are refused with it.
  if (rawOffset % BigInt(clusterSize) !== 0n || INT64_MAX - BigInt(count * ENTRY_HEADER_BYTES) < rawOffset || rawOffset > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new SnapshotTableError(file.path, [
      `ERROR snapshot table offset invalid (snapshots_offset 0x${rawOffset.toString(16)}: it must be a multiple of the cluster size ${clusterSize}, at most 2^53)`,
    ], 'Invalid argument', constants.errno.EINVAL);
  }
  const start = Number(rawOffset);
  const reader = new ZeroPaddedReader(file, fileSize);
  const entries: SnapshotEntry[] = [];
  let extraDropped = 0;
  let at = start;
  let tableLength = 0;
  for (let index = 0; index < count; index++) {
    const entryStart = at;
    tableLength = Math.ceil(tableLength / 8) * 8;
    at = Math.ceil(at / 8) * 8;
    const fixed = Buffer.from(await reader.read(at, ENTRY_HEADER_BYTES));
    at += ENTRY_HEADER_BYTES;
    const idSize = fixed.readUInt16BE(12);
    const nameSize = fixed.readUInt16BE(14);
    const storedExtra = fixed.readUInt32BE(36);
    let extraDataSize = storedExtra;
    if (storedExtra > MAX_EXTRA_DATA) {
      if (!fixErrors) {
        throw new SnapshotTableError(file.path, [
          `ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry ${index} (extra_data_size ${storedExtra}, at most ${MAX_EXTRA_DATA})`,
          'You can force-remove this extra metadata with imgmount check -r all',
        ], 'File too large', constants.errno.EFBIG);
      }
      messages.push(`Discarding too much extra metadata in snapshot table entry ${index} (${storedExtra} > ${MAX_EXTRA_DATA})`);
      extraDropped += 1;
      extraDataSize = MAX_EXTRA_DATA;
    }
    const extra = Buffer.from(await reader.read(at, extraDataSize));
    at += storedExtra;
    const idBytes = Buffer.from(await reader.read(at, idSize));
    at += idSize;
    const nameBytes = Buffer.from(await reader.read(at, nameSize));
    at += nameSize;
    tableLength += ENTRY_HEADER_BYTES + extraDataSize + idSize + nameSize;
    if (tableLength > MAX_TABLE_BYTES || at - start > INT_MAX) {
      const overhang = count - index;
      if (!fixErrors) {
        throw new SnapshotTableError(file.path, [
          `ERROR failed to read the snapshot table: Snapshot table is too big (more than ${MAX_TABLE_BYTES} bytes at entry ${index})`,
          `You can force-remove all ${overhang} overhanging snapshots with imgmount check -r all`,
        ], 'File too large', constants.errno.EFBIG);
      }
      messages.push(`Discarding ${overhang} overhanging snapshots (snapshot table is too big)`);
      reduced += overhang;
      at = entryStart;
      break;
    }
    const l1Offset = fixed.readBigUInt64BE(0);
    entries.push({
      id: cString(idBytes),
      name: cString(nameBytes),
      l1TableOffset: l1Offset > BigInt(Number.MAX_SAFE_INTEGER) ? 1 : Number(l1Offset),
      l1Size: fixed.readUInt32BE(8),
      rawL1Offset: l1Offset,
      idBytes,
      nameBytes,
      dateSec: fixed.readUInt32BE(16),
      dateNsec: fixed.readUInt32BE(20),
      vmClockNsec: fixed.readBigUInt64BE(24),
      vmStateSize32: fixed.readUInt32BE(32),
      extraDataSize,
      extra,
    });
  }
  if (options.repair && entries.length > 0 && at - start > 0 && at - fileSize >= clusterSize) {
    // qemu reads zeros there, finds every cluster of every snapshot unreferenced and frees them all (-r leaks
    // as -r all), then writes the zeroed entries back: the snapshots are gone even if the table is intact
    // elsewhere (a damaged snapshots_offset). Refused: nothing is written.
    throw new SnapshotTableError(file.path, [
      `the snapshot table (${entries.length} entries at 0x${start.toString(16)}, ${at - start} bytes) lies outside the file (${fileSize} bytes)`,
      'its entries read as zeros, and a repair would free every cluster the snapshots use (qemu-img check -r does); not repaired',
      'imgmount check without -r reports what is wrong',
    ], 'the snapshot table is outside the file', constants.errno.EINVAL);
  }
  const result: SnapshotTableRead = { entries, offset: start, size: at - start, corruptions: reduced + extraDropped, corruptionsFixed: 0 };
  if (reduced > 0) {
    // As qemu, at once: the refcount pass counts what the header says, and what was cut off becomes leaks.
    const field = Buffer.alloc(4);
    field.writeUInt32BE(entries.length);
    await file.write(SNAPSHOT_POINTER_AT, field);
    await file.flush();
    result.corruptionsFixed += reduced;
    result.corruptions -= reduced;
  }
  if (version === 3) {
    entries.forEach((entry, index) => {
      if (entry.extraDataSize >= 16) return;
      result.corruptions += 1;
      messages.push(`${fixErrors ? 'Repairing' : 'ERROR'} snapshot table entry ${index} is incomplete`);
    });
  }
  return result;
}

/** A string as qemu holds it: up to the first NUL. */
export function cString(bytes: Buffer): string {
  const end = bytes.indexOf(0);
  return bytes.subarray(0, end < 0 ? bytes.length : end).toString('utf8');
}
