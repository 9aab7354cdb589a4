/**
 * Writing monolithicSparse VMDK images (one uncompressed sparse file, every
 * grain table allocated: what qemu-img create makes) and descriptor files
 * whose extents are flat or such sparse files (monolithicFlat,
 * twoGbMaxExtentFlat / Sparse, vmfs): a request is split at extent
 * boundaries; a flat extent is raw, written in place (zero requests punch a
 * hole, else write zeros); a sparse extent is written in place where a grain
 * is allocated, else a new grain at the end of that extent's file.
 *
 * The order of an allocating write keeps the image consistent at every
 * moment, as qemu's "write the grain itself first": the whole new grain (the
 * request's bytes, the rest from the parent or zeros; zeros for a zeroed
 * grain) is written at the end of the file, made durable (fdatasync), then
 * the grain table entry is written in the primary table, then in the
 * redundant one (each as the whole 512-byte sector that holds it), and only
 * then does the cached table change. A crash before the entry leaves an
 * unreferenced grain at the end (the old content still reads); a failed grain
 * write cuts the file back. The first change of an open image gives the
 * image a new CID (qemu does the same, so that differencing images over it
 * are seen as stale by qemu).
 *
 * Concurrency: allocating writes (and zeroed-grain updates) are serialized by
 * one lock, and each re-reads its entry under it; in-place writes and reads
 * run concurrently. Flush is fdatasync of the image's file and of every
 * extent file written since the last flush.
 */
import { randomInt } from 'node:crypto';
import { constants } from 'node:os';
import { Mutex } from 'async-mutex';
import { CorruptImageError, InvalidArgumentError } from '../../block/errors.js';
import type { BackingReader, Protocol } from '../../block/types.js';
import { descriptorText } from './descriptor.js';
import { FlatExtent, SparseExtent, type Extent } from './extent.js';
import { SECTOR } from './header.js';
import { VmdkImage, type VmdkImageParts } from './image.js';

/** Bytes of zeros written at a time where zeros cannot be recorded as zeroed grains. */
const ZERO_CHUNK = 1024 * 1024;

/** Where the embedded descriptor lives in the image's own file (bytes), for the CID update. */
export interface DescriptorPlace {
  offset: number;
  /** Bytes the descriptor may take (desc_size sectors). */
  room: number;
}

export interface WritableParts extends VmdkImageParts {
  descriptorPlace: DescriptorPlace;
  /** The redundant grain directory of each sparse extent (undefined without one). */
  redundant: Map<SparseExtent, Uint32Array | undefined>;
}

/** Why an image opened read-write must stay read-only, or undefined when it can be written. */
export function writeRefusal(extents: readonly Extent[], version: (extent: SparseExtent) => number): string | undefined {
  for (const extent of extents) {
    if (extent instanceof FlatExtent) continue;
    if (!(extent instanceof SparseExtent)) return 'writing this kind of VMDK extent is not supported';
    if (extent.compressed) return 'writing stream-optimized (compressed) VMDK images is not supported';
    if (version(extent) === 3) return 'it is a VMDK version 3 image, which qemu also opens only read-only (changed block tracking)';
    if (extent.directory.some((sector) => sector === 0)) return 'a grain table is not allocated (writing would need to allocate one, which is not supported)';
  }
  return undefined;
}

export class WritableVmdkImage extends VmdkImage {
  private readonly place: DescriptorPlace;
  private readonly redundant: Map<SparseExtent, Uint32Array | undefined>;
  /** The next free sector of each sparse extent file (grain-aligned, as qemu allocates). */
  protected readonly nextSector = new Map<SparseExtent, number>();
  /** Serializes allocating writes and zeroed-grain updates (async-mutex, as the other drivers). */
  protected readonly allocation = new Mutex();
  private backingReader: BackingReader | undefined;
  /** Extent files written since the last flush began (marked before a write and again when it ends). */
  private readonly dirty = new Set<Protocol>();
  private cidUpdate: Promise<void> | undefined;

  constructor(parts: WritableParts) {
    super(parts);
    this.place = parts.descriptorPlace;
    this.redundant = parts.redundant;
    for (const extent of parts.extents) {
      if (extent instanceof SparseExtent) {
        const grainSectors = extent.header.granularity;
        this.nextSector.set(extent, Math.ceil(extent.fileBytes / SECTOR / grainSectors) * grainSectors);
      }
    }
  }

  attachBacking(reader: BackingReader | undefined): void {
    this.backingReader = reader;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.assertParent();
    await this.changing();
    await this.eachExtent(offset, data.length, (extent, at, start, done) => this.writeExtent(extent, at, data.subarray(done, done + Math.min(extent.length - at, data.length - done)), start));
  }

