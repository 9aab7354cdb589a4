/**
 * The DMG (Apple UDIF) format driver, read-only: probe (the "koly" trailer in
 * the last 512 bytes), open (trailer.ts, then the XML property list's blkx
 * chunk table, blkx.ts, or without one the binary resource fork's, rsrc.ts),
 * reads through image.ts. No create, check or resize.
 * Specification and limits: docs/formats/dmg.md. Opening reads the trailer
 * and the property list once; nothing is shared between opened images.
 */
import createDebug from 'debug';
import type { FormatDriver, FormatImage, OpenOptions, ProbeSample, Protocol } from '../../block/types.js';
import { blkxBlocks, chunkTable } from './blkx.js';
import { DmgImage } from './image.js';
import { resourceForkBlocks } from './rsrc.js';
import { KOLY_MAGIC, parseTrailer, TRAILER_BYTES } from './trailer.js';

const log = createDebug('imgmount:dmg');

/** A trailer found only at the end of the file: a format whose header is at the start of the same file wins. */
const LIKELY = 90;

function probe(sample: ProbeSample): number {
  const { tail, fileSize } = sample;
  if (fileSize < TRAILER_BYTES || tail.length < TRAILER_BYTES) return 0;
  return tail.subarray(tail.length - TRAILER_BYTES, tail.length - TRAILER_BYTES + 4).equals(KOLY_MAGIC) ? LIKELY : 0;
}

async function openDmg(file: Protocol, _options: OpenOptions): Promise<FormatImage> {
  const fileSize = await file.size();
  const bytes = Buffer.alloc(TRAILER_BYTES);
  if (fileSize >= TRAILER_BYTES) await file.read(fileSize - TRAILER_BYTES, bytes);
  const trailer = parseTrailer(bytes, fileSize, file.path);
  const xml = trailer.xmlLength !== 0;
  const table = Buffer.alloc(xml ? trailer.xmlLength : trailer.rsrcForkLength);
  await file.read(xml ? trailer.xmlOffset : trailer.rsrcForkOffset, table);
  const blocks = xml ? blkxBlocks(table, file.path) : resourceForkBlocks(table, file.path);
  const chunks = chunkTable(blocks, trailer, file.path);
  log('%s: %d sectors, %d chunks', file.path, trailer.sectorCount, chunks.length);
  return new DmgImage(file, trailer, chunks);
}

export const dmg: FormatDriver = {
  name: 'dmg',
  extensions: ['.dmg'],
  probe,
  readOnlyReason: 'DMG images are read-only here',
  open: openDmg,
};
