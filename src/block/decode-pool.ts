/**
 * Worker threads that decode compressed clusters beside the main thread, so a
 * read covering several compressed clusters decodes them in parallel, as qemu
 * decodes in its thread pool. The caller decides which clusters go here
 * (image.ts: every `decodeLanes()`-th encoded run of one read stays on the
 * calling thread, the others come here); a read of one cluster never pays the
 * hop to a worker.
 *
 * The workers (dist/block/decode-worker.js, tsc's output, also when this module
 * runs from a bundle or from the sources under vitest) start on the first job.
 * Jobs go round-robin; each worker decodes its jobs one at a time, in order. A
 * worker keeps the process alive only while it has jobs. If a worker cannot
 * start or dies, its jobs and every later one are decoded on the calling
 * thread instead, so a read never fails because of the pool.
 *
 * Concurrency: main thread only (one pool per thread that uses it).
 */
import createDebug from 'debug';
import { availableParallelism } from 'node:os';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import type { Codec } from './codecs.js';

const log = createDebug('imgmount:decode-pool');

/** What the main thread sends: decode `data` into `size` bytes. */
export interface DecodeRequest {
  id: number;
  codec: Codec;
  data: Uint8Array;
  size: number;
}

/** What a worker answers: the decoded bytes (transferred), or the decoder's message. */
export type DecodeAnswer = { id: number; decoded: Uint8Array } | { id: number; error: string };

/** Workers beside the calling thread: one per core but one, at most 3. */
const WORKERS = Math.max(0, Math.min(3, availableParallelism() - 1));

/**
 * From the sources (src/block) as from dist/block, dist/fuse or dist/cli: two levels below the package root.
 * IMGMOUNT_TEST_DECODE_WORKER names another file, for the tests only (a worker that cannot start).
 */
const WORKER_URL = process.env.IMGMOUNT_TEST_DECODE_WORKER
  ? pathToFileURL(process.env.IMGMOUNT_TEST_DECODE_WORKER)
  : new URL('../../dist/block/decode-worker.js', import.meta.url);

interface Job extends DecodeRequest {
  resolve(decoded: Buffer): void;
  reject(error: Error): void;
  /** Decodes on the calling thread (when the pool cannot). */
  here(): Promise<Buffer>;
}

interface Lane {
  worker: Worker;
  jobs: Map<number, Job>;
}

class DecodePool {
  private lanes: Lane[] | undefined;
  private broken = WORKERS === 0;
  private nextId = 1;
  private turn = 0;

  /** How many decodes of one read can run at once: the calling thread and the workers. */
  get width(): number {
    return this.broken ? 1 : 1 + WORKERS;
  }

  /** Decodes on a worker; `here` decodes on this thread, used when no worker can. */
  decode(codec: Codec, data: Buffer, size: number, here: () => Promise<Buffer>): Promise<Buffer> {
    const lanes = this.broken ? undefined : (this.lanes ??= this.start());
    if (!lanes || lanes.length === 0) return here();
    return new Promise<Buffer>((resolve, reject) => {
      const lane = lanes[this.turn++ % lanes.length]!;
      const job: Job = { id: this.nextId++, codec, data, size, resolve, reject, here };
      if (lane.jobs.size === 0) lane.worker.ref();
      lane.jobs.set(job.id, job);
      const request: DecodeRequest = { id: job.id, codec, data, size };
      lane.worker.postMessage(request); // data is copied: a job can still be decoded here if the worker fails
    });
  }

  private start(): Lane[] | undefined {
    const lanes: Lane[] = [];
    try {
      for (let i = 0; i < WORKERS; i++) {
        const worker = new Worker(WORKER_URL, { name: `imgmount decode ${i + 1}` });
        const lane: Lane = { worker, jobs: new Map() };
        worker.unref();
        worker.on('message', (answer: DecodeAnswer) => this.answered(lane, answer));
        worker.on('error', (error) => this.fail(lane, `failed: ${error.message}`));
        worker.on('exit', (code) => this.fail(lane, `exited with status ${code}`));
        lanes.push(lane);
      }
    } catch (error) {
      log('cannot start decode workers (%s): decoding on the calling thread', (error as Error).message);
      this.broken = true;
      for (const lane of lanes) void lane.worker.terminate();
      return undefined;
    }
    log('%d decode worker(s) started', lanes.length);
    return lanes;
  }

  private answered(lane: Lane, answer: DecodeAnswer): void {
    const job = lane.jobs.get(answer.id);
    if (!job) return;
    lane.jobs.delete(answer.id);
    if (lane.jobs.size === 0) lane.worker.unref();
    if ('error' in answer) job.reject(new Error(answer.error));
    else job.resolve(Buffer.from(answer.decoded.buffer, answer.decoded.byteOffset, answer.decoded.byteLength));
  }

  /** A worker is gone: its jobs, and all later ones, are decoded on this thread. */
  private fail(lane: Lane, what: string): void {
    if (!this.broken) log('decode worker %s: decoding on the calling thread from now on', what);
    this.broken = true;
    const jobs = [...lane.jobs.values()];
    lane.jobs.clear();
    for (const job of jobs) job.here().then(job.resolve, job.reject);
    for (const other of this.lanes ?? []) if (other !== lane) void other.worker.terminate();
  }
}

const pool = new DecodePool();

/** How many decodes one read can run at once (1: no workers, every decode on the calling thread). */
export function decodeLanes(): number {
  return pool.width;
}

/** Decodes on a worker thread; `here` is the same decode on this thread, for when no worker can. */
export function decodeOnWorker(codec: Codec, data: Buffer, size: number, here: () => Promise<Buffer>): Promise<Buffer> {
  return pool.decode(codec, data, size, here);
}
