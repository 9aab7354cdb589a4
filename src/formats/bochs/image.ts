/**
 * An opened Bochs growing image, read-only. Guest bytes of an extent come from
 * two places in the file (its bitmap says which sectors are stored; the others
 * read as zeros), so each extent is an `encoded` run that `decode` assembles:
 * one read of the bitmap, one of the extent's sectors. `map` therefore shows
 * the whole disk as data without a host offset, exactly as qemu-img map does
 * for bochs (its driver has no block-status answer). Unallocated extents
 * (catalog entry 0xffffffff) decode to zeros without reading anything.
 *
 * Every catalog entry is checked before use: its extent must lie inside the
 * file, and every sector its bitmap marks stored too; otherwise the reads of
 * that extent fail naming the entry.
 *
 * Concurrency: nothing is written after open; reads and decodes run
 * concurrently without locks (the generic layer shares one decode among
 * concurrent readers of an extent).
 */
import { CorruptImageError } from '../../block/errors.js';
import type { BackingReference, EncodedCluster, FormatImage, FormatInfo, Mapping, Protocol } from '../../block/types.js';
import { UNALLOCATED, type BochsHeader } from './header.js';
import { ReadOnlyImage } from '../read-only-image.js';

export class BochsImage extends ReadOnlyImage implements FormatImage {
  readonly virtualSize: number;
  readonly backing: BackingReference | undefined = undefined;

  constructor(
    file: Protocol,
    private readonly header: BochsHeader,
    private readonly catalog: Buffer,
    private readonly fileSize: number,
  ) {
    super(file);
    this.virtualSize = header.diskBytes;
  }

  async map(offset: number, length: number): Promise<Mapping[]> {
    const runs: Mapping[] = [];
    const { extentBytes } = this.header;
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const index = Math.floor(pos / extentBytes);
      const extentEnd = Math.min(end, (index + 1) * extentBytes);
      runs.push({ kind: 'encoded', guestOffset: pos, length: extentEnd - pos, cluster: this.extent(index) });
      pos = extentEnd;
    }
    return runs;
  }

  private extent(index: number): EncodedCluster {
    const { extentBytes, bitmapSectors, extentSectors, dataOffset } = this.header;
    const entry = this.catalog.readUInt32LE(4 * index);
    if (entry === UNALLOCATED) {
      return { key: 'unallocated', guestStart: index * extentBytes, decodedLength: extentBytes, hostOffset: 0, hostLength: 0 };
    }
    const hostOffset = dataOffset + 512 * entry * (bitmapSectors + extentSectors);
    if (hostOffset + 512 * bitmapSectors > this.fileSize) {
      throw new CorruptImageError(
        `${this.file.path}: bochs catalog entry ${index} (guest bytes ${index * extentBytes}..) points to extent ${entry} at ${hostOffset}, whose bitmap is past the end of the ${this.fileSize}-byte file`,
      );
    }
    return { key: `${entry}`, guestStart: index * extentBytes, decodedLength: extentBytes, hostOffset, hostLength: 512 * (bitmapSectors + extentSectors) };
  }

  async decode(cluster: EncodedCluster): Promise<Buffer> {
    const out = Buffer.alloc(cluster.decodedLength);
    if (cluster.hostLength === 0) return out;
    const { bitmapSectors, extentSectors } = this.header;
    const bitmap = Buffer.alloc(Math.ceil(extentSectors / 8));
    await this.file.read(cluster.hostOffset, bitmap);
    const dataStart = cluster.hostOffset + 512 * bitmapSectors;
    const stored = Buffer.alloc(Math.max(0, Math.min(512 * extentSectors, this.fileSize - dataStart)));
    if (stored.length > 0) await this.file.read(dataStart, stored);
    for (let sector = 0; sector < extentSectors; sector++) {
      if (((bitmap[sector >> 3]! >> (sector & 7)) & 1) === 0) continue;
      if (512 * (sector + 1) > stored.length) {
        throw new CorruptImageError(
          `${this.file.path}: bochs extent for guest bytes ${cluster.guestStart}.. marks sector ${sector} stored at ${dataStart + 512 * sector}, past the end of the ${this.fileSize}-byte file`,
        );
      }
      stored.copy(out, 512 * sector, 512 * sector, 512 * (sector + 1));
    }
    return out;
  }

  info(): FormatInfo {
    // qemu-img shows neither a cluster size nor a dirty flag for bochs.
    return {};
  }
}
