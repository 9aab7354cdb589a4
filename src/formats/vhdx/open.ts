/**
 * Opening a VHDX file's structures in order: file identifier, headers, the
 * log (replayed in memory into an overlay when it holds entries), region
 * table, metadata, BAT geometry. Used by open and check; stateless.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';
import type { Protocol } from '../../block/types.js';
import { BatGeometry } from './bat.js';
import { checkLayout, chooseHeader, FILE_SIGNATURE, HEADER_BYTES, HEADER_OFFSETS, MiB, parseRegionTables, REGION_TABLE_BYTES, REGION_TABLE_OFFSETS } from './header.js';
import type { VhdxParts } from './image.js';
import { LogOverlay, readLog } from './log.js';
import { readMetadata } from './metadata.js';

export const READ_ONLY_REASON = 'writing VHDX images is not supported yet';

async function readAt(file: Protocol, offset: number, length: number): Promise<Buffer> {
  const bytes = Buffer.alloc(length);
  await file.read(offset, bytes);
  return bytes;
}

/** Reads and checks every structure of the image; `view` is the file as reads see it (the log replayed in memory). */
export async function openParts(file: Protocol, notice: (line: string) => void): Promise<{ parts: VhdxParts; view: Protocol }> {
  const path = file.path;
  const size = await file.size();
  const identifier = await readAt(file, 0, 8);
  if (!identifier.equals(FILE_SIGNATURE)) throw new CorruptImageError(`${path}: the file identifier is not "vhdxfile"`);
  if (size < MiB) throw new CorruptImageError(`${path}: the file is ${size} bytes, shorter than the 1 MiB header section of a VHDX image`);
  const header = chooseHeader(await readAt(file, HEADER_OFFSETS[0], HEADER_BYTES), await readAt(file, HEADER_OFFSETS[1], HEADER_BYTES), size, path);
  const entries = await readLog(file, header, size, path);
  let view: Protocol = file;
  if (entries.length > 0) {
    if (!file.readOnly) throw new UnsupportedFeatureError(`${path}: the VHDX log must be replayed, and ${READ_ONLY_REASON}`);
    const overlay = new LogOverlay(file, entries, size);
    view = overlay;
    notice(
      `${path}: the VHDX log holds ${entries.length} entr${entries.length === 1 ? 'y' : 'ies'} (sequence ${entries[0]!.sequenceNumber}..${entries[entries.length - 1]!.sequenceNumber}, ${overlay.changes} change(s)) not yet applied: replayed in memory for this read-only open; the file is not changed`,
    );
  }
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
  return { parts: { header, regions, metadata, geometry, fileSize, replayedEntries: entries.length }, view };
}