  async zero(offset: number, length: number): Promise<void> {
    this.assertParent();
    await this.changing();
    await this.eachExtent(offset, length, async (extent, at, start, done) => {
      const part = Math.min(extent.length - at, length - done);
      if (extent instanceof SparseExtent && extent.zeroGrains) {
        this.dirty.add(extent.file);
        await this.zeroSparse(extent, at, part, start);
        return;
      }
      if (extent instanceof FlatExtent && (await this.punch(extent, at, part))) return;
      // zeros written, a bounded buffer at a time
      const zeros = Buffer.alloc(Math.min(part, ZERO_CHUNK));
      for (let written = 0; written < part; written += zeros.length) {
        await this.writeExtent(extent, at + written, zeros.subarray(0, Math.min(zeros.length, part - written)), start);
      }
    });
  }

  /** Frees a flat extent's range (it then reads as zeros); false when the host file cannot punch holes. */
  private async punch(extent: FlatExtent, at: number, length: number): Promise<boolean> {
    if (!extent.file.punchHole) return false;
    this.dirty.add(extent.file);
    try {
      await extent.file.punchHole(extent.flatOffset + at, length);
      return true;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'EOPNOTSUPP' || Math.abs((error as { errno?: number }).errno ?? 0) === constants.errno.EOPNOTSUPP) return false;
      throw error;
    }
  }

  /** The image's own file and every extent file written since the last flush. */
  override async flush(): Promise<void> {
    await this.allocation.waitForUnlock();
    const files = new Set([this.file, ...this.dirty]);
    this.dirty.clear();
    try {
      for (const file of files) await file.flush();
    } catch (error) {
      for (const file of files) this.dirty.add(file);
      throw error;
    }
  }

  override async close(): Promise<void> {
    await this.flush();
    await super.close();
  }

  /** Calls `body` for each extent piece of [offset, offset + length): extent, offset in it, its guest start, bytes done before. */
  private async eachExtent(offset: number, length: number, body: (extent: Extent, at: number, start: number, done: number) => Promise<void>): Promise<void> {
    let index = this.extentAt(offset);
    let done = 0;
    const pieces: Promise<void>[] = [];
    const touched: Extent[] = [];
    while (done < length) {
      const extent = this.extents[index]!;
      const start = this.starts[index]!;
      const at = offset + done - start;
      if (at < extent.length) {
        touched.push(extent);
        pieces.push(body(extent, at, start, done));
        done += Math.min(extent.length - at, length - done);
      }
      index += 1;
    }
    const results = await Promise.allSettled(pieces);
    // again once done: a flush that ran meanwhile may have taken the mark before these bytes landed
    for (const extent of touched) this.dirty.add(extent.file);
    const failed = results.find((result): result is PromiseRejectedResult => result.status === 'rejected');
    if (failed) throw failed.reason;
  }

  private async writeExtent(extent: Extent, at: number, data: Buffer, start: number): Promise<void> {
    if (extent instanceof FlatExtent) {
      // a flat extent is raw: written in place
      this.dirty.add(extent.file);
      await extent.file.write(extent.flatOffset + at, data);
      return;
    }
    if (!(extent instanceof SparseExtent)) throw new InvalidArgumentError(`${extent.file.path}: only flat and sparse VMDK extents are written`);
    const sparse = extent;
    this.dirty.add(sparse.file);
    const grain = sparse.grainSize;
    const parts: Promise<void>[] = [];
    for (let done = 0; done < data.length; ) {
      const position = at + done;
      const grainStart = position - (position % grain);
      const length = Math.min(data.length - done, grainStart + grain - position);
      parts.push(this.writeGrain(sparse, grainStart, position - grainStart, data.subarray(done, done + length), start));
      done += length;
    }
    const results = await Promise.allSettled(parts);
    const failed = results.find((result): result is PromiseRejectedResult => result.status === 'rejected');
    if (failed) throw failed.reason;
  }

  /** Where grain `grainStart` of `extent` has its entry. */
  protected entryOf(extent: SparseExtent, grainStart: number): { gdIndex: number; index: number } {
    const perTable = extent.header.numGtesPerGt;
    const grainNumber = grainStart / extent.grainSize;
    return { gdIndex: Math.floor(grainNumber / perTable), index: grainNumber % perTable };
  }

  protected async entry(extent: SparseExtent, gdIndex: number, index: number): Promise<number> {
    const table = extent.grainTable(gdIndex);
    if (!table) throw new CorruptImageError(`${extent.file.path}: VMDK grain directory entry ${gdIndex} is 0: no grain table to write into`);
    return (await table)[index]!;
  }

  private allocated(extent: SparseExtent, entry: number): boolean {
    return entry !== 0 && !(entry === 1 && extent.zeroGrains);
  }

  private async writeGrain(extent: SparseExtent, grainStart: number, inGrain: number, data: Buffer, start: number): Promise<void> {
    const { gdIndex, index } = this.entryOf(extent, grainStart);
    const entry = await this.entry(extent, gdIndex, index);
    if (this.allocated(extent, entry)) {
      await this.inPlace(extent, entry, grainStart, inGrain, data);
      return;
    }
    await this.locked(async () => {
      const now = await this.entry(extent, gdIndex, index);
      if (this.allocated(extent, now)) {
        await this.inPlace(extent, now, grainStart, inGrain, data);
        return;
      }
      const grain = Buffer.alloc(extent.grainSize);
      const inExtent = Math.min(extent.grainSize, extent.length - grainStart);
      if (now === 0 && this.backingReader) await this.backingReader(start + grainStart, grain.subarray(0, inExtent));
      data.copy(grain, inGrain);
      const sector = this.nextSector.get(extent)!;
      if (sector + extent.header.granularity > 0xffffffff) {
        throw new InvalidArgumentError(`${extent.file.path}: the VMDK extent is full (grain sectors must stay below 2^32)`);
      }
      try {
        await extent.file.write(sector * SECTOR, grain);
        await extent.file.flush();
      } catch (error) {
        await extent.file.truncate(sector * SECTOR).catch(() => undefined);
        throw error;
      }
      this.nextSector.set(extent, sector + extent.header.granularity);
      extent.grewTo((sector + extent.header.granularity) * SECTOR);
      await this.setEntry(extent, gdIndex, index, sector);
    });
  }

  private async inPlace(extent: SparseExtent, entry: number, grainStart: number, inGrain: number, data: Buffer): Promise<void> {
    if (entry < extent.header.grainOffset) {
      throw new CorruptImageError(`${extent.file.path}: VMDK grain at extent offset ${grainStart} is at sector ${entry}, inside the metadata (grains start at ${extent.header.grainOffset}); not written`);
    }
    if (entry * SECTOR >= extent.fileBytes) {
      // writing there would grow the file under grains allocated later
      throw new CorruptImageError(`${extent.file.path}: VMDK grain at extent offset ${grainStart} is at sector ${entry}, past the end of the file (${extent.fileBytes} bytes); not written`);
    }
    await extent.file.write(entry * SECTOR + inGrain, data);
  }

  /** Whole grains of a zeroed-grain extent become entry 1; partial grains are written with zeros. */
  private async zeroSparse(extent: SparseExtent, at: number, length: number, start: number): Promise<void> {
    const grain = extent.grainSize;
    const end = at + length;
    for (let position = at; position < end; ) {
      const grainStart = position - (position % grain);
      const grainEnd = Math.min(grainStart + grain, extent.length);
      const stop = Math.min(end, grainEnd);
      if (position === grainStart && stop === grainEnd) {
        const { gdIndex, index } = this.entryOf(extent, grainStart);
        await this.locked(async () => {
          if ((await this.entry(extent, gdIndex, index)) !== 1) await this.setEntry(extent, gdIndex, index, 1);
        });
      } else {
        await this.writeGrain(extent, grainStart, position - grainStart, Buffer.alloc(stop - position), start);
      }
      position = stop;
    }
  }

  /** Writes a grain table entry in the primary table, then the redundant one, then the cache follows. */
  protected async setEntry(extent: SparseExtent, gdIndex: number, index: number, value: number): Promise<void> {
    const tables = [extent.directory[gdIndex]!, this.redundant.get(extent)?.[gdIndex]].filter((sector): sector is number => sector !== undefined);
    for (const tableSector of tables) {
      const at = tableSector * SECTOR + index * 4;
      const sectorStart = at - (at % SECTOR);
      const bytes = Buffer.alloc(SECTOR);
      await extent.file.read(sectorStart, bytes);
      bytes.writeUInt32LE(value, at - sectorStart);
      await extent.file.write(sectorStart, bytes);
    }
    await extent.entryWritten(gdIndex, index, value);
  }

  private locked(body: () => Promise<void>): Promise<void> {
    return this.allocation.runExclusive(body);
  }

  /** The first change of this open: a new CID in the descriptor, durable before any data (as qemu). */
  protected changing(): Promise<void> {
    this.cidUpdate ??= this.updateCid().catch((error: unknown) => {
      this.cidUpdate = undefined;
      throw error;
    });
    return this.cidUpdate;
  }

  private async updateCid(): Promise<void> {
    const old = Buffer.alloc(this.place.room);
    await this.file.read(this.place.offset, old);
    const text = descriptorText(old);
    const cid = randomInt(0, 0x100000000);
    const replaced = replaceCid(text, cid, this.file.path);
    const bytes = Buffer.from(replaced, 'utf8');
    if (bytes.length > this.place.room) {
      throw new CorruptImageError(`${this.file.path}: the VMDK descriptor would not fit its ${this.place.room} bytes after the CID update`);
    }
    // the whole area, NUL-padded, as qemu writes it
    await this.file.write(this.place.offset, Buffer.concat([bytes, Buffer.alloc(this.place.room - bytes.length)]));
    await this.file.flush();
    this.descriptor = { ...this.descriptor, cid };
  }
}

/** The descriptor with its first "CID=" value replaced, everything from "parentCID" on kept (qemu's rewrite). */
export function replaceCid(text: string, cid: number, path: string): string {
  const parent = text.indexOf('parentCID');
  const at = text.indexOf('CID');
  if (parent === -1 || at === -1 || at >= parent) throw new CorruptImageError(`${path}: the VMDK descriptor has no CID line before its parentCID line; its CID cannot be updated`);
  return `${text.slice(0, at + 4)}${cid.toString(16)}\n${text.slice(parent)}`;
}
