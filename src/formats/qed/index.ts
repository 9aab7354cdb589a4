/**
 * The QED format driver (specification: docs/formats/qed.md and the QED spec
 * in the project seeds): probe, open (with need-check repair and autoclear
 * handling), create and check. The I/O path lives in image.ts.
 */
import createDebug from 'debug';
import type { CheckOptions, CheckResult, CreateOptions, FormatDriver, FormatImage, OpenOptions, ProbeSample, Protocol } from '../../block/types.js';
import { checkQed } from './check.js';
import { createQed } from './create.js';
import { HEADER_BYTES, KNOWN_AUTOCLEAR_FEATURES, parseHeader, QED_F_BACKING_FILE, QED_F_BACKING_FORMAT_NO_PROBE, QED_F_NEED_CHECK, QED_MAGIC, type QedHeader } from './header.js';
import { QedImage } from './image.js';
import { resizeQed } from './resize.js';
import { readTable, writeHeader } from './tables.js';

const log = createDebug('imgmount:qed');

async function readHeader(file: Protocol): Promise<QedHeader> {
  const bytes = Buffer.alloc(HEADER_BYTES);
  await file.read(0, bytes);
  return parseHeader(bytes, await file.size(), file.path);
}

async function openQed(file: Protocol, options: OpenOptions): Promise<FormatImage> {
  const notice = options.notice ?? ((line: string) => log(line));
  let header = await readHeader(file);
  if (!file.readOnly && header.autoclearFeatures & ~KNOWN_AUTOCLEAR_FEATURES) {
    notice(`${file.path}: clearing unknown QED autoclear_features bits 0x${header.autoclearFeatures.toString(16)}`);
    header = { ...header, autoclearFeatures: header.autoclearFeatures & KNOWN_AUTOCLEAR_FEATURES };
    await writeHeader(file, header);
    await file.flush();
  }
  if (!file.readOnly && header.features & QED_F_NEED_CHECK) {
    const result = await checkQed(file, header, { repair: true });
    const left = result.corruptions - result.corruptionsFixed;
    notice(
      `${file.path}: was not closed cleanly (need-check set); repaired ${result.corruptionsFixed} corruption(s),` +
        ` ${result.leaksFixed} of ${result.leaks} leaked cluster(s) reclaimed${left > 0 ? `; ${left} corruption(s) remain` : ''}`,
    );
    await file.flush();
    header = await readHeader(file);
  }
  let backing: { filename: string; format?: string } | undefined;
  if (header.features & QED_F_BACKING_FILE) {
    const name = Buffer.alloc(header.backingFilenameSize);
    await file.read(header.backingFilenameOffset, name);
    backing = { filename: name.toString('utf8') };
    if (header.features & QED_F_BACKING_FORMAT_NO_PROBE) backing.format = 'raw';
  }
  const geometryTableBytes = header.tableSize * header.clusterSize;
  const l1 = await readTable(file, header.l1TableOffset, geometryTableBytes);
  const fileSize = await file.size();
  return new QedImage(file, header, l1, fileSize, backing, options);
}

async function check(file: Protocol, options: CheckOptions): Promise<CheckResult> {
  return checkQed(file, await readHeader(file), options);
}

export const qed: FormatDriver = {
  name: 'qed',
  extensions: ['.qed'],
  probe(sample: ProbeSample): number {
    return sample.head.subarray(0, 4).equals(QED_MAGIC) ? 100 : 0;
  },
  open: openQed,
  create: (path: string, options: CreateOptions) => createQed(path, options),
  check,
  resize: resizeQed,
};
