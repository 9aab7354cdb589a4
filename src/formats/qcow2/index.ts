/**
 * The qcow2 format driver (specification: docs/interop/qcow2.txt in qemu;
 * what is supported here: docs/formats/qcow2.md): probe and open. Open reads and validates the header, its extensions, the
 * L1 table (the active one or a snapshot's), the refcount table (to know
 * where metadata lives) and the snapshot table, and opens an external data
 * file through the gate (read-write only when the image will be written,
 * after data-file.ts checked its mapping). Reading lives in image.ts; a read-write open of an
 * image it can write returns writable.ts's image, any other gets a notice and
 * a read-only one.
 */
import { resolve } from 'node:path';
import createDebug from 'debug';
import { resolveBackingName } from '../../block/backing-name.js';
import { CorruptImageError, UnsupportedFeatureError } from '../../block/errors.js';
import type { FormatDriver, FormatImage, OpenOptions, ProbeSample, Protocol } from '../../block/types.js';
import { describeBits, parseExtensions } from './extensions.js';
import { Geometry } from './geometry.js';
import {
  AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, KNOWN_INCOMPAT, parseHeader, QCOW_MAGIC, type Qcow2Header,
} from './header.js';
import { Qcow2Image } from './image.js';
import { WritableQcow2Image } from './writable.js';
import { MetadataClusters, readWords } from './metadata.js';
import { findSnapshot, readSnapshots } from './snapshots.js';
import { dataFileMappingRefusal } from './data-file.js';
import { readBitmaps } from './bitmaps.js';
import { checkQcow2, rebuildRefcounts } from './check.js';
import { createQcow2 } from './create.js';
import { resizeQcow2 } from './resize.js';

const log = createDebug('imgmount:qcow2');

/** Bytes read first: enough for every fixed header field. */
const HEADER_PROBE_BYTES = 4096;

async function openQcow2(file: Protocol, options: OpenOptions, repaired = false): Promise<FormatImage> {
  const notice = options.notice ?? ((line: string) => log(line));
  const fileSize = await file.size();
  const start = Buffer.alloc(HEADER_PROBE_BYTES);
  await file.read(0, start);
  const header = parseHeader(start, fileSize, file.path);
  const firstCluster = Buffer.alloc(header.clusterSize);
  await file.read(0, firstCluster);
  const extensions = parseExtensions(firstCluster, header, file.path);
  refuseUnsupported(header, extensions.featureNames, extensions.hasCrypto, file.path);
  if (header.incompatibleFeatures & INCOMPAT_CORRUPT) {
    notice(`${file.path}: the qcow2 image is marked corrupt; it is opened read-only (run qemu-img check -r to repair it)`);
  }
  if (!repaired && (header.incompatibleFeatures & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)) === INCOMPAT_DIRTY && !options.readOnly && options.snapshot === undefined) {
    // As qemu does at a read-write open: refcounts may lag behind (lazy refcounts), so rebuild them first.
    const { result } = await rebuildRefcounts(file);
    notice(
      `${file.path}: was not closed cleanly (dirty bit set, lazy refcounts); refcounts checked and repaired ` +
        `(${result.leaksFixed} leaked cluster(s), ${result.corruptionsFixed} corruption(s) fixed${result.corruptions > result.corruptionsFixed ? `, ${result.corruptions - result.corruptionsFixed} left` : ''})`,
    );
    return openQcow2(file, options, true);
  }
  const geometry = new Geometry(header);
  const needed = geometry.l1EntriesFor(header.size);
  if (header.l1Size < needed) {
    throw new CorruptImageError(`${file.path}: qcow2 l1_size ${header.l1Size} is too small for the virtual size ${header.size} (it needs ${needed} entries)`);
  }

  const metadata = new MetadataClusters(header.clusterBits);
  metadata.addRange(0, header.clusterSize);
  metadata.addRange(header.l1TableOffset, header.l1Size * 8);
  const refcountTable = await readWords(file, header.refcountTableOffset, (header.refcountTableClusters * header.clusterSize) / 8);
  metadata.addRange(header.refcountTableOffset, refcountTable.length);
  metadata.addTablesListedIn(refcountTable, refcountTable.length / 8, header.clusterSize);
  const snapshots = header.nbSnapshots > 0 ? await readSnapshots(file, header, fileSize) : [];
  for (const snapshot of snapshots) metadata.addRange(snapshot.l1TableOffset, snapshot.l1Size * 8);

  let l1Offset = header.l1TableOffset;
  let l1Entries = header.l1Size;
  let virtualSize = header.size;
  if (options.snapshot !== undefined) {
    const snapshot = findSnapshot(snapshots, options.snapshot, file.path);
    l1Offset = snapshot.l1TableOffset;
    l1Entries = snapshot.l1Size;
    virtualSize = snapshot.diskSize ?? header.size;
    const snapshotNeeds = geometry.l1EntriesFor(virtualSize);
    if (l1Entries < snapshotNeeds) {
      throw new CorruptImageError(`${file.path}: snapshot ${snapshot.id} has ${l1Entries} L1 entries, too few for its size ${virtualSize} (it needs ${snapshotNeeds})`);
    }
    log('%s: opening snapshot %s (%s)', file.path, snapshot.id, snapshot.name);
  }
  const l1 = await readWords(file, l1Offset, l1Entries);
  metadata.addTablesListedIn(l1, l1Entries, header.clusterSize);
  if (l1Offset !== header.l1TableOffset) {
    metadata.addTablesListedIn(await readWords(file, header.l1TableOffset, header.l1Size), header.l1Size, header.clusterSize);
  }

  let backing: { filename: string; format?: string } | undefined;
  if (header.backingFileOffset !== 0) {
    const name = firstCluster.subarray(header.backingFileOffset, header.backingFileOffset + header.backingFileSize).toString('utf8');
    backing = { filename: name };
    if (extensions.backingFormat !== undefined) backing.format = extensions.backingFormat;
  }

  let dataFile: Protocol | undefined;
  let dataFileRefusal: string | undefined;
  if (header.incompatibleFeatures & INCOMPAT_DATA_FILE) {
    if (extensions.dataFile === undefined) {
      throw new UnsupportedFeatureError(`${file.path}: the qcow2 image keeps its data in an external data file but does not name it`);
    }
    // Written at guest offsets, it would overwrite the image's own metadata (a read-write open fails on the lock anyway).
    if (resolve(resolveBackingName(file.path, extensions.dataFile, 'external data file')) === resolve(file.path)) {
      throw new CorruptImageError(`${file.path}: the qcow2 image names itself as its external data file (${extensions.dataFile})`);
    }
    // Read-write only when this image will be written (the gate opens it read-only below the top image).
    const wanted = !options.readOnly && options.snapshot === undefined && writeRefusal(header, geometry) === undefined;
    if (wanted) dataFileRefusal = await dataFileMappingRefusal(file, geometry, l1, l1Entries, fileSize);
    dataFile = await options.files.open(extensions.dataFile, 'external data file', { readOnly: !wanted || dataFileRefusal !== undefined });
    if (wanted && dataFileRefusal === undefined && dataFile.readOnly) dataFileRefusal = `its external data file ${dataFile.path} opens read-only`;
  } else if (extensions.dataFile !== undefined) {
    throw new CorruptImageError(`${file.path}: qcow2 names an external data file (${extensions.dataFile}) without the external data file feature bit`);
  }

  // The bitmap directory is consistent with the image only while the autoclear bit is set.
  const bitmaps = extensions.bitmaps && header.autoclearFeatures & AUTOCLEAR_BITMAPS ? await readBitmaps(file, extensions.bitmaps, fileSize) : undefined;

  const parts = {
    file, header, extensions, geometry, l1, l1Entries, virtualSize, fileSize, dataFile, metadata, backing, snapshots, bitmaps,
    metadataCacheBytes: options.metadataCacheBytes,
    notice: options.notice,
  };
  if (options.readOnly || options.snapshot !== undefined) return new Qcow2Image(parts);
  const refusal = writeRefusal(header, geometry) ?? dataFileRefusal;
  if (refusal !== undefined) {
    notice(`${file.path}: opened read-only: ${refusal}`);
    return new Qcow2Image(parts);
  }
  return WritableQcow2Image.open(parts, options);
}

