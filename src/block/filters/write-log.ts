/**
 * The file format of the log-writes filter (log-writes.ts), its writer and
 * its reader. The log says, in order, what reached the image file: every
 * write (with its data), flush, truncate and hole punch, each twice — when it
 * was issued to the file and when it ended — plus marks a caller adds
 * (`markWriteLog`) and the driver events (events.ts) that came before each
 * request. That is enough to build every state a power loss could leave
 * (scripts/power-loss.mjs does): a request takes effect at some moment
 * between its issue and its end, and a flush that ended makes durable every
 * request that ended before the flush was issued.
 *
 * Layout, integers little-endian:
 *
 *   header, 64 bytes
 *     0   8  magic "IMGMLOGW"
 *     8   4  version (1)
 *    12   4  header length (64)
 *    16   8  size of the image file when the log started
 *    24   8  when the log started, ms since the epoch
 *    32  32  zeros
 *   then records, each a 32-byte head and its payload
 *     0   1  kind: 1 write, 2 flush, 3 truncate, 4 punch (hole, reads as zeros), 5 mark, 6 event
 *     1   1  phase: 0 issued, 1 ended, 2 failed (ended with the errno below)
 *     2   2  zeros
 *     4   4  errno of a failed request, else 0
 *     8   8  id: numbers the request (from 1); its issue and end records share it
 *    16   8  offset (write, punch); the new length (truncate)
 *    24   8  length (write, punch); payload length (mark, event)
 *   payload: a write's data, in its issue record only; a mark's or event's
 *   name (UTF-8); nothing otherwise.
 *
 * Marks and events have phase 0 and id 0. Records are in the order things
 * happened: a request's issue record is appended before the request goes
 * down to the file, its end record once the file answered.
 *
 * Concurrency: appends are synchronous (one thread), so their order is the
 * order of events; the writer puts the buffered records into the log file
 * one chunk at a time, in order. `drain` resolves once everything appended
 * before it is in the file (not fdatasync'd: the log is a record of a run,
 * not a journal that must survive the host's own crash).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { BlockError, CorruptImageError, hostIoError } from '../errors.js';

export const WRITE_LOG_MAGIC = 'IMGMLOGW';
export const WRITE_LOG_VERSION = 1;
export const WRITE_LOG_HEADER_BYTES = 64;
export const WRITE_LOG_RECORD_HEAD_BYTES = 32;

export const RECORD_KINDS = ['write', 'flush', 'truncate', 'punch', 'mark', 'event'] as const;
export type RecordKind = (typeof RECORD_KINDS)[number];
export const RECORD_PHASES = ['issued', 'ended', 'failed'] as const;
export type RecordPhase = (typeof RECORD_PHASES)[number];

/** One record as read back. `data` (write issue records, marks, events) is a view into the log's bytes. */
export interface WriteLogRecord {
  /** Position among the records, from 0. */
  index: number;
  kind: RecordKind;
  phase: RecordPhase;
  errno: number;
  id: number;
  offset: number;
  length: number;
  data?: Buffer;
  /** A mark's or event's name. */
  name?: string;
}

export interface WriteLog {
  /** Size of the image file when the log started. */
  initialSize: number;
  startedMs: number;
  records: WriteLogRecord[];
}

/** Start writing out once this much is buffered. */
const WRITE_OUT_BYTES = 1 << 20;
/** Above this much buffered or being written, new requests wait for the log to catch up. */
const BACKLOG_LIMIT_BYTES = 64 << 20;

