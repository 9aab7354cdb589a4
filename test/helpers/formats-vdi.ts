/**
 * The VDI entry of the conformance matrix (test/helpers/formats.ts): dynamic
 * and static images made by `qemu-img create -f vdi [-o static=on]` or
 * `qemu-img convert -O vdi`, then written by qemu-io. qemu 7.2 makes and reads
 * only 1 MiB blocks. Sizes are 10 MiB or more so the random-write test's
 * ranges (up to 4 blocks) do not overlap too often.
 *
 * This module is imported by formats.ts (and imports from it): it uses what
 * it imports only inside `build`, never while the modules load.
 */
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { mixedContent, type BuiltImage, type FormatEntry, type MapFeature, type Shape } from './formats.js';
import { qemuImg, qemuIo } from './qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** The VDI block (qemu's cluster) size. */
const BLOCK = MiB;

interface VdiPlan {
  name: string;
  description: string;
  /** Bytes given to qemu-img create (qemu rounds up to 512). */
  size: number;
  static?: boolean;
  /** qemu-img convert -O vdi of mixed content with these blocks zeroed (left unallocated by convert), instead of create. */
  convert?: { seed: number; zeroBlocks: number[] };
  commands?: (size: number) => string[];
  says?: { map?: MapFeature[]; mapNot?: MapFeature[] };
}

/** Unaligned pattern writes: across a block boundary, over several blocks, the first byte, the middle, the tail, a rewrite inside an allocated block. */
function patternWrites(size: number, salt: number): string[] {
  const p = (k: number) => `0x${((salt + k * 0x11) & 0xff).toString(16).padStart(2, '0')}`;
  return [
    `write -P ${p(1)} ${BLOCK - 100} 300`,
    `write -P ${p(2)} ${3 * BLOCK + 17} ${2 * BLOCK + 5}`,
    `write -P ${p(3)} 1 1`,
    `write -P ${p(4)} ${Math.floor(size / 2) + 333} 4097`,
    `write -P ${p(5)} ${size - 700} 700`,
    `write -P ${p(6)} ${BLOCK - 40} 10`,
  ];
}

function vdiShape(plan: VdiPlan): Shape {
  return {
    name: plan.name,
    description: plan.description,
    async build(dir): Promise<BuiltImage> {
      const path = join(dir, `${plan.name}.vdi`);
      const options = ['-o', `static=${plan.static ? 'on' : 'off'}`];
      if (plan.convert) {
        const source = join(dir, `${plan.name}.source.tmp`);
        const content = mixedContent(plan.size, plan.convert.seed);
        for (const block of plan.convert.zeroBlocks) content.fill(0, block * BLOCK, Math.min(plan.size, (block + 1) * BLOCK));
        await writeFile(source, content);
        try {
          await qemuImg(['convert', '-f', 'raw', '-O', 'vdi', ...options, source, path]);
        } finally {
          await rm(source, { force: true });
        }
      } else {
        await qemuImg(['create', '-q', '-f', 'vdi', ...options, path, String(plan.size)]);
      }
      if (plan.commands) await qemuIo(path, plan.commands(Math.ceil(plan.size / 512) * 512), 'vdi');
      return {
        path,
        format: 'vdi',
        description: plan.description,
        layers: ['vdi'],
        clusterSize: BLOCK,
        qemuSays: { ...plan.says, info: { 'cluster-size': BLOCK } },
      };
    },
  };
}

const vdiShapes: Shape[] = [
  vdiShape({
    name: 'dynamic',
    says: { map: ['zero'] },
    description: 'dynamic, 12 MiB + 3000 bytes (not a whole block; qemu rounds to 512), unaligned pattern writes across blocks, write -z over data and over an unallocated block (qemu writes zeros)',
    size: 12 * MiB + 3000,
    commands: (size) => [...patternWrites(size, 0x19), `write -z ${3 * BLOCK + 4096} 8192`, `write -z ${8 * BLOCK} ${BLOCK}`, `write -P 0x5a ${8 * BLOCK + 9} 3`],
  }),
  vdiShape({
    name: 'static',
    says: { mapNot: ['zero'] },
    description: 'static=on (every block allocated in a sparse file), 10 MiB + 512, unaligned pattern writes',
    size: 10 * MiB + 512,
    static: true,
    commands: (size) => patternWrites(size, 0x29),
  }),
  vdiShape({
    name: 'empty',
    says: { map: ['zero'] },
    description: 'dynamic, 10 MiB, nothing written (every entry 0xffffffff)',
    size: 10 * MiB,
  }),
  vdiShape({
    name: 'converted',
    says: { map: ['zero'] },
    description: 'qemu-img convert -O vdi of text + random + zeros (blocks 2, 5 and 6 all zeros, left unallocated), then pattern writes',
    size: 11 * MiB + 1536,
    convert: { seed: 701, zeroBlocks: [2, 5, 6] },
    commands: (size) => patternWrites(size, 0x39),
  }),
  vdiShape({
    name: 'static-converted',
    says: { mapNot: ['zero'] },
    description: 'qemu-img convert -O vdi -o static=on of text + random + zeros, then pattern writes',
    size: 10 * MiB,
    static: true,
    convert: { seed: 702, zeroBlocks: [4] },
    commands: (size) => patternWrites(size, 0x49),
  }),
];

export const vdiFormat: FormatEntry = { name: 'vdi', extension: '.vdi', writable: true, checkable: true, snapshots: false, shapes: vdiShapes, chains: [] };
