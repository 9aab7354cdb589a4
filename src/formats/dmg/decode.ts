/**
 * Decoding one compressed DMG chunk into exactly the bytes of its sectors:
 * zlib (UDZO: a zlib stream, as qemu inflates it, which must end inside the
 * chunk and give exactly the chunk's size), bzip2 (UDBZ: `seek-bzip`, a pure
 * JavaScript decoder, fed through a sink that refuses a byte past the chunk's
 * size, so a damaged stream can never allocate or run past it), ADC (UDCO:
 * adc.ts). All decode synchronously on the calling thread; no state.
 */
import { inflateSync } from 'node:zlib';
import Bunzip from 'seek-bzip';
import { decodeAdc } from './adc.js';
import type { ChunkKind } from './blkx.js';

/** Decodes `data` into exactly `length` bytes; throws a message (without the file name) when it cannot. */
export function decodeChunk(kind: Exclude<ChunkKind, 'zero' | 'raw'>, data: Buffer, length: number): Buffer {
  let decoded: Buffer;
  switch (kind) {
    case 'zlib':
      decoded = inflateZlib(data, length);
      break;
    case 'bzip2':
      decoded = bunzip(data, length);
      break;
    case 'adc':
      decoded = decodeAdc(data, length);
      break;
  }
  if (decoded.length !== length) throw new Error(`the ${kind} data decodes to ${decoded.length} bytes, not the chunk's ${length}`);
  return decoded;
}

function inflateZlib(data: Buffer, length: number): Buffer {
  try {
    // maxOutputLength: one byte more than the chunk, so an overlong stream is seen, never decoded further.
    return inflateSync(data, { maxOutputLength: length + 1 });
  } catch (error) {
    throw new Error(`zlib data does not decode (${(error as Error).message})`);
  }
}

class Overflow extends Error {}

function bunzip(data: Buffer, length: number): Buffer {
  const out = Buffer.alloc(length);
  let at = 0;
  const sink = {
    writeByte(byte: number): void {
      if (at >= length) throw new Overflow(`the bzip2 data decodes to more than the chunk's ${length} bytes`);
      out[at++] = byte;
    },
  };
  try {
    Bunzip.decode(data, sink, false);
  } catch (error) {
    if (error instanceof Overflow) throw error;
    throw new Error(`bzip2 data does not decode (${(error as Error).message})`);
  }
  return out.subarray(0, at);
}
