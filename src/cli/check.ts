/**
 * `imgmount check [-r] [--output=human|json] FILE`, after qemu-img check:
 * exit 0 when clean, 2 when corruptions remain, 3 when only leaks remain,
 * 1 when the image could not be checked, 63 when its format has no check
 * (raw). A progress bar appears on a terminal when the check takes longer
 * than a moment.
 */
import { createRequire } from 'node:module';
import type CliProgress from 'cli-progress';
import { checkImage, NO_CHECK_EXIT_STATUS, NoCheckError, type CheckReport } from '../index.js';
import { ExitError } from './errors.js';

export interface CheckArguments {
  file: string;
  format?: string;
  repair?: boolean;
  output: 'human' | 'json';
}

/** Milliseconds a check runs before a progress bar is shown. */
const PROGRESS_DELAY_MS = 500;

export async function runCheck(args: CheckArguments): Promise<void> {
  const progress = terminalProgress();
  let report: CheckReport;
  try {
    report = await checkImage(args.file, { repair: args.repair, format: args.format, progress: progress.update });
  } catch (error) {
    // qemu-img's words and exit status for a format without a check, with the file named.
    if (error instanceof NoCheckError) throw new ExitError(`${args.file}: This image format does not support checks`, NO_CHECK_EXIT_STATUS);
    throw new ExitError(error instanceof Error ? error.message : String(error), 1);
  } finally {
    progress.stop();
  }
  const corruptionsLeft = report.corruptions - report.corruptionsFixed;
  const leaksLeft = report.leaks - report.leaksFixed;
  process.stdout.write(args.output === 'json' ? toJson(report) : toHuman(report, args.repair ?? false));
  process.exitCode = corruptionsLeft > 0 ? 2 : leaksLeft > 0 ? 3 : 0;
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

function toJson(report: CheckReport): string {
  const json: Record<string, unknown> = {
    'image-end-offset': report.imageEndOffset,
    'total-clusters': report.totalClusters,
    'check-errors': 0,
    'allocated-clusters': report.allocatedClusters,
    filename: report.filename,
    format: report.format,
    corruptions: report.corruptions - report.corruptionsFixed,
    leaks: report.leaks - report.leaksFixed,
    'corruptions-fixed': report.corruptionsFixed,
    'leaks-fixed': report.leaksFixed,
  };
  return `${JSON.stringify(json, null, 4)}\n`;
}

function toHuman(report: CheckReport, repaired: boolean): string {
  const lines: string[] = [];
  for (const message of report.messages) lines.push(`${repaired ? 'Repairing' : 'ERROR'} ${message}`);
  if (repaired && (report.corruptionsFixed > 0 || report.leaksFixed > 0)) {
    lines.push(`The following inconsistencies were found and repaired:`);
    lines.push(`    ${report.leaksFixed} leaked clusters`, `    ${report.corruptionsFixed} corruptions`, '');
  }
  const corruptionsLeft = report.corruptions - report.corruptionsFixed;
  const leaksLeft = report.leaks - report.leaksFixed;
  if (corruptionsLeft > 0) {
    lines.push(`${corruptionsLeft} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
  }
  if (leaksLeft > 0) {
    lines.push(`${leaksLeft} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
  }
  if (corruptionsLeft === 0 && leaksLeft === 0) lines.push('No errors were found on the image.');
  if (report.totalClusters !== undefined && report.allocatedClusters !== undefined && report.totalClusters > 0) {
    const percent = ((100 * report.allocatedClusters) / report.totalClusters).toFixed(2);
    lines.push(`${report.allocatedClusters}/${report.totalClusters} = ${percent}% allocated`);
  }
  if (report.imageEndOffset !== undefined) lines.push(`Image end offset: ${report.imageEndOffset}`);
  return `${lines.join('\n')}\n`;
}