/** Appends records to a log file created (or emptied) at `create`. */
export class WriteLogWriter {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  /** Bytes appended but not yet in the file (pending and being written). */
  private backlogBytes = 0;
  private position = WRITE_LOG_HEADER_BYTES;
  private writing: Promise<void> = Promise.resolve();
  private failure: BlockError | undefined;
  private nextId = 1;

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
  ) {}

  static async create(path: string, initialSize: number): Promise<WriteLogWriter> {
    let handle: FileHandle;
    try {
      handle = await open(path, 'w');
    } catch (error) {
      throw hostIoError('filter log-writes: cannot create log', path, error);
    }
    const header = Buffer.alloc(WRITE_LOG_HEADER_BYTES);
    header.write(WRITE_LOG_MAGIC, 0, 'latin1');
    header.writeUInt32LE(WRITE_LOG_VERSION, 8);
    header.writeUInt32LE(WRITE_LOG_HEADER_BYTES, 12);
    header.writeBigUInt64LE(BigInt(initialSize), 16);
    header.writeBigUInt64LE(BigInt(Date.now()), 24);
    try {
      await handle.write(header, 0, header.length, 0);
    } catch (error) {
      await handle.close().catch(() => undefined);
      throw hostIoError('filter log-writes: cannot write log', path, error);
    }
    return new WriteLogWriter(path, handle);
  }

  /** A new request id. */
  newId(): number {
    return this.nextId++;
  }

  /** The first failure writing the log, if any; requests fail with it from then on. */
  get failed(): BlockError | undefined {
    return this.failure;
  }

  /** Whether new requests should wait (`drain`) before appending more. */
  get overloaded(): boolean {
    return this.backlogBytes > BACKLOG_LIMIT_BYTES;
  }

  /** Appends one record; `payload` is copied. */
  append(kind: RecordKind, phase: RecordPhase, id: number, offset: number, length: number, payload?: Buffer, errno = 0): void {
    const head = Buffer.alloc(WRITE_LOG_RECORD_HEAD_BYTES);
    head[0] = RECORD_KINDS.indexOf(kind) + 1;
    head[1] = RECORD_PHASES.indexOf(phase);
    head.writeUInt32LE(errno, 4);
    head.writeBigUInt64LE(BigInt(id), 8);
    head.writeBigUInt64LE(BigInt(offset), 16);
    head.writeBigUInt64LE(BigInt(length), 24);
    this.push(head);
    if (payload && payload.length > 0) this.push(Buffer.from(payload));
    if (this.pendingBytes >= WRITE_OUT_BYTES) void this.drain().catch(() => undefined);
  }

  /** Appends a named record (mark or event). */
  appendName(kind: 'mark' | 'event', name: string): void {
    const payload = Buffer.from(name, 'utf8');
    this.append(kind, 'issued', 0, 0, payload.length, payload);
  }

  /** Resolves once every record appended so far is in the log file; rejects if writing the log failed. */
  drain(): Promise<void> {
    if (this.pendingBytes > 0) {
      const chunk = this.pending.length === 1 ? this.pending[0]! : Buffer.concat(this.pending, this.pendingBytes);
      this.pending = [];
      this.pendingBytes = 0;
      const at = this.position;
      this.position += chunk.length;
      this.writing = this.writing.then(async () => {
        try {
          if (this.failure) return;
          let done = 0;
          while (done < chunk.length) {
            const { bytesWritten } = await this.handle.write(chunk, done, chunk.length - done, at + done);
            if (bytesWritten === 0) throw new Error('wrote nothing');
            done += bytesWritten;
          }
        } catch (error) {
          this.failure = hostIoError('filter log-writes: cannot write log', this.path, error);
        } finally {
          this.backlogBytes -= chunk.length;
        }
      });
    }
    return this.writing.then(() => {
      if (this.failure) throw this.failure;
    });
  }

  /** Writes out what is left and closes the log file. */
  async close(): Promise<void> {
    try {
      await this.drain();
    } finally {
      await this.handle.close().catch(() => undefined);
    }
  }

  private push(buffer: Buffer): void {
    this.pending.push(buffer);
    this.pendingBytes += buffer.length;
    this.backlogBytes += buffer.length;
  }
}

/** Parses a whole log; a truncated last record (a log cut short) is dropped, anything else malformed throws. */
export function parseWriteLog(bytes: Buffer, path = 'log'): WriteLog {
  if (bytes.length < WRITE_LOG_HEADER_BYTES || bytes.toString('latin1', 0, 8) !== WRITE_LOG_MAGIC) {
    throw new CorruptImageError(`${path}: not a log-writes log (no ${WRITE_LOG_MAGIC} header)`);
  }
  const version = bytes.readUInt32LE(8);
  if (version !== WRITE_LOG_VERSION) throw new CorruptImageError(`${path}: log version ${version}, expected ${WRITE_LOG_VERSION}`);
  const headerBytes = bytes.readUInt32LE(12);
  if (headerBytes < WRITE_LOG_HEADER_BYTES || headerBytes > bytes.length) {
    throw new CorruptImageError(`${path}: header length ${headerBytes} is not in [${WRITE_LOG_HEADER_BYTES}, ${bytes.length}]`);
  }
  const records: WriteLogRecord[] = [];
  let at = headerBytes;
  while (at + WRITE_LOG_RECORD_HEAD_BYTES <= bytes.length) {
    const kindCode = bytes[at]!;
    const phaseCode = bytes[at + 1]!;
    const kind = RECORD_KINDS[kindCode - 1];
    const phase = RECORD_PHASES[phaseCode];
    if (kind === undefined || phase === undefined) {
      throw new CorruptImageError(`${path}: record ${records.length} at byte ${at}: kind ${kindCode} / phase ${phaseCode} unknown`);
    }
    const record: WriteLogRecord = {
      index: records.length,
      kind,
      phase,
      errno: bytes.readUInt32LE(at + 4),
      id: safeNumber(bytes.readBigUInt64LE(at + 8), path, at),
      offset: safeNumber(bytes.readBigUInt64LE(at + 16), path, at),
      length: safeNumber(bytes.readBigUInt64LE(at + 24), path, at),
    };
    const payloadBytes = (kind === 'write' && phase === 'issued') || kind === 'mark' || kind === 'event' ? record.length : 0;
    const end = at + WRITE_LOG_RECORD_HEAD_BYTES + payloadBytes;
    if (end > bytes.length) break;
    if (payloadBytes > 0) record.data = bytes.subarray(at + WRITE_LOG_RECORD_HEAD_BYTES, end);
    if (kind === 'mark' || kind === 'event') record.name = record.data?.toString('utf8') ?? '';
    records.push(record);
    at = end;
  }
  return { initialSize: safeNumber(bytes.readBigUInt64LE(16), path, 16), startedMs: Number(bytes.readBigUInt64LE(24)), records };
}

function safeNumber(value: bigint, path: string, at: number): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new CorruptImageError(`${path}: value ${value} at byte ${at} is above 2^53`);
  return Number(value);
}
