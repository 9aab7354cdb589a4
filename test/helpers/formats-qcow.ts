/**
 * The conformance entry of qcow (version 1), read-only here: images made by
 * qemu-img create -f qcow / convert -c -O qcow and written by qemu-io
 * (normal and compressed clusters), over qcow, raw and qcow2 backing files.
 * qemu-img create picks the geometry: 4 KiB clusters with 512-entry L2 tables
 * alone, 512-byte clusters with 4096-entry L2 tables over a backing file.
 */
import { join } from 'node:path';
import { mixedContent, type BuiltImage, type FormatEntry, type FormatName, type MapFeature, type Shape } from './formats.js';
import { qemuImg, qemuIo } from './qemu.js';
import { MB, patternWrites, qcow2CompressedBase, qcowCompressedConvert, rawBase, type Base } from './formats-small.js';

interface QcowPlan {
  name: string;
  description: string;
  size: number;
  map: MapFeature[];
  /** Builds the image itself (instead of qemu-img create). */
  make?: (dir: string, path: string) => Promise<void>;
  commands?: (size: number, c: number) => string[];
  layers?: FormatName[];
}

function qcowShape(plan: QcowPlan, prepare?: (dir: string) => Promise<Base>): Shape {
  return {
    name: plan.name,
    description: plan.description,
    async build(dir): Promise<BuiltImage> {
      const backing = prepare ? await prepare(dir) : undefined;
      const path = join(dir, `${plan.name}.qcow`);
      if (plan.make) await plan.make(dir, path);
      else {
        const backingArgs = backing ? ['-b', backing.name, '-F', backing.format] : [];
        await qemuImg(['create', '-f', 'qcow', ...backingArgs, path, String(plan.size)], { cwd: dir });
      }
      const info = JSON.parse((await qemuImg(['info', '-f', 'qcow', '--output=json', path], { cwd: dir })).stdout) as { 'cluster-size': number };
      const c = info['cluster-size'];
      if (plan.commands) await qemuIo(path, plan.commands(plan.size, c), 'qcow', { cwd: dir });
      return {
        path,
        format: 'qcow',
        description: plan.description,
        layers: plan.layers ?? (backing ? ['qcow', backing.format] : ['qcow']),
        clusterSize: c,
        backingLength: backing && backing.length < plan.size ? backing.length : undefined,
        qemuSays: { map: plan.map, info: { 'cluster-size': c, ...(backing ? { 'backing-filename': backing.name } : {}) } },
      };
    },
  };
}

/** A qcow base (4 KiB clusters) with pattern data, for chains. */
async function qcowBase(dir: string, name: string, size: number): Promise<Base> {
  await qemuImg(['create', '-f', 'qcow', join(dir, name), String(size)]);
  await qemuIo(join(dir, name), ['write -P 0xc1 5000 20000', `write -P 0xc2 ${size - 4096 - 100} 4196`, `write -P 0xc3 ${Math.floor(size / 2)} 70000`], 'qcow');
  return { name, format: 'qcow', length: size };
}

/** Writes over a backing file: partial clusters, writes straddling the end of a shorter backing file, the tail. */
function chainTopWrites(backingLength: number) {
  return (size: number, c: number): string[] => [
    `write -P 0xa1 ${c + 7} 33`,
    `write -P 0xa2 ${Math.min(size - 3000, Math.max(0, backingLength - 1000))} 3000`,
    `write -P 0xa3 ${size - 513} 513`,
    `write -P 0xa4 ${6 * c - 10} ${c + 20}`,
  ];
}

const shapes: Shape[] = [
  qcowShape({
    name: 'default',
    map: ['unallocated'],
    description: 'qemu-img create -f qcow (4 KiB clusters, 512-entry L2 tables), 6 MiB + 512, unaligned pattern writes',
    size: 6 * MB + 512,
    commands: (size, c) => [...patternWrites(size, c, 0x17), `write -P 0x18 ${2 * MB - 3000} 9000`],
  }),
  qcowShape({
    name: 'compressed',
    map: ['compressed'],
    description: 'qemu-img convert -c -O qcow of random + text + zeros (4 MiB), then a partial rewrite of compressed clusters and compressed qemu-io writes',
    size: 4 * MB,
    make: (dir) => qcowCompressedConvert(dir, mixedContent(4 * MB, 701), 'compressed.qcow'),
    commands: (size, c) => [
      `write -P 0x81 ${c + 100} 50`,
      `write -P 0x82 ${2 * c} ${c}`,
      `write -c -P 0x83 ${4 * c} ${c}`,
      `write -c -P 0x84 ${5 * c} ${c}`,
      `write -P 0x85 ${size - 333} 333`,
    ],
  }),
  qcowShape(
    {
      name: 'backing',
      map: ['backing-data', 'unallocated'],
      description: 'over a shorter qcow backing file (3 MiB - 512 under 5 MiB; 512-byte clusters, 4096-entry L2 tables): partial clusters, writes across the backing end',
      size: 5 * MB,
      commands: chainTopWrites(3 * MB - 512),
    },
    (dir) => qcowBase(dir, 'backing-base.qcow', 3 * MB - 512),
  ),
];

const chains: Shape[] = [
  qcowShape(
    {
      name: 'over-raw',
      map: ['backing-data', 'unallocated'],
      description: 'qcow (4 MiB) over a raw backing file of 1 MiB + 4608: past its end reads zeros',
      size: 4 * MB,
      commands: chainTopWrites(MB + 4608),
    },
    (dir) => rawBase(dir, 'over-raw-base.raw', MB + 4608, 702),
  ),
  qcowShape(
    {
      name: 'over-qcow2',
      map: ['backing-compressed'],
      description: 'qcow over a compressed-and-rewritten qcow2 of the same size (4 MiB)',
      size: 4 * MB,
      commands: chainTopWrites(4 * MB),
      layers: ['qcow', 'qcow2'],
    },
    (dir) => qcow2CompressedBase(dir, 'over-qcow2-base.qcow2', 4 * MB, 703),
  ),
];

export const qcowEntry: FormatEntry = { name: 'qcow', extension: '.qcow', writable: false, checkable: false, snapshots: false, shapes, chains };

