/**
 * The VHDX format driver (MS-VHDX; docs/formats/vhdx.md): probe, read-only
 * open of dynamic, fixed and differencing images (a log that must be replayed
 * is replayed in memory, never on disk), and check. Writing is not supported:
 * a read-write open becomes read-only with a notice (readOnlyReason).
 * Parsing lives in header.ts / metadata.ts / log.ts / bat.ts, the I/O path in
 * image.ts, the parent checks in parent.ts. No state outside the opened image.
 */
import createDebug from 'debug';
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';
import type { CheckOptions, CheckResult, FormatDriver, FormatImage, OpenOptions, ProbeSample, Protocol } from '../../block/types.js';
import { BatGeometry } from './bat.js';
import { checkVhdx } from './check.js';
import { checkLayout, chooseHeader, FILE_SIGNATURE, HEADER_BYTES, HEADER_OFFSETS, parseRegionTables, REGION_TABLE_BYTES, REGION_TABLE_OFFSETS } from './header.js';
import { VhdxImage, type VhdxParts } from './image.js';
import { LogOverlay, readLog } from './log.js';
import { readMetadata } from './metadata.js';
import { parentReference, verifyParent } from './parent.js';

const log = createDebug('imgmount:vhdx');

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
  if (size < 1024 * 1024) throw new CorruptImageError(`${path}: the file is ${size} bytes, shorter than the 1 MiB header section of a VHDX image`);
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

async function openVhdx(file: Protocol, options: OpenOptions): Promise<FormatImage> {
  const notice = options.notice ?? ((line: string) => log(line));
  const { parts, view } = await openParts(file, notice);
  let backing;
  if (parts.metadata.hasParent) {
    backing = parentReference(parts.metadata.parent!, file.path);
    await verifyParent(parts.metadata.parent!, backing.filename, options.files, file.path);
  }
  return new VhdxImage(file, view, parts, backing, options);
}

export const vhdx: FormatDriver = {
  name: 'vhdx',
  extensions: ['.vhdx', '.avhdx'],
  readOnlyReason: READ_ONLY_REASON,
  probe(sample: ProbeSample): number {
    return sample.head.subarray(0, 8).equals(FILE_SIGNATURE) ? 100 : 0;
  },
  open: openVhdx,
  check: (file: Protocol, options: CheckOptions): Promise<CheckResult> => checkVhdx(file, options),
};
