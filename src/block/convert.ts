/**
 * Converting an image to another format (qemu-img convert), generically over
 * the block layer: the source is opened read-only through openImage (any
 * readable format, its whole backing chain), the destination is created with
 * the target driver's `create` (createImage, the same -o options as
 * `imgmount create`) or, with `existing` (-n), opened read-write as it is.
 *
 * What is copied comes from the source's `map`, not from reading zeros: runs
 * no layer stores are holes and are not read at all; data runs are read and,
 * with `sparseSize` (qemu's -S, 4 KiB by default), blocks of zeros found in
 * them are skipped too. A freshly created destination without a backing file
 * reads as zeros, so holes are left alone there; into an existing image (-n)
 * or over a backing file (-B) they are written as zeros, as qemu does. With
 * -B only what the source's top image stores is copied (qemu's meaning: the
 * new backing file has the content of the source's backing chain).
 *
 * Concurrency: up to `parallel` (qemu's -m, 8) reads of at most `bufferSize`
 * bytes are in flight at a time, so memory stays bounded by their product;
 * writes happen one at a time, in guest order (as qemu-img without -W), so
 * the destination's clusters are laid out in order. Nothing else touches
 * either image while converting: the destination is write-locked by its open.
 *
 * On failure a destination this call created is removed (a partly converted
 * image is never left looking like a good one); an existing destination (-n)
 * is left as it is and the error says that it was partly written.
 */
import { rm, stat } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import createDebug from 'debug';
import { BlockError, InvalidArgumentError, UnsupportedFeatureError } from './errors.js';
import { pathExists } from './file.js';
import type { FilePolicy } from './gate.js';
import type { BlockImage, ImageInfo, MapRun } from './image.js';
import { createImage, openImage } from './open.js';
import type { FormatList } from './probe.js';
import { settleAll } from './settle.js';
import type { FilterSpec } from './filters/index.js';

const log = createDebug('imgmount:convert');

/** qemu-img's default -S: zero blocks of 4 KiB in data are not written. */
export const DEFAULT_SPARSE_SIZE = 4096;
/** qemu-img's default -m: 8 requests in flight. */
export const DEFAULT_PARALLEL = 8;
/** Largest -m qemu-img accepts. */
export const MAX_PARALLEL = 16;
/** Bytes per request (qemu-img's default buffer is 2 MiB too). */
export const DEFAULT_BUFFER_SIZE = 2 * 1024 * 1024;
/** Largest -S qemu-img accepts (its MAX_BUF_SECTORS: 16 MiB). */
export const MAX_SPARSE_SIZE = 16 * 1024 * 1024;
/** How much of the source one `map` call describes. */
const MAP_WINDOW = 1024 * 1024 * 1024;

export interface ConvertImageOptions extends FilePolicy {
  formats: FormatList;
  /** The destination's format (-O). */
  targetFormat: string;
  /** The source's format (-f); probed when omitted. */
  sourceFormat?: string;
  /** Format options of the destination (-o), as for createImage. */
  options?: Record<string, string>;
  /** An internal snapshot of the source (id or name) to convert instead of its current state (-l). */
  snapshot?: string;
  /** Write into an existing destination instead of creating it (-n). */
  existing?: boolean;
  /** Overwrite an existing destination (qemu-img does so silently; here it must be asked for). */
  force?: boolean;
  /** Compress the destination's clusters (-c); refused by name where the target cannot. */
  compress?: boolean;
  /** Zero blocks of this many bytes in data are not written (-S); 0 writes everything, fully allocating the destination. */
  sparseSize?: number;
  /** Create the destination over this backing file (-B); only what the source's top image stores is copied. */
  backingFile?: string;
  /** The format of `backingFile` (-F). */
  backingFormat?: string;
  /** Requests in flight (-m, 1..16). */
  parallel?: number;
  /** Bytes per request. */
  bufferSize?: number;
  /** Called with (bytes done, virtual size) as the conversion goes. */
  progress?: (done: number, total: number) => void;
  /** Filters on the source (openImage's `filters`). */
  filters?: readonly FilterSpec[];
  /** Lines the user should see (notices of opening). */
  notice?: (line: string) => void;
  /** Stops the conversion (SIGINT of the command line): it fails as on an error, DEST removed. */
  signal?: AbortSignal;
}

