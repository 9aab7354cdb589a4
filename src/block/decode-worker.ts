/**
 * A decode worker thread (decode-pool.ts starts it): decodes each request with
 * the same decoders the main thread uses and answers with the bytes
 * (transferred) or the decoder's message. One request at a time, in order.
 */
import { parentPort } from 'node:worker_threads';
import { decodeHere } from './codecs.js';
import type { DecodeAnswer, DecodeRequest } from './decode-pool.js';

const port = parentPort;
if (!port) throw new Error('decode-worker.js runs as a worker thread');

port.on('message', (request: DecodeRequest) => {
  const data = Buffer.from(request.data.buffer, request.data.byteOffset, request.data.byteLength);
  decodeHere(request.codec, data, request.size).then(
    (decoded) => {
      // Send a buffer of its own: transferring a view's ArrayBuffer would carry (and detach) all of it, a pool's too.
      const own = decoded.byteOffset === 0 && decoded.buffer.byteLength === decoded.byteLength ? decoded : new Uint8Array(decoded);
      const answer: DecodeAnswer = { id: request.id, decoded: own };
      port.postMessage(answer, [own.buffer as ArrayBuffer]);
    },
    (error: unknown) => {
      const answer: DecodeAnswer = { id: request.id, error: (error as Error).message };
      port.postMessage(answer);
    },
  );
});
