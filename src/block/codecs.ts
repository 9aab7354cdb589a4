/**
 * Decoders for compressed clusters: raw deflate (qcow2's zlib compression
 * type) and zstd. The stored bytes run to a sector boundary and may be
 * followed by the start of the next compressed cluster, so both decoders stop
 * at the end of their stream: deflate by itself, zstd after the first frame,
 * whose length is found by walking its block headers.
 *
 * Both decode synchronously on the calling thread. A read that covers several
 * compressed clusters, or clusters decoded ahead of a sequential reader, may
 * be sent to decode worker threads (decode-pool.ts), which run these same
 * decoders (decode-worker.ts).
 *
 * For deflate, decoding on the main thread was measured against zlib's
 * asynchronous inflate (thread pool) through a mount, fio 4 KiB random
 * O_DIRECT reads of a deflate qcow2: 2.6k -> 4.5k IOPS at 1 job, 4.9-5.1k ->
 * 5.7-5.9k at 4 jobs, 128 KiB sequential 190-208 -> 256-265 MB/s: the
 * thread-pool hop cost more than the ~100 us the decode blocks.
 *
 * zstd uses `zstddec` (zstd compiled to WebAssembly; Node 20's zlib has no
 * zstd): it installs on a fresh machine with no native build and no download,
 * and decodes at a few hundred MiB/s. The module is imported, and its
 * WebAssembly instance made, once per thread, on the first zstd decode (so
 * opening an image, or any command, does not pay for it).
 */
import { inflateRawSync, constants as zlibConstants } from 'node:zlib';
import type { ZSTDDecoder } from 'zstddec';
import { decodeOnWorker } from './decode-pool.js';

/** The codecs: deflate (raw, no zlib header) and zstd. */
export type Codec = 'deflate' | 'zstd';

/**
 * Decodes `data` into exactly `clusterSize` bytes; throws a message (without the file name) when it cannot.
 * `parallel`: on a decode worker thread (src/block/decode-pool.ts), beside the others of the same read.
 */
export async function decompressCluster(codec: Codec, data: Buffer, clusterSize: number, parallel = false): Promise<Buffer> {
  const here = (): Promise<Buffer> => decodeHere(codec, data, clusterSize);
  const decoded = await (parallel ? decodeOnWorker(codec, data, clusterSize, here) : here());
  // A stream that ends early (damaged data or sector count) must not hand a short cluster to a writer that copies from it.
  if (decoded.length !== clusterSize) throw new Error(`the data decodes to ${decoded.length} bytes, not the cluster size ${clusterSize}`);
  return decoded;
}

/** Decodes on the calling thread (the main thread, or a decode worker). */
export function decodeHere(codec: Codec, data: Buffer, clusterSize: number): Promise<Buffer> {
  return codec === 'zstd' ? decodeZstd(data, clusterSize) : decodeDeflate(data, clusterSize);
}

function decodeDeflate(data: Buffer, clusterSize: number): Promise<Buffer> {
  try {
    return Promise.resolve(inflateRawSync(data, { finishFlush: zlibConstants.Z_SYNC_FLUSH, maxOutputLength: clusterSize }));
  } catch (error) {
    return Promise.reject(new Error(`deflate data does not decode (${(error as Error).message})`));
  }
}

let zstd: Promise<ZSTDDecoder> | undefined;

async function decodeZstd(data: Buffer, clusterSize: number): Promise<Buffer> {
  zstd ??= (async () => {
    const { ZSTDDecoder } = await import('zstddec');
    const decoder = new ZSTDDecoder();
    await decoder.init();
    return decoder;
  })();
  const decoder = await zstd;
  const frame = data.subarray(0, zstdFrameLength(data));
  let out: Uint8Array;
  try {
    out = decoder.decode(frame, clusterSize);
  } catch (error) {
    throw new Error(`zstd data does not decode (${(error as Error).message})`);
  }
  return Buffer.from(out.buffer, out.byteOffset, out.byteLength);
}

const ZSTD_MAGIC = 0xfd2fb528;

/** Length of the zstd frame at the start of `data` (RFC 8878 section 3.1.1), walking its block headers. */
export function zstdFrameLength(data: Buffer): number {
  if (data.length < 6 || data.readUInt32LE(0) !== ZSTD_MAGIC) throw new Error('zstd data does not start with a zstd frame');
  const descriptor = data[4]!;
  const sizeFlag = descriptor >> 6;
  const singleSegment = (descriptor >> 5) & 1;
  const checksum = (descriptor >> 2) & 1;
  const dictionaryFlag = descriptor & 3;
  let at = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][dictionaryFlag]! + [singleSegment, 2, 4, 8][sizeFlag]!;
  for (;;) {
    if (at + 3 > data.length) throw new Error('zstd frame runs past the compressed cluster');
    const blockHeader = data[at]! | (data[at + 1]! << 8) | (data[at + 2]! << 16);
    const last = blockHeader & 1;
    const type = (blockHeader >> 1) & 3;
    const size = blockHeader >>> 3;
    if (type === 3) throw new Error('zstd frame has a reserved block type');
    at += 3 + (type === 1 ? 1 : size);
    if (last) break;
  }
  at += checksum ? 4 : 0;
  if (at > data.length) throw new Error('zstd frame runs past the compressed cluster');
  return at;
}
