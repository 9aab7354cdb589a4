/**
 * The conformance entry of cloop, read-only here: V2.0 images made by
 * create_compressed_fs (Debian package cloop-utils) from seeded content, at
 * several block sizes, one whose input does not fill its last block (qemu
 * reads the padding as zeros). qemu reads each of them; it is the oracle.
 */
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { mixedContent, type BuiltImage, type FormatEntry, type Shape } from './formats.js';
import { runOk } from './qemu.js';
import { KB, MB } from './formats-small.js';

/** create_compressed_fs -B blockSize of `content` into `dir/name` (zlib, the default method). */
export async function makeCloop(dir: string, name: string, content: Buffer, blockSize: number): Promise<string> {
  const source = join(dir, `${name}.source.tmp`);
  await writeFile(source, content);
  const path = join(dir, name);
  try {
    await runOk('create_compressed_fs', ['-q', '-B', String(blockSize), source, path], { cwd: dir });
  } finally {
    await rm(source, { force: true });
  }
  return path;
}

function cloopShape(name: string, description: string, size: number, blockSize: number, seed: number): Shape {
  return {
    name,
    description,
    async build(dir): Promise<BuiltImage> {
      const path = await makeCloop(dir, `${name}.cloop`, mixedContent(size, seed), blockSize);
      return { path, format: 'cloop', description, layers: ['cloop'], clusterSize: blockSize, qemuSays: { map: [] } };
    },
  };
}

const shapes: Shape[] = [
  cloopShape('block-64k', 'create_compressed_fs -B 65536 of 3 MiB of random + text + zeros', 3 * MB, 64 * KB, 901),
  cloopShape('block-256k', 'create_compressed_fs -B 262144 (its largest recommended block) of 5 MiB', 5 * MB, 256 * KB, 902),
  cloopShape('block-4k-partial', 'create_compressed_fs -B 4096 of 1 MiB + 1000 bytes: the last block padded with zeros', MB + 1000, 4 * KB, 903),
];

export const cloopEntry: FormatEntry = { name: 'cloop', extension: '.cloop', writable: false, checkable: false, snapshots: false, shapes, chains: [] };
