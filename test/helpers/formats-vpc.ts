/**
 * The conformance entry of VHD ("vpc"): shapes made by qemu-img / qemu-io
 * only, so qemu is the oracle (always opened with -f vpc: qemu 7.2 probes a
 * fixed VHD as raw). Dynamic and fixed, with qemu's CHS rounding and with
 * force_size=on; and images whose creator application and geometry are
 * patched (both footer copies, checksums fixed) so the virtual size comes
 * from the geometry for some creators and from current_size for others.
 *
 * This module is imported by formats.ts (which it imports back): nothing
 * from there is used at load time, only inside build().
 */
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { mixedContent, type BuiltImage, type FormatEntry, type MapFeature, type Shape } from './formats.js';
import { qemuImg, qemuIo } from './qemu.js';
import { patchFooter } from './vhd-layout.js';

const K = 1024;
const M = 1024 * K;
/** qemu's block size for dynamic VHDs. */
const BLOCK = 2 * M;

/** qemu-io writes of every kind over an image of `size` bytes with blocks of `c`. */
function writes(size: number, c: number, salt: number): string[] {
  const p = (k: number) => `0x${((salt + k * 0x13) & 0xff).toString(16).padStart(2, '0')}`;
  return [
    `write -P ${p(1)} ${c - 100} 300`, // across a block boundary
    `write -P ${p(2)} 1 1`,
    `write -P ${p(3)} ${Math.floor(size / 3) + 17} ${c + 5}`, // over three blocks (two on a 2-block image)
    `write -P ${p(4)} ${Math.floor(size / 2) + 333} 4097`,
    `write -P ${p(5)} ${size - 700} 700`, // the last bytes
    `write -P ${p(6)} ${c - 40} 10`, // inside an allocated block
    `write -z ${2 * c + 512} 4096`, // allocates a block of zeros
    `discard ${c} 512`, // vpc ignores discard
  ];
}

interface VpcPlan {
  name: string;
  description: string;
  size: number;
  options: string[];
  fixed: boolean;
  /** Mixed content converted in with qemu-img convert -n first. */
  seed?: number;
  /** Footer patches after the writes: creator application and geometry. */
  creator?: { app: string; chs?: [number, number, number] };
  /** The virtual size qemu must report, when known in advance. */
  virtualSize?: number;
  says?: { map?: MapFeature[]; mapNot?: MapFeature[] };
}

function vpcShape(plan: VpcPlan): Shape {
  return {
    name: plan.name,
    description: plan.description,
    async build(dir): Promise<BuiltImage> {
      const path = join(dir, `${plan.name}.vhd`);
      const options = plan.options.length > 0 ? ['-o', plan.options.join(',')] : [];
      await qemuImg(['create', '-q', '-f', 'vpc', ...options, path, String(plan.size)]);
      if (plan.seed !== undefined) {
        const source = join(dir, `${plan.name}.source.tmp`);
        await writeFile(source, mixedContent(plan.size, plan.seed));
        try {
          await qemuImg(['convert', '-n', '-f', 'raw', '-O', 'vpc', source, path]);
        } finally {
          await rm(source, { force: true });
        }
      }
      await qemuIo(path, writes(plan.size, BLOCK, plan.name.length * 7), 'vpc');
      if (plan.creator) {
        await patchFooter(path, 28, Buffer.from(plan.creator.app, 'latin1'));
        const chs = plan.creator.chs;
        if (chs) {
          const bytes = Buffer.alloc(4);
          bytes.writeUInt16BE(chs[0], 0);
          bytes.writeUInt8(chs[1], 2);
          bytes.writeUInt8(chs[2], 3);
          await patchFooter(path, 56, bytes);
        }
      }
      const info: Record<string, unknown> = plan.fixed ? {} : { 'cluster-size': BLOCK };
      if (plan.virtualSize !== undefined) info['virtual-size'] = plan.virtualSize;
      return {
        path,
        format: 'vpc',
        description: plan.description,
        layers: ['vpc'],
        clusterSize: plan.fixed ? 64 * K : BLOCK,
        qemuSays: { ...plan.says, info },
      };
    },
  };
}