/** Why this image cannot be written here, when it cannot (the corrupt bit has its own notice above). */
function writeRefusal(header: Qcow2Header, geometry: Geometry): string | undefined {
  if (header.incompatibleFeatures & INCOMPAT_CORRUPT) return 'it is marked corrupt';
  if (header.incompatibleFeatures & INCOMPAT_DIRTY) {
    return 'it was not closed cleanly (dirty bit set) and its repair left problems; see imgmount check';
  }
  // qemu refuses to create snapshots there: their shared clusters could not be copied on write (host offset = guest offset).
  if (geometry.hasDataFile && header.nbSnapshots > 0) return 'it has internal snapshots and an external data file, which qemu never writes together';
  return undefined;
}

/** Encryption and unknown incompatible features are refused by name. */
function refuseUnsupported(header: Qcow2Header, names: Parameters<typeof describeBits>[2], hasCrypto: boolean, path: string): void {
  if (header.cryptMethod !== 0 || hasCrypto) {
    const method = header.cryptMethod === 1 ? 'AES' : header.cryptMethod === 2 ? 'LUKS' : `method ${header.cryptMethod}`;
    throw new UnsupportedFeatureError(`${path}: encrypted qcow2 images (${method}) are not supported`);
  }
  const unknown = header.incompatibleFeatures & ~KNOWN_INCOMPAT;
  if (unknown !== 0n) {
    throw new UnsupportedFeatureError(`${path}: the qcow2 image uses unknown incompatible features: ${describeBits(unknown, 'incompatible', names)}`);
  }
}

export const qcow2: FormatDriver = {
  name: 'qcow2',
  extensions: ['.qcow2', '.qcow2c'],
  snapshots: true,
  probe(sample: ProbeSample): number {
    if (!sample.head.subarray(0, 4).equals(QCOW_MAGIC)) return 0;
    // Version 1 is the older qcow format; any other version is ours to accept or refuse by number.
    return sample.head.readUInt32BE(4) === 1 ? 0 : 100;
  },
  open: openQcow2,
  check: checkQcow2,
  create: createQcow2,
  resize: resizeQcow2,
};
