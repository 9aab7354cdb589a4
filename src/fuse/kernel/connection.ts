/**
 * One /dev/fuse connection: the request loop, INIT negotiation, the dispatch
 * table from opcodes to the file system's handlers, and replies.
 *
 * Thread model. Everything runs on the JavaScript main thread. The native
 * addon polls the fd on Node's event loop; when it is readable, requests are
 * read (non-blocking) until EAGAIN, parsed (request.ts) and dispatched without
 * waiting for each other, so many requests are in flight at once and overlap
 * at their awaits. Replies are written with one writev each (reply.ts), on the
 * same thread; /dev/fuse writes never block. Once the last request in
 * flight is answered, the connection keeps reading for a short adaptive
 * window (poll-window.ts) before it sleeps in the event loop again: at queue
 * depth 1 the next request usually comes within it, without a wake-up.
 *
 * Buffers. Each read of /dev/fuse goes into a buffer of max_write plus room
 * for the headers (a smaller one makes the kernel fail the read). Only a
 * WRITE keeps its buffer (its data is a view into it) until it is answered;
 * every other request gives it back at once. A request is answered only after
 * every read or write on its buffer has finished (the block layer settles all
 * parts before it resolves).
 *
 * The end. When the kernel lets go of the file system (every unmount route,
 * a lazy unmount once its last user is gone), reads fail with ENODEV: the
 * connection ends, `ended` resolves, and no request can come after that.
 * A handler that throws only fails its own request (toFuseError picks the errno);
 * the loop keeps serving.
 */
import { closeSync } from 'node:fs';
import * as native from '../../native/index.js';
import { Errno, toFuseError } from '../errno.js';
import { log, trace } from '../log.js';
import {
  FUSE_ASYNC_DIO, FUSE_ASYNC_READ, FUSE_BIG_WRITES, FUSE_KERNEL_MINOR_VERSION, FUSE_KERNEL_VERSION, FUSE_MAX_PAGES,
  FUSE_PARALLEL_DIROPS, minReadBufferSize,
} from './abi.js';
import { PollWindow } from './poll-window.js';
import { parseRequest, WireError, type Request } from './request.js';
import {
  DirentWriter, replyAttr, replyData, replyEmpty, replyEntry, replyError, replyInit, replyLseek, replyOpen, replyStatfs, replyWrite,
  type FuseAttr, type Kstatfs,
} from './reply.js';

/** Largest READ/WRITE negotiated: 1 MiB (256 pages). */
export const MAX_REQUEST_BYTES = 1024 * 1024;
const PAGE_SIZE = 4096;
const READ_BUFFER_BYTES = Math.max(minReadBufferSize(MAX_REQUEST_BYTES), MAX_REQUEST_BYTES + PAGE_SIZE);
/** Buffers kept for reuse; more are allocated while many writes are in flight. */
const SPARE_BUFFERS = 8;
/** How long the kernel may cache names and attributes, in seconds. */
const CACHE_SECONDS = 1;
/** Default longest busy poll after the last reply (QEMU's IOThreads poll up to 32 µs). */
export const DEFAULT_POLL_MAX_US = 50;

/** A node as LOOKUP answers it. */
export interface NodeEntry {
  nodeid: bigint;
  attr: FuseAttr;
}

/** A directory entry for READDIR. */
export interface DirectoryEntry {
  name: string;
  nodeid: bigint;
  mode: number;
}

/** What the file system answers; every handler may throw (BlockError: its errno). */
export interface KernelFilesystem {
  lookup(parent: bigint, name: string): NodeEntry | Promise<NodeEntry>;
  getattr(node: bigint): FuseAttr | Promise<FuseAttr>;
  /** SETATTR with FATTR_SIZE when `size` is set; other attribute changes are refused or ignored by the file system. */
  setattr(node: bigint, change: { size?: number; valid: number }): FuseAttr | Promise<FuseAttr>;
  /** Returns the file handle and FOPEN_* flags. */
  open(node: bigint, flags: number): { fh: number; openFlags: number };
  release(node: bigint, fh: number): void;
  /** Reads at most `size` bytes at `offset` (fewer at the end of the file). */
  read(node: bigint, offset: number, size: number): Promise<Buffer>;
  /** Takes back a buffer `read` returned, once its reply has been written (optional). */
  recycleRead?(data: Buffer): void;
  write(node: bigint, offset: number, data: Buffer): Promise<number>;
  flush(node: bigint): void;
  fsync(node: bigint, dataOnly: boolean): Promise<void>;
  statfs(): Kstatfs;
  opendir(node: bigint): number;
  /** Every entry of the directory, "." and ".." included. */
  readdir(node: bigint): DirectoryEntry[];
  access(node: bigint, mask: number): void;
  lseek(node: bigint, offset: number, whence: number): Promise<number>;
  fallocate(node: bigint, offset: number, length: number, mode: number): Promise<void>;
}

