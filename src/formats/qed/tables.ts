/**
 * Reading and writing QED tables and the header on the image file. Writes
 * of table entries go out as whole 512-byte sectors so an entry is never
 * torn; the caller changes its in-memory copy only after the disk write
 * succeeded (write-through without a window where memory is ahead of disk
 * on error).
 */
import type { Protocol } from '../../block/types.js';
import { announce } from '../../block/events.js';
import { serializeHeader, type QedHeader } from './header.js';
import { sectorRangeOfEntries, setEntry, type Table } from './geometry.js';

export async function readTable(file: Protocol, offset: number, tableBytes: number): Promise<Table> {
  const table = Buffer.alloc(tableBytes);
  await file.read(offset, table);
  return table;
}

/**
 * Writes new values for entries [first, first + values.length) of the table
 * stored at `tableOffset`, then applies them to `table` in memory.
 */
export async function updateEntries(file: Protocol, tableOffset: number, table: Table, first: number, values: number[]): Promise<void> {
  const { start, end } = sectorRangeOfEntries(first, values.length);
  const sectors = Buffer.from(table.subarray(start, Math.min(end, table.length)));
  values.forEach((value, i) => setEntry(sectors, first + i - start / 8, value));
  await file.write(tableOffset + start, sectors);
  sectors.copy(table, start);
}

export async function writeHeader(file: Protocol, header: QedHeader): Promise<void> {
  announce(file, 'header_update');
  await file.write(0, serializeHeader(header));
}
