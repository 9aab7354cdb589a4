/**
 * Builders shared by the conformance entries of the read-only formats
 * (formats-qcow.ts, formats-parallels.ts, formats-bochs.ts, formats-cloop.ts):
 * seeded content, qemu-io pattern write lists, raw and qcow2 backing files.
 * Every image is made by qemu-img / qemu-io (or the format's own Debian tool),
 * never by this library. Nothing here runs at import time: formats.ts imports
 * the entries, which import this, so top-level code may not use formats.ts
 * values before they exist.
 */
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { mixedContent, randomBytes, type FormatName } from './formats.js';
import { qemuImg, qemuIo, run } from './qemu.js';

export const KB = 1024;
export const MB = 1024 * KB;

/** Pattern writes at unaligned offsets: across cluster boundaries, the first byte, the middle, the tail, a rewrite. */
export function patternWrites(size: number, c: number, salt: number): string[] {
  const p = (k: number) => `0x${((salt + k * 0x11) & 0xff).toString(16).padStart(2, '0')}`;
  return [
    `write -P ${p(1)} ${c - 100} 300`,
    `write -P ${p(2)} ${3 * c + 17} ${2 * c + 5}`,
    `write -P ${p(3)} 1 1`,
    `write -P ${p(4)} ${Math.floor(size / 2) + 333} 4097`,
    `write -P ${p(5)} ${size - 700} 700`,
    `write -P ${p(6)} ${c - 40} 10`,
  ];
}

export interface Base {
  name: string;
  format: FormatName;
  length: number;
}

/** A fully written raw file of random bytes. */
export async function rawBase(dir: string, name: string, size: number, seed: number): Promise<Base> {
  await writeFile(join(dir, name), randomBytes(size, seed));
  return { name, format: 'raw', length: size };
}

/** A qcow2 base of mixed content, compressed (qemu-img convert -c), then rewritten in places. */
export async function qcow2CompressedBase(dir: string, name: string, size: number, seed: number): Promise<Base> {
  const source = join(dir, `${name}.source.tmp`);
  await writeFile(source, mixedContent(size, seed));
  try {
    await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', source, join(dir, name)]);
  } finally {
    await rm(source, { force: true });
  }
  await qemuIo(join(dir, name), ['write -P 0xd1 100000 3000', 'write -z 262144 65536'], 'qcow2');
  return { name, format: 'qcow2', length: size };
}

/**
 * `qemu-img convert -c -O qcow` of `content`. qemu-img 7.2 exits 1 without a
 * message after writing every cluster (its final zero-length compressed write,
 * which flushes, is refused by the qcow driver), so a failure is accepted only
 * when it said nothing and `qemu-img compare` finds the result identical.
 */
export async function qcowCompressedConvert(dir: string, content: Buffer, out: string, extra: readonly string[] = []): Promise<void> {
  const source = join(dir, `${out}.source.tmp`);
  await writeFile(source, content);
  try {
    const result = await run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow', ...extra, source, join(dir, out)], { cwd: dir });
    if (result.code !== 0) {
      const compare = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow', source, join(dir, out)], { cwd: dir });
      if (result.stderr.trim() !== '' || result.code !== 1 || compare.code !== 0) {
        throw new Error(`qemu-img convert -c -O qcow exited ${result.code}: ${result.stderr}; compare: ${compare.stdout}${compare.stderr}`);
      }
    }
  } finally {
    await rm(source, { force: true });
  }
}