export interface ConvertReport {
  /** Virtual size of the source (and of what was written). */
  size: number;
  /** True when the destination was created by this call. */
  created: boolean;
  /** Guest bytes written as data, and made zero by request (not counting holes left alone). */
  bytesWritten: number;
  bytesZeroed: number;
}

/** What one step of the copy does with [offset, offset + length) of the destination. */
type Step = { kind: 'copy' | 'zero' | 'skip' | 'fill'; offset: number; length: number };

/** Converts `source` to a new (or, with `existing`, an existing) image `dest` of `options.targetFormat`. */
export async function convertImage(source: string, dest: string, options: ConvertImageOptions): Promise<ConvertReport> {
  const settings = checkSettings(options);
  const target = options.formats.named(options.targetFormat);
  if (!options.existing && !target.create) throw new UnsupportedFeatureError(`convert: creating ${target.name} images is not supported`);
  if (options.compress && options.existing) {
    throw new InvalidArgumentError('convert -c cannot be used with -n: compressed clusters are written only into unallocated clusters of a new image');
  }
  if (options.existing && (options.backingFile !== undefined || options.options !== undefined && Object.keys(options.options).length > 0)) {
    throw new InvalidArgumentError('convert -n writes into an existing image: -B and -o, which only apply when creating it, cannot be used with it');
  }
  const destExists = await pathExists(dest);
  if (options.existing && !destExists) throw new InvalidArgumentError(`convert -n: ${dest} does not exist`);
  if (!options.existing && destExists && !options.force) {
    throw new InvalidArgumentError(`convert: ${dest} already exists; pass --force to overwrite it or -n to write into it`);
  }

  const input = await openImage(source, {
    formats: options.formats,
    format: options.sourceFormat,
    readOnly: true,
    snapshot: options.snapshot,
    filters: options.filters,
    notice: options.notice,
    allowFiles: options.allowFiles,
    idleCleanSeconds: 0,
  });
  try {
    if (destExists) await refuseSourceAsDest(input, dest);
    let created = false;
    let writing = false;
    let output: BlockImage | undefined;
    try {
      if (!options.existing) {
        await createImage(dest, target.name, {
          formats: options.formats,
          size: input.length,
          options: options.options,
          force: options.force,
          backingFile: options.backingFile,
          backingFormat: options.backingFormat,
        });
        created = true;
      }
      output = await openImage(dest, { formats: options.formats, format: target.name, notice: options.notice, allowFiles: options.allowFiles, idleCleanSeconds: 0 });
      if (output.readOnly) throw new UnsupportedFeatureError(`convert: ${dest} cannot be written (${target.name} images open read-only here)`);
      if (output.length < input.length) {
        throw new InvalidArgumentError(`convert -n: ${dest} (${output.length} bytes) is smaller than ${source} (${input.length} bytes)`);
      }
      const fresh = created && options.backingFile === undefined;
      const cluster = options.compress ? await compressionCluster(output, target.name) : undefined;
      writing = true;
      const report = await copy(input, output, { ...settings, fresh, topOnly: options.backingFile !== undefined, progress: options.progress, cluster, signal: options.signal });
      const finished = output;
      output = undefined;
      await finished.flush();
      await finished.close();
      log('converted %s to %s (%s): %d bytes written, %d zeroed', source, dest, target.name, report.bytesWritten, report.bytesZeroed);
      return { size: input.length, created, ...report };
    } catch (error) {
      await output?.close().catch(() => undefined);
      throw await cleanUp(error, dest, created, writing);
    }
  } finally {
    await input.close();
  }
}

interface Settings {
  sparseSize: number;
  parallel: number;
  bufferSize: number;
}