export class KernelConnection {
  /** Resolves once the kernel has let go of the file system. */
  readonly ended: Promise<void>;
  private markEnded!: () => void;
  private hasEnded = false;
  private readonly pollId: number;
  private readonly spare: Buffer[] = [];
  /** Uniques of requests being answered, for INTERRUPT and drain (an array: a few entries, no Set rehashing as it empties and fills). */
  private readonly inFlight: bigint[] = [];
  private idle: (() => void)[] = [];
  private initialized = false;
  private readonly pollWindow: PollWindow;
  /** Whether requests are traced (read once: the debug namespace's getter is slow on every request). */
  private readonly tracing = trace.enabled;

  constructor(
    private readonly fd: number,
    private readonly filesystem: KernelFilesystem,
    /** Longest busy poll after the last reply, in microseconds (poll-window.ts); 0: none. */
    pollMaxUs = DEFAULT_POLL_MAX_US,
  ) {
    this.pollWindow = new PollWindow(pollMaxUs);
    this.ended = new Promise((resolve) => (this.markEnded = resolve));
    this.pollId = native.pollStart(fd, (status) => this.onReadable(status));
  }

  /** Requests being answered right now. */
  get requestsInFlight(): number {
    return this.inFlight.length;
  }

  /** Resolves once no request is being answered. */
  drain(): Promise<void> {
    if (this.inFlight.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.idle.push(resolve));
  }

  /** Stops reading and closes the fd (after the end, or when a mount is abandoned). */
  close(): void {
    if (this.hasEnded) return;
    this.hasEnded = true;
    native.pollStop(this.pollId);
    try {
      closeSync(this.fd);
    } catch (error) {
      log('closing /dev/fuse: %s', (error as Error).message);
    }
    this.markEnded();
  }

  private onReadable(status: number): void {
    if (this.hasEnded) return;
    if (status < 0) log('/dev/fuse poll reported %d; reading to find out why', status);
    for (;;) {
      const buffer = this.spare.pop() ?? Buffer.allocUnsafe(READ_BUFFER_BYTES);
      let length: number;
      try {
        length = native.readInto(this.fd, buffer);
      } catch (error) {
        this.giveBack(buffer);
        const code = (error as NodeJS.ErrnoException).code;
        if (code === 'EINTR' || code === 'ENOENT') continue; // ENOENT: the request was interrupted before we read it
        if (code === 'ENODEV') log('the kernel has let go of the file system');
        else log('reading /dev/fuse failed (%s); ending the connection', (error as Error).message);
        this.close();
        return;
      }
      if (length < 0) {
        this.giveBack(buffer);
        return; // EAGAIN: nothing more to read until the next poll
      }
      this.pollWindow.arrived(performance.now());
      this.receive(buffer, length);
    }
  }

  private receive(buffer: Buffer, length: number): void {
    let request: Request;
    try {
      request = parseRequest(buffer, length);
    } catch (error) {
      this.giveBack(buffer);
      if (error instanceof WireError && error.header) {
        log('malformed request: %s', error.message);
        this.send(error.header.unique, [replyError(error.header.unique, Errno.EINVAL)]);
      } else {
        log('unreadable request: %s', (error as Error).message);
      }
      return;
    }
    if (request.kind !== 'write') this.giveBack(buffer);
    this.dispatch(request, request.kind === 'write' ? buffer : undefined);
  }

  private giveBack(buffer: Buffer): void {
    if (this.spare.length < SPARE_BUFFERS) this.spare.push(buffer);
  }

