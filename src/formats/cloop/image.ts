/**
 * An opened cloop image, read-only: every block is zlib-compressed, so each is
 * an `encoded` run whose `decode` inflates it (node:zlib, synchronously on the
 * calling thread, as the qcow2 driver measured best for cluster-sized
 * blocks); `map` shows the whole disk as data without a host offset, as
 * qemu-img map does for cloop. A block whose bytes run past the end of the
 * file, or that does not inflate to exactly block_size bytes (as qemu
 * requires: the stream must end there), fails the reads of that block, naming
 * it. Concurrency: nothing is written; reads run concurrently without locks.
 */
import { inflateSync } from 'node:zlib';
import { CorruptImageError } from '../../block/errors.js';
import type { BackingReference, EncodedCluster, FormatImage, FormatInfo, Mapping, Protocol } from '../../block/types.js';
import type { CloopHeader } from './header.js';
import { ReadOnlyImage } from '../read-only-image.js';

export class CloopImage extends ReadOnlyImage implements FormatImage {
  readonly virtualSize: number;
  readonly backing: BackingReference | undefined = undefined;

  constructor(
    file: Protocol,
    private readonly header: CloopHeader,
    private readonly offsets: Float64Array,
    private readonly fileSize: number,
  ) {
    super(file);
    this.virtualSize = header.blocks * header.blockSize;
  }

  async map(offset: number, length: number): Promise<Mapping[]> {
    const runs: Mapping[] = [];
    const { blockSize } = this.header;
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const block = Math.floor(pos / blockSize);
      const blockEnd = Math.min(end, (block + 1) * blockSize);
      runs.push({ kind: 'encoded', guestOffset: pos, length: blockEnd - pos, cluster: this.block(block) });
      pos = blockEnd;
    }
    return runs;
  }

  private block(index: number): EncodedCluster {
    const start = this.offsets[index]!;
    const end = this.offsets[index + 1]!;
    if (end > this.fileSize) {
      throw new CorruptImageError(`${this.file.path}: cloop block ${index} (guest bytes ${index * this.header.blockSize}..) at [${start}, ${end}) runs past the end of the ${this.fileSize}-byte file`);
    }
    return { key: `${index}`, guestStart: index * this.header.blockSize, decodedLength: this.header.blockSize, hostOffset: start, hostLength: end - start };
  }

  async decode(cluster: EncodedCluster): Promise<Buffer> {
    const data = Buffer.alloc(cluster.hostLength);
    await this.file.read(cluster.hostOffset, data);
    const where = `${this.file.path}: cloop block ${cluster.guestStart / this.header.blockSize} (guest bytes ${cluster.guestStart}.., host offset ${cluster.hostOffset})`;
    let out: Buffer;
    try {
      out = inflateSync(data, { maxOutputLength: cluster.decodedLength });
    } catch (error) {
      throw new CorruptImageError(`${where} does not inflate to ${cluster.decodedLength} bytes: ${(error as Error).message}`);
    }
    if (out.length !== cluster.decodedLength) throw new CorruptImageError(`${where} inflates to ${out.length} bytes, not the block size ${cluster.decodedLength}`);
    return out;
  }

  info(): FormatInfo {
    // qemu-img shows neither a cluster size nor a dirty flag for cloop.
    return {};
  }
}
