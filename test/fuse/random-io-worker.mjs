// A process doing random 4 KiB O_DIRECT I/O on a mounted file for a while, as
// a stress client for the FUSE tests (fio is not installed everywhere).
//
//   node random-io-worker.mjs read  FILE REFERENCE SECONDS SEED BLOCKS
//   node random-io-worker.mjs write FILE REFERENCE SECONDS SEED BLOCKS
//
// Blocks are 4 KiB. The writer writes seeded bytes to even blocks only and
// applies each write that succeeded to REFERENCE too, so REFERENCE ends equal
// to what the mounted file should hold. Readers read any block and compare odd
// blocks (never written) with REFERENCE. Prints one JSON line:
// { ops, errors: [first few error messages], errorCount, mismatches }.
// Synchronous calls on purpose: one request in flight per process.
import { closeSync, constants, openSync, readSync, writeSync } from 'node:fs';

const [mode, file, reference, seconds, seedText, blocksText] = process.argv.slice(2);
const BLOCK = 4096;
const blocks = Number(blocksText);
let state = Number(seedText) >>> 0;
const next = () => {
  state = (state + 0x6d2b79f5) >>> 0;
  let t = state;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};

const fd = openSync(file, (mode === 'write' ? constants.O_RDWR : constants.O_RDONLY) | constants.O_DIRECT);
const ref = openSync(reference, mode === 'write' ? constants.O_RDWR : constants.O_RDONLY);
const buffer = Buffer.alloc(BLOCK);
const expected = Buffer.alloc(BLOCK);
const errors = [];
let errorCount = 0;
let mismatches = 0;
let ops = 0;
const until = Date.now() + Number(seconds) * 1000;
while (Date.now() < until) {
  let block = Math.floor(next() * blocks);
  try {
    if (mode === 'write') {
      block -= block % 2;
      for (let i = 0; i < BLOCK; i += 4) buffer.writeUInt32LE(Math.floor(next() * 4294967296), i);
      if (writeSync(fd, buffer, 0, BLOCK, block * BLOCK) !== BLOCK) throw new Error(`short write at block ${block}`);
      writeSync(ref, buffer, 0, BLOCK, block * BLOCK);
    } else {
      if (readSync(fd, buffer, 0, BLOCK, block * BLOCK) !== BLOCK) throw new Error(`short read at block ${block}`);
      if (block % 2 === 1) {
        readSync(ref, expected, 0, BLOCK, block * BLOCK);
        if (!buffer.equals(expected)) mismatches += 1;
      }
    }
    ops += 1;
  } catch (error) {
    errorCount += 1;
    if (errors.length < 5) errors.push(`${mode} of block ${block}: ${error.message}`);
  }
}
closeSync(fd);
closeSync(ref);
process.stdout.write(`${JSON.stringify({ ops, errors, errorCount, mismatches })}\n`);