function checkSettings(options: ConvertImageOptions): Settings {
  const sparseSize = options.sparseSize ?? DEFAULT_SPARSE_SIZE;
  if (!Number.isSafeInteger(sparseSize) || sparseSize < 0 || sparseSize % 512 !== 0 || sparseSize > MAX_SPARSE_SIZE) {
    throw new InvalidArgumentError(`convert -S ${sparseSize}: the sparse size must be a multiple of 512 bytes from 0 to ${MAX_SPARSE_SIZE}`);
  }
  const parallel = options.parallel ?? DEFAULT_PARALLEL;
  if (!Number.isSafeInteger(parallel) || parallel < 1 || parallel > MAX_PARALLEL) {
    throw new InvalidArgumentError(`convert -m ${parallel}: the number of requests in flight must be from 1 to ${MAX_PARALLEL}`);
  }
  const bufferSize = Math.max(options.bufferSize ?? DEFAULT_BUFFER_SIZE, sparseSize);
  if (!Number.isSafeInteger(bufferSize) || bufferSize < 512 || bufferSize > 256 * 1024 * 1024) {
    throw new InvalidArgumentError(`convert: a buffer size of ${bufferSize} bytes is outside 512 .. 256 MiB`);
  }
  return { sparseSize, parallel, bufferSize };
}

/**
 * Converting an image into itself, or into a file of its backing chain (or one of
 * the files an image names, an external data file), would destroy what it reads.
 * Files are compared by device and inode, so another name of the same file counts.
 */
async function refuseSourceAsDest(input: BlockImage, dest: string): Promise<void> {
  const target = await stat(dest).catch(() => undefined);
  if (!target) return;
  const top = await input.info();
  for (let info: ImageInfo | undefined = top; info; info = info.backing) {
    const named = [
      { path: info.filename, what: info === top ? 'the source image itself' : `in the source's backing chain (${info.filename})` },
      ...(info.files ?? []).map((file) => ({ path: file.path, what: `the ${file.role} of ${info!.filename}` })),
    ];
    for (const { path, what } of named) {
      const seen = await stat(path).catch(() => undefined);
      if (seen && seen.dev === target.dev && seen.ino === target.ino) {
        throw new InvalidArgumentError(`convert: ${dest} is ${what}; writing it would destroy what is being converted`);
      }
    }
  }
}

/** The error to report after a failure, once a destination this call created is removed. */
async function cleanUp(error: unknown, dest: string, created: boolean, written: boolean): Promise<unknown> {
  const message = error instanceof Error ? error.message : String(error);
  const errno = error instanceof BlockError ? error.errno : ((error as NodeJS.ErrnoException | undefined)?.errno ?? -osConstants.errno.EIO);
  let what: string;
  if (created) {
    what = await rm(dest, { force: true }).then(
      () => `${dest}, which it had created, was removed`,
      (removal: unknown) => `${dest}, which it had created, could not be removed (${(removal as Error).message}) and is incomplete`,
    );
  } else if (written) {
    what = `${dest} (written into with -n) was left partly converted`;
  } else {
    return error;
  }
  return new BlockError(`convert failed: ${message}; ${what}`, Math.abs(errno));
}

/** With -c: the destination's cluster size, the unit of compressed writes. */
async function compressionCluster(output: BlockImage, format: string): Promise<number> {
  if (!output.canWriteCompressed) throw new UnsupportedFeatureError(`convert -c: writing compressed clusters into ${format} images is not supported`);
  const { clusterSize } = await output.info();
  if (clusterSize === undefined || !Number.isSafeInteger(clusterSize) || clusterSize <= 0) {
    throw new UnsupportedFeatureError(`convert -c: ${output.path} has no cluster size to compress by`);
  }
  return clusterSize;
}

interface CopySettings extends Settings {
  /** The destination reads as zeros everywhere: holes need no writing. */
  fresh: boolean;
  /** -B: copy only what the source's top image stores. */
  topOnly: boolean;
  progress?: (done: number, total: number) => void;
  /** -c: compress whole clusters of this size; copied ranges grow to cluster boundaries. */
  cluster?: number;
  signal?: AbortSignal;
}

/** What a run of the source's map becomes in the destination. */
function kindOf(run: MapRun, settings: CopySettings): Step['kind'] {
  if (settings.topOnly && run.depth > 0) return 'skip';
  if (run.data) return 'copy';
  if (settings.topOnly && !run.present) return 'skip';
  if (settings.sparseSize === 0) return 'fill';
  return settings.fresh ? 'skip' : 'zero';
}

/**
 * The steps of the copy, in guest order, from the source's map. With -c they are
 * whole clusters of the destination: a cluster whose parts would be treated
 * differently is copied whole (read from the source, so it holds what the source
 * shows there), since a compressed cluster is written once, whole.
 */
