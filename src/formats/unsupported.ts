/**
 * Formats we recognize but cannot read yet. Each is an ordinary driver whose
 * probe finds its images and whose `open` refuses by name, so such an image
 * is never mounted (or written) as raw. The names are qemu's, and with the
 * real drivers (src/formats/index.ts) they cover every format qemu-img 7.2 probes.
 *
 * Where each format is recognized (offsets in bytes; see also the tests):
 *
 *   vmdk       "KDMV" (sparse / streamOptimized) or "COWD" (ESX, vmdk3) at 0; or a
 *              text descriptor (monolithicFlat, twoGbMax...): it starts with
 *              "# Disk DescriptorFile", or, as qemu reads it, its first line that is
 *              not a comment (#) or blank is "version=1|2|3"
 *   vhdx       "vhdxfile" at 0
 *   vdi        0xbeda107f little-endian at 0x40; or the "<<< ... Disk Image >>>\n"
 *              banner at 0 with a damaged signature
 *   parallels  "WithoutFreeSpace" or "WithouFreSpacExt" at 0, version 2 (le32 at 16)
 *   bochs      "Bochs Virtual HD Image" at 0, type "Redolog" at 32, subtype
 *              "Growing" at 48 (each NUL-terminated), version 0x20000 or 0x10000 (le32 at 64)
 *   cloop      the shell-script header that starts every cloop V2.0 file
 *   dmg        "koly" at the file size - 512 (the UDIF trailer)
 *   luks       "LUKS\xba\xbe" at 0, version 1 (be16 at 6); LUKS2 is raw to qemu too
 *   qcow       "QFI\xfb" at 0, version 1 (be32 at 4); versions 2 and 3 are qcow2's
 *
 * Scores: a signature at the start of the file answers 100. One found only
 * at the end (DMG) or a damaged VDI banner answers LIKELY, so a
 * real format's header at the start of the same file wins. cloop answers
 * 2, as in qemu: a shell-script header is weak evidence, but better than raw.
 */
import { UnsupportedFeatureError } from '../block/errors.js';
import type { FormatDriver, ProbeSample } from '../block/types.js';

/** A signature where the format keeps its header. */
const CERTAIN = 100;
/** A signature only at the end of the file, or a damaged one: a header at the start beats it. */
const LIKELY = 90;
/** Weak evidence (qemu's score for cloop): anything but raw beats it. */
const WEAK = 2;

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

/** `text` and its NUL: how qemu's strcmp on a fixed-size field matches a string. */
function cString(text: string): Buffer {
  return Buffer.concat([bytes(text), Buffer.alloc(1)]);
}

const VMDK4_MAGIC = bytes('KDMV');
const VMDK3_MAGIC = bytes('COWD');
const VMDK_DESCRIPTOR_BANNER = '# Disk DescriptorFile';

/**
 * qemu's test for a VMDK text descriptor: skipping comment lines and blank
 * lines, the first line is "version=N" (N 1..3), LF or CRLF. qemu accepts
 * only blank lines made of spaces; empty lines and tabs are accepted here too.
 */
function isVmdkDescriptor(head: Buffer): boolean {
  const text = head.toString('latin1');
  if (text.startsWith(VMDK_DESCRIPTOR_BANNER)) return true;
  let start = 0;
  while (start < text.length) {
    const newline = text.indexOf('\n', start);
    if (newline === -1) return false; // a line the sample cuts off (or the zeros past a short file)
    const line = text.slice(start, newline);
    if (line.startsWith('#') || /^[ \t]*\r?$/.test(line)) {
      start = newline + 1;
      continue;
    }
    return /^version=[123]\r?$/.test(line);
  }
  return false;
}

const VDI_SIGNATURE = 0xbeda107f;
const VDI_SIGNATURE_OFFSET = 0x40;

const PARALLELS_MAGICS = [bytes('WithoutFreeSpace'), bytes('WithouFreSpacExt')];
const PARALLELS_VERSION = 2;

const VHDX_MAGIC = bytes('vhdxfile');

const BOCHS_MAGIC = cString('Bochs Virtual HD Image');
const BOCHS_TYPE = cString('Redolog');
const BOCHS_SUBTYPE = cString('Growing');
const BOCHS_VERSIONS = [0x00020000, 0x00010000];

const CLOOP_HEADER = bytes('#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n');

const DMG_KOLY = bytes('koly');
/** The UDIF trailer is the last 512 bytes of a DMG. */
const DMG_TRAILER_BYTES = 512;

const LUKS_MAGIC = bytes([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
const QCOW_MAGIC = bytes([0x51, 0x46, 0x49, 0xfb]);

export const vmdk = recognized('vmdk', ['.vmdk'], ({ head }) =>
  has(head, 0, VMDK4_MAGIC) || has(head, 0, VMDK3_MAGIC) || isVmdkDescriptor(head) ? CERTAIN : 0,
);

export const vhdx = recognized('vhdx', ['.vhdx', '.avhdx'], ({ head }) => (has(head, 0, VHDX_MAGIC) ? CERTAIN : 0));

export const vdi = recognized('vdi', ['.vdi'], ({ head }) => {
  if (uint(head, VDI_SIGNATURE_OFFSET, 4, 'le') === VDI_SIGNATURE) return CERTAIN;
  const banner = head.subarray(0, VDI_SIGNATURE_OFFSET).toString('latin1');
  return banner.startsWith('<<< ') && banner.includes(' Disk Image >>>\n') ? LIKELY : 0;
});

export const parallels = recognized('parallels', ['.hdd', '.hds'], ({ head }) =>
  PARALLELS_MAGICS.some((magic) => has(head, 0, magic)) && uint(head, 16, 4, 'le') === PARALLELS_VERSION ? CERTAIN : 0,
);

/** Bochs: only "Growing" redolog images are images qemu reads (as bximage makes them). */
export const bochs = recognized('bochs', [], ({ head }) =>
  has(head, 0, BOCHS_MAGIC) &&
  has(head, 32, BOCHS_TYPE) &&
  has(head, 48, BOCHS_SUBTYPE) &&
  BOCHS_VERSIONS.includes(uint(head, 64, 4, 'le') ?? -1)
    ? CERTAIN
    : 0,
);

export const cloop = recognized('cloop', ['.cloop'], ({ head }) => (has(head, 0, CLOOP_HEADER) ? WEAK : 0));

export const dmg = recognized('dmg', ['.dmg'], (sample) => (hasAtEnd(sample, DMG_TRAILER_BYTES, DMG_KOLY) ? LIKELY : 0));

export const luks = recognized('luks', ['.luks'], ({ head }) => (has(head, 0, LUKS_MAGIC) && uint(head, 6, 2, 'be') === 1 ? CERTAIN : 0));

export const qcow = recognized('qcow', ['.qcow'], ({ head }) => (has(head, 0, QCOW_MAGIC) && uint(head, 4, 4, 'be') === 1 ? CERTAIN : 0));

export const unsupportedFormats: readonly FormatDriver[] = [vmdk, vhdx, vdi, parallels, bochs, cloop, dmg, luks, qcow];
