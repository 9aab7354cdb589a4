/**
 * The Bochs format driver, read-only: probe (a growing redolog header of
 * version 1 or 2, as qemu probes it), open (header checks in header.ts, the
 * catalog read whole) and the extent answers in image.ts. No shared state.
 */
import type { FormatDriver, FormatImage, OpenOptions, ProbeSample, Protocol } from '../../block/types.js';
import { HEADER_BYTES, looksLikeBochs, parseHeader } from './header.js';
import { BochsImage } from './image.js';

async function openBochs(file: Protocol, _options: OpenOptions): Promise<FormatImage> {
  const fileSize = await file.size();
  const head = Buffer.alloc(HEADER_BYTES);
  await file.read(0, head);
  const header = parseHeader(head, fileSize, file.path);
  // parseHeader bounded the catalog (2^20 entries, inside the file) before this allocation.
  const catalog = Buffer.alloc(4 * header.catalogEntries);
  await file.read(header.catalogOffset, catalog);
  return new BochsImage(file, header, catalog, fileSize);
}

export const bochs: FormatDriver = {
  name: 'bochs',
  extensions: [],
  readOnlyReason: 'bochs images are read-only here',
  probe: (sample: ProbeSample) => (looksLikeBochs(sample.head) ? 100 : 0),
  open: openBochs,
};
