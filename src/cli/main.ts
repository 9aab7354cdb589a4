/**
 * The command line: yargs wiring for every imgmount command. Each command's
 * work lives in its own module; this file only parses and dispatches, and
 * turns every failure into one line on stderr with a non-zero exit.
 */
import { readFileSync } from 'node:fs';
import type { CheckArguments } from './check.js';
import type { CreateArguments } from './create.js';
import { ExitError, reportError } from './errors.js';
import type { InfoArguments } from './info.js';
import type { MapArguments } from './map.js';
import type { MountArguments } from './mount.js';

// yargs and each command's module (the block layer, FUSE, cli-progress) load only when
// used, so `imgmount --version` starts as fast as node itself.
const runCheck = async (args: CheckArguments) => (await import('./check.js')).runCheck(args);
const runCreate = async (args: CreateArguments) => (await import('./create.js')).runCreate(args);
const runInfo = async (args: InfoArguments) => (await import('./info.js')).runInfo(args);
const runMap = async (args: MapArguments) => (await import('./map.js')).runMap(args);
const runMount = async (args: MountArguments) => (await import('./mount.js')).runMount(args);
const runUnmount = async (args: { mountpoint: string }) => (await import('./mount.js')).runUnmount(args);

const outputChoices = ['human', 'json'] as const;

const ALLOW_FILES_HELP =
  'backing files and external data files an image names must lie in DIR (repeatable); by default any regular file you can read';

/** A repeatable string option: yargs gives a string, an array or nothing. */
export function asList(value: string | string[] | undefined): string[] {
  return value === undefined ? [] : Array.isArray(value) ? value : [value];
}

/** "imgmount 0.1.0": the version from package.json, read with fs (no other module needed). */
export function versionLine(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
  return `imgmount ${pkg.version}`;
}

