/**
 * The write side of an opened VHDX (dynamic or fixed): the header updates,
 * block allocation and BAT changes through the log, in the order qemu's
 * driver uses (block/vhdx.c, vhdx-log.c), each step durable before the next:
 *
 *   first write of the session: the non-current header is rewritten with
 *     sequence + 1, a new FileWriteGuid and DataWriteGuid (and no log GUID),
 *     fdatasync; from then on it is the current one.
 *   allocating blocks (those one write request needs): the file is extended
 *     by them at its end, 1 MiB aligned (reads as zeros), the guest data
 *     written into them, fdatasync; then their BAT sectors change through the
 *     log, in one entry: a header naming a new log
 *     GUID, fdatasync (only when the current header names none); a log entry
 *     holding the new BAT sectors, fdatasync; the BAT sectors themselves, fdatasync.
 *   flush, close and idle clean (`settle`): when a header names the log GUID,
 *     a header without it, fdatasync: the image needs no replay from then on.
 *     (qemu writes that header after every entry; keeping the GUID until the
 *     next flush spares two fdatasyncs per allocation. Every entry's tail is
 *     itself, since all earlier ones are applied, so a replay writes only the
 *     last entry's BAT sectors, which hold what the BAT holds.)
 *
 * A crash before the log entry is durable leaves unreferenced blocks past
 * the end (the old data reads back); after it, a replay (ours at any open,
 * qemu's at a read-write open or `check -r all`) writes the new BAT sectors
 * again, so the new data reads back. Each header write goes to the header
 * that is not current, so a torn one leaves the other (the previous state).
 *
 * Concurrency: `lock` serializes header updates and allocations (the image
 * takes it around each allocation, flush and close); every method here
 * except `userVisible` is called with it held. The in-memory header and
 * file size change only under it.
 */
import { Mutex } from 'async-mutex';
import createDebug from 'debug';
import { constants as osConstants } from 'node:os';
import { BlockError, UnsupportedFeatureError } from '../../block/errors.js';
import { announce, flushToDisk } from '../../block/events.js';
import type { Protocol } from '../../block/types.js';
import { HEADER_OFFSETS, MiB, newGuid, serializeHeader, type VhdxHeader } from './header.js';
import { LOG_SECTOR } from './log.js';
import { logEntryBytes } from './log-write.js';

const log = createDebug('imgmount:vhdx');

export const NO_GUID = Buffer.alloc(16);

/** Writes the header that is not `current` with sequence + 1 and `change`, flushes; returns the new current header. */
export async function writeNextHeader(
  file: Protocol,
  current: VhdxHeader,
  change: { fileWriteGuid: Buffer; dataWriteGuid?: Buffer; logGuid?: Buffer },
): Promise<VhdxHeader> {
  const index = 1 - current.index;
  const next: VhdxHeader = {
    ...current,
    index,
    sequenceNumber: current.sequenceNumber + 1n,
    fileWriteGuid: change.fileWriteGuid,
    dataWriteGuid: change.dataWriteGuid ?? current.dataWriteGuid,
    logGuid: change.logGuid ?? current.logGuid,
  };
  announce(file, 'header_update');
  await file.write(HEADER_OFFSETS[index], serializeHeader(next));
  await flushToDisk(file);
  return next;
}

export class VhdxWriter {
  readonly lock = new Mutex();
  /** This session's FileWriteGuid, made at its first change of the file. */
  private readonly fileWriteGuid = newGuid();
  private visible: Promise<void> | undefined;
  /** Where the next log entry goes, from the start of the log. */
  private logPosition = 0;
  private sequence = 1n;
  /** The current header names this session's log GUID (entries may be in the log). */
  private logActive = false;

  constructor(
    private readonly file: Protocol,
    private header: VhdxHeader,
    /** The file's size as this writer made it (blocks are allocated past it). */
    public fileSize: number,
  ) {}

  get currentHeader(): VhdxHeader {
    return this.header;
  }

  /** Before the first guest-visible change: a new FileWriteGuid and DataWriteGuid, durable (once per session). */
  userVisible(): Promise<void> {
    this.visible ??= this.lock
      .runExclusive(async () => {
        this.header = await writeNextHeader(this.file, this.header, { fileWriteGuid: this.fileWriteGuid, dataWriteGuid: newGuid(), logGuid: NO_GUID });
        log('%s: header %d is current (sequence %d): new data write GUID', this.file.path, this.header.index + 1, this.header.sequenceNumber);
      })
      .catch((error: unknown) => {
        this.visible = undefined;
        throw error;
      });
    return this.visible;
  }

  /**
   * Extends the file by `count` blocks of `blockSize` at its end (1 MiB
   * aligned, as qemu; they read as zeros) and returns the first one's file
   * offset. The caller writes their data and flushes. The space is given up
   * even when the extension fails (it may be on disk).
   */
  async reserveBlocks(blockSize: number, count: number): Promise<number> {
    const start = Math.ceil(this.fileSize / MiB) * MiB;
    const end = start + count * blockSize;
    if (!Number.isSafeInteger(end)) throw new BlockError(`${this.file.path}: new blocks at ${start} would end past 2^53`, osConstants.errno.EFBIG);
    announce(this.file, 'cluster_alloc');
    this.fileSize = end;
    await this.file.truncate(end);
    return start;
  }

  /**
   * Changes 4 KiB metadata sectors of the file (BAT sectors) through the log:
   * a header with a log GUID (unless one is current), the log entry, the
   * sectors, each flushed. After a crash anywhere the file holds either the
   * old sectors or, once the entry is durable, the new ones after a replay.
   */
  async logAndApply(sectors: ReadonlyArray<{ offset: number; data: Buffer }>): Promise<void> {
    const { logOffset, logLength } = this.header;
    if (!this.logActive) {
      this.header = await writeNextHeader(this.file, this.header, { fileWriteGuid: this.fileWriteGuid, logGuid: newGuid() });
      this.logActive = true;
    }
    const logGuid = this.header.logGuid;
    const length = (Math.ceil((sectors.length + 2) / 128) + sectors.length) * LOG_SECTOR;
    if (length > logLength) throw new UnsupportedFeatureError(`${this.file.path}: a log entry of ${length} bytes does not fit in the ${logLength}-byte log`);
    if (this.logPosition + length > logLength) this.logPosition = 0;
    const entry = logEntryBytes({
      sequenceNumber: this.sequence,
      tail: this.logPosition,
      logGuid,
      flushedFileOffset: this.fileSize,
      lastFileOffset: this.fileSize,
      sectors,
    });
    announce(this.file, 'write_aio');
    await this.file.write(logOffset + this.logPosition, entry);
    await flushToDisk(this.file);
    this.logPosition += entry.length;
    this.sequence += 1n;
    announce(this.file, 'l1_update');
    for (const sector of sectors) await this.file.write(sector.offset, sector.data);
    await flushToDisk(this.file);
  }

  /** Clears the log GUID from the header when it names one (every entry is applied already). Under the lock. */
  async settle(): Promise<void> {
    if (!this.logActive) return;
    this.header = await writeNextHeader(this.file, this.header, { fileWriteGuid: this.fileWriteGuid, logGuid: NO_GUID });
    this.logActive = false;
  }
}