async function* steps(input: BlockImage, settings: CopySettings): AsyncGenerator<Step> {
  const cluster = settings.cluster ?? 1;
  const chunk = Math.ceil(settings.bufferSize / cluster) * cluster;
  const total = input.length;
  let open: Step | undefined; // consecutive clusters of one kind, not yielded yet
  function* add(kind: Step['kind'], from: number, to: number): Generator<Step> {
    if (open && open.kind === kind && open.offset + open.length === from) open.length = to - open.offset;
    else {
      if (open) yield* split(open);
      open = { kind, offset: from, length: to - from };
    }
    // Whole chunks go at once, so the copy starts before the whole map is read.
    const boundary = Math.floor(to / chunk) * chunk;
    if (boundary > open.offset) {
      yield* split({ kind, offset: open.offset, length: boundary - open.offset });
      open = boundary < to ? { kind, offset: boundary, length: to - boundary } : undefined;
    }
  }
  function* split(step: Step): Generator<Step> {
    if (step.kind === 'skip' || step.kind === 'zero') {
      yield step;
      return;
    }
    for (let at = step.offset; at < step.offset + step.length; ) {
      const end = Math.min(step.offset + step.length, (Math.floor(at / chunk) + 1) * chunk);
      yield { kind: step.kind, offset: at, length: end - at };
      at = end;
    }
  }
  let partial: { start: number; kind: Step['kind'] } | undefined; // a cluster only partly described so far
  for (let window = 0; window < total; window += MAP_WINDOW) {
    for (const run of await input.map(window, Math.min(MAP_WINDOW, total - window))) {
      const kind = kindOf(run, settings);
      let at = run.offset;
      const end = run.offset + run.length;
      if (partial) {
        const clusterEnd = Math.min(partial.start + cluster, total);
        if (kind !== partial.kind) partial.kind = 'copy';
        at = Math.min(end, clusterEnd);
        if (at < clusterEnd) continue;
        yield* add(partial.kind, partial.start, clusterEnd);
        partial = undefined;
      }
      if (at >= end) continue;
      const whole = end === total ? end : Math.floor(end / cluster) * cluster;
      if (whole > at) {
        yield* add(kind, at, whole);
        at = whole;
      }
      if (at < end) partial = { start: at, kind };
    }
  }
  if (partial) yield* add(partial.kind, partial.start, total);
  if (open) yield* split(open);
}

/**
 * Copies the source into the destination: up to `parallel` reads in flight; each
 * buffer's writes are issued in guest order as its read completes (so the format
 * allocates in order), and up to `parallel` of them run at the same time.
 */
async function copy(input: BlockImage, output: BlockImage, settings: CopySettings): Promise<{ bytesWritten: number; bytesZeroed: number }> {
  const reads: { step: Step; read: Promise<Buffer | undefined> }[] = [];
  const writes = new Set<Promise<void>>();
  let failure: { error: unknown } | undefined;
  let bytesWritten = 0;
  let bytesZeroed = 0;
  let done = 0;
  const total = input.length;
  settings.progress?.(0, total);

  const start = (step: Step): Promise<Buffer | undefined> => {
    if (step.kind !== 'copy') return Promise.resolve(undefined);
    const buffer = Buffer.allocUnsafe(step.length);
    const read = input.read(step.offset, buffer).then(() => buffer);
    read.catch(() => undefined); // awaited in order below; a failure before then is not unhandled
    return read;
  };

  const zeros = async (at: number, length: number): Promise<void> => {
    await zeroRange(output, at, length);
    bytesZeroed += length;
  };

  /** The writes of one step, all issued at once (the format orders its allocations by arrival). */
  const write = (step: Step, buffer: Buffer | undefined): Promise<void> => {
    if (step.kind === 'copy' && settings.cluster !== undefined) {
      bytesWritten += step.length;
      return writeCompressedClusters(output, buffer!, step.offset, settings.cluster, (at, length) => (settings.fresh ? Promise.resolve() : zeros(at, length)));
    }
    if (step.kind === 'copy') {
      return settleAll(
        sparseParts(buffer!, step.offset, settings.sparseSize).map((part) => {
          if (part.zero) return settings.fresh ? undefined : zeros(part.offset, part.length);
          bytesWritten += part.length;
          return output.write(part.offset, buffer!.subarray(part.offset - step.offset, part.offset - step.offset + part.length));
        }),
      );
    }
    if (step.kind === 'zero') return zeros(step.offset, step.length);
    if (step.kind === 'fill') {
      bytesWritten += step.length;
      return output.write(step.offset, Buffer.alloc(step.length));
    }
    return Promise.resolve();
  };

  const issueOldest = async (): Promise<void> => {
    const { step, read } = reads.shift()!;
    const buffer = await read;
    const writing: Promise<void> = write(step, buffer).then(
      () => {
        done = Math.max(done, step.offset + step.length);
        settings.progress?.(done, total);
      },
      (error: unknown) => {
        failure ??= { error };
      },
    );
    writes.add(writing);
    void writing.finally(() => writes.delete(writing));
  };

  const check = (): void => {
    if (failure) throw failure.error;
    if (settings.signal?.aborted) throw new BlockError('interrupted', osConstants.errno.EINTR);
  };

  try {
    for await (const step of steps(input, settings)) {
      check();
      reads.push({ step, read: start(step) });
      while (reads.length >= settings.parallel) await issueOldest();
      while (writes.size >= settings.parallel) await Promise.race(writes);
    }
    while (reads.length > 0) {
      check();
      await issueOldest();
    }
    await Promise.allSettled([...writes]);
    check();
  } catch (error) {
    await Promise.allSettled([...reads.map((entry) => entry.read), ...writes]);
    throw failure?.error ?? error;
  }
  return { bytesWritten, bytesZeroed };
}

