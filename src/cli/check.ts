/**
 * `imgmount check [-r [leaks|all]] [--output=human|json] FILE`, after qemu-img
 * check: exit 0 when clean, 2 when corruptions remain, 3 when only leaks
 * remain, 1 when the image could not be checked, 63 when its format has no
 * check (raw). `-r leaks` repairs leaks only, `-r all` (or a bare `-r`)
 * everything. As qemu-img, a repair that fixed anything is followed by a
 * second check, whose findings are reported with the first one's repairs.
 * What the check finds goes to stderr line by line, the summary to stdout
 * (qemu-img's words, and its JSON key order). A progress bar appears on a
 * terminal when the check takes longer than a moment.
 */
import { createRequire } from 'node:module';
import type CliProgress from 'cli-progress';
import { checkImage, NO_CHECK_EXIT_STATUS, NoCheckError, type CheckReport } from '../index.js';
import { ExitError } from './errors.js';
import { parseFilterArgument } from '../block/filters/spec.js';

export interface CheckArguments {
  file: string;
  format?: string;
  /** The repair level; undefined: check only. */
  repair?: 'leaks' | 'all';
  output: 'human' | 'json';
  /** `--filter NAME[:key=value,...]` (repeatable): protocol filters on the image file. */
  filters?: string[];
}

/** Milliseconds a check runs before a progress bar is shown. */
const PROGRESS_DELAY_MS = 500;

/** A report with the allocation figures a format may add (qcow2's fragmented and compressed clusters). */
type Report = CheckReport & { fragmentedClusters?: number; compressedClusters?: number };

export async function runCheck(args: CheckArguments): Promise<void> {
  const first = await check(args, args.repair);
  let report = first;
  let preamble = '';
  if (first.corruptionsFixed > 0 || first.leaksFixed > 0) {
    if (args.output === 'human') {
      preamble = 'The following inconsistencies were found and repaired:\n\n' +
        `    ${first.leaksFixed} leaked clusters\n    ${first.corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`;
    }
    // What is left is what a plain check finds now; the repairs are the first pass's.
    const second = await check(args, undefined);
    report = {
      ...second,
      corruptions: second.corruptions + first.corruptionsFixed,
      leaks: second.leaks + first.leaksFixed,
      corruptionsFixed: first.corruptionsFixed,
      leaksFixed: first.leaksFixed,
    };
  }
  const corruptionsLeft = report.corruptions - report.corruptionsFixed;
  const leaksLeft = report.leaks - report.leaksFixed;
  process.stdout.write(args.output === 'json' ? toJson(report) : preamble + toHuman(report));
  process.exitCode = corruptionsLeft > 0 ? 2 : leaksLeft > 0 ? 3 : 0;
}

/** One pass; its findings go to stderr as they are reported. */
async function check(args: CheckArguments, repair: CheckArguments['repair']): Promise<Report> {
  const progress = terminalProgress();
  let report: Report;
  try {
    report = await checkImage(args.file, {
      repair: repair !== undefined,
      fix: repair,
      format: args.format,
      progress: progress.update,
      filters: (args.filters ?? []).map((text) => parseFilterArgument(text)),
    });
  } catch (error) {
    // qemu-img's words and exit status for a format without a check, with the file named.
    if (error instanceof NoCheckError) throw new ExitError(`${args.file}: This image format does not support checks`, NO_CHECK_EXIT_STATUS);
    throw new ExitError(error instanceof Error ? error.message : String(error), 1);
  } finally {
    progress.stop();
  }
  if (report.messages.length > 0) process.stderr.write(`${report.messages.join('\n')}\n`);
  return report;
}

function terminalProgress(): { update: (done: number, total: number) => void; stop: () => void } {
  if (!process.stderr.isTTY) return { update: () => undefined, stop: () => undefined };
  const started = Date.now();
  let bar: CliProgress.SingleBar | undefined;
  return {
    update(done, total) {
      if (!bar && Date.now() - started > PROGRESS_DELAY_MS) {
        // cli-progress (CommonJS, loaded synchronously) only when a bar is shown.
        const cliProgress = createRequire(import.meta.url)('cli-progress') as typeof CliProgress;
        bar = new cliProgress.SingleBar({ stream: process.stderr, format: 'checking [{bar}] {percentage}% | {value}/{total} L2 tables' }, cliProgress.Presets.shades_classic);
        bar.start(total, done);
      }
      bar?.update(done);
    },
    stop() {
      bar?.stop();
    },
  };
}

/**
 * qemu-img's JSON: its keys in the order its QDict's hash buckets give them;
 * filename, format and check-errors always, every other only when not zero.
 */
function toJson(report: Report): string {
  const optional = (value: number | undefined): number | undefined => (value === undefined || value === 0 ? undefined : value);
  const json: Record<string, unknown> = {
    'image-end-offset': optional(report.imageEndOffset),
    'compressed-clusters': optional(report.compressedClusters),
    'total-clusters': optional(report.totalClusters),
    corruptions: optional(report.corruptions - report.corruptionsFixed),
    'corruptions-fixed': optional(report.corruptionsFixed),
    'check-errors': 0,
    leaks: optional(report.leaks - report.leaksFixed),
    'leaks-fixed': optional(report.leaksFixed),
    'allocated-clusters': optional(report.allocatedClusters),
    filename: report.filename,
    format: report.format,
    'fragmented-clusters': optional(report.fragmentedClusters),
  };
  return `${JSON.stringify(json, null, 4)}\n`;
}

/**
 * `part * 100 / whole` with two decimals, as printf's %0.2f: like toFixed,
 * except that an exact tie (3.125) goes to the even digit, not up.
 */
function percent(part: number, whole: number): string {
  const value = (part * 100) / whole;
  const hundredths = Math.floor((part * 10000) / whole);
  const tie = (2 * hundredths + 1) * whole === 2 * part * 10000 && (2 * hundredths + 1) % 25 === 0;
  if (!tie) return value.toFixed(2);
  return ((hundredths + (hundredths % 2)) / 100).toFixed(2);
}

/** qemu-img's human summary. */
function toHuman(report: Report): string {
  let out = '';
  const corruptionsLeft = report.corruptions - report.corruptionsFixed;
  const leaksLeft = report.leaks - report.leaksFixed;
  if (corruptionsLeft === 0 && leaksLeft === 0) out += 'No errors were found on the image.\n';
  if (corruptionsLeft > 0) {
    out += `\n${corruptionsLeft} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
  }
  if (leaksLeft > 0) out += `\n${leaksLeft} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
  const total = report.totalClusters ?? 0;
  const allocated = report.allocatedClusters ?? 0;
  if (total !== 0 && allocated !== 0) {
    out += `${allocated}/${total} = ${percent(allocated, total)}% allocated, ${percent(report.fragmentedClusters ?? 0, allocated)}% fragmented, ` +
      `${percent(report.compressedClusters ?? 0, allocated)}% compressed clusters\n`;
  }
  if (report.imageEndOffset) out += `Image end offset: ${report.imageEndOffset}\n`;
  return out;
}
