/**
 * The qcow2 internal snapshot table: parsing with bounds checks, and finding
 * a snapshot by id or name as qemu does (an id match first, then a name).
 *
 * Entry layout (big-endian, each entry padded to 8 bytes):
 *   0 l1_table_offset u64   8 l1_size u32   12 id_str_size u16   14 name_size u16
 *  16 date_sec u32         20 date_nsec u32 24 vm_clock_nsec u64 32 vm_state_size u32
 *  36 extra_data_size u32  40 extra data (vm_state_size_large u64, disk_size u64, icount u64)
 *  then the id string and the name string.
 */
import { CorruptImageError, InvalidArgumentError } from '../../block/errors.js';
import type { Protocol, SnapshotInfo } from '../../block/types.js';
import type { Qcow2Header } from './header.js';

/** qemu's bound on a snapshot's extra data. */
const MAX_EXTRA_DATA = 1024;
const FIXED_BYTES = 40;

export interface Qcow2Snapshot extends SnapshotInfo {
  l1TableOffset: number;
  l1Size: number;
}

export async function readSnapshots(file: Protocol, header: Qcow2Header, fileSize: number): Promise<Qcow2Snapshot[]> {
  const snapshots: Qcow2Snapshot[] = [];
  let at = header.snapshotsOffset;
  const fail = (index: number, message: string): never => {
    throw new CorruptImageError(`${file.path}: qcow2 snapshot table entry ${index}: ${message}`);
  };
  for (let index = 0; index < header.nbSnapshots; index++) {
    if (at + FIXED_BYTES > fileSize) fail(index, `lies outside the file (at ${at}, file ${fileSize} bytes)`);
    const fixed = Buffer.alloc(FIXED_BYTES);
    await file.read(at, fixed);
    const l1Offset = fixed.readBigUInt64BE(0);
    const l1Size = fixed.readUInt32BE(8);
    const idSize = fixed.readUInt16BE(12);
    const nameSize = fixed.readUInt16BE(14);
    const extraSize = fixed.readUInt32BE(36);
    if (extraSize > MAX_EXTRA_DATA) fail(index, `extra_data_size ${extraSize} is above ${MAX_EXTRA_DATA}`);
    const restBytes = extraSize + idSize + nameSize;
    if (at + FIXED_BYTES + restBytes > fileSize) fail(index, 'runs past the end of the file');
    const rest = Buffer.alloc(restBytes);
    await file.read(at + FIXED_BYTES, rest);
    if (l1Offset > BigInt(Number.MAX_SAFE_INTEGER)) fail(index, `l1_table_offset ${l1Offset} is above 2^53`);
    const l1TableOffset = Number(l1Offset);
    if (l1TableOffset % header.clusterSize !== 0 || (l1Size > 0 && l1TableOffset < header.clusterSize)) {
      fail(index, `l1_table_offset ${l1TableOffset} is not a cluster-aligned offset past the header`);
    }
    if (l1TableOffset + l1Size * 8 > fileSize) fail(index, `its L1 table (${l1Size} entries at ${l1TableOffset}) lies outside the file`);
    const vmClock = fixed.readBigUInt64BE(24);
    const extra = rest.subarray(0, extraSize);
    const snapshot: Qcow2Snapshot = {
      id: rest.subarray(extraSize, extraSize + idSize).toString('utf8'),
      name: rest.subarray(extraSize + idSize, extraSize + idSize + nameSize).toString('utf8'),
      vmStateSize: extra.length >= 8 ? Number(extra.readBigUInt64BE(0)) : fixed.readUInt32BE(32),
      dateSec: fixed.readUInt32BE(16),
      dateNsec: fixed.readUInt32BE(20),
      vmClockSec: Number(vmClock / 1_000_000_000n),
      vmClockNsec: Number(vmClock % 1_000_000_000n),
      l1TableOffset,
      l1Size,
    };
    if (extra.length >= 16) {
      const diskSize = extra.readBigUInt64BE(8);
      if (diskSize > BigInt(Number.MAX_SAFE_INTEGER)) fail(index, `disk_size ${diskSize} is above 2^53`);
      snapshot.diskSize = Number(diskSize);
    }
    if (extra.length >= 24) {
      const icount = extra.readBigUInt64BE(16);
      if (icount !== 0xffffffffffffffffn) snapshot.icount = Number(icount);
    }
    snapshots.push(snapshot);
    at += Math.ceil((FIXED_BYTES + restBytes) / 8) * 8;
  }
  return snapshots;
}

/** The snapshot `wanted` names: by id first, then by name (as qemu's lookup). */
export function findSnapshot(snapshots: readonly Qcow2Snapshot[], wanted: string, path: string): Qcow2Snapshot {
  const found = snapshots.find((snapshot) => snapshot.id === wanted) ?? snapshots.find((snapshot) => snapshot.name === wanted);
  if (!found) {
    const known = snapshots.map((snapshot) => `${snapshot.id} (${snapshot.name})`).join(', ');
    throw new InvalidArgumentError(`${path}: no snapshot '${wanted}'${known ? `; the image has ${known}` : '; the image has no snapshots'}`);
  }
  return found;
}
