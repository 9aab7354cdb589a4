/**
 * The conformance entry of Bochs, read-only here: growing redolog images made
 * by bximage (Debian package bximage): created empty, and converted from flat
 * images bximage created and the test filled with seeded content (bximage
 * stores only the sectors that are not zero); one rewritten to a version 1
 * header. qemu reads each of them; it is the oracle.
 */
import { readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { mixedContent, type BuiltImage, type FormatEntry, type Shape } from './formats.js';
import { runOk } from './qemu.js';
import { MB } from './formats-small.js';

/** Runs bximage quietly (it prints a progress bar); fails with its output on a non-zero exit. */
export async function bximage(args: readonly string[], cwd: string): Promise<void> {
  await runOk('bximage', ['-q', ...args], { cwd });
}

/**
 * A growing image `name` converted by bximage from a flat image of `megabytes`
 * MiB (bximage rounds it to its geometry) holding `fill(size)`.
 */
export async function convertedBochs(dir: string, name: string, megabytes: number, fill: (size: number) => Buffer): Promise<string> {
  const flat = join(dir, `${name}.flat.tmp`);
  await bximage(['-func=create', `-hd=${megabytes}M`, '-imgmode=flat', flat], dir);
  const size = (await stat(flat)).size;
  await writeFile(flat, fill(size));
  const path = join(dir, name);
  try {
    await bximage(['-func=convert', '-imgmode=growing', flat, path], dir);
  } finally {
    await rm(flat, { force: true });
  }
  return path;
}

/** Rewrites a version 2 header as version 1 (the disk size moves from offset 88 to 84). */
export async function toBochsV1(path: string): Promise<void> {
  const file = await readFile(path);
  const disk = file.readBigUInt64LE(88);
  file.writeUInt32LE(0x00010000, 64);
  file.fill(0, 84, 96);
  file.writeBigUInt64LE(disk, 84);
  await writeFile(path, file);
}

/** Mixed content in a few places of an otherwise zero disk. */
function sparseMixed(seed: number) {
  return (size: number): Buffer => {
    const out = Buffer.alloc(size);
    mixedContent(Math.min(size, 3 * MB), seed).copy(out, 0);
    mixedContent(Math.min(size, MB), seed + 1).copy(out, Math.floor(size / 2) + 777);
    mixedContent(700, seed + 2).copy(out, size - 700);
    return out;
  };
}

function bochsShape(name: string, description: string, build: (dir: string, path: string) => Promise<void>): Shape {
  return {
    name,
    description,
    async build(dir): Promise<BuiltImage> {
      const path = join(dir, `${name}.img`);
      await build(dir, path);
      const extent = (await readFile(path)).readUInt32LE(80);
      return { path, format: 'bochs', description, layers: ['bochs'], clusterSize: extent, qemuSays: { map: [] } };
    },
  };
}

const shapes: Shape[] = [
  bochsShape('created', 'bximage -func=create -hd=10M -imgmode=growing: every extent unallocated', async (dir, path) => {
    await bximage(['-func=create', '-hd=10M', '-imgmode=growing', path], dir);
  }),
  bochsShape('converted', 'bximage -func=convert of a 10 MiB flat image with random + text + zeros in three places (16 KiB extents)', async (dir) => {
    await convertedBochs(dir, 'converted.img', 10, sparseMixed(801));
  }),
  bochsShape('converted-64m', 'bximage -func=convert of a 64 MiB flat image (32 KiB extents, 2048 catalog entries)', async (dir) => {
    await convertedBochs(dir, 'converted-64m.img', 64, sparseMixed(811));
  }),
  bochsShape('v1', 'a converted 10 MiB image with its header rewritten to version 1 (0x10000: the disk size at offset 84)', async (dir, path) => {
    await convertedBochs(dir, 'v1.img', 10, sparseMixed(821));
    await toBochsV1(path);
  }),
];

export const bochsEntry: FormatEntry = { name: 'bochs', extension: '.img', writable: false, checkable: false, snapshots: false, shapes, chains: [] };
