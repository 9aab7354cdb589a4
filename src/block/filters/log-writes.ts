/**
 * log-writes: records every request that changes the image file — writes
 * with their data, flushes, truncates, hole punches — in the order they
 * happened, each when it was issued and when it ended, like Linux's
 * dm-log-writes. Reads are not recorded. The log's format and the rules for
 * rebuilding what a power loss could leave are in write-log.ts;
 * scripts/power-loss.sh replays logs that way.
 *
 *   --filter log-writes:log=FILE      (FILE is created, or emptied, at open)
 *
 * A program using the library adds named marks to an open log with
 * `markWriteLog(FILE, name)` (dm-log-writes' marks), e.g. "the guest's flush
 * number 7 was acknowledged here".
 *
 * Concurrency: a request's issue record is appended synchronously before it
 * goes down, and its end record as soon as the file answered, so records keep
 * the order of events even for overlapping requests. A flush answers only
 * once the log holds everything up to its end record. If writing the log
 * fails, every request after that fails with the log's error.
 */
import { realpath } from 'node:fs/promises';
import { resolve } from 'node:path';
import { constants as osConstants } from 'node:os';
import type { BlockEvent } from '../events.js';
import { InvalidArgumentError } from '../errors.js';
import type { HostOffset, Protocol } from '../types.js';
import { ProtocolFilter } from './protocol-filter.js';
import type { FilterDefinition } from './types.js';
import { WriteLogWriter, type RecordKind } from './write-log.js';

/** The logs open in this process, by absolute path: where `markWriteLog` finds them. */
const openLogs = new Map<string, WriteLogWriter>();

export const logWrites: FilterDefinition = {
  name: 'log-writes',
  summary: 'record every write, flush, truncate and hole punch reaching the image file, in order and with data: log=FILE',
  keys: ['log'],
  validate(options) {
    if (options.log === undefined || options.log === '') {
      throw new InvalidArgumentError('filter log-writes: log= is needed (the file to record the writes in)');
    }
  },
  async wrapProtocol(inner, options) {
    const path = resolve(options.log!);
    const imagePath = await realpath(inner.path).catch(() => resolve(inner.path));
    const logPath = await realpath(path).catch(() => path);
    if (logPath === imagePath) throw new InvalidArgumentError(`filter log-writes: log=${options.log} is the image file itself`);
    if (openLogs.has(path)) throw new InvalidArgumentError(`filter log-writes: log ${path} is already recording another open image`);
    const writer = await WriteLogWriter.create(path, await inner.size());
    openLogs.set(path, writer);
    return new LogWritesProtocol(inner, writer, path);
  },
};

/** Adds a mark named `name` to the open log at `path` and waits until the log file holds everything up to it. */
export async function markWriteLog(path: string, name: string): Promise<void> {
  const writer = openLogs.get(resolve(path));
  if (!writer) throw new InvalidArgumentError(`no open image is recording into log-writes log ${resolve(path)}`);
  writer.appendName('mark', name);
  await writer.drain();
}

class LogWritesProtocol extends ProtocolFilter {
  constructor(
    inner: Protocol,
    private readonly log: WriteLogWriter,
    private readonly logPath: string,
  ) {
    super(inner);
  }

  override write(offset: HostOffset, buffer: Buffer): Promise<void> {
    return this.record('write', offset, buffer.length, buffer, () => super.write(offset, buffer));
  }

  override async flush(): Promise<void> {
    await this.record('flush', 0, 0, undefined, () => super.flush());
    await this.log.drain();
  }

  override truncate(length: number): Promise<void> {
    return this.record('truncate', length, 0, undefined, () => super.truncate(length));
  }

  protected override punchHoleBelow(offset: HostOffset, length: number): Promise<void> {
    return this.record('punch', offset, length, undefined, () => super.punchHoleBelow(offset, length));
  }

  override event(name: BlockEvent): void {
    this.log.appendName('event', name);
    super.event(name);
  }

  override async close(): Promise<void> {
    try {
      await super.close();
    } finally {
      openLogs.delete(this.logPath);
      await this.log.close();
    }
  }

  /** Issue record, the request, end (or failed) record. */
  private async record(kind: RecordKind, offset: number, length: number, data: Buffer | undefined, request: () => Promise<void>): Promise<void> {
    if (this.log.overloaded) await this.log.drain();
    if (this.log.failed) throw this.log.failed;
    const id = this.log.newId();
    this.log.append(kind, 'issued', id, offset, length, data);
    try {
      await request();
    } catch (error) {
      const errno = typeof (error as { errno?: unknown }).errno === 'number' ? Math.abs((error as { errno: number }).errno) : osConstants.errno.EIO;
      this.log.append(kind, 'failed', id, offset, length, undefined, errno);
      throw error;
    }
    this.log.append(kind, 'ended', id, offset, length);
  }
}
