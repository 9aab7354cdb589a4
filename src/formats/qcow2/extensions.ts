/**
 * qcow2 header extensions: the records after the header, inside the first
 * cluster (type u32, length u32, data padded to 8 bytes, ending with type 0).
 * Known ones are decoded; unknown ones are skipped, as the specification
 * allows. A record that runs past the first cluster is refused.
 */
import { CorruptImageError } from '../../block/errors.js';
import { bitsOf, BUILTIN_FEATURE_NAMES, type Qcow2Header } from './header.js';

export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_NAMES = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export interface FeatureName {
  type: 'incompatible' | 'compatible' | 'autoclear';
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  count: number;
  directorySize: number;
  directoryOffset: number;
}

export interface Qcow2Extensions {
  backingFormat?: string;
  dataFile?: string;
  featureNames: FeatureName[];
  bitmaps?: BitmapsExtension;
  hasCrypto: boolean;
}

const FEATURE_TYPES = ['incompatible', 'compatible', 'autoclear'] as const;

/** Parses the extensions in `firstCluster` (the whole first cluster of the file). */
export function parseExtensions(firstCluster: Buffer, header: Qcow2Header, path: string): Qcow2Extensions {
  const result: Qcow2Extensions = { featureNames: [], hasCrypto: false };
  // Extensions end where the backing file name begins, if it lies after them.
  const end = header.backingFileOffset > header.headerLength ? Math.min(header.backingFileOffset, firstCluster.length) : firstCluster.length;
  let at = header.headerLength;
  while (at + 8 <= end) {
    const type = firstCluster.readUInt32BE(at);
    const length = firstCluster.readUInt32BE(at + 4);
    if (type === EXT_END) break;
    const dataStart = at + 8;
    if (dataStart + length > end) {
      throw new CorruptImageError(`${path}: qcow2 header extension 0x${type.toString(16)} at ${at} (${length} bytes) runs past the header cluster`);
    }
    const data = firstCluster.subarray(dataStart, dataStart + length);
    switch (type) {
      case EXT_BACKING_FORMAT:
        result.backingFormat = data.toString('utf8');
        break;
      case EXT_DATA_FILE:
        result.dataFile = data.toString('utf8');
        break;
      case EXT_FEATURE_NAMES:
        for (let entry = 0; entry + 48 <= data.length; entry += 48) {
          const kind = FEATURE_TYPES[data[entry]!];
          if (!kind) continue;
          const raw = data.subarray(entry + 2, entry + 48);
          const nul = raw.indexOf(0);
          result.featureNames.push({ type: kind, bit: data[entry + 1]!, name: raw.subarray(0, nul < 0 ? raw.length : nul).toString('utf8') });
        }
        break;
      case EXT_BITMAPS:
        if (length >= 24) {
          const directorySize = data.readBigUInt64BE(8);
          const directoryOffset = data.readBigUInt64BE(16);
          result.bitmaps = {
            count: data.readUInt32BE(0),
            directorySize: Number(directorySize > BigInt(Number.MAX_SAFE_INTEGER) ? -1n : directorySize),
            directoryOffset: Number(directoryOffset > BigInt(Number.MAX_SAFE_INTEGER) ? -1n : directoryOffset),
          };
        }
        break;
      case EXT_CRYPTO:
        result.hasCrypto = true;
        break;
      default:
        break;
    }
    at = dataStart + Math.ceil(length / 8) * 8;
  }
  return result;
}

/** Names each set bit of `bits` ("bit 5 (name)"), from the image's feature name table or the known names. */
export function describeBits(bits: bigint, type: FeatureName['type'], names: readonly FeatureName[]): string {
  return bitsOf(bits)
    .map((bit) => {
      const name = names.find((entry) => entry.type === type && entry.bit === bit)?.name ?? BUILTIN_FEATURE_NAMES[type][bit];
      return name ? `bit ${bit} (${name})` : `bit ${bit}`;
    })
    .join(', ');
}
