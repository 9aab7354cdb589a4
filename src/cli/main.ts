/**
 * The command line: parses (args.ts, over the commands of commands.ts) and
 * dispatches; each command's work lives in its own module. Every failure
 * becomes one line on stderr with a non-zero exit.
 */
import { readFileSync } from 'node:fs';
import { parseCommandLine } from './args.js';
import type { CheckArguments } from './check.js';
import { HELP_FORMAT_NAMES, invocation, program } from './commands.js';
import type { ConvertArguments } from './convert.js';
import type { CreateArguments } from './create.js';
import { ExitError, reportError } from './errors.js';
import type { InfoArguments } from './info.js';
import type { MapArguments } from './map.js';
import type { MountArguments } from './mount.js';
import type { ResizeArguments } from './resize.js';

// Each command's module (the block layer, FUSE, cli-progress) loads only when used, so
// `imgmount --version` and `--help` start about as fast as node itself.
const runCheck = async (args: CheckArguments) => (await import('./check.js')).runCheck(args);
const runConvert = async (args: ConvertArguments) => (await import('./convert.js')).runConvert(args);
const runCreate = async (args: CreateArguments) => (await import('./create.js')).runCreate(args);
const runInfo = async (args: InfoArguments) => (await import('./info.js')).runInfo(args);
const runMap = async (args: MapArguments) => (await import('./map.js')).runMap(args);
const runResize = async (args: ResizeArguments) => (await import('./resize.js')).runResize(args);
// A background mount without -o starts its daemon from background.ts, without the block layer or FUSE.
const runMount = async (args: MountArguments) => {
  if (!(await (await import('./background.js')).runBackgroundMount(args))) await (await import('./mount.js')).runMount(args);
};
const runUnmount = async (args: { mountpoint: string }) => (await import('./mount.js')).runUnmount(args);

/** "imgmount 0.1.0": the version from package.json, read with fs (no other module needed). */
export function versionLine(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
  return `imgmount ${pkg.version}`;
}

/** The width help is wrapped to: the terminal's, at most 100 columns. */
export function helpWidth(): number {
  return Math.min(100, process.stdout.columns ?? 100);
}

export async function main(argv: string[]): Promise<void> {
  if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-V')) {
    process.stdout.write(`${versionLine()}\n`);
    return;
  }
  const outcome = parseCommandLine(program(HELP_FORMAT_NAMES), argv, helpWidth());
  if (outcome.kind === 'error') throw new ExitError(outcome.message, 1);
  if (outcome.kind === 'help') {
    process.stdout.write(`${outcome.text}\n`);
    return;
  }
  const call = invocation(outcome.parsed);
  switch (call.command) {
    case 'create':
      return runCreate(call.args);
    case 'info':
      return runInfo(call.args);
    case 'check':
      return runCheck(call.args);
    case 'map':
      return runMap(call.args);
    case 'convert':
      return runConvert(call.args);
    case 'resize':
      return runResize(call.args);
    case 'mount':
      return runMount(call.args);
    case 'unmount':
      return runUnmount(call.args);
  }
}

// Every command has finished its work (and written its output: stdout and stderr are
// synchronous on Linux) when main settles: exit at once rather than tear the
// runtime down politely, a few milliseconds more.
main(process.argv.slice(2))
  .catch(reportError)
  .finally(() => process.exit());
