/**
 * Apple Data Compression (ADC), the LZ77 variant of DMG chunk type UDCO,
 * decoded from its description (written here, no library decodes it). Pure
 * function; no state.
 *
 * The stream is a sequence of phrases, by the first byte b:
 *   b >= 0x80         literal: the next (b & 0x7f) + 1 bytes are copied as they are
 *   0x40 <= b < 0x80  long copy: length (b & 0x3f) + 4, distance: the next two bytes (big-endian) + 1
 *   b < 0x40          short copy: length ((b >> 2) & 0x0f) + 3, distance: ((b & 3) << 8 | next byte) + 1
 * A copy repeats the bytes `distance` back in the output, byte by byte (so it
 * may overlap what it writes). Decoding stops when `outputLength` bytes are
 * out; bytes left after that are ignored, as dmg2img does.
 */

/** Decodes `input` into exactly `outputLength` bytes; throws a message (without the file name) when it cannot. */
export function decodeAdc(input: Buffer, outputLength: number): Buffer {
  const out = Buffer.alloc(outputLength);
  let inPos = 0;
  let outPos = 0;
  while (outPos < outputLength) {
    if (inPos >= input.length) throw new Error(`ADC data ends after ${outPos} of ${outputLength} bytes`);
    const b = input[inPos]!;
    if (b & 0x80) {
      const length = (b & 0x7f) + 1;
      if (inPos + 1 + length > input.length) throw new Error(`ADC literal of ${length} bytes at input offset ${inPos} runs past the end of the data`);
      if (outPos + length > outputLength) throw new Error(`ADC literal at input offset ${inPos} runs past the ${outputLength} decoded bytes`);
      input.copy(out, outPos, inPos + 1, inPos + 1 + length);
      inPos += 1 + length;
      outPos += length;
      continue;
    }
    let length: number;
    let distance: number;
    if (b & 0x40) {
      if (inPos + 3 > input.length) throw new Error(`ADC copy at input offset ${inPos} runs past the end of the data`);
      length = (b & 0x3f) + 4;
      distance = input.readUInt16BE(inPos + 1) + 1;
      inPos += 3;
    } else {
      if (inPos + 2 > input.length) throw new Error(`ADC copy at input offset ${inPos} runs past the end of the data`);
      length = ((b >> 2) & 0x0f) + 3;
      distance = (((b & 0x03) << 8) | input[inPos + 1]!) + 1;
      inPos += 2;
    }
    if (distance > outPos) throw new Error(`ADC copy at output offset ${outPos} reaches ${distance} bytes back, before the start of the chunk`);
    if (outPos + length > outputLength) throw new Error(`ADC copy at output offset ${outPos} runs past the ${outputLength} decoded bytes`);
    for (let i = 0; i < length; i++, outPos++) out[outPos] = out[outPos - distance]!;
  }
  return out;
}
