/**
 * The copy loop of convert (convert.ts): which ranges of the source become
 * what in the destination (from the source's `map`), and moving them.
 *
 *   skip  - a hole the destination already reads as (a fresh image: zeros; -B: the backing file);
 *   zero  - made zero with the format's zeroing (or zeros written where it has none);
 *   copy  - read from the source and written, -S zero blocks left as holes (or zeroed, see above);
 *   fill  - -S 0: zeros written as data (a fully allocated destination).
 *
 * With -c the steps are whole clusters of the destination, each written through
 * `writeCompressed`.
 *
 * Concurrency: up to `parallel` reads of at most `bufferSize` bytes are in flight;
 * as each read completes in guest order its writes are issued (so formats allocate
 * in order) and up to min(parallel, WRITES_IN_FLIGHT) steps' writes run at the same
 * time. Memory stays bounded by 2 x parallel x bufferSize. Steps never overlap, so
 * writes never race.
 * Every WRITE_BACK_EVERY bytes written, one fdatasync of the destination's files
 * (BlockImage.writeBack, never two at once) starts beside the writes; the copy
 * waits for the last one before returning, and the caller then flushes.
 */
import { constants as osConstants } from 'node:os';
import { BlockError } from './errors.js';
import type { BlockImage, MapRun } from './image.js';
import { settleAll } from './settle.js';

/** Bytes per request (qemu-img's default buffer is 2 MiB too). */
export const DEFAULT_BUFFER_SIZE = 2 * 1024 * 1024;
/**
 * How many bytes written make convert start writing the destination's files to disk
 * (one fdatasync at a time, on the thread pool, while the copy goes on): without it the
 * whole destination sat in the page cache until the final flush, about a third of a
 * 512 MiB conversion into a raw file.
 */
export const WRITE_BACK_EVERY = 32 * 1024 * 1024;
/**
 * Steps whose writes run at the same time (at most -m): two, one in the kernel and the next
 * one queued, so the thread pool's round trip is hidden. More only had the writers of one
 * host file wait for each other on its inode lock (ext4 takes it for every buffered write,
 * and its waiters spin): 8 instead of 2 nearly doubled the CPU time of a 512 MiB
 * conversion into a raw file (docs/convert.md, Speed).
 */
const WRITES_IN_FLIGHT = 2;
/** How much of the source one `map` call describes. */
const MAP_WINDOW = 256 * 1024 * 1024;

/** What one step of the copy does with [offset, offset + length) of the destination. */
type Step = { kind: 'copy' | 'zero' | 'skip' | 'fill'; offset: number; length: number };

export interface CopySettings {
  /** -S: zero blocks of this size in data are holes; 0 writes everything. */
  sparseSize: number;
  /** -m: requests in flight. */
  parallel: number;
  /** Bytes per read. */
  bufferSize: number;
  /** The destination reads as zeros everywhere: holes need no writing. */
  fresh: boolean;
  /** -B: copy only what the source's top image stores. */
  topOnly: boolean;
  progress?: (done: number, total: number) => void;
  /** -c: compress whole clusters of this size; copied ranges grow to cluster boundaries. */
  cluster?: number;
  signal?: AbortSignal;
  /** Start writing the destination's files to disk (BlockImage.writeBack) each time this many bytes were written since the last one started; 0 or missing: never. */
  writeBackEvery?: number;
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
 * allocates in order), and up to min(parallel, WRITES_IN_FLIGHT) of them run at the
 * same time.
 */
export async function copy(input: BlockImage, output: BlockImage, settings: CopySettings): Promise<{ bytesWritten: number; bytesZeroed: number }> {
  const reads: { step: Step; read: Promise<Buffer | undefined> }[] = [];
  const writes = new Set<Promise<void>>();
  let failure: { error: unknown } | undefined;
  let bytesWritten = 0;
  let bytesZeroed = 0;
  let done = 0;
  const total = input.length;
  settings.progress?.(0, total);

  // Early writeback: an fdatasync of the destination's files (no flush of the format: no metadata,
  // no lock) runs while the copy goes on, so the page cache drains during the copy and the final
  // flush finds little left. One at a time; its failure fails the conversion like a write's.
  let flushing: Promise<void> | undefined;
  let unflushed = 0;
  const writeBackSoon = (length: number): void => {
    unflushed += length;
    if (!settings.writeBackEvery || flushing || unflushed < settings.writeBackEvery) return;
    unflushed = 0;
    flushing = output.writeBack().then(
      () => {
        flushing = undefined;
      },
      (error: unknown) => {
        failure ??= { error };
      },
    );
  };

  // Buffers go back to a pool once their writes have settled (the block layer resolves a write only
  // after all I/O on its buffer finished): a fresh 2 MiB buffer per read cost a page fault per 4 KiB,
  // about a third of the system time of a 512 MiB conversion.
  const pool: Buffer[] = [];
  const whole = new Map<Buffer, Buffer>();
  const start = (step: Step): Promise<Buffer | undefined> => {
    if (step.kind !== 'copy') return Promise.resolve(undefined);
    const pooled = pool.pop() ?? Buffer.allocUnsafeSlow(settings.bufferSize);
    const buffer = step.length <= pooled.length ? pooled.subarray(0, step.length) : Buffer.allocUnsafe(step.length);
    if (buffer.buffer === pooled.buffer) whole.set(buffer, pooled);
    else pool.push(pooled);
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
        if (step.kind === 'copy' || step.kind === 'fill') writeBackSoon(step.length);
      },
      (error: unknown) => {
        failure ??= { error };
      },
    ).finally(() => {
      const pooled = buffer && whole.get(buffer);
      if (pooled) {
        whole.delete(buffer);
        pool.push(pooled);
      }
    });
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
      while (writes.size >= Math.min(settings.parallel, WRITES_IN_FLIGHT)) await Promise.race(writes);
    }
    while (reads.length > 0) {
      check();
      await issueOldest();
    }
    await Promise.allSettled([...writes]);
    await flushing;
    check();
  } catch (error) {
    await Promise.allSettled([...reads.map((entry) => entry.read), ...writes, flushing]);
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
    writes.push(isZero(buffer, at, at + piece.length, zero) ? zeros(offset + at, piece.length) : output.writeCompressed(offset + at, piece));
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
    const zero = isZero(buffer, at - offset, next - offset, zeros);
    const last = parts[parts.length - 1];
    if (last && last.zero === zero) last.length += next - at;
    else parts.push({ offset: at, length: next - at, zero });
    at = next;
  }
  return parts;
}

/**
 * Whether buffer[start, end) holds only zeros: its first and last bytes first (a block of
 * data nearly always fails there), then a compare in place (no subarray per block: at 4 KiB
 * per block, their allocation showed in profiles of a 512 MiB conversion).
 */
function isZero(buffer: Buffer, start: number, end: number, zeros: Buffer): boolean {
  if (buffer[start] !== 0 || buffer[end - 1] !== 0) return false;
  return buffer.compare(zeros, 0, end - start, start, end) === 0;
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
