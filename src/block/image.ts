/**
 * BlockImage: the generic layer over one format image and its backing chain.
 * It owns the byte moving: range checks (once, here), following mappings
 * down the backing chain, zero-filling past the end of a shorter backing
 * file, decoding encoded clusters (through the driver, with a cache), data
 * kept in other files than the image's own (external data files), and `map`
 * answers like `qemu-img map`. Formats only answer where bytes live and
 * allocate on write.
 *
 * Concurrency: reads and writes may overlap; the format driver serializes
 * whatever must be serialized (QED: allocating writes). A request split into
 * parts is answered only once every part has finished (settleAll), and
 * close waits for every request in flight (decodes ahead of a sequential
 * reader included: decode-ahead.ts), so no I/O ever runs on a buffer that was
 * answered or on a file that was closed. Writes, zeroing and
 * discard go through the idle timer (idle-clean.ts): after a while with
 * none of them the format marks the image clean, never during one.
 */
import createDebug from 'debug';
import { constants as osConstants } from 'node:os';
import { BlockError, CorruptImageError, InvalidArgumentError, ReadOnlyError } from './errors.js';
import { resolveBackingName } from './backing-name.js';
import { DecodedClusterCache } from './decoded-cache.js';
import { DecodeAhead } from './decode-ahead.js';
import { decodeLanes } from './decode-pool.js';
import { IdleClean } from './idle-clean.js';
import type { ImageFileGate } from './gate.js';
import type { ImageFilter } from './filters/types.js';
import type { WriteGuard } from './probe-guard.js';
import { settleAll } from './settle.js';
import { announce } from './events.js';
import type { EncodedCluster, FormatImage, GuestOffset, HostOffset, Mapping, Protocol, SnapshotInfo } from './types.js';

/** Compressed clusters a read must cover before some decode on worker threads (fewer: the round trip costs more). */
const OFFLOAD_MIN_CLUSTERS = 4;

const log = createDebug('imgmount:block');

/** Asked once per compressed cluster, in order: whether it goes to a decode worker (all but every `lanes`-th does). */
function workerShare(lanes: number): () => boolean {
  let clusters = 0;
  return () => clusters++ % lanes !== 0;
}

/** One run of `map`, like a line of `qemu-img map --output=json`. */
export interface MapRun {
  offset: GuestOffset;
  length: number;
  /** True where the bytes are stored in some layer's file (not zero, not unallocated). */
  data: boolean;
  /** True where the bytes read as zeros. */
  zero: boolean;
  /** True where some layer of the chain says what the bytes are (data or a zero cluster), as in qemu-img map. */
  present: boolean;
  /** 0 for the top image, 1 for its backing file, and so on. */
  depth: number;
  /** Where the data lives, for data runs stored as is (not for compressed clusters). */
  hostOffset?: HostOffset;
  /** The file that holds the data, for data runs. */
  filename?: string;
  /** True for compressed (encoded) data. */
  compressed?: boolean;
}

export interface ImageInfo {
  filename: string;
  format: string;
  virtualSize: number;
  /** Bytes on disk of the image's own file (qemu-img's actual-size). */
  actualSize: number;
  clusterSize?: number;
  dirty?: boolean;
  backingFilename?: string;
  backingFormat?: string;
  fullBackingFilename?: string;
  formatSpecific?: Record<string, unknown>;
  snapshots?: SnapshotInfo[];
  /** Other files of this image (an external data file...): the name stored, where it resolved, bytes on disk. */
  files?: { role: string; name: string; path: string; actualSize: number }[];
  backing?: ImageInfo;
}

export interface BlockImageParts {
  path: string;
  format: string;
  /** The image's own file. */
  file: Protocol;
  image: FormatImage;
  /** The opened backing image (always read-only), if any. */
  backing?: BlockImage;
  /** The files the driver opened through the gate; closed after the image. */
  gate?: ImageFileGate;
  /** Checked before every write (an image probed as raw). */
  writeGuard?: WriteGuard;
  decodedCacheBytes?: number;
  /** Idle clean (idle-clean.ts): after this many ms without writes the format marks the image clean; 0 or missing: off. */
  idleCleanMs?: number;
  /** Lines the user should see (a failed idle clean); the debug log when missing. */
  notice?: (line: string) => void;
  /** Image filters of this layer (blkverify), in the order given; each sees every request after the format answered it. */
  filters?: readonly ImageFilter[];
}

