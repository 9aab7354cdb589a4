/**
 * `imgmount info [--output=human|json] [--backing-chain] FILE`: what
 * qemu-img info shows, with qemu-img's JSON keys.
 */
import { openImage } from '../index.js';
import type { ImageInfo } from '../block/image.js';
import { humanSize } from './format-bytes.js';

export interface InfoArguments {
  file: string;
  format?: string;
  output: 'human' | 'json';
  backingChain?: boolean;
}

export async function runInfo(args: InfoArguments): Promise<void> {
  const image = await openImage(args.file, { readOnly: true, format: args.format, openBacking: args.backingChain === true });
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
  const json: Record<string, unknown> = {
    'virtual-size': info.virtualSize,
    filename: info.filename,
    format: info.format,
    'actual-size': info.actualSize,
  };
  if (info.clusterSize !== undefined) json['cluster-size'] = info.clusterSize;
  if (info.backingFilename !== undefined) {
    json['backing-filename'] = info.backingFilename;
    if (info.fullBackingFilename !== undefined) json['full-backing-filename'] = info.fullBackingFilename;
    if (info.backingFormat !== undefined) json['backing-filename-format'] = info.backingFormat;
  }
  if (info.dirty !== undefined) json['dirty-flag'] = info.dirty;
  if (info.formatSpecific) json['format-specific'] = { type: info.format, data: info.formatSpecific };
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
  if (info.dirty !== undefined) lines.push(`dirty (need-check): ${info.dirty ? 'yes' : 'no'}`);
  if (info.formatSpecific) {
    lines.push('Format specific information:');
    for (const [key, value] of Object.entries(info.formatSpecific)) lines.push(`    ${key}: ${value}`);
  }
  return `${lines.join('\n')}\n`;
}
