#!/usr/bin/env node
/**
 * The power-loss workload: one run of seeded random writes through imgmount
 * with the log-writes filter on the image file, for the replay (replay.mjs)
 * to rebuild crash states from.
 *
 *   node scripts/power-loss/workload.mjs DIR FORMAT VARIANT SEED BATCHES
 *
 * In DIR it makes: backing.FMT (when the variant has a backing file),
 * image.FMT (what was written), initial.img (image.FMT before the run, the
 * state the log starts from), guest-0.raw (the disk's bytes before the run),
 * writes.log (the filter's log) and workload.json (the variant, and each
 * batch's writes as offset, length and data seed).
 *
 * Each batch issues 1-6 writes (or zeroes) at once, never overlapping each
 * other, 512 B - 256 KiB, page-, sector- or byte-aligned, some over earlier
 * ones, some allocating; then flushes. Marks in the log: "batch N" before
 * batch N is issued, "ack N" once its flush was answered (from then on every
 * crash state must hold batches 1..N). A variant with `close: false` ends with
 * a batch that is never flushed and exits with it possibly still in flight,
 * without closing: the image stays marked need-check / dirty.
 */
import { execFile } from 'node:child_process';
import { copyFile, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { Random, VARIANTS, VIRTUAL_SIZE, opData, seededData } from './common.mjs';

const [dir, format, variantName, seedText, batchesText] = process.argv.slice(2);
if (!dir || !format || !variantName) {
  console.error('usage: workload.mjs DIR FORMAT VARIANT SEED BATCHES');
  process.exit(2);
}
const variant = (VARIANTS[format] ?? []).find((entry) => entry.name === variantName);
if (!variant) throw new Error(`no variant ${variantName} for ${format}`);
const seed = Number(seedText);
const batchCount = Number(batchesText);
const { createImage, markWriteLog, openImage } = await import('../../dist/index.js');

const random = new Random(seed);
const imagePath = join(dir, `image.${format}`);
const logPath = join(dir, 'writes.log');

const options = { cluster_size: String(variant.clusterSize) };
if (format === 'qed') options.table_size = '2'; // qemu 7.2 refuses table_size 1 (docs/formats/qed.md)
if (format === 'qcow2') {
  options.lazy_refcounts = variant.lazy ? 'on' : 'off';
  if (variant.extendedL2) options.extended_l2 = 'on';
}
// Named relative to the image, so every state built next to it (and a kept failure) finds it.
let backingName;
if (variant.backing) backingName = basename(await makeBacking(variant.backing));
await createImage(imagePath, format, { size: VIRTUAL_SIZE, backingFile: backingName, backingFormat: variant.backing, options });
if (variant.zeroAllocated) {
  const half = VIRTUAL_SIZE / 2;
  await promisify(execFile)('qemu-io', ['-f', format, '-c', `write -q -P 0xa5 0 ${half}`, '-c', `write -q -z 0 ${half}`, imagePath]);
}

// What the guest sees before the run, and the file the log starts from.
const before = await openImage(imagePath, { format, readOnly: true });
const guest = Buffer.alloc(VIRTUAL_SIZE);
await before.read(0, guest);
await before.close();
await writeFile(join(dir, 'guest-0.raw'), guest);
await copyFile(imagePath, join(dir, 'initial.img'));

const image = await openImage(imagePath, { format, idleCleanSeconds: variant.idle, filters: [{ name: 'log-writes', log: logPath }] });
const batches = [];
const written = [];
for (let number = 1; number <= batchCount + (variant.close ? 0 : 1); number++) {
  const ops = makeBatch();
  batches.push({ ops });
  await markWriteLog(logPath, `batch ${number}`);
  const requests = Promise.all(ops.map((op) => (op.kind === 'zero' ? image.zero(op.offset, op.length) : image.write(op.offset, opData(op)))));
  if (number > batchCount) {
    // The last batch of a run without close: never flushed, maybe still in flight when the process ends.
    await Promise.race([requests, sleep(random.int(0, 30))]);
    await markWriteLog(logPath, 'end');
    await saveWorkload();
    process.exit(0);
  }
  await requests;
  await image.flush();
  await markWriteLog(logPath, `ack ${number}`);
  if (variant.idle > 0 && number % 8 === 4) await sleep(variant.idle * 1000 + 300); // idle clean runs
}
await image.close();
await saveWorkload();

async function makeBacking(backingFormat) {
  const path = join(dir, `backing.${backingFormat}`);
  await createImage(path, backingFormat, { size: VIRTUAL_SIZE, options: backingFormat === 'raw' ? undefined : { cluster_size: String(variant.clusterSize) } });
  const backing = await openImage(path, { format: backingFormat, idleCleanSeconds: 0 });
  for (let i = 0; i < 24; i++) {
    const length = random.int(1, 64) * 4096;
    await backing.write(random.int(0, (VIRTUAL_SIZE - length) / 512) * 512, seededData(seed + 1000 + i, length));
  }
  await backing.close();
  return path;
}

/** 1-6 guest ops that do not overlap each other. */
function makeBatch() {
  const ops = [];
  const count = random.int(1, 6);
  for (let tries = 0; ops.length < count && tries < 100; tries++) {
    const op = makeOp();
    if (ops.some((other) => op.offset < other.offset + other.length && other.offset < op.offset + op.length)) continue;
    ops.push(op);
  }
  written.push(...ops);
  return ops;
}

function makeOp() {
  const roll = random.next();
  const alignment = roll < 0.5 ? 4096 : roll < 0.75 ? 512 : 1;
  const wanted = Math.round(Math.exp(Math.log(512) + random.next() * (Math.log(256 * 1024) - Math.log(512))));
  const length = Math.max(alignment === 1 ? 512 : alignment, Math.floor(wanted / alignment) * alignment);
  let offset;
  if (written.length > 0 && random.chance(0.4)) {
    const earlier = written[random.int(0, written.length - 1)];
    offset = earlier.offset + random.int(-length / 2, earlier.length / 2);
  } else {
    offset = random.int(0, VIRTUAL_SIZE - length);
  }
  offset = Math.min(Math.max(0, Math.floor(offset / alignment) * alignment), VIRTUAL_SIZE - length);
  offset -= offset % alignment;
  const kind = random.chance(0.1) ? 'zero' : 'write';
  return { kind, offset, length, seed: random.int(1, 2 ** 31) };
}

async function saveWorkload() {
  const description = { format, variant, seed, virtualSize: VIRTUAL_SIZE, backing: backingName, batches };
  await writeFile(join(dir, 'workload.json'), JSON.stringify(description));
}