export class BlockImage {
  readonly path: string;
  readonly format: string;
  /** The virtual size in bytes. */
  readonly length: number;
  /** The opened backing image (always read-only), if any. */
  readonly backing: BlockImage | undefined;
  private readonly file: Protocol;
  private readonly image: FormatImage;
  private readonly gate: ImageFileGate | undefined;
  private readonly writeGuard: WriteGuard | undefined;
  private readonly decoded: DecodedClusterCache | undefined;
  /** The idle timer of a writable image whose format can mark itself clean. */
  private readonly idle: IdleClean | undefined;
  private readonly filters: readonly ImageFilter[];
  /** Decoding ahead of sequential reads of compressed clusters, when there are decode workers. */
  private readonly ahead: DecodeAhead | undefined;
  /** Reads and writes not finished yet; close waits until none is left. */
  private active = 0;
  private readonly whenSettled: (() => void)[] = [];
  /** Counts one request as finished (bound once: it runs for every request). */
  private readonly settle = (): void => {
    if (--this.active === 0 && this.whenSettled.length > 0) for (const wake of this.whenSettled.splice(0)) wake();
  };
  private closing: Promise<void> | undefined;

  constructor(parts: BlockImageParts) {
    this.path = parts.path;
    this.format = parts.format;
    this.file = parts.file;
    this.image = parts.image;
    this.backing = parts.backing;
    this.gate = parts.gate;
    this.writeGuard = parts.writeGuard;
    this.filters = parts.filters ?? [];
    this.length = parts.image.virtualSize;
    const decode = parts.image.decode?.bind(parts.image);
    this.decoded = decode ? new DecodedClusterCache((cluster, parallel) => this.decodeChecked(decode, cluster, parallel), parts.decodedCacheBytes) : undefined;
    this.ahead =
      this.decoded && decodeLanes() > 1
        ? new DecodeAhead(this.length, (offset, length) => {
            // After the read that asked for it has been answered; refused (and dropped) once close began.
            setImmediate(() => this.track(() => this.decodeAhead(offset, length)).catch(() => undefined));
          })
        : undefined;
    parts.image.attachBacking?.(parts.backing ? (offset, buffer) => this.readBacking(offset, buffer) : undefined);
    const markClean = parts.image.markClean?.bind(parts.image);
    const idleMs = parts.idleCleanMs ?? 0;
    if (markClean && idleMs > 0 && !this.readOnly) {
      const notice = parts.notice ?? ((line: string) => log(line));
      this.idle = new IdleClean(idleMs, markClean, (error) =>
        notice(`${this.path}: marking it clean after ${idleMs / 1000} s without writes failed (it stays marked until the next idle time or the close): ${(error as Error).message}`),
      );
    }
  }

  /** True when writes are refused: the file is open read-only or the format cannot write. */
  get readOnly(): boolean {
    return this.file.readOnly || this.image.write === undefined;
  }

  /** Fills `buffer` with the guest bytes at `offset`. */
  read(offset: GuestOffset, buffer: Buffer): Promise<void> {
    if (this.filters.length > 0) return this.track(() => this.filtered(this.readNow(offset, buffer), (filter) => filter.afterRead?.(offset, buffer)));
    return this.track(() => this.readNow(offset, buffer));
  }

  /** Runs `request`, then each filter's hook for it in order. */
  private async filtered(request: Promise<void>, hook: (filter: ImageFilter) => Promise<void> | undefined): Promise<void> {
    await request;
    for (const filter of this.filters) await hook(filter);
  }

  private async readNow(offset: GuestOffset, buffer: Buffer): Promise<void> {
    this.checkRange('read', offset, buffer.length);
    if (buffer.length === 0) return;
    // The format may not hand out the host clusters mapped here again before the read ends.
    const token = this.image.beginRead?.();
    try {
      const runs = await this.image.map(offset, buffer.length);
      // One run (most reads) has no other part that could still be using the buffer.
      if (runs.length === 1) await this.readRun(runs[0]!, offset, buffer, false);
      else {
        // Many encoded clusters in one read decode side by side: every `lanes`-th here, the others on
        // decode workers. A few are not worth a worker's round trip: decoding ahead covers sequential reads.
        const encodedRuns = this.decoded ? runs.reduce((count, run) => count + (run.kind === 'encoded' ? 1 : 0), 0) : 0;
        const offload = workerShare(encodedRuns >= OFFLOAD_MIN_CLUSTERS ? decodeLanes() : 1);
        await settleAll(runs.map((run) => this.readRun(run, offset, buffer, run.kind === 'encoded' && offload())));
      }
      if (this.ahead && runs.some((run) => run.kind === 'encoded')) this.ahead.read(offset, buffer.length);
    } finally {
      if (token !== undefined) this.image.endRead?.(token);
    }
  }

