/**
 * qcow2 check, part 2: the OFLAG_COPIED bit. An active L1 entry and a
 * standard L2 entry must carry it exactly when the cluster they point to has
 * refcount 1 (only then may a write go to the cluster in place). Checked
 * after the refcounts were compared (and repaired), against the stored
 * refcounts; with `repair`, the bit is set or cleared. A flipped bit needs no
 * ordering: each table is written on its own, and the image stays readable
 * whichever state it is in. When what the counting recorded of the bits
 * (copied-record.ts) agrees with the refcounts, nothing needs reporting or
 * fixing and no L2 table is read again; otherwise every table is.
 *
 * Concurrency: runs inside a check, on an image nobody else writes.
 */
import type { Protocol } from '../../block/types.js';
import { hex64, nextL2Entry, readTables, type CheckContext, type TableScratch } from './check-refs.js';
import type { CopiedRecord, RefcountBlocks } from './copied-record.js';
import { tableWords } from '../../block/table-scan.js';

interface Tally {
  corruptions: number;
  corruptionsFixed: number;
}

interface Refcounts extends RefcountBlocks {
  get(cluster: number): number | undefined;
}

const COPIED = 0x80000000;
const offsetOf = (high: number, low: number): number => (high & 0x00ffffff) * 0x100000000 + ((low & 0xfffffe00) >>> 0);

/** `record`: what the counting of the active tables saw of the bits, which the tables on disk still hold. */
export async function checkCopiedFlags(ctx: CheckContext, res: Tally, stored: Refcounts, repair: boolean, record: CopiedRecord): Promise<void> {
  const { header, geometry, file } = ctx;
  if (!record.mayNeedChanges(stored)) {
    if (repair) await file.flush();
    return;
  }
  const { clusterSize, clusterBits } = header;
  const word = repair ? 'Repairing' : 'ERROR';
  const l1 = Buffer.alloc(header.l1Size * 8);
  await file.read(header.l1TableOffset, l1);
  const used: number[] = [];
  for (let index = 0; index < header.l1Size; index++) if (offsetOf(l1.readUInt32BE(index * 8), l1.readUInt32BE(index * 8 + 4)) !== 0) used.push(index);
  const batch = 256;
  const scratch: TableScratch = {};
  for (let first = 0; first < used.length; first += batch) {
    const indexes = used.slice(first, first + batch);
    const offsets = indexes.map((index) => offsetOf(l1.readUInt32BE(index * 8), l1.readUInt32BE(index * 8 + 4))).filter((offset) => offset < ctx.fileSize);
    const tables = await readTables(file, offsets, clusterSize, scratch);
    for (const index of indexes) {
      const high = l1.readUInt32BE(index * 8);
      const low = l1.readUInt32BE(index * 8 + 4);
      const l2Offset = offsetOf(high, low);
      const tableRefcount = stored.get(Math.floor(l2Offset / 2 ** clusterBits));
      if (tableRefcount === undefined) continue;
      if ((tableRefcount === 1) !== ((high & COPIED) !== 0)) {
        res.corruptions += 1;
        ctx.messages.push(`${word} OFLAG_COPIED L2 cluster: l1_index=${index} l1_entry=${hex64(high, low)} refcount=${tableRefcount}`);
        if (repair) {
          l1.writeUInt32BE((tableRefcount === 1 ? high | COPIED : high & ~COPIED) >>> 0, index * 8);
          await writeRange(file, header.l1TableOffset, l1, index * 8, 8);
          res.corruptions -= 1;
          res.corruptionsFixed += 1;
        }
      }
      const l2 = tables.get(l2Offset);
      if (!l2) continue; // past the end of the file: reads as zeros, no entry to check
      let changed = 0;
      const entries = geometry.l2Entries;
      const words = tableWords(l2);
      for (let entry = nextL2Entry(l2, words, 0, entries, geometry.extendedL2); entry < entries; entry = nextL2Entry(l2, words, entry + 1, entries, geometry.extendedL2)) {
        const at = entry * geometry.l2EntryBytes;
        const entryHigh = l2.readUInt32BE(at);
        const entryLow = l2.readUInt32BE(at + 4);
        if (entryHigh === 0 && entryLow === 0) continue;
        if (entryHigh & 0x40000000) continue; // compressed
        const offset = offsetOf(entryHigh, entryLow);
        const allocated = offset !== 0 || (geometry.hasDataFile && (entryHigh & COPIED) !== 0);
        if (!allocated) continue;
        const refcount = geometry.hasDataFile ? 1 : stored.get(Math.floor(offset / 2 ** clusterBits));
        if (refcount === undefined) continue;
        if ((refcount === 1) === ((entryHigh & COPIED) !== 0)) continue;
        res.corruptions += 1;
        ctx.messages.push(`${word} OFLAG_COPIED data cluster: l2_entry=${hex64(entryHigh, entryLow)} refcount=${refcount}`);
        if (repair) {
          l2.writeUInt32BE((refcount === 1 ? entryHigh | COPIED : entryHigh & ~COPIED) >>> 0, at);
          changed += 1;
        }
      }
      if (changed > 0) {
        await file.write(l2Offset, l2);
        res.corruptions -= changed;
        res.corruptionsFixed += changed;
      }
    }
  }
  if (repair) await file.flush();
}

async function writeRange(file: Protocol, tableOffset: number, table: Buffer, at: number, length: number): Promise<void> {
  await file.write(tableOffset + at, table.subarray(at, at + length));
}