export async function main(argv: string[]): Promise<void> {
  if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-V')) {
    process.stdout.write(`${versionLine()}\n`);
    return;
  }
  const { default: yargs } = await import('yargs');
  const { formatDrivers } = await import('../formats/index.js');
  // Help texts come from the list of formats.
  const readable = formatDrivers.filter((driver) => !driver.recognizedOnly).map((driver) => driver.name).join(', ');
  const creatable = formatDrivers.filter((driver) => driver.create !== undefined).map((driver) => driver.name).join(', ');
  const parser = yargs(argv)
    .scriptName('imgmount')
    .usage('$0 [options] IMAGE... MOUNTPOINT\n$0 <command> [options]\n$0 --version')
    .command(
      'create <file> [size]',
      'create a disk image (like qemu-img create)',
      (y) =>
        y
          .positional('file', { type: 'string', demandOption: true, describe: 'image file to create' })
          .positional('size', { type: 'string', describe: 'virtual size, with an optional K, M, G or T suffix' })
          .option('format', { alias: 'f', type: 'string', default: 'raw', describe: `image format (${creatable})` })
          .option('backing', { alias: 'b', type: 'string', describe: 'backing file' })
          .option('backing-format', { alias: 'F', type: 'string', describe: `backing file format (${readable})` })
          .option('options', { alias: 'o', type: 'string', describe: 'format options: cluster_size=N,table_size=N (repeatable)' })
          .option('force', { type: 'boolean', default: false, describe: 'overwrite an existing file' }),
      (args) =>
        runCreate({
          format: args.format,
          file: args.file,
          size: args.size,
          backing: args.backing,
          backingFormat: args['backing-format'],
          options: asList(args.options),
          force: args.force,
        }),
    )
    .command(
      'info <file>',
      'show what an image is (like qemu-img info)',
      (y) =>
        y
          .positional('file', { type: 'string', demandOption: true })
          .option('format', { alias: 'f', type: 'string', describe: `image format (${readable}); no probing` })
          .option('snapshot', { alias: 's', type: 'string', describe: 'describe this internal snapshot (id or name) instead of the current state' })
          .option('output', { choices: outputChoices, default: 'human' as const })
          .option('backing-chain', { type: 'boolean', default: false, describe: 'describe every image of the backing chain' })
          .option('allow-files', { type: 'string', describe: ALLOW_FILES_HELP }),
      (args) =>
        runInfo({
          file: args.file,
          format: args.format,
          snapshot: args.snapshot,
          output: args.output,
          backingChain: args['backing-chain'],
          allowFiles: asList(args['allow-files']),
        }),
    )
    .command(
      'check <file>',
      'check image metadata (like qemu-img check); exit 0 clean, 2 corrupt, 3 leaks, 1 failed, 63 no check for the format',
      (y) =>
        y
          .positional('file', { type: 'string', demandOption: true })
          .option('format', { alias: 'f', type: 'string', describe: `image format (${readable}); no probing` })
          .option('repair', { alias: 'r', type: 'boolean', default: false, describe: 'repair what can be repaired' })
          .option('output', { choices: outputChoices, default: 'human' as const }),
      (args) => runCheck({ file: args.file, format: args.format, repair: args.repair, output: args.output }),
    )
    .command(
      'map <file>',
      'show where the guest bytes live, data, zero or unallocated, down the backing chain (like qemu-img map)',
      (y) =>
        y
          .positional('file', { type: 'string', demandOption: true })
          .option('format', { alias: 'f', type: 'string', describe: `image format (${readable}); no probing` })
          .option('snapshot', { alias: 's', type: 'string', describe: 'map this internal snapshot (id or name) instead of the current state' })
          .option('allow-files', { type: 'string', describe: ALLOW_FILES_HELP })
          .option('output', { choices: outputChoices, default: 'human' as const, describe: "human: qemu-img's table of data runs; json: every run, as qemu-img map --output=json" }),
      (args) =>
        runMap({
          file: args.file,
          format: args.format,
          snapshot: args.snapshot,
          allowFiles: asList(args['allow-files']),
          output: args.output,
        }),
    )
    .command(
      '$0 [paths..]',
      'mount IMAGE... at MOUNTPOINT: one raw file per image (disk.qed -> disk.raw)',
      (y) =>
        y
          .positional('paths', { type: 'string', array: true, describe: 'IMAGE... MOUNTPOINT' })
          .option('read-only', { alias: 'r', type: 'boolean', describe: 'open the images read-only; writes fail with EROFS' })
          .option('format', { alias: 'f', type: 'string', describe: `image format (${readable}); no probing` })
          .option('snapshot', { alias: 's', type: 'string', describe: 'mount this internal snapshot (id or name) read-only; the file keeps its usual name' })
          .option('name', { type: 'string', describe: 'file name in the mount (one image only)' })
          .option('allow-files', { type: 'string', describe: ALLOW_FILES_HELP })
          .option('allow-other', { type: 'boolean', describe: 'let other users open the files' })
          .option('foreground', { type: 'boolean', describe: 'stay attached instead of returning once the mount is ready' })
          .option('debug', { alias: 'd', type: 'boolean', describe: 'log every FUSE operation (implies --foreground without --log)' })
          .option('log', { type: 'string', describe: "append the daemon's log to this file" })
          .option('cache-size', { type: 'string', describe: 'L2-table cache per image (default 16M: every table of a 128 GiB default-geometry QED image); a size below 4 tables, 0 included, is raised to 4 tables, with a notice' })
          .option('options', { alias: 'o', type: 'string', describe: 'mount(8)-style options: ro, allow_other, format=FMT, snapshot=ID, name=NAME, log=FILE, debug, foreground, nonempty, cache_size=SIZE' })
          .option('unmount', { alias: 'u', type: 'boolean', describe: 'unmount MOUNTPOINT (same as imgmount unmount)' }),
      (args) =>
        runMount({
          paths: args.paths ?? [],
          format: args.format,
          snapshot: args.snapshot,
          allowFiles: asList(args['allow-files']),
          readOnly: args['read-only'],
          allowOther: args['allow-other'],
          name: args.name,
          foreground: args.foreground,
          debug: args.debug,
          log: args.log,
          cacheSize: args['cache-size'],
          options: asList(args.options),
          unmount: args.unmount,
        }),
    )
    .command(
      'unmount <mountpoint>',
      'unmount and wait until every image is closed cleanly',
      (y) => y.positional('mountpoint', { type: 'string', demandOption: true }),
      (args) => runUnmount({ mountpoint: args.mountpoint }),
    )
    .strict()
    .demandCommand(1, 'give a command (create, info, check, map) or IMAGE... MOUNTPOINT to mount')
    .help()
    .alias('help', 'h')
    .version(false)
    .wrap(Math.min(100, process.stdout.columns ?? 100))
    .fail((message, error) => {
      throw error ?? new ExitError(`${message} (see imgmount --help)`, 1);
    });
  await parser.parseAsync();
}

main(process.argv.slice(2)).catch(reportError);