  /** Decodes the compressed clusters of a range ahead of a sequential reader (decode-ahead.ts); failures are left to the read that needs them. */
  private async decodeAhead(offset: GuestOffset, length: number): Promise<void> {
    const decoded = this.decoded;
    if (!decoded) return;
    const token = this.image.beginRead?.();
    try {
      const runs = await this.image.map(offset, length);
      const offload = workerShare(decodeLanes());
      const decodes: Promise<void>[] = [];
      for (const run of runs) if (run.kind === 'encoded') decodes.push(decoded.prefetch(run.cluster, offload()));
      await Promise.allSettled(decodes);
    } finally {
      if (token !== undefined) this.image.endRead?.(token);
    }
  }

  /** Starts reading one run of the map into its part of `buffer` (which starts at guest `offset`); `parallel`: as FormatImage.decode's. */
  private readRun(run: Mapping, offset: GuestOffset, buffer: Buffer, parallel: boolean): Promise<void> | undefined {
    const start = run.guestOffset - offset;
    const part = start === 0 && run.length === buffer.length ? buffer : buffer.subarray(start, start + run.length);
    switch (run.kind) {
      case 'data': {
        const file = run.file ?? this.file;
        announce(file, 'read_aio');
        return file.read(run.hostOffset, part);
      }
      case 'encoded':
        return this.readEncoded(run.cluster, run.guestOffset - run.cluster.guestStart, part, parallel);
      case 'zero':
        part.fill(0);
        return undefined;
      case 'backing':
        return this.readBacking(run.guestOffset, part);
    }
  }

  private readEncoded(cluster: EncodedCluster, offsetInCluster: number, part: Buffer, parallel: boolean): Promise<void> {
    if (!this.decoded) return Promise.reject(new CorruptImageError(`${this.path}: the ${this.format} driver mapped an encoded cluster but cannot decode it`));
    return this.decoded.read(cluster, offsetInCluster, part, parallel);
  }

  private async decodeChecked(decode: (cluster: EncodedCluster, parallel: boolean) => Promise<Buffer>, cluster: EncodedCluster, parallel: boolean): Promise<Buffer> {
    const decoded = await decode(cluster, parallel);
    if (decoded.length !== cluster.decodedLength) {
      throw new CorruptImageError(
        `${this.path}: the compressed cluster at host offset ${cluster.hostOffset} (guest offset ${cluster.guestStart}) decodes to ${decoded.length} bytes, not ${cluster.decodedLength}`,
      );
    }
    return decoded;
  }

  /** Writes `buffer` at guest `offset`. */
  write(offset: GuestOffset, buffer: Buffer): Promise<void> {
    if (this.filters.length > 0) return this.track(() => this.filtered(this.writeNow(offset, buffer), (filter) => filter.afterWrite?.(offset, buffer)));
    return this.track(() => this.writeNow(offset, buffer));
  }

  private async writeNow(offset: GuestOffset, buffer: Buffer): Promise<void> {
    if (this.readOnly || !this.image.write) throw new ReadOnlyError(`${this.path} is open read-only`);
    this.checkRange('write', offset, buffer.length);
    if (buffer.length === 0) return;
    const write = this.image.write.bind(this.image);
    const guard = this.writeGuard;
    await this.writing(() => (guard ? guard(offset, buffer, () => write(offset, buffer)) : write(offset, buffer)));
  }

  /** True when the format writes compressed clusters (writeCompressed). */
  get canWriteCompressed(): boolean {
    return this.image.writeCompressed !== undefined;
  }

  /** True when the format takes only compressed writes (convert compresses into it without -c). */
  get compressedOnly(): boolean {
    return this.image.compressedOnly === true;
  }

  /** Writes one whole cluster compressed (convert -c), into a cluster holding no data yet; EOPNOTSUPP when the format cannot. */
  writeCompressed(offset: GuestOffset, buffer: Buffer): Promise<void> {
    const compressed = this.image.writeCompressed?.bind(this.image);
    const request = () => this.optionalWrite('compressed write', offset, buffer.length, compressed && ((at) => compressed(at, buffer)));
    if (this.filters.length === 0) return this.track(request);
    return this.track(() => this.filtered(request(), (filter) => filter.afterWrite?.(offset, buffer)));
  }

