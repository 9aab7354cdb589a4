/**
 * The VHDX format driver (MS-VHDX; docs/formats/vhdx.md): probe, open of
 * dynamic, fixed and differencing images (a log that must be replayed is
 * replayed in memory for a read-only open, on disk for a read-write one),
 * writing (writer.ts, image.ts: a differencing image's new blocks are
 * filled from the parent), create (create.ts) and check.
 * Parsing lives in header.ts / metadata.ts / log.ts / bat.ts (in order: open.ts),
 * the I/O path in image.ts, the parent checks in parent.ts. No state outside the opened image.
 */
import createDebug from 'debug';
import type { CheckOptions, CheckResult, FormatDriver, FormatImage, OpenOptions, ProbeSample, Protocol } from '../../block/types.js';
import { checkVhdx } from './check.js';
import { createVhdx } from './create.js';
import { FILE_SIGNATURE } from './header.js';
import { VhdxImage } from './image.js';
import { openParts } from './open.js';
import { parentReference, verifyParent } from './parent.js';
import { VhdxWriter } from './writer.js';

const log = createDebug('imgmount:vhdx');

async function openVhdx(file: Protocol, options: OpenOptions): Promise<FormatImage> {
  const notice = options.notice ?? ((line: string) => log(line));
  const { parts, view } = await openParts(file, notice);
  let backing;
  if (parts.metadata.hasParent) {
    backing = parentReference(parts.metadata.parent!, file.path);
    await verifyParent(parts.metadata.parent!, backing.filename, options.files, file.path);
  }
  let writer: VhdxWriter | undefined;
  if (!file.readOnly) {
    const why = parts.header.logLength === 0 ? 'the image has no log, through which every BAT change must go' : undefined;
    if (why) notice(`${file.path}: opened read-only: ${why}`);
    else writer = new VhdxWriter(file, parts.header, parts.fileSize);
  }
  return new VhdxImage(file, view, parts, backing, options, writer);
}

export const vhdx: FormatDriver = {
  name: 'vhdx',
  extensions: ['.vhdx', '.avhdx'],
  probe(sample: ProbeSample): number {
    return sample.head.subarray(0, 8).equals(FILE_SIGNATURE) ? 100 : 0;
  },
  open: openVhdx,
  create: createVhdx,
  check: (file: Protocol, options: CheckOptions): Promise<CheckResult> => checkVhdx(file, options),
};