  private dispatch(request: Request, heldBuffer: Buffer | undefined): void {
    const { unique, nodeid } = request.header;
    switch (request.kind) {
      case 'forget':
      case 'batchForget':
        return; // no reply; nodes are fixed for the life of the mount
      case 'interrupt':
        // We cannot cancel I/O already started; an unknown request gets EAGAIN, as the protocol asks.
        if (!this.inFlight.includes(request.interruptedUnique)) {
          trace('interrupt of request %s: not in flight, EAGAIN', String(request.interruptedUnique));
          this.send(unique, [replyError(unique, Errno.EAGAIN)]);
        } else {
          trace('interrupt of request %s: in flight, answered when its I/O is done', String(request.interruptedUnique));
        }
        return;
      case 'init':
        this.answerInit(request);
        return;
      case 'read':
        if (!this.tracing) {
          this.serveRead(request);
          return;
        }
        break;
      default:
        break;
    }
    const fs = this.filesystem;
    this.serve(request, unique, heldBuffer, async (): Promise<Buffer[]> => {
      switch (request.kind) {
        case 'lookup': {
          const entry = await fs.lookup(nodeid, request.name);
          return [replyEntry(unique, { nodeid: entry.nodeid, generation: 0, entryValid: CACHE_SECONDS, attrValid: CACHE_SECONDS, attr: entry.attr })];
        }
        case 'getattr':
          return [replyAttr(unique, { attrValid: CACHE_SECONDS, attr: await fs.getattr(nodeid) })];
        case 'setattr': {
          const change = (request.valid & FATTR_SIZE_BIT) !== 0 ? { size: request.size, valid: request.valid } : { valid: request.valid };
          return [replyAttr(unique, { attrValid: CACHE_SECONDS, attr: await fs.setattr(nodeid, change) })];
        }
        case 'open':
          return [replyOpen(unique, fs.open(nodeid, request.flags))];
        case 'release':
          fs.release(nodeid, request.fh);
          return [replyEmpty(unique)];
        case 'read': {
          const data = await fs.read(nodeid, request.offset, request.size);
          return replyData(unique, data);
        }
        case 'write':
          return [replyWrite(unique, await fs.write(nodeid, request.offset, request.data))];
        case 'flush':
          fs.flush(nodeid);
          return [replyEmpty(unique)];
        case 'fsync':
          await fs.fsync(nodeid, (request.fsyncFlags & 1) !== 0);
          return [replyEmpty(unique)];
        case 'statfs':
          return [replyStatfs(unique, fs.statfs())];
        case 'opendir':
          return [replyOpen(unique, { fh: fs.opendir(nodeid), openFlags: 0 })];
        case 'readdir':
        case 'readdirplus': {
          // READDIRPLUS is not negotiated; answer both with plain entries.
          const writer = new DirentWriter(request.size);
          const entries = fs.readdir(nodeid);
          for (let index = request.offset; index < entries.length; index++) {
            const entry = entries[index]!;
            if (!writer.add({ ino: entry.nodeid, offset: index + 1, type: (entry.mode & 0o170000) >>> 12, name: entry.name })) break;
          }
          return [writer.reply(unique)];
        }
        case 'releasedir':
          return [replyEmpty(unique)];
        case 'access':
          fs.access(nodeid, request.mask);
          return [replyEmpty(unique)];
        case 'lseek':
          return [replyLseek(unique, await fs.lseek(nodeid, request.offset, request.whence))];
        case 'fallocate':
          await fs.fallocate(nodeid, request.offset, request.length, request.mode);
          return [replyEmpty(unique)];
        case 'destroy':
          return [replyEmpty(unique)];
        case 'unknown':
          return [replyError(unique, Errno.ENOSYS)];
      }
    });
  }

  /**
   * Runs one request; answers with what `work` returns, or the errno of what it
   * throws. Its description is made only for the debug log and for failures.
   */
  private serve(request: Request, unique: bigint, heldBuffer: Buffer | undefined, work: () => Promise<Buffer[]>): void {
    this.inFlight.push(unique);
    const started = this.tracing ? performance.now() : 0;
    work().then(
      (reply) => {
        if (this.tracing) trace('%s -> ok (%s ms)', describe(request), (performance.now() - started).toFixed(2));
        this.finish(unique, heldBuffer, reply);
        // The reply is written (writev is synchronous): the data buffer is free again.
        if (request.kind === 'read' && reply.length === 2) this.filesystem.recycleRead?.(reply[1]!);
      },
      (error: unknown) => this.fail(request, unique, heldBuffer, error, started),
    );
  }

  /** READ without tracing, the hottest request: serve's work with one promise less. */
  private serveRead(request: Extract<Request, { kind: 'read' }>): void {
    const { unique, nodeid } = request.header;
    this.inFlight.push(unique);
    this.filesystem.read(nodeid, request.offset, request.size).then(
      (data) => {
        let reply: Buffer[];
        try {
          reply = replyData(unique, data);
        } catch (error) {
          this.fail(request, unique, undefined, error, 0);
          return;
        }
        this.finish(unique, undefined, reply);
        if (reply.length === 2) this.filesystem.recycleRead?.(data);
      },
      (error: unknown) => this.fail(request, unique, undefined, error, 0),
    );
  }

  /** Answers a request whose work failed with the errno of its error. */
  private fail(request: Request, unique: bigint, heldBuffer: Buffer | undefined, error: unknown, started: number): void {
    const name = describe(request);
    const errno = -toFuseError(error, name);
    if (this.tracing) trace('%s -> %s (%s ms)', name, errnoName(errno), (performance.now() - started).toFixed(2));
    this.finish(unique, heldBuffer, [replyError(unique, errno)]);
  }

