/**
 * An opened Parallels image, read-only: guest offsets go through the catalog
 * (BAT, read whole at open: one u32 per cluster). Entry 0, or a cluster past
 * the catalog, is unallocated (zeros, or the backing file a caller attaches);
 * any other entry is the cluster's first sector (v1) or cluster number (v2).
 * An entry pointing onto the header or the catalog fails the reads of its
 * cluster (qemu would show the catalog as guest data there).
 *
 * Concurrency: nothing is written after open, so reads run concurrently
 * without locks.
 */
import { CorruptImageError } from '../../block/errors.js';
import type { BackingReference, FormatImage, FormatInfo, Mapping, Protocol } from '../../block/types.js';
import { entrySector, type ParallelsHeader } from './header.js';
import { appendRun } from '../../block/mapping.js';
import { ReadOnlyImage } from '../read-only-image.js';

export class ParallelsImage extends ReadOnlyImage implements FormatImage {
  readonly virtualSize: number;
  readonly backing: BackingReference | undefined = undefined;

  constructor(
    file: Protocol,
    private readonly header: ParallelsHeader,
    private readonly bat: Buffer,
  ) {
    super(file);
    this.virtualSize = header.totalSectors * 512;
  }

  async map(offset: number, length: number): Promise<Mapping[]> {
    const runs: Mapping[] = [];
    const { clusterSize } = this.header;
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const index = Math.floor(pos / clusterSize);
      const clusterEnd = Math.min(end, (index + 1) * clusterSize);
      const entry = index < this.header.batEntries ? this.bat.readUInt32LE(4 * index) : 0;
      if (entry === 0) {
        appendRun(runs, { kind: 'backing', guestOffset: pos, length: clusterEnd - pos });
      } else {
        const host = entrySector(this.header, entry) * 512;
        if (host < this.header.headerBytes) {
          throw new CorruptImageError(
            `${this.file.path}: parallels BAT entry ${index} (guest bytes ${index * clusterSize}..) points to sector ${host / 512}, on the header or the catalog (${this.header.headerBytes} bytes)`,
          );
        }
        appendRun(runs, { kind: 'data', guestOffset: pos, length: clusterEnd - pos, hostOffset: host + (pos - index * clusterSize) });
      }
      pos = clusterEnd;
    }
    return runs;
  }

  info(): FormatInfo {
    // qemu-img shows neither a cluster size nor a dirty flag for parallels.
    return {};
  }
}
