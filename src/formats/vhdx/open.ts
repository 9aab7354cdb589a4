/**
 * Opening a VHDX file's structures in order: file identifier, headers, the
 * log (replayed in memory into an overlay when it holds entries, or on disk
 * for a read-write open), region table, metadata, BAT geometry. Used by open
 * and check; stateless. Runs before the image is shared (no concurrency).
 */
import { CorruptImageError } from '../../block/errors.js';
import type { Protocol } from '../../block/types.js';
import { BatGeometry } from './bat.js';
import {
  checkLayout, chooseHeader, FILE_SIGNATURE, HEADER_BYTES, HEADER_OFFSETS, MiB, newGuid, parseRegionTables, REGION_TABLE_BYTES, REGION_TABLE_OFFSETS,
  type VhdxHeader,
} from './header.js';
import type { VhdxParts } from './image.js';
import { LogOverlay, readLog } from './log.js';
import { replayOnDisk } from './log-write.js';
import { readMetadata } from './metadata.js';
import { NO_GUID, writeNextHeader } from './writer.js';

async function readAt(file: Protocol, offset: number, length: number): Promise<Buffer> {
  const bytes = Buffer.alloc(length);
  await file.read(offset, bytes);
  return bytes;
}

/** The region table, metadata and BAT geometry as `view` shows them. */
async function readStructures(view: Protocol, header: VhdxHeader, path: string): Promise<Omit<VhdxParts, 'replayedEntries' | 'replayedOnDisk'>> {
  const fileSize = await view.size();
  const regions = parseRegionTables(
    await readAt(view, REGION_TABLE_OFFSETS[0], REGION_TABLE_BYTES),
    await readAt(view, REGION_TABLE_OFFSETS[1], REGION_TABLE_BYTES),
    fileSize,
    path,
  );
  checkLayout(header, regions, path);
  const metadata = await readMetadata(view, regions.metadata, path);
  const geometry = new BatGeometry(metadata, regions, path);
  return { header, regions, metadata, geometry, fileSize };
}

/**
 * Reads and checks every structure of the image; `view` is the file as reads
 * see it. A log with entries to replay is replayed in memory (`view` is then
 * the overlay) for a read-only open; a read-write open replays it on disk,
 * flushes, and writes a header without the log GUID, and says so.
 */
export async function openParts(file: Protocol, notice: (line: string) => void): Promise<{ parts: VhdxParts; view: Protocol }> {
  const path = file.path;
  const size = await file.size();
  const identifier = await readAt(file, 0, 8);
  if (!identifier.equals(FILE_SIGNATURE)) throw new CorruptImageError(`${path}: the file identifier is not "vhdxfile"`);
  if (size < MiB) throw new CorruptImageError(`${path}: the file is ${size} bytes, shorter than the 1 MiB header section of a VHDX image`);
  const header = chooseHeader(await readAt(file, HEADER_OFFSETS[0], HEADER_BYTES), await readAt(file, HEADER_OFFSETS[1], HEADER_BYTES), size, path);
  const entries = await readLog(file, header, size, path);
  if (entries.length === 0) return { parts: { ...(await readStructures(file, header, path)), replayedEntries: 0, replayedOnDisk: 0 }, view: file };
  const overlay = new LogOverlay(file, entries, size);
  const parts = await readStructures(overlay, header, path);
  const what = `${path}: the VHDX log holds ${entries.length} entr${entries.length === 1 ? 'y' : 'ies'} (sequence ${entries[0]!.sequenceNumber}..${entries[entries.length - 1]!.sequenceNumber}, ${overlay.changes} change(s)) not yet applied`;
  if (file.readOnly) {
    notice(`${what}: replayed in memory for this read-only open; the file is not changed`);
    return { parts: { ...parts, replayedEntries: entries.length, replayedOnDisk: 0 }, view: overlay };
  }
  await replayOnDisk(file, entries, size);
  const cleared = await writeNextHeader(file, header, { fileWriteGuid: newGuid(), logGuid: NO_GUID });
  notice(`${what}: replayed on disk for this read-write open (the file was changed), and the log emptied`);
  return { parts: { ...(await readStructures(file, cleared, path)), replayedEntries: 0, replayedOnDisk: entries.length }, view: file };
}
