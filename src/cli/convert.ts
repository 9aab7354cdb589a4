/**
 * `imgmount convert [-f FMT] [-O FMT] [-o OPTS] [-c] [-p] [-n] [-S SIZE] [-m N]
 * [-l SNAPSHOT] [-B BACKING [-F FMT]] [--force] SOURCE DEST`, after qemu-img
 * convert; the work is convertImage's (src/block/convert.ts). Like qemu-img it
 * prints nothing but the progress bar (-p, on stderr) and errors; unlike
 * qemu-img an existing DEST is refused unless --force (or -n).
 */
import { parseOpenOptions } from './open-options.js';
import { createRequire } from 'node:module';
import type CliProgress from 'cli-progress';
import { convertImage, parseFilterArgument } from '../index.js';
import { InvalidArgumentError } from '../block/errors.js';
import { parseSize } from '../block/size.js';
import { parseOptionList } from './create.js';

export interface ConvertArguments {
  source: string;
  dest: string;
  format?: string;
  outputFormat: string;
  options?: string[];
  compress?: boolean;
  progress?: boolean;
  existing?: boolean;
  sparseSize?: string;
  snapshot?: string;
  backing?: string;
  backingFormat?: string;
  parallel?: string;
  force?: boolean;
  allowFiles?: string[];
  filters?: string[];
  /** `--open-option KEY=VALUE` (repeatable): the source format's open options. */
  openOptions?: string[];
}

/** `-l`: snapshot.id=ID, snapshot.name=NAME, or a bare ID or name, as qemu-img takes it. */
export function parseSnapshotParam(text: string): string {
  if (!text.includes('=')) {
    if (text === '') throw new InvalidArgumentError('convert -l: empty snapshot; expected snapshot.id=ID, snapshot.name=NAME or an ID or name');
    return text;
  }
  const items = text.split(',');
  if (items.length !== 1) throw new InvalidArgumentError(`convert -l ${text}: give one of snapshot.id=ID or snapshot.name=NAME`);
  const match = /^snapshot\.(id|name)=(.+)$/.exec(items[0]!);
  if (!match) throw new InvalidArgumentError(`convert -l ${text}: expected snapshot.id=ID, snapshot.name=NAME or an ID or name`);
  return match[2]!;
}

function parseCount(text: string | undefined, flag: string): number | undefined {
  if (text === undefined) return undefined;
  if (!/^\d+$/.test(text)) throw new InvalidArgumentError(`convert ${flag} ${text}: expected a whole number`);
  return Number(text);
}

export async function runConvert(args: ConvertArguments): Promise<void> {
  const options = parseOptionList(args.options);
  let backingFile = args.backing;
  if (options.backing_file !== undefined) {
    backingFile ??= options.backing_file;
    delete options.backing_file;
  }
  let backingFormat = args.backingFormat;
  if (options.backing_fmt !== undefined) {
    backingFormat ??= options.backing_fmt;
    delete options.backing_fmt;
  }
  if (backingFormat !== undefined && backingFile === undefined) throw new InvalidArgumentError('convert: a backing format (-F) was given without a backing file (-B)');
  const sparseSize = args.sparseSize === undefined ? undefined : parseSparse(args.sparseSize);
  const bar = args.progress ? progressBar() : undefined;
  // Ctrl-C stops the conversion like a failure: a DEST it created is removed.
  const interrupt = new AbortController();
  const stop = (): void => interrupt.abort();
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  try {
    await convertImage(args.source, args.dest, {
      sourceFormat: args.format,
      targetFormat: args.outputFormat,
      options,
      compress: args.compress,
      existing: args.existing,
      force: args.force,
      sparseSize,
      snapshot: args.snapshot === undefined ? undefined : parseSnapshotParam(args.snapshot),
      backingFile,
      backingFormat,
      parallel: parseCount(args.parallel, '-m'),
      allowFiles: args.allowFiles && args.allowFiles.length > 0 ? args.allowFiles : undefined,
      filters: (args.filters ?? []).map((text) => parseFilterArgument(text)),
      sourceOpenOptions: parseOpenOptions(args.openOptions),
      progress: bar?.update,
      notice: (line) => process.stderr.write(`${line}\n`),
      signal: interrupt.signal,
    });
  } finally {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
    bar?.stop();
  }
}

function parseSparse(text: string): number {
  return parseSize(text, 'convert -S size');
}

/** The -p bar: on stderr, in percent of the virtual size, as qemu-img shows it. */
function progressBar(): { update: (done: number, total: number) => void; stop: () => void } {
  // cli-progress (CommonJS, loaded synchronously) only with -p.
  const cliProgress = createRequire(import.meta.url)('cli-progress') as typeof CliProgress;
  const bar = new cliProgress.SingleBar(
    { stream: process.stderr, format: 'converting [{bar}] {percentage}%', noTTYOutput: true, notTTYSchedule: 1000 },
    cliProgress.Presets.shades_classic,
  );
  let started = false;
  return {
    update(done, total) {
      if (!started) {
        bar.start(total, done);
        started = true;
      } else bar.update(done);
    },
    stop() {
      if (started) bar.stop();
    },
  };
}
