/**
 * The VHDX entry of the conformance matrix (test/helpers/formats.ts): images
 * made by `qemu-img create -f vhdx` / `qemu-img convert -O vhdx` and written
 * by qemu-io, so qemu is the oracle. qemu 7.2 has no block-status for VHDX
 * (its `map` calls every byte data without an offset), so these shapes say
 * nothing about qemu-img map; test/vhdx.test.ts checks our map against the
 * file's bytes instead. Differencing images and logs, which qemu cannot make,
 * are in test/vhdx.test.ts (built by test/helpers/vhdx-writer.ts).
 */
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { FormatEntry, Shape } from './formats.js';
import { mixedContent } from './formats.js';
import { qemuImg, qemuIo } from './qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;

interface VhdxPlan {
  name: string;
  description: string;
  size: number;
  blockSize: number;
  /** -o options besides block_size. */
  options?: string[];
  /** qemu-img convert -O vhdx of mixed content with this seed (instead of create). */
  convertSeed?: number;
  commands?: (size: number, b: number) => string[];
}

/** Unaligned pattern writes across block boundaries, the first and last bytes, a rewrite, and zero writes. */
function writes(salt: number) {
  return (size: number, b: number): string[] => {
    const p = (k: number) => `0x${((salt + k * 0x13) & 0xff).toString(16).padStart(2, '0')}`;
    return [
      `write -P ${p(1)} ${b - 100} 300`,
      `write -P ${p(2)} 0 1`,
      `write -P ${p(3)} ${2 * b + 4097} ${b + 5}`,
      `write -P ${p(4)} ${size - 700} 700`,
      `write -P ${p(5)} ${b - 40} 10`,
      `write -z ${Math.floor(size / 2)} 70000`,
    ];
  };
}

function vhdxShape(plan: VhdxPlan): Shape {
  return {
    name: plan.name,
    description: plan.description,
    async build(dir) {
      const path = join(dir, `${plan.name}.vhdx`);
      const options = [`block_size=${plan.blockSize}`, ...(plan.options ?? [])].join(',');
      if (plan.convertSeed !== undefined) {
        const source = join(dir, `${plan.name}.source.tmp`);
        await writeFile(source, mixedContent(plan.size, plan.convertSeed));
        try {
          await qemuImg(['convert', '-f', 'raw', '-O', 'vhdx', '-o', options, source, path]);
        } finally {
          await rm(source, { force: true });
        }
      } else {
        await qemuImg(['create', '-f', 'vhdx', '-o', options, path, String(plan.size)]);
      }
      if (plan.commands) await qemuIo(path, plan.commands(plan.size, plan.blockSize), 'vhdx');
      return {
        path,
        format: 'vhdx',
        description: plan.description,
        layers: ['vhdx'],
        // The unit the suite's random reads and writes are scaled by (lengths up to 3-4 units, offsets at unit
        // boundaries): a block of 4 or 64 MiB on a 14 or 130 MiB image would make most of the random writes
        // overlap (and be dropped), so at most 1 MiB; every block boundary is a multiple of it all the same.
        clusterSize: Math.min(plan.blockSize, MiB),
        qemuSays: { info: { 'cluster-size': plan.blockSize } },
      };
    },
  };
}

const shapes: Shape[] = [
  vhdxShape({
    name: 'dynamic-1m',
    description: 'dynamic, block_size=1M (ZERO blocks where never written), unaligned writes across blocks, first and last bytes, write -z',
    size: 9 * MiB + 512,
    blockSize: MiB,
    commands: writes(0x11),
  }),
  vhdxShape({
    name: 'not-present',
    description: 'dynamic, block_size=2M, block_state_zero=off (NOT_PRESENT blocks where never written), writes',
    size: 12 * MiB,
    blockSize: 2 * MiB,
    options: ['block_state_zero=off'],
    commands: writes(0x22),
  }),
  vhdxShape({
    name: 'fixed',
    description: 'subformat=fixed, block_size=4M, log_size=2M, writes',
    size: 14 * MiB + 1024,
    blockSize: 4 * MiB,
    options: ['subformat=fixed', 'log_size=2M'],
    commands: writes(0x33),
  }),
  vhdxShape({
    name: 'converted',
    description: 'qemu-img convert -O vhdx (block_size=1M, block_state_zero=off) of random + text + zeros, then writes',
    size: 6 * MiB,
    blockSize: MiB,
    options: ['block_state_zero=off'],
    convertSeed: 701,
    commands: writes(0x44),
  }),
  vhdxShape({
    name: 'block-64m',
    description: 'dynamic, block_size=64M (chunk ratio 64), 130 MiB + 512: writes in the first, second and last block',
    size: 130 * MiB + 512,
    blockSize: 64 * MiB,
    commands: (size, b) => [`write -P 0x55 ${b - 3000} 6000`, `write -P 0x56 ${size - 5000} 5000`, 'write -P 0x57 12345 678'],
  }),
];

export const vhdxFormat: FormatEntry = {
  name: 'vhdx',
  extension: '.vhdx',
  writable: true,
  checkable: true,
  snapshots: false,
  shapes,
  chains: [],
};
