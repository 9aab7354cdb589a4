/**
 * Formats we recognize but cannot read yet. Each is an ordinary driver whose
 * probe finds its images and whose `open` refuses by name, so such an image
 * is never mounted (or written) as raw. The names are qemu's (`-f vpc` is
 * VHD), and together they cover every format qemu-img 7.2 probes.
 *
 * Where each format is recognized (offsets in bytes; see also the tests):
 *
 *   vpc        "conectix" at 0 (dynamic/differencing VHD: a copy of the footer), or
 *              at the file size - 512 (the footer of a fixed VHD, which qemu itself
 *              probes as raw) or - 511 (Virtual PC before 2004 wrote 511-byte footers)
 *   luks       "LUKS\xba\xbe" at 0, version 1 (be16 at 6); LUKS2 is raw to qemu too
 *
 * Scores: a signature at the start of the file answers 100. One found only
 * at the end (fixed VHD) answers LIKELY, so a real format's header at the start of
 * the same file wins.
 */
import { UnsupportedFeatureError } from '../block/errors.js';
import type { FormatDriver, ProbeSample } from '../block/types.js';

/** A signature where the format keeps its header. */
const CERTAIN = 100;
/** A signature only at the end of the file, or a damaged one: a header at the start beats it. */
const LIKELY = 90;

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

/** True when the file holds `magic` at `distance` bytes before its end (inside the sampled tail). */
function hasAtEnd(sample: ProbeSample, distance: number, magic: Buffer): boolean {
  return sample.fileSize >= distance && distance <= sample.tail.length && has(sample.tail, sample.tail.length - distance, magic);
}

/** An unsigned integer at `offset`, or undefined past the end of the sample: probing never throws. */
function uint(buffer: Buffer, offset: number, size: 2 | 4, endian: 'le' | 'be'): number | undefined {
  if (offset < 0 || offset + size > buffer.length) return undefined;
  if (size === 2) return endian === 'le' ? buffer.readUInt16LE(offset) : buffer.readUInt16BE(offset);
  return endian === 'le' ? buffer.readUInt32LE(offset) : buffer.readUInt32BE(offset);
}

const VHD_COOKIE = bytes('conectix');



const LUKS_MAGIC = bytes([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);

export const vpc = recognized('vpc', ['.vhd', '.vpc', '.avhd'], (sample) => {
  if (has(sample.head, 0, VHD_COOKIE)) return CERTAIN;
  if (hasAtEnd(sample, 512, VHD_COOKIE) || hasAtEnd(sample, 511, VHD_COOKIE)) return LIKELY;
  return 0;
});


export const luks = recognized('luks', ['.luks'], ({ head }) => (has(head, 0, LUKS_MAGIC) && uint(head, 6, 2, 'be') === 1 ? CERTAIN : 0));

export const unsupportedFormats: readonly FormatDriver[] = [vpc, luks];
