/**
 * Creating a QED image: a header cluster (or more, for a long backing file
 * name) followed by an empty L1 table, with every option validated first so
 * nothing is written for a bad request.
 */
import { open } from 'node:fs/promises';
import { hostIoError, InvalidArgumentError } from '../../block/errors.js';
import { parseSize } from '../../block/size.js';
import type { CreateOptions } from '../../block/types.js';
import { rejectUnknownOptions } from '../options.js';
import {
  DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE, HEADER_BYTES, isPowerOfTwo, MAX_BACKING_NAME_BYTES, MAX_CLUSTER_SIZE,
  MAX_TABLE_SIZE, maxImageSize, MIN_CLUSTER_SIZE, MIN_TABLE_SIZE, QED_F_BACKING_FILE, QED_F_BACKING_FORMAT_NO_PROBE,
  serializeHeader, type QedHeader,
} from './header.js';

export const CREATE_OPTIONS = ['cluster_size', 'table_size'] as const;

/** Validates create options and returns the header to write. */
export function headerForCreate(options: CreateOptions): { header: QedHeader; backingName: Buffer } {
  rejectUnknownOptions('qed', options.options, CREATE_OPTIONS);
  const clusterSize = options.options?.cluster_size !== undefined ? parseSize(options.options.cluster_size, 'cluster_size') : DEFAULT_CLUSTER_SIZE;
  if (!isPowerOfTwo(clusterSize) || clusterSize < MIN_CLUSTER_SIZE || clusterSize > MAX_CLUSTER_SIZE) {
    throw new InvalidArgumentError(`cluster_size ${clusterSize} is not a power of two in [${MIN_CLUSTER_SIZE}, ${MAX_CLUSTER_SIZE}]`);
  }
  const tableText = options.options?.table_size;
  const tableSize = tableText !== undefined ? Number(tableText) : DEFAULT_TABLE_SIZE;
  if (!isPowerOfTwo(tableSize) || tableSize < MIN_TABLE_SIZE || tableSize > MAX_TABLE_SIZE) {
    throw new InvalidArgumentError(`table_size ${tableText} is not a power of two in [${MIN_TABLE_SIZE}, ${MAX_TABLE_SIZE}]`);
  }
  if (!Number.isSafeInteger(options.size) || options.size < 0) {
    throw new InvalidArgumentError(`size ${options.size} is not a whole non-negative number of bytes`);
  }
  const imageSize = Math.ceil(options.size / 512) * 512;
  const maxSize = maxImageSize({ clusterSize, tableSize });
  if (imageSize > maxSize) {
    throw new InvalidArgumentError(`size ${options.size} is larger than ${maxSize}, the most cluster_size ${clusterSize} and table_size ${tableSize} can address`);
  }
  let features = 0n;
  const backingName = Buffer.from(options.backingFile ?? '', 'utf8');
  if (options.backingFile !== undefined) {
    if (backingName.length < 1 || backingName.length > MAX_BACKING_NAME_BYTES) {
      throw new InvalidArgumentError(`backing file name is ${backingName.length} bytes; it must be 1 to ${MAX_BACKING_NAME_BYTES}`);
    }
    features |= QED_F_BACKING_FILE;
    if (options.backingFormat === 'raw') features |= QED_F_BACKING_FORMAT_NO_PROBE;
    else if (options.backingFormat !== undefined && options.backingFormat !== 'qed') {
      throw new InvalidArgumentError(`backing format '${options.backingFormat}' cannot be recorded in a QED image (QED records only raw, or probes)`);
    }
  }
  const headerSize = Math.ceil((HEADER_BYTES + backingName.length) / clusterSize);
  const header: QedHeader = {
    clusterSize,
    tableSize,
    headerSize,
    features,
    compatFeatures: 0n,
    autoclearFeatures: 0n,
    l1TableOffset: headerSize * clusterSize,
    imageSize,
    backingFilenameOffset: options.backingFile !== undefined ? HEADER_BYTES : 0,
    backingFilenameSize: backingName.length,
  };
  return { header, backingName };
}

export async function createQed(path: string, options: CreateOptions): Promise<void> {
  const { header, backingName } = headerForCreate(options);
  const first = Buffer.alloc(header.l1TableOffset);
  serializeHeader(header).copy(first, 0);
  backingName.copy(first, HEADER_BYTES);
  try {
    const handle = await open(path, 'w');
    try {
      await handle.write(first, 0, first.length, 0);
      await handle.truncate(header.l1TableOffset + header.tableSize * header.clusterSize);
      await handle.datasync();
    } finally {
      await handle.close();
    }
  } catch (error) {
    throw hostIoError('cannot create', path, error);
  }
}
