/**
 * The VHD ("vpc", qemu's name) format driver: fixed, dynamic and
 * differencing disks (docs/formats/vpc.md). Probe here, opening in open.ts,
 * the I/O path in image.ts, creating in create.ts. Differencing disks name
 * their parent (a VHD) through the generic backing chain; `create -b` makes one.
 *
 * Concurrency: the probe is pure; see image.ts for the opened image.
 */
import type { FormatDriver, ProbeSample } from '../../block/types.js';
import { createVpc } from './create.js';
import { FOOTER_BYTES, FOOTER_COOKIE } from './footer.js';
import { OPEN_OPTIONS, openVpc } from './open.js';

/** The cookie at offset 0: the footer copy of a dynamic or differencing disk. */
const AT_START = 100;
/** A footer only at the end (a fixed disk, which qemu itself probes as raw): a header at the start of the file beats it. */
const AT_END = 90;

/** True when the file holds the cookie `distance` bytes before its end (inside the sampled tail). */
function cookieAtEnd(sample: ProbeSample, distance: number): boolean {
  const at = sample.tail.length - distance;
  return sample.fileSize >= distance && at >= 0 && sample.tail.subarray(at, at + FOOTER_COOKIE.length).equals(FOOTER_COOKIE);
}

export const vpc: FormatDriver = {
  name: 'vpc',
  extensions: ['.vhd', '.vpc', '.avhd'],
  probe(sample: ProbeSample): number {
    if (sample.head.subarray(0, FOOTER_COOKIE.length).equals(FOOTER_COOKIE)) return AT_START;
    // 511: Virtual PC before 2004 wrote 511-byte footers (recognized, refused by name on open).
    if (cookieAtEnd(sample, FOOTER_BYTES) || cookieAtEnd(sample, FOOTER_BYTES - 1)) return AT_END;
    return 0;
  },
  openOptions: OPEN_OPTIONS,
  open: openVpc,
  create: createVpc,
};
