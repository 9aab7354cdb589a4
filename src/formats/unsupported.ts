/**
 * Formats we recognize but cannot read yet. Each is an ordinary driver whose
 * probe finds its images and whose `open` refuses by name, so such an image
 * is never mounted (or written) as raw. Every other format qemu-img 7.2
 * probes has its own driver now; what is left:
 *
 *   luks       "LUKS\xba\xbe" at 0, version 1 (be16 at 6); LUKS2 is raw to qemu too
 *
 * A signature at the start of the file answers 100.
 */
import { UnsupportedFeatureError } from '../block/errors.js';
import type { FormatDriver, ProbeSample } from '../block/types.js';

/** A signature where the format keeps its header. */
const CERTAIN = 100;
function recognized(name: string, extensions: readonly string[], probe: (sample: ProbeSample) => number): FormatDriver {
  return {
    name,
    extensions,
    probe,
    recognizedOnly: true,
    async open(file) {
      throw new UnsupportedFeatureError(`${file.path}: ${name} images are not supported yet`);
    },
  };
}

function bytes(magic: string | readonly number[]): Buffer {
  return typeof magic === 'string' ? Buffer.from(magic, 'latin1') : Buffer.from(magic);
}

/** True when `buffer` holds `magic` at `offset`. */
function has(buffer: Buffer, offset: number, magic: Buffer): boolean {
  return offset >= 0 && offset + magic.length <= buffer.length && buffer.subarray(offset, offset + magic.length).equals(magic);
}

/** An unsigned integer at `offset`, or undefined past the end of the sample: probing never throws. */
function uint(buffer: Buffer, offset: number, size: 2 | 4, endian: 'le' | 'be'): number | undefined {
  if (offset < 0 || offset + size > buffer.length) return undefined;
  if (size === 2) return endian === 'le' ? buffer.readUInt16LE(offset) : buffer.readUInt16BE(offset);
  return endian === 'le' ? buffer.readUInt32LE(offset) : buffer.readUInt32BE(offset);
}

const LUKS_MAGIC = bytes([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);

export const luks = recognized('luks', ['.luks'], ({ head }) => (has(head, 0, LUKS_MAGIC) && uint(head, 6, 2, 'be') === 1 ? CERTAIN : 0));

export const unsupportedFormats: readonly FormatDriver[] = [luks];