  private finish(unique: bigint, heldBuffer: Buffer | undefined, reply: Buffer[]): void {
    this.send(unique, reply);
    if (heldBuffer) this.giveBack(heldBuffer);
    const inFlight = this.inFlight;
    const index = inFlight.indexOf(unique);
    if (index >= 0) {
      const last = inFlight.pop()!;
      if (index < inFlight.length) inFlight[index] = last;
    }
    if (inFlight.length === 0) {
      if (this.idle.length > 0) for (const wake of this.idle.splice(0)) wake();
      this.pollBriefly();
    }
  }

  /**
   * Keeps reading /dev/fuse for the poll window (poll-window.ts) once the last
   * request is answered; a request read here is dispatched as onReadable would.
   * Nothing else runs meanwhile: the window is bounded (`pollMaxUs`).
   */
  private pollBriefly(): void {
    const now = performance.now();
    const windowUs = this.pollWindow.beginIdle(now);
    if (windowUs <= 0) return;
    const until = now + windowUs / 1000;
    const buffer = this.spare.pop() ?? Buffer.allocUnsafe(READ_BUFFER_BYTES);
    while (!this.hasEnded) {
      let length: number;
      try {
        length = native.readInto(this.fd, buffer);
      } catch {
        break; // onReadable meets the same error and handles it
      }
      if (length >= 0) {
        this.pollWindow.arrived(performance.now());
        this.receive(buffer, length);
        return;
      }
      if (performance.now() > until) break;
    }
    this.giveBack(buffer);
  }

  private send(unique: bigint, reply: Buffer[]): void {
    if (this.hasEnded) return;
    try {
      native.writev(this.fd, reply);
    } catch (error) {
      // ENOENT: the kernel gave up on the request (interrupted); ENODEV: the connection is gone.
      const code = (error as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' && code !== 'ENODEV') log('replying to request %s failed: %s', unique, (error as Error).message);
    }
  }

  private answerInit(request: Extract<Request, { kind: 'init' }>): void {
    const { unique } = request.header;
    if (request.major < FUSE_KERNEL_VERSION) {
      log('the kernel speaks FUSE %d.%d, older than 7: refusing', request.major, request.minor);
      this.send(unique, [replyError(unique, Errno.EPROTO)]);
      return;
    }
    if (request.major > FUSE_KERNEL_VERSION) {
      // The kernel asks again with our major.
      this.send(unique, [replyInit(unique, initReply(0n, 0))]);
      return;
    }
    const wanted = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_ASYNC_DIO | FUSE_PARALLEL_DIROPS;
    const flags = wanted & request.flags;
    this.send(unique, [replyInit(unique, initReply(flags, Math.min(request.maxReadahead, MAX_REQUEST_BYTES)))]);
    this.initialized = true;
    log('FUSE %d.%d, kernel offers 0x%s, using 0x%s; requests up to %d bytes', request.major, request.minor, request.flags.toString(16), flags.toString(16), MAX_REQUEST_BYTES);
    if (this.pollWindow.maxUs > 0) log('busy polling up to %d µs after the last reply (adaptive)', this.pollWindow.maxUs);
    else log('busy polling off');
  }

  /** Whether INIT has been answered. */
  get ready(): boolean {
    return this.initialized;
  }
}

const FATTR_SIZE_BIT = 1 << 3;

function initReply(flags: bigint, maxReadahead: number) {
  return {
    major: FUSE_KERNEL_VERSION,
    minor: FUSE_KERNEL_MINOR_VERSION,
    maxReadahead,
    flags,
    maxBackground: 64,
    congestionThreshold: 48,
    maxWrite: MAX_REQUEST_BYTES,
    timeGran: 1,
    maxPages: MAX_REQUEST_BYTES / PAGE_SIZE,
  };
}

/** A request in words, for logs: "read node 2 131072@0". */
function describe(request: Request): string {
  const node = `node ${request.header.nodeid}`;
  switch (request.kind) {
    case 'lookup':
      return `lookup ${request.name} in ${node}`;
    case 'read':
    case 'write':
      return `${request.kind} ${node} ${request.size}@${request.offset}`;
    case 'setattr':
      return `setattr ${node} valid 0x${request.valid.toString(16)}${request.valid & FATTR_SIZE_BIT ? ` size ${request.size}` : ''}`;
    case 'open':
      return `open ${node} flags 0x${request.flags.toString(16)}`;
    case 'fsync':
      return `fsync ${node}${request.fsyncFlags & 1 ? ' (data)' : ''}`;
    case 'lseek':
      return `lseek ${node} ${request.offset} whence ${request.whence}`;
    case 'fallocate':
      return `fallocate ${node} ${request.length}@${request.offset} mode 0x${request.mode.toString(16)}`;
    case 'unknown':
      return `opcode ${request.opcode} on ${node}`;
    default:
      return `${request.kind} ${node}`;
  }
}

function errnoName(errno: number): string {
  return Object.entries(Errno).find(([, value]) => value === errno)?.[0] ?? String(errno);
}
