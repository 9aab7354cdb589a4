/**
 * `imgmount map [-f FMT] [-s SNAPSHOT] [--output=human|json] FILE`: where the guest bytes of
 * an image live, printed byte for byte as `qemu-img map` prints them.
 *
 * - JSON: one object per run, keys in qemu's order (start, length, depth,
 *   present, zero, data, and offset only for data stored as is, not for
 *   compressed data), as `[{ ... },\n{ ... }]`. An empty image prints qemu's
 *   single zero-length entry.
 * - human: qemu's "Offset / Length / Mapped to / File" table, data runs only,
 *   numbers as printf's %#-16x (0 is "0", others 0x...). File names are shown
 *   as qemu names them: the image as given, a backing file as its stored name
 *   combined with the directory part of the name of the image that names it
 *   (qemu's path_combine), so relative stays relative; a data file by its
 *   stored name as is.
 *   Compressed runs have no host offset; like qemu, the human format refuses
 *   them (use --output=json).
 */
import { parseOpenOptions } from './open-options.js';
import { isAbsolute } from 'node:path';
import { openImage, type BlockImage, type ImageInfo, type MapRun } from '../index.js';
import { ExitError } from './errors.js';
import { parseFilterArgument } from '../block/filters/spec.js';

export interface MapArguments {
  file: string;
  format?: string;
  snapshot?: string;
  allowFiles?: string[];
  output: 'human' | 'json';
  /** `--filter NAME[:key=value,...]` (repeatable). */
  filters?: string[];
  /** `--open-option KEY=VALUE` (repeatable): the format's open options. */
  openOptions?: string[];
}

export async function runMap(args: MapArguments): Promise<void> {
  const image = await openImage(args.file, {
    readOnly: true,
    format: args.format,
    snapshot: args.snapshot,
    allowFiles: args.allowFiles && args.allowFiles.length > 0 ? args.allowFiles : undefined,
    filters: (args.filters ?? []).map((text) => parseFilterArgument(text)),
    formatOptions: parseOpenOptions(args.openOptions),
    notice: (line) => process.stderr.write(`imgmount: ${line}\n`),
  });
  let runs: MapRun[];
  let names: Map<string, string>;
  try {
    // A driver may answer an empty range with one empty run (raw does); qemu shows none.
    runs = (await image.map()).filter((run) => run.length > 0);
    names = args.output === 'human' ? await displayNames(image, args.file) : new Map();
  } finally {
    await image.close();
  }
  process.stdout.write(args.output === 'json' ? mapToJson(runs) : mapToHuman(runs, names, args.file));
}

/** `qemu-img map --output=json`. */
export function mapToJson(runs: readonly MapRun[]): string {
  const entries = runs.length > 0 ? runs : [{ offset: 0, length: 0, depth: 0, present: false, zero: false, data: false } satisfies MapRun];
  const lines = entries.map((run) => {
    const offset = run.hostOffset !== undefined && !run.compressed ? `, "offset": ${run.hostOffset}` : '';
    return `{ "start": ${run.offset}, "length": ${run.length}, "depth": ${run.depth}, "present": ${run.present}, "zero": ${run.zero}, "data": ${run.data}${offset}}`;
  });
  return `[${lines.join(',\n')}]\n`;
}

/** `qemu-img map` (human): data runs only; `names` turns opened paths into the names qemu shows. */
export function mapToHuman(runs: readonly MapRun[], names: ReadonlyMap<string, string>, file: string): string {
  if (runs.some((run) => run.data && (run.compressed || run.hostOffset === undefined))) {
    throw new ExitError(`${file}: the image contains external, encrypted or compressed clusters, which the human format cannot show; use --output=json`, 1);
  }
  const lines = [`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File`];
  for (const run of runs) {
    if (!run.data || run.zero) continue;
    const filename = run.filename === undefined ? '' : (names.get(run.filename) ?? run.filename);
    lines.push(`${hex(run.offset)}${hex(run.length)}${hex(run.hostOffset ?? 0)}${filename}`);
  }
  return `${lines.join('\n')}\n`;
}

/** printf("%#-16" PRIx64): 0 stays "0", others get 0x; left-aligned in 16 columns. */
function hex(value: number): string {
  return (value === 0 ? '0' : `0x${value.toString(16)}`).padEnd(16);
}

/**
 * qemu's path_combine: a relative `name` is appended to the directory part of
 * `base` (everything up to its last '/'), without normalizing; an absolute one
 * stays as it is.
 */
export function qemuPathCombine(base: string, name: string): string {
  const plain = name.startsWith('file:') ? name.slice('file:'.length) : name;
  if (isAbsolute(plain)) return plain;
  return base.slice(0, base.lastIndexOf('/') + 1) + plain;
}

/** The name qemu would show for each file of the chain, keyed by the path it was opened with. */
async function displayNames(top: BlockImage, file: string): Promise<Map<string, string>> {
  const names = new Map<string, string>();
  let name = file;
  let info: ImageInfo | undefined = await top.info();
  for (let layer: BlockImage | undefined = top; layer && info; layer = layer.backing, info = info.backing) {
    names.set(layer.path, name);
    // qemu opens a data file by its stored name as is (relative to its working directory) and shows that name.
    for (const named of info.files ?? []) names.set(named.path, named.name);
    if (info.backingFilename === undefined) break;
    name = qemuPathCombine(name, info.backingFilename);
  }
  return names;
}