/** A geometry smaller than 30 MiB: 200 cylinders, 16 heads, 17 sectors per track. */
const SMALL_CHS: [number, number, number] = [200, 16, 17];
const SMALL_CHS_BYTES = 200 * 16 * 17 * 512;
const PATCHED_SIZE = 30 * M;

export const vpcShapes: Shape[] = [
  vpcShape({
    name: 'dynamic',
    description: 'qemu-img create -f vpc 24M (size rounded up to its CHS geometry), then qemu-io writes, write -z, discard',
    size: 24 * M,
    options: [],
    fixed: false,
    says: { map: ['zero'] },
  }),
  vpcShape({
    name: 'dynamic-force-size',
    description: 'qemu-img create -f vpc -o force_size=on of 20 MiB + 3.5 KiB (size kept, creator qem2), then qemu-io writes',
    size: 20 * M + 3584,
    options: ['force_size=on'],
    fixed: false,
    virtualSize: 20 * M + 3584,
    says: { map: ['zero'] },
  }),
  vpcShape({
    name: 'converted',
    description: 'qemu-img convert -n of 13 MiB of text + random + zeros into a dynamic VHD, then qemu-io writes',
    size: 13 * M,
    options: [],
    fixed: false,
    seed: 0x7c,
  }),
  vpcShape({
    name: 'fixed',
    description: 'qemu-img create -f vpc -o subformat=fixed 9M (qemu probes it as raw; read with -f vpc), then qemu-io writes',
    size: 9 * M,
    options: ['subformat=fixed'],
    fixed: true,
  }),
  vpcShape({
    name: 'fixed-force-size',
    description: 'qemu-img create -f vpc -o subformat=fixed,force_size=on of 7 MiB + 512, then qemu-io writes',
    size: 7 * M + 512,
    options: ['subformat=fixed', 'force_size=on'],
    fixed: true,
    virtualSize: 7 * M + 512,
  }),
  vpcShape({
    name: 'creator-vpc',
    description: 'a force_size 30 MiB dynamic VHD patched to creator "vpc " and geometry 200/16/17: Virtual PC sizes by the geometry (27.2 MB)',
    size: PATCHED_SIZE,
    options: ['force_size=on'],
    fixed: false,
    creator: { app: 'vpc ', chs: SMALL_CHS },
    virtualSize: SMALL_CHS_BYTES,
  }),
  vpcShape({
    name: 'creator-win',
    description: 'the same patched to creator "win " (Hyper-V): sized by current_size (30 MiB) whatever the geometry',
    size: PATCHED_SIZE,
    options: ['force_size=on'],
    fixed: false,
    creator: { app: 'win ', chs: SMALL_CHS },
    virtualSize: PATCHED_SIZE,
  }),
  vpcShape({
    name: 'creator-tap',
    description: 'a fixed 30 MiB force_size VHD patched to creator "tap\\0" (XenServer) and geometry 200/16/17: current_size',
    size: PATCHED_SIZE,
    options: ['subformat=fixed', 'force_size=on'],
    fixed: true,
    creator: { app: 'tap\0', chs: SMALL_CHS },
    virtualSize: PATCHED_SIZE,
  }),
  vpcShape({
    name: 'creator-vpc-max-chs',
    description: 'a force_size 30 MiB VHD patched to creator "vpc " keeping the largest geometry 65535/16/255: current_size',
    size: PATCHED_SIZE,
    options: ['force_size=on'],
    fixed: false,
    creator: { app: 'vpc ' },
    virtualSize: PATCHED_SIZE,
  }),
];

export const vpcEntry: FormatEntry = {
  name: 'vpc',
  extension: '.vhd',
  writable: true,
  checkable: false,
  snapshots: false,
  shapes: vpcShapes,
  chains: [],
};
