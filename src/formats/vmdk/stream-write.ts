/**
 * Writing streamOptimized VMDK files (one compressed sparse file with grain
 * markers, qemu-img create -o subformat=streamOptimized's layout: every grain
 * table allocated between the header and grain_offset) the only way qemu
 * writes them: whole grains, each deflated (zlib) into a grain marker
 * {lba u64, size u32, data} appended at the end of the file, into grains never
 * written (qemu's vmdk_co_pwritev_compressed, what qemu-img convert does).
 * Grains must come in increasing guest order, as a stream is read; a grain
 * already written, an out-of-order grain, and every ordinary write or zero are
 * refused by name (ordinary writes with EROFS). Only an opener that writes so
 * (convert: OpenOptions.compressedWrites) gets this image; any other
 * read-write open is read-only with a notice (open.ts).
 *
 * Like qemu, the grain table entry (primary, then redundant table) is written
 * after the grain's bytes, with no flush between them; flush / close make
 * everything durable. A write that fails cuts the file back to where the grain
 * began. A crash may leave grains not yet named by a table (unreferenced, the
 * grain reads as before: zeros) or, past a power loss, an entry whose grain did
 * not reach the disk: reading that grain then fails naming it (its marker or
 * zlib data do not decode), never other bytes.
 *
 * Concurrency: writeCompressed checks the order when it is called, deflates at
 * once (calls overlap), and places the grains one at a time in call order.
 */
import { deflate as deflateCallback } from 'node:zlib';
import { promisify } from 'node:util';
import createDebug from 'debug';
import { InvalidArgumentError, ReadOnlyError } from '../../block/errors.js';
import { SparseExtent, type Extent } from './extent.js';
import { FLAG_MARKER, SECTOR } from './header.js';
import { WritableVmdkImage, type WritableParts } from './writable.js';

const log = createDebug('imgmount:vmdk');
const deflate = promisify(deflateCallback);

/** The grain marker before each compressed grain: lba (u64) and size (u32). */
const MARKER_BYTES = 12;

/** Why a streamOptimized file cannot take compressed writes here, or undefined when it can. */
export function streamRefusal(extents: readonly Extent[]): string | undefined {
  const extent = extents[0];
  if (extents.length !== 1 || !(extent instanceof SparseExtent)) return 'only a single-file streamOptimized VMDK is written';
  if (extent.header.fromFooter) return 'its grain directory is in a footer (GD_AT_END, as VMware writes streams); such a stream is not appended to';
  if (!(extent.header.flags & FLAG_MARKER)) return 'its compressed grains have no markers (qemu writes only files with markers)';
  if (extent.directory.some((sector) => sector === 0)) return 'a grain table is not allocated (writing would need to allocate one, which is not supported)';
  return undefined;
}

export class StreamVmdkImage extends WritableVmdkImage {
  readonly compressedOnly = true;
  private readonly extent: SparseExtent;
  /** The guest offset of the last grain a writeCompressed call asked for (-1: none yet). */
  private last = -1;
  /** Grains are placed one at a time, in call order. */
  private queue: Promise<void> = Promise.resolve();

  constructor(parts: WritableParts) {
    super(parts);
    this.extent = parts.extents[0] as SparseExtent;
  }

  override write(): Promise<void> {
    return Promise.reject(this.refused('ordinary writes'));
  }

  override zero(): Promise<void> {
    return Promise.reject(this.refused('zero requests'));
  }

  private refused(what: string): ReadOnlyError {
    return new ReadOnlyError(
      `${this.file.path}: a streamOptimized VMDK image takes only whole compressed grains in increasing order (imgmount convert -c); ${what} are refused`,
    );
  }

  writeCompressed(offset: number, data: Buffer): Promise<void> {
    const extent = this.extent;
    const grain = extent.grainSize;
    const expected = Math.min(grain, extent.length - offset);
    // the last grain may come short of the extent's whole sectors (an image whose size is no multiple of 512): zeros follow
    const last = offset + grain >= extent.length;
    if (offset % grain !== 0 || data.length > expected || (data.length < expected && !last) || data.length === 0) {
      return Promise.reject(new InvalidArgumentError(
        `${this.file.path}: a compressed VMDK write must cover one whole grain (${grain} bytes at a multiple of it, less only at the end), not ${data.length} bytes at ${offset}`,
      ));
    }
    if (offset <= this.last) {
      return Promise.reject(new InvalidArgumentError(
        `${this.file.path}: the grain at guest offset ${offset} comes after the one at ${this.last}: a streamOptimized VMDK image takes grains in increasing guest order only`,
      ));
    }
    this.last = offset;
    const compressed = deflate(data.length === expected ? data : Buffer.concat([data, Buffer.alloc(expected - data.length)]));
    compressed.catch(() => undefined); // awaited in order below
    const placed = this.queue.then(() => this.placeGrain(offset, compressed));
    this.queue = placed.catch(() => undefined);
    return placed;
  }

  private async placeGrain(offset: number, compressing: Promise<Buffer>): Promise<void> {
    const extent = this.extent;
    const compressed = await compressing;
    await this.allocation.runExclusive(async () => {
      const { gdIndex, index } = this.entryOf(extent, offset);
      const entry = await this.entry(extent, gdIndex, index);
      if (entry !== 0 && !(entry === 1 && extent.zeroGrains)) {
        throw new InvalidArgumentError(`${this.file.path}: the grain at guest offset ${offset} is already written (sector ${entry}); a streamOptimized VMDK grain is written only once`);
      }
      // the first change of this open gives the image a new CID, as qemu does (refusals above change nothing)
      await this.changing();
      const record = Buffer.alloc(Math.ceil((MARKER_BYTES + compressed.length) / SECTOR) * SECTOR);
      record.writeBigUInt64LE(BigInt(offset / SECTOR), 0);
      record.writeUInt32LE(compressed.length, 8);
      compressed.copy(record, MARKER_BYTES);
      const sector = this.nextSector.get(extent)!;
      const end = sector + record.length / SECTOR;
      if (end > 0xffffffff) throw new InvalidArgumentError(`${this.file.path}: the VMDK file is full (grain sectors must stay below 2^32)`);
      try {
        await extent.file.write(sector * SECTOR, record);
      } catch (error) {
        await extent.file.truncate(sector * SECTOR).catch(() => undefined);
        throw error;
      }
      this.nextSector.set(extent, end);
      extent.grewTo(end * SECTOR);
      await this.setEntry(extent, gdIndex, index, sector);
      log('%s: grain at guest %d compressed to %d bytes at sector %d', this.file.path, offset, compressed.length, sector);
    });
  }

  override async flush(): Promise<void> {
    await this.queue;
    await super.flush();
  }
}
