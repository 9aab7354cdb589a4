/**
 * The two-level lookup shared by the read-only sparse extents of older and
 * newer VMware products, VMDK3 ("COWD", cowd.ts) and seSparse (sesparse.ts):
 * a grain directory read at open names grain tables, each table's entries
 * name grains. What an entry means is the subclass's (grainAt); the walk over
 * a range, the table cache and the runs are here.
 *
 * Concurrency: map may run concurrently; grain tables are cached (least
 * recently used first out) as promises of their bytes, so concurrent misses of
 * one table share one read, and a failed read is not kept. Nothing else
 * changes after open.
 */
import { LRUCache } from 'lru-cache';
import { CorruptImageError } from '../../block/errors.js';
import { appendRun } from '../../block/mapping.js';
import type { Mapping, Protocol } from '../../block/types.js';
import type { Extent, ExtentInfo } from './extent.js';

/** Grain tables cached per extent by default (4 MiB of tables). */
const DEFAULT_GT_CACHE_BYTES = 4 * 1024 * 1024;

/** What one grain table entry says: read the parent (or zeros), zeros, or the grain at a byte offset of the file. */
export type GrainAt = 'backing' | 'zero' | number;

export interface TableExtentParts {
  file: Protocol;
  /** Guest bytes of the extent. */
  length: number;
  grainSize: number;
  /** Entries per grain table. */
  tableEntries: number;
  /** Bytes per grain table entry (4 or 8). */
  entryBytes: number;
  /** The descriptor line's type (VMFSSPARSE, SESPARSE), as qemu-img info shows it. */
  type: string;
  cacheBytes?: number;
}

export abstract class TableExtent implements Extent {
  readonly file: Protocol;
  readonly length: number;
  readonly grainSize: number;
  readonly compressed = false;
  protected readonly tableEntries: number;
  protected readonly tableBytes: number;
  private readonly coverage: number;
  private readonly type: string;
  private readonly tables: LRUCache<number, Promise<Buffer>>;

  constructor(parts: TableExtentParts) {
    this.file = parts.file;
    this.length = parts.length;
    this.grainSize = parts.grainSize;
    this.tableEntries = parts.tableEntries;
    this.tableBytes = parts.tableEntries * parts.entryBytes;
    this.coverage = parts.tableEntries * parts.grainSize;
    this.type = parts.type;
    const max = Math.max(1, Math.floor((parts.cacheBytes ?? DEFAULT_GT_CACHE_BYTES) / this.tableBytes));
    this.tables = new LRUCache({ max });
  }

  /** The byte offset of the grain table of directory entry `gdIndex` (checked to lie in the file), or undefined when none is allocated. */
  protected abstract tableOffset(gdIndex: number): number | undefined;

  /** What entry `index` of the table `table` (directory entry `gdIndex`) says, for the grain at extent offset `grainStart`. */
  protected abstract grainAt(table: Buffer, index: number, gdIndex: number, grainStart: number): GrainAt;

  private table(gdIndex: number): Promise<Buffer> | undefined {
    const offset = this.tableOffset(gdIndex);
    if (offset === undefined) return undefined;
    let table = this.tables.get(gdIndex);
    if (!table) {
      table = (async () => {
        const bytes = Buffer.alloc(this.tableBytes);
        await this.file.read(offset, bytes);
        return bytes;
      })();
      this.tables.set(gdIndex, table);
      table.catch(() => this.tables.delete(gdIndex));
    }
    return table;
  }

  async map(offset: number, length: number, base: number): Promise<Mapping[]> {
    const runs: Mapping[] = [];
    const end = offset + length;
    let at = offset;
    while (at < end) {
      const gdIndex = Math.floor(at / this.coverage);
      const tableEnd = Math.min(end, (gdIndex + 1) * this.coverage);
      const pending = this.table(gdIndex);
      if (!pending) {
        appendRun(runs, { kind: 'backing', guestOffset: base + at, length: tableEnd - at });
        at = tableEnd;
        continue;
      }
      const table = await pending;
      while (at < tableEnd) {
        const grainStart = at - (at % this.grainSize);
        const runEnd = Math.min(tableEnd, grainStart + this.grainSize);
        const guestOffset = base + at;
        const grain = this.grainAt(table, Math.floor((at % this.coverage) / this.grainSize), gdIndex, grainStart);
        if (grain === 'backing' || grain === 'zero') appendRun(runs, { kind: grain, guestOffset, length: runEnd - at });
        else appendRun(runs, { kind: 'data', guestOffset, length: runEnd - at, hostOffset: grain + (at - grainStart), file: this.file });
        at = runEnd;
      }
    }
    return runs;
  }

  /**
   * For check: one line per grain directory entry or grain table entry that
   * fails (outside the file, an unknown type), as a read of its range would.
   */
  async problems(progress?: (done: number, total: number) => void): Promise<string[]> {
    const lines: string[] = [];
    const tables = Math.ceil(this.length / this.coverage);
    for (let gdIndex = 0; gdIndex < tables; gdIndex++) {
      progress?.(gdIndex, tables);
      let table: Buffer | undefined;
      try {
        const offset = this.tableOffset(gdIndex);
        if (offset === undefined) continue;
        table = Buffer.alloc(this.tableBytes);
        await this.file.read(offset, table);
      } catch (error) {
        if (!(error instanceof CorruptImageError)) throw error;
        lines.push(error.message);
        continue;
      }
      const grains = Math.min(this.tableEntries, Math.ceil((this.length - gdIndex * this.coverage) / this.grainSize));
      for (let i = 0; i < grains; i++) {
        try {
          this.grainAt(table, i, gdIndex, gdIndex * this.coverage + i * this.grainSize);
        } catch (error) {
          if (!(error instanceof CorruptImageError)) throw error;
          lines.push(error.message);
        }
      }
    }
    progress?.(tables, tables);
    return lines;
  }

  info(): ExtentInfo {
    return { 'virtual-size': this.length, filename: this.file.path, format: this.type, 'cluster-size': this.grainSize };
  }
}
