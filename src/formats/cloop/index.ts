/**
 * The cloop format driver, read-only: probe (the V2.0 shell-script header;
 * score 2, as in qemu: a script is weak evidence, but better than raw), open
 * (header and offsets checks in header.ts) and the block answers in image.ts.
 * No shared state.
 */
import type { FormatDriver, FormatImage, OpenOptions, ProbeSample, Protocol } from '../../block/types.js';
import { HEADER_BYTES, parseHeader, parseOffsets, SCRIPT } from './header.js';
import { CloopImage } from './image.js';

/** qemu's score for a cloop script: anything but raw beats it. */
const WEAK = 2;

async function openCloop(file: Protocol, _options: OpenOptions): Promise<FormatImage> {
  const fileSize = await file.size();
  const head = Buffer.alloc(HEADER_BYTES);
  await file.read(0, head);
  const header = parseHeader(head, fileSize, file.path);
  // parseHeader bounded the table (512 MiB, inside the file) before this allocation.
  const table = Buffer.alloc((header.blocks + 1) * 8);
  await file.read(HEADER_BYTES, table);
  return new CloopImage(file, header, parseOffsets(table, header, file.path), fileSize);
}

export const cloop: FormatDriver = {
  name: 'cloop',
  extensions: ['.cloop'],
  readOnlyReason: 'cloop images are read-only here',
  probe: ({ head }: ProbeSample) => (head.length >= SCRIPT.length && head.subarray(0, SCRIPT.length).equals(SCRIPT) ? WEAK : 0),
  open: openCloop,
};
