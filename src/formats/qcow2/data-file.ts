/**
 * The check an image with an external data file passes before it is written:
 * every L2 entry that points at a data cluster points at its own guest offset.
 *
 * qemu allocates data clusters there (host offset = guest offset, with or
 * without data_file_raw; block/qcow2-cluster.c do_alloc_cluster_offset) and
 * writable.ts does the same, so a new cluster can only land on another guest
 * cluster's data when some entry maps elsewhere. Such an image (not one qemu
 * writes) is read, but opened read-only. Reads every L2 table once, one at a
 * time; runs at open, before anything else touches the image.
 */
import type { Protocol } from '../../block/types.js';
import { L2E_COMPRESSED_HIGH, L2E_COPIED_HIGH, offsetBits, wordAt, type Geometry } from './geometry.js';

/** Why the image's data clusters are not mapped 1:1 (the first entry that is not), or undefined. */
export async function dataFileMappingRefusal(file: Protocol, geometry: Geometry, l1: Buffer, l1Entries: number, fileSize: number): Promise<string | undefined> {
  const { clusterSize } = geometry;
  const table = Buffer.alloc(clusterSize);
  // DataView reads big-endian words several times faster than Buffer.readUInt32BE in this loop.
  const view = new DataView(table.buffer, table.byteOffset, table.length);
  for (let l1Index = 0; l1Index < l1Entries; l1Index++) {
    const [l1High, l1Low] = wordAt(l1, l1Index * 8);
    const tableOffset = offsetBits(l1High, l1Low);
    if (tableOffset === 0) continue;
    // Damaged L1 entries are the reader's to report (image.ts), with its message.
    if (tableOffset < 0 || tableOffset % clusterSize !== 0 || tableOffset + clusterSize > fileSize) continue;
    await file.read(tableOffset, table);
    for (let l2Index = 0; l2Index < geometry.l2Entries; l2Index++) {
      const high = view.getUint32(l2Index * geometry.l2EntryBytes);
      const low = view.getUint32(l2Index * geometry.l2EntryBytes + 4);
      if (high & L2E_COMPRESSED_HIGH) continue;
      const host = offsetBits(high, low);
      if (host === 0 && !(high & L2E_COPIED_HIGH)) continue;
      const guest = l1Index * geometry.l2Span + l2Index * clusterSize;
      if (host !== guest) {
        return `guest cluster at ${guest} is stored at ${host} of the external data file, not at its own offset as qemu writes them (a new cluster could overwrite it)`;
      }
    }
  }
  return undefined;
}
