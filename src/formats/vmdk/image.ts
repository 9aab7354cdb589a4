/**
 * An opened VMDK image: its extents laid end to end (guest offsets), the
 * descriptor's facts for `info` (CID, parentCID, createType), and the parent
 * a differencing image names (and whether it is still the image this one
 * was made over: verifyBacking). map() splits a request at extent boundaries
 * and asks each extent; decode() hands a compressed grain to the extent that
 * mapped it. Writing is writable.ts (monolithicSparse, flat and sparse extents
 * of descriptor files) and stream-write.ts.
 *
 * Concurrency: no state changes after open (verifyBacking runs before any
 * request); the extents' grain-table caches are safe under concurrent
 * requests (extent.ts).
 */
import { CorruptImageError } from '../../block/errors.js';
import type { BackingReference, EncodedCluster, FormatImage, FormatInfo, Mapping, Protocol } from '../../block/types.js';
import type { Descriptor } from './descriptor.js';
import { SparseExtent, type Extent, type ExtentInfo } from './extent.js';
import { TableExtent } from './table-extent.js';

export interface VmdkImageParts {
  /** The image's own file (the sparse file, or the descriptor file). */
  file: Protocol;
  extents: Extent[];
  descriptor: Descriptor;
  createType: string;
  backing: BackingReference | undefined;
}

export class VmdkImage implements FormatImage {
  readonly virtualSize: number;
  readonly backing: BackingReference | undefined;
  protected readonly file: Protocol;
  protected readonly extents: Extent[];
  /** Guest offset where each extent starts. */
  protected readonly starts: number[];
  protected descriptor: Descriptor;
  private readonly createType: string;

  constructor(parts: VmdkImageParts) {
    this.file = parts.file;
    this.extents = parts.extents;
    this.descriptor = parts.descriptor;
    this.createType = parts.createType;
    this.backing = parts.backing;
    this.starts = [];
    let at = 0;
    for (const extent of parts.extents) {
      this.starts.push(at);
      at += extent.length;
    }
    this.virtualSize = at;
  }

  /**
   * Checks that the parent is the image this one was made over: its CID must be
   * this image's parentCID (a parent written since has a new CID, and then this
   * image's grains no longer fit the bytes around them). A mismatch does not
   * stop the open (info and check still work); every read and write fails with
   * it, as qemu fails them.
   */
  verifyBacking(backing: { path: string; format: string; specific: Record<string, unknown> | undefined }): void {
    // A parent of another format has no CID: it is trusted by its name, as qcow2's and QED's backing files are.
    if (backing.format !== 'vmdk') return;
    const found = backing.specific?.['cid'];
    if (found === this.descriptor.parentCid) return;
    const theirs = typeof found === 'number' ? `its CID is ${found.toString(16)}` : 'it has no CID';
    this.parentMismatch =
      `${this.file.path}: its parent ${backing.path} is not the image it was made over, or was written since: ` +
      `parentCID is ${this.descriptor.parentCid.toString(16)}, ${theirs}; reads and writes are refused (as qemu refuses them)`;
  }

  /** Set by verifyBacking: why no read or write may use this image's parent. */
  protected parentMismatch: string | undefined;

  /** Throws when the parent is not the one this image was made over (verifyBacking). */
  protected assertParent(): void {
    if (this.parentMismatch !== undefined) throw new CorruptImageError(this.parentMismatch);
  }

  async map(offset: number, length: number): Promise<Mapping[]> {
    this.assertParent();
    const runs: Mapping[] = [];
    const end = offset + length;
    let index = this.extentAt(offset);
    let at = offset;
    while (at < end) {
      const extent = this.extents[index]!;
      const start = this.starts[index]!;
      const stop = Math.min(end, start + extent.length);
      if (stop > at) runs.push(...(await extent.map(at - start, stop - at, start)));
      at = stop;
      index += 1;
    }
    return runs;
  }

  /** The index of the extent holding guest offset `offset` (the caller keeps it inside the image). */
  protected extentAt(offset: number): number {
    let low = 0;
    let high = this.extents.length - 1;
    while (low < high) {
      const middle = (low + high + 1) >> 1;
      if (this.starts[middle]! <= offset) low = middle;
      else high = middle - 1;
    }
    return low;
  }

  decode(cluster: EncodedCluster): Promise<Buffer> {
    const extent = this.extents[this.extentAt(cluster.guestStart)];
    if (!(extent instanceof SparseExtent) || !extent.compressed) {
      return Promise.reject(new CorruptImageError(`${this.file.path}: no compressed VMDK extent holds guest offset ${cluster.guestStart}`));
    }
    return extent.decode(cluster);
  }

  async flush(): Promise<void> {
    // nothing is ever written
  }

  async close(): Promise<void> {
    // extent files other than the image's own are closed by the generic layer (the gate)
    await this.file.close();
  }

  /** The COWD and seSparse extents, for check. */
  tableExtents(): TableExtent[] {
    return this.extents.filter((extent): extent is TableExtent => extent instanceof TableExtent);
  }

  /** The sparse extents, for check. */
  sparseExtents(): SparseExtent[] {
    return this.extents.filter((extent): extent is SparseExtent => extent instanceof SparseExtent);
  }

  /** qemu-img's actual-size: the image's file and every other extent file. */
  async allocatedSize(): Promise<number> {
    let total = await this.file.allocatedSize();
    for (const extent of new Set(this.extents.map((e) => e.file))) {
      if (extent !== this.file) total += await extent.allocatedSize();
    }
    return total;
  }

  /**
   * One extent for info. qemu names an extent of a descriptor file as it opened it: the
   * descriptor's directory as the user wrote it (up to its last '/') and the line's name
   * ("disk-flat.vmdk" for "disk.vmdk", "/srv/disk-flat.vmdk" for "/srv/disk.vmdk"); so does this.
   */
  private extentInfo(extent: Extent, index: number): ExtentInfo {
    const info = extent.info();
    const line = this.descriptor.extents[index];
    if (extent.file === this.file || line === undefined || this.descriptor.extents.length !== this.extents.length) return info;
    const name = line.fileName.startsWith('/') ? line.fileName : this.file.path.slice(0, this.file.path.lastIndexOf('/') + 1) + line.fileName;
    return { ...info, filename: name };
  }

  info(): FormatInfo {
    const first = this.extents[0];
    // qemu gives a cluster size when every extent is sparse with the same grain and compression
    const same = this.extents.every((e) => e.grainSize === first?.grainSize && e.compressed === first?.compressed);
    return {
      clusterSize: same && first?.grainSize !== undefined ? first.grainSize : undefined,
      dirty: false,
      specific: {
        cid: this.descriptor.cid,
        'parent-cid': this.descriptor.parentCid,
        'create-type': this.createType,
        extents: this.extents.map((extent, i) => this.extentInfo(extent, i)),
      },
    };
  }
}