  /** Makes [offset, offset + length) read as zeros; EOPNOTSUPP when the format cannot. */
  zero(offset: GuestOffset, length: number): Promise<void> {
    return this.track(() => this.changed(this.optionalWrite('zero', offset, length, this.image.zero?.bind(this.image)), offset, length));
  }

  /** Frees [offset, offset + length) where the format can; EOPNOTSUPP when it cannot. */
  discard(offset: GuestOffset, length: number): Promise<void> {
    return this.track(() => this.changed(this.optionalWrite('discard', offset, length, this.image.discard?.bind(this.image)), offset, length));
  }

  /** Tells the filters what a zero or discard changed, once it is done. */
  private changed(request: Promise<void>, offset: GuestOffset, length: number): Promise<void> {
    if (this.filters.length === 0) return request;
    return this.filtered(request, (filter) => filter.afterChange?.(offset, length, (at, buffer) => this.readNow(at, buffer)));
  }

  private async optionalWrite(
    operation: 'zero' | 'discard' | 'compressed write',
    offset: GuestOffset,
    length: number,
    run: ((offset: GuestOffset, length: number) => Promise<void>) | undefined,
  ): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(`${this.path} is open read-only`);
    this.checkRange(operation, offset, length);
    if (!run) throw new BlockError(`${this.path}: ${this.format} images do not support ${operation} requests here`, osConstants.errno.EOPNOTSUPP);
    if (length > 0) await this.writing(() => run(offset, length));
  }

  /** Runs a change of the image's content through the idle timer, when there is one. */
  private writing(change: () => Promise<void>): Promise<void> {
    return this.idle ? this.idle.around(change) : change();
  }

  /** Everything written so far reaches stable storage (driver metadata, then fdatasync). */
  async flush(): Promise<void> {
    if (this.readOnly) return;
    await this.image.flush();
    for (const filter of this.filters) await filter.afterFlush?.();
  }

  /**
   * Starts writing to disk what was written so far into the image's host files: an fdatasync of
   * its own file and of the writable files it opened through the gate, without the format (no
   * metadata written, no ordering, no lock taken), so it is no flush: only `flush` makes the image
   * durable. convert calls it while copying, so the page cache drains during the copy and the
   * final flush finds little left.
   */
  writeBack(): Promise<void> {
    if (this.readOnly) return Promise.resolve();
    const files = [this.file, ...(this.gate?.opened ?? [])].filter((file) => !file.readOnly);
    return this.track(() => settleAll(files.map((file) => file.flush())));
  }

  /** Describes [offset, offset + length) like `qemu-img map`, following the backing chain. */
  async map(offset: GuestOffset = 0, length: number = this.length - offset): Promise<MapRun[]> {
    this.checkRange('map', offset, length);
    const runs: MapRun[] = [];
    for (const run of await this.image.map(offset, length)) {
      if (run.kind === 'data') {
        runs.push({ offset: run.guestOffset, length: run.length, data: true, zero: false, present: true, depth: 0, hostOffset: run.hostOffset, filename: (run.file ?? this.file).path });
      } else if (run.kind === 'encoded') {
        runs.push({ offset: run.guestOffset, length: run.length, data: true, zero: false, present: true, depth: 0, filename: this.path, compressed: true });
      } else if (run.kind === 'zero' || !this.backing) {
        const zero: MapRun = { offset: run.guestOffset, length: run.length, data: false, zero: true, present: run.kind === 'zero', depth: 0 };
        if (run.hostOffset !== undefined) {
          zero.hostOffset = run.hostOffset;
          zero.filename = (run.file ?? this.file).path;
        }
        runs.push(zero);
      } else {
        const inBacking = Math.max(0, Math.min(run.length, this.backing.length - run.guestOffset));
        if (inBacking > 0) {
          for (const below of await this.backing.map(run.guestOffset, inBacking)) runs.push({ ...below, depth: below.depth + 1 });
        }
        if (inBacking < run.length) {
          // Past the end of a shorter backing file: zeros of this layer, as qemu-img map reports them (depth 0).
          runs.push({ offset: run.guestOffset + inBacking, length: run.length - inBacking, data: false, zero: true, present: false, depth: 0 });
        }
      }
    }
    return mergeRuns(runs);
  }

  /** Bytes the image occupies on disk: its own file and every file it names (not backing files). */
  async allocatedBytes(): Promise<number> {
    let total = await this.file.allocatedSize();
    for (const file of this.gate?.opened ?? []) total += await file.allocatedSize();
    return total;
  }

  async info(): Promise<ImageInfo> {
    const formatInfo = this.image.info();
    const reference = this.image.backing;
    return {
      filename: this.path,
      format: this.format,
      virtualSize: this.length,
      actualSize: this.image.allocatedSize ? await this.image.allocatedSize() : await this.file.allocatedSize(),
      clusterSize: formatInfo.clusterSize,
      dirty: formatInfo.dirty,
      backingFilename: reference?.filename,
      backingFormat: reference ? (reference.format ?? this.backing?.format ?? reference.assumedFormat) : undefined,
      fullBackingFilename: reference ? (this.backing?.path ?? safeResolve(this.path, reference.filename)) : undefined,
      formatSpecific: formatInfo.specific,
      snapshots: formatInfo.snapshots,
      files: await this.otherFiles(),
      backing: this.backing ? await this.backing.info() : undefined,
    };
  }

  private async otherFiles(): Promise<ImageInfo['files']> {
    if (!this.gate || this.gate.opened.length === 0) return undefined;
    const files = this.gate.opened;
    return Promise.all(this.gate.resolved.map(async (entry, i) => ({ ...entry, actualSize: await files[i]!.allocatedSize() })));
  }

  /** Waits for reads and writes in flight, flushes, marks the image clean, closes it, its files, then its backing chain. */
  close(): Promise<void> {
    this.closing ??= this.closeNow();
    return this.closing;
  }

  private async closeNow(): Promise<void> {
    log('closing %s (%d requests in flight)', this.path, this.active);
    const cleaning = this.idle?.stop();
    if (this.active > 0) await new Promise<void>((resolve) => this.whenSettled.push(resolve));
    await cleaning;
    try {
      await this.image.close();
    } finally {
      await Promise.allSettled(this.filters.map((filter) => filter.close?.()));
      try {
        await this.gate?.closeAll();
      } finally {
        await this.backing?.close();
      }
    }
  }

  /** Runs an I/O request, refusing it once close has begun, and remembers it until it settles. */
  private track(request: () => Promise<void>): Promise<void> {
    if (this.closing) return Promise.reject(new InvalidArgumentError(`${this.path} is closed`));
    const promise = request();
    this.active++;
    promise.then(this.settle, this.settle);
    return promise;
  }

  /** Reads from the backing chain; past the end of a shorter backing file reads zeros. */
  private async readBacking(offset: GuestOffset, buffer: Buffer): Promise<void> {
    const backing = this.backing;
    if (!backing) {
      buffer.fill(0);
      return;
    }
    const inBacking = Math.max(0, Math.min(buffer.length, backing.length - offset));
    if (inBacking < buffer.length) buffer.fill(0, inBacking);
    if (inBacking > 0) await backing.read(offset, buffer.subarray(0, inBacking));
  }

  private checkRange(operation: string, offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new InvalidArgumentError(`${operation} of ${length} bytes at offset ${offset}: offset and length must be whole non-negative numbers`);
    }
    if (offset + length > this.length) {
      throw new InvalidArgumentError(
        `${operation} of ${length} bytes at offset ${offset} is outside ${this.path} (virtual size ${this.length})`,
      );
    }
  }
}

/** The path a backing name stands for, or undefined when it cannot be a plain file. */
function safeResolve(imagePath: string, name: string): string | undefined {
  try {
    return resolveBackingName(imagePath, name);
  } catch {
    return undefined;
  }
}

/** Joins neighbouring runs that describe the same kind of storage. */
function mergeRuns(runs: MapRun[]): MapRun[] {
  const merged: MapRun[] = [];
  for (const run of runs) {
    const last = merged[merged.length - 1];
    if (
      last &&
      last.offset + last.length === run.offset &&
      last.data === run.data &&
      last.zero === run.zero &&
      last.present === run.present &&
      last.depth === run.depth &&
      last.filename === run.filename &&
      last.compressed === run.compressed &&
      (last.hostOffset === undefined) === (run.hostOffset === undefined) &&
      (last.hostOffset === undefined || last.hostOffset + last.length === run.hostOffset)
    ) {
      last.length += run.length;
    } else {
      merged.push({ ...run });
    }
  }
  return merged;
}