/** -c: each cluster of `buffer` (read at cluster-aligned `offset`) compressed, or `zeros` for one of zeros only. */
async function writeCompressedClusters(output: BlockImage, buffer: Buffer, offset: number, cluster: number, zeros: (at: number, length: number) => Promise<void>): Promise<void> {
  const zero = zeroBuffer(cluster);
  const writes: Promise<void>[] = [];
  for (let at = 0; at < buffer.length; at += cluster) {
    const piece = buffer.subarray(at, Math.min(buffer.length, at + cluster));
    // The clusters of one buffer compress at the same time (zlib's thread pool); the format places them one at a time.
    writes.push(piece.equals(zero.subarray(0, piece.length)) ? zeros(offset + at, piece.length) : output.writeCompressed(offset + at, piece));
  }
  await settleAll(writes);
}

/**
 * Splits a buffer read at guest `offset` into parts at multiples of `sparseSize`
 * (joined while of the same kind): all-zero parts are holes to leave. With 0
 * the whole buffer is data.
 */
function sparseParts(buffer: Buffer, offset: number, sparseSize: number): { offset: number; length: number; zero: boolean }[] {
  if (sparseSize === 0) return [{ offset, length: buffer.length, zero: false }];
  const parts: { offset: number; length: number; zero: boolean }[] = [];
  const zeros = zeroBuffer(sparseSize);
  const end = offset + buffer.length;
  for (let at = offset; at < end; ) {
    const next = Math.min(end, (Math.floor(at / sparseSize) + 1) * sparseSize);
    const slice = buffer.subarray(at - offset, next - offset);
    const zero = slice.equals(zeros.subarray(0, slice.length));
    const last = parts[parts.length - 1];
    if (last && last.zero === zero) last.length += next - at;
    else parts.push({ offset: at, length: next - at, zero });
    at = next;
  }
  return parts;
}

let zeroBytes: Buffer = Buffer.alloc(0);
function zeroBuffer(length: number): Buffer {
  if (zeroBytes.length < length) zeroBytes = Buffer.alloc(length);
  return zeroBytes;
}

/** Makes a range of the destination read as zeros: the format's zeroing, or zeros written where it has none. */
async function zeroRange(output: BlockImage, offset: number, length: number): Promise<void> {
  try {
    await output.zero(offset, length);
    return;
  } catch (error) {
    if (!(error instanceof BlockError) || error.errno !== osConstants.errno.EOPNOTSUPP) throw error;
  }
  for (let at = offset; at < offset + length; at += DEFAULT_BUFFER_SIZE) {
    const part = Math.min(DEFAULT_BUFFER_SIZE, offset + length - at);
    await output.write(at, zeroBuffer(part).subarray(0, part));
  }
}
