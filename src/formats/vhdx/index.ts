/**
 * The VHDX format driver (MS-VHDX; docs/formats/vhdx.md): probe, read-only
 * open of dynamic, fixed and differencing images (a log that must be replayed
 * is replayed in memory, never on disk), and check. Writing is not supported:
 * a read-write open becomes read-only with a notice (readOnlyReason).
 * Parsing lives in header.ts / metadata.ts / log.ts / bat.ts (in order: open.ts),
 * the I/O path in image.ts, the parent checks in parent.ts. No state outside the opened image.
 */
import createDebug from 'debug';
import type { CheckOptions, CheckResult, FormatDriver, FormatImage, OpenOptions, ProbeSample, Protocol } from '../../block/types.js';
import { checkVhdx } from './check.js';
import { FILE_SIGNATURE } from './header.js';
import { VhdxImage } from './image.js';
import { openParts, READ_ONLY_REASON } from './open.js';
import { parentReference, verifyParent } from './parent.js';

const log = createDebug('imgmount:vhdx');

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
