/**
 * `imgmount info [-f FMT] [-s SNAPSHOT] [--output=human|json] [--backing-chain] FILE`:
 * what qemu-img info shows, with qemu-img's JSON keys and human layout
 * (snapshot list, format-specific information). With --output=json only
 * the JSON goes to stdout; notices (a corrupt image...) go to stderr.
 */
import { parseOpenOptions } from './open-options.js';
import { openImage } from '../index.js';
import { parseFilterArgument } from '../block/filters/spec.js';
import type { ImageInfo } from '../block/image.js';
import type { SnapshotInfo } from '../block/types.js';
import { humanSize } from './format-bytes.js';

export interface InfoArguments {
  file: string;
  format?: string;
  snapshot?: string;
  output: 'human' | 'json';
  backingChain?: boolean;
  allowFiles?: string[];
  /** `--filter NAME[:key=value,...]` (repeatable). */
  filters?: string[];
  /** `--open-option KEY=VALUE` (repeatable): the format's open options. */
  openOptions?: string[];
}

export async function runInfo(args: InfoArguments): Promise<void> {
  const image = await openImage(args.file, {
    readOnly: true,
    format: args.format,
    snapshot: args.snapshot,
    openBacking: args.backingChain === true,
    allowFiles: args.allowFiles && args.allowFiles.length > 0 ? args.allowFiles : undefined,
    filters: (args.filters ?? []).map((text) => parseFilterArgument(text)),
    formatOptions: parseOpenOptions(args.openOptions),
    notice: (line) => process.stderr.write(`imgmount: ${line}\n`),
  });
  let info: ImageInfo;
  try {
    info = await image.info();
  } finally {
    await image.close();
  }
  const chain: ImageInfo[] = [];
  for (let layer: ImageInfo | undefined = info; layer; layer = args.backingChain ? layer.backing : undefined) chain.push(layer);
  if (args.output === 'json') {
    const json = chain.map(toJson);
    process.stdout.write(`${JSON.stringify(args.backingChain ? json : json[0], null, 4)}\n`);
  } else {
    process.stdout.write(chain.map(toHuman).join('\n'));
  }
}

function toJson(info: ImageInfo): Record<string, unknown> {
  const json: Record<string, unknown> = {};
  if (info.snapshots) json.snapshots = info.snapshots.map(snapshotJson);
  json['virtual-size'] = info.virtualSize;
  json.filename = info.filename;
  json.format = info.format;
  json['actual-size'] = info.actualSize;
  if (info.clusterSize !== undefined) json['cluster-size'] = info.clusterSize;
  if (info.backingFilename !== undefined) {
    json['backing-filename'] = info.backingFilename;
    if (info.fullBackingFilename !== undefined) json['full-backing-filename'] = info.fullBackingFilename;
    if (info.backingFormat !== undefined) json['backing-filename-format'] = info.backingFormat;
  }
  if (info.formatSpecific) json['format-specific'] = { type: info.format, data: info.formatSpecific };
  if (info.dirty !== undefined) json['dirty-flag'] = info.dirty;
  if (info.files) {
    json.files = info.files.map((file) => ({ role: file.role, filename: file.name, 'full-filename': file.path, 'actual-size': file.actualSize }));
  }
  return json;
}

function snapshotJson(snapshot: SnapshotInfo): Record<string, unknown> {
  const json: Record<string, unknown> = {
    id: snapshot.id,
    name: snapshot.name,
    'vm-state-size': snapshot.vmStateSize,
    'date-sec': snapshot.dateSec,
    'date-nsec': snapshot.dateNsec,
    'vm-clock-sec': snapshot.vmClockSec,
    'vm-clock-nsec': snapshot.vmClockNsec,
  };
  if (snapshot.icount !== undefined) json.icount = snapshot.icount;
  return json;
}

function toHuman(info: ImageInfo): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${humanSize(info.virtualSize)} (${info.virtualSize} bytes)`,
    `disk size: ${humanSize(info.actualSize)}`,
  ];
  if (info.clusterSize !== undefined) lines.push(`cluster_size: ${info.clusterSize}`);
  if (info.backingFilename !== undefined) {
    lines.push(`backing file: ${info.backingFilename}${info.fullBackingFilename ? ` (actual path: ${info.fullBackingFilename})` : ''}`);
    if (info.backingFormat !== undefined) lines.push(`backing file format: ${info.backingFormat}`);
  }
  if (info.snapshots) {
    lines.push('Snapshot list:', snapshotRow(['ID', 'TAG', 'VM SIZE', 'DATE', 'VM CLOCK', 'ICOUNT'], true));
    for (const snapshot of info.snapshots) {
      lines.push(
        snapshotRow(
          [snapshot.id, snapshot.name, humanSize(snapshot.vmStateSize), snapshotDate(snapshot), vmClock(snapshot), snapshot.icount?.toString() ?? ''],
          false,
        ),
      );
    }
  }
  if (info.dirty !== undefined) lines.push(`dirty (need-check): ${info.dirty ? 'yes' : 'no'}`);
  for (const file of info.files ?? []) {
    lines.push(`${file.role}: ${file.name} (actual path: ${file.path}, disk size: ${humanSize(file.actualSize)})`);
  }
  if (info.formatSpecific) {
    lines.push('Format specific information:');
    for (const [key, value] of Object.entries(info.formatSpecific)) humanValue(lines, key.replace(/-/g, ' '), value, '    ');
  }
  return `${lines.join('\n')}\n`;
}

/** Prints a format-specific value as qemu-img does: lists as `[i]:` items, objects one key per line, 4 more spaces each level. */
function humanValue(lines: string[], label: string, value: unknown, indent: string): void {
  if (Array.isArray(value)) {
    lines.push(`${indent}${label}:`);
    value.forEach((item, i) => humanValue(lines, `[${i}]`, item, `${indent}    `));
  } else if (value !== null && typeof value === 'object') {
    lines.push(`${indent}${label}:`);
    for (const [key, inner] of Object.entries(value)) humanValue(lines, key.replace(/-/g, ' '), inner, `${indent}    `);
  } else {
    lines.push(`${indent}${label}: ${String(value)}`);
  }
}

/** One line of qemu-img's snapshot table (its column widths). */
function snapshotRow(cells: string[], heading: boolean): string {
  const [id, tag, size, date, clock, icount] = cells as [string, string, string, string, string, string];
  const left = heading ? `${id.padEnd(10)}${tag.padEnd(17)}` : `${id.padEnd(9)} ${tag.padEnd(16)} `;
  return `${left}${size.padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`;
}

function snapshotDate(snapshot: SnapshotInfo): string {
  const date = new Date(snapshot.dateSec * 1000);
  const two = (n: number) => String(n).padStart(2, '0');
  return `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())} ${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}`;
}

function vmClock(snapshot: SnapshotInfo): string {
  const seconds = snapshot.vmClockSec;
  const two = (n: number) => String(n).padStart(2, '0');
  const ms = String(Math.floor(snapshot.vmClockNsec / 1_000_000)).padStart(3, '0');
  return `${two(Math.floor(seconds / 3600))}:${two(Math.floor(seconds / 60) % 60)}:${two(seconds % 60)}.${ms}`;
}
