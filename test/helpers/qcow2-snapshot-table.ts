/**
 * Reading and writing a qcow2 snapshot table by hand in tests, from the
 * specification (docs/interop/qcow2.txt, "Snapshots"), never with the
 * driver's parser: each entry is 40 fixed bytes (l1_table_offset u64,
 * l1_size u32, id_str_size u16, name_size u16, date_sec u32, date_nsec u32,
 * vm_clock_nsec u64, vm_state_size u32, extra_data_size u32), then the extra
 * data, the id and the name, padded to 8 bytes. Also: setting one refcount
 * (16-bit refcounts, the first refcount block) for tables placed by hand.
 */
import { stat } from 'node:fs/promises';
import { patchBytes, readBytes } from './qemu.js';
import { QCOW2, readBE32, readBE64, writeBE32, writeBE64 } from './qcow2-layout.js';

export interface RawSnapshot {
  l1Offset: bigint;
  l1Size: number;
  id: Buffer;
  name: Buffer;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  vmStateSize: number;
  extra: Buffer;
  /** extra_data_size as written, when it should not be extra.length (a lie, to damage the entry). */
  extraDataSize?: number;
}

export async function readSnapshotTable(path: string): Promise<{ offset: number; entries: RawSnapshot[]; end: number }> {
  const count = await readBE32(path, QCOW2.nbSnapshots);
  const offset = Number(await readBE64(path, QCOW2.snapshotsOffset));
  // One read of everything from the table on (tables of 65536 entries are read here); zeros past the end of the file.
  const size = (await stat(path)).size;
  const bytes = await readBytes(path, offset, Math.max(0, size - offset));
  const at = (position: number, length: number): Buffer => {
    const out = Buffer.alloc(length);
    bytes.copy(out, 0, Math.min(position, bytes.length), Math.min(position + length, bytes.length));
    return out;
  };
  const entries: RawSnapshot[] = [];
  let position = 0;
  for (let index = 0; index < count; index++) {
    position = Math.ceil(position / 8) * 8;
    const fixed = at(position, 40);
    const idSize = fixed.readUInt16BE(12);
    const nameSize = fixed.readUInt16BE(14);
    const extraSize = fixed.readUInt32BE(36);
    const rest = at(position + 40, extraSize + idSize + nameSize);
    entries.push({
      l1Offset: fixed.readBigUInt64BE(0),
      l1Size: fixed.readUInt32BE(8),
      dateSec: fixed.readUInt32BE(16),
      dateNsec: fixed.readUInt32BE(20),
      vmClockNsec: fixed.readBigUInt64BE(24),
      vmStateSize: fixed.readUInt32BE(32),
      extra: rest.subarray(0, extraSize),
      id: rest.subarray(extraSize, extraSize + idSize),
      name: rest.subarray(extraSize + idSize),
    });
    position += 40 + extraSize + idSize + nameSize;
  }
  return { offset, entries, end: offset + position };
}

export function encodeSnapshotTable(entries: readonly RawSnapshot[]): Buffer {
  const parts: Buffer[] = [];
  let length = 0;
  for (const entry of entries) {
    const padding = Math.ceil(length / 8) * 8 - length;
    if (padding > 0) parts.push(Buffer.alloc(padding));
    const fixed = Buffer.alloc(40);
    fixed.writeBigUInt64BE(entry.l1Offset, 0);
    fixed.writeUInt32BE(entry.l1Size, 8);
    fixed.writeUInt16BE(entry.id.length, 12);
    fixed.writeUInt16BE(entry.name.length, 14);
    fixed.writeUInt32BE(entry.dateSec, 16);
    fixed.writeUInt32BE(entry.dateNsec, 20);
    fixed.writeBigUInt64BE(entry.vmClockNsec, 24);
    fixed.writeUInt32BE(entry.vmStateSize, 32);
    fixed.writeUInt32BE(entry.extraDataSize ?? entry.extra.length, 36);
    parts.push(fixed, entry.extra, entry.id, entry.name);
    length += padding + 40 + entry.extra.length + entry.id.length + entry.name.length;
  }
  return Buffer.concat(parts);
}

/**
 * Writes `entries` over the table where it is, inside the clusters it already
 * occupies (so every refcount stays right), and sets nb_snapshots to `count`
 * (default: the number of entries).
 */
export async function rewriteSnapshotTableInPlace(path: string, entries: readonly RawSnapshot[], count = entries.length): Promise<void> {
  const clusterSize = 2 ** (await readBE32(path, QCOW2.clusterBits));
  const { offset, end } = await readSnapshotTable(path);
  const room = Math.ceil(end / clusterSize) * clusterSize - offset;
  const table = encodeSnapshotTable(entries);
  if (table.length > room) throw new Error(`the new snapshot table (${table.length} bytes) does not fit in the old one's ${room} bytes`);
  await patchBytes(path, offset, Buffer.concat([table, Buffer.alloc(room - table.length)]).subarray(0, Math.min(room, (await stat(path)).size - offset)));
  await writeBE32(path, QCOW2.nbSnapshots, count);
}

/** Sets the 16-bit refcount of host cluster `cluster` (it must lie in the first refcount block's range). */
export async function setRefcount16(path: string, cluster: number, value: number): Promise<void> {
  const clusterSize = 2 ** (await readBE32(path, QCOW2.clusterBits));
  if (cluster >= clusterSize / 2) throw new Error(`cluster ${cluster} is outside the first refcount block`);
  const table = Number(await readBE64(path, QCOW2.refcountTableOffset));
  const block = Number((await readBE64(path, table)) & 0xfffffffffffffe00n);
  const bytes = Buffer.alloc(2);
  bytes.writeUInt16BE(value);
  await patchBytes(path, block + cluster * 2, bytes);
}

export { writeBE64 };
