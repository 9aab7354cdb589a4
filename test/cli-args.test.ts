/**
 * The command-line parser (src/cli/args.ts, commands.ts) against yargs 18 wired
 * as src/cli/main.ts wired it before the parser replaced it: for every argv of a
 * corpus (the usual command lines, the odd ones, and random mixes of options,
 * values and positionals) both give the same command with the same handler
 * arguments, or the same error message, or the same help at several widths.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import yargs from 'yargs';
import { parseCommandLine } from '../src/cli/args.js';
import { formatNames, HELP_FORMAT_NAMES, invocation, program } from '../src/cli/commands.js';
import { formatDrivers } from '../src/formats/index.js';

const formats = formatNames(formatDrivers);

type Outcome = { ok: { command: string; args: unknown } } | { help: string } | { error: string } | { none: true };

const REPAIR_LEVELS = ['leaks', 'all'];

/**
 * check's `-r [leaks|all]`, which yargs cannot declare (a boolean that takes a
 * value only when it is one of two words): for a check command line, the
 * level words are taken out of argv (`-r leaks` -> `-r`, `--repair=all` ->
 * `--repair`) and the level of the last -r given is kept, to be applied when
 * yargs says the flag is true.
 */
function splitRepairLevels(argv: string[]): { argv: string[]; level: string | undefined } {
  // (the command is check when its name is the first positional yargs sees)
  const bare = yargs(argv).boolean('help').alias('help', 'h').help(false).version(false).parseSync();
  if (bare._[0] !== 'check') return { argv, level: undefined };
  const out: string[] = [];
  let level: string | undefined;
  // Only after the command's name (yargs reads what comes before it for the default command).
  const commandAt = argv.indexOf('check');
  out.push(...argv.slice(0, commandAt + 1));
  for (let i = commandAt + 1; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') {
      out.push(...argv.slice(i));
      break;
    }
    const inline = /^(--repair|-[A-Za-z]*r)=(.*)$/.exec(arg);
    if (inline) {
      level = REPAIR_LEVELS.includes(inline[2]!) ? inline[2] : undefined;
      out.push(level !== undefined ? inline[1]! : arg);
      continue;
    }
    if (arg === '--repair' || /^-[A-Za-z]*r$/.test(arg)) {
      level = REPAIR_LEVELS.includes(argv[i + 1] ?? '') ? argv[++i] : undefined;
      out.push(arg);
      continue;
    }
    if (arg === '--no-repair') level = undefined;
    out.push(arg);
  }
  return { argv: out, level };
}

/** Stands for resize's size in what yargs reads (see takeResizeSize). */
const SIZE_PLACEHOLDER = 'resize-size-placeholder';

/**
 * resize's size, which yargs cannot declare (qemu-img resize takes its last
 * argument as the size before reading options, so `-1G` is a size): for a
 * resize command line not ending in -h/--help, the last argument is taken out
 * and a placeholder put right after the command's name, where yargs reads it
 * as the first positional (so `file` and `size` arrive swapped).
 */
function takeResizeSize(argv: string[]): { argv: string[]; size: string | undefined } {
  const positionalsOf = (part: string[]) => yargs(part).boolean('help').alias('help', 'h').help(false).version(false).parseSync()._;
  if (positionalsOf(argv)[0] !== 'resize') return { argv, size: undefined };
  // The command's name: the first 'resize' that yargs reads as a positional (not as an option's value).
  const commandAt = argv.findIndex((arg, i) => arg === 'resize' && positionalsOf(argv.slice(0, i)).length === 0 && positionalsOf(argv.slice(0, i + 1))[0] === 'resize');
  const last = argv[argv.length - 1]!;
  if (argv.length - 1 <= commandAt || last === '-h' || last === '--help') return { argv, size: undefined };
  return { argv: [...argv.slice(0, commandAt + 1), SIZE_PLACEHOLDER, ...argv.slice(commandAt + 1, -1)], size: last };
}

/** The yargs wiring of main.ts before the change, handlers replaced by a recorder. */
async function reference(original: string[], columns = 100): Promise<Outcome> {
  const split = splitRepairLevels(original);
  const level = split.level;
  const { argv, size } = takeResizeSize(split.argv);
  const asList = (v: unknown): unknown[] => (v === undefined ? [] : Array.isArray(v) ? v : [v]);
  const { readable, creatable } = formats;
  const OPEN_OPTION_HELP = "an option of the image's format for opening it, KEY=VALUE (repeatable; vpc: force_size_calc=chs|current_size)";
  const FILTER_HELP =
  'a filter between the layers, NAME[:key=value,...] (repeatable, applied in order; layer=N picks the image of the backing chain): ' +
  'blkdebug:event=NAME,errno=N[,once=on][,nth=K] or blkdebug:config=FILE, blkverify:reference=FILE, log-writes:log=FILE; see docs/filters.md';
  const ALLOW_FILES_HELP =
    'backing files and external data files an image names must lie in DIR (repeatable); by default any regular file you can read';
  const outputChoices = ['human', 'json'] as const;
  let result: { command: string; args: unknown } | undefined;
  const run = (command: string) => (args: unknown) => {
    result = { command, args };
  };
  const out: string[] = [];
  const log = console.log;
  const exit = process.exit;
  console.log = (...parts: unknown[]) => void out.push(parts.join(' '));
  process.exit = ((code: number) => {
    throw { exitMarker: code };
  }) as typeof process.exit;
  try {
    const parser = yargs(argv)
    .scriptName('imgmount')
    .usage('$0 [options] IMAGE... MOUNTPOINT\n$0 <command> [options]\n$0 --version')
    .command('create <file> [size]', 'create a disk image (like qemu-img create)', (y: any) => y
          .positional('file', { type: 'string', demandOption: true, describe: 'image file to create' })
          .positional('size', { type: 'string', describe: 'virtual size, with an optional K, M, G or T suffix' })
          .option('format', { alias: 'f', type: 'string', default: 'raw', describe: `image format (${creatable})` })
          .option('backing', { alias: 'b', type: 'string', describe: 'backing file' })
          .option('backing-format', { alias: 'F', type: 'string', describe: `backing file format (${readable})` })
          .option('options', { alias: 'o', type: 'string', describe: 'format options: cluster_size=N,table_size=N (repeatable)' })
          .option('force', { type: 'boolean', default: false, describe: 'overwrite an existing file' }),
      (args: any) => run('create')({ format: args.format, file: args.file, size: args.size, backing: args.backing, backingFormat: args['backing-format'], options: asList(args.options), force: args.force }))
    .command('info <file>', 'show what an image is (like qemu-img info)', (y: any) => y
          .positional('file', { type: 'string', demandOption: true })
          .option('format', { alias: 'f', type: 'string', describe: `image format (${readable}); no probing` })
          .option('snapshot', { alias: 's', type: 'string', describe: 'describe this internal snapshot (id or name) instead of the current state' })
          .option('output', { choices: outputChoices, default: 'human' })
          .option('backing-chain', { type: 'boolean', default: false, describe: 'describe every image of the backing chain' })
          .option('allow-files', { type: 'string', describe: ALLOW_FILES_HELP })
          .option('filter', { type: 'string', describe: FILTER_HELP })
          .option('open-option', { type: 'string', describe: OPEN_OPTION_HELP }),
      (args: any) => run('info')({ file: args.file, format: args.format, snapshot: args.snapshot, output: args.output, backingChain: args['backing-chain'], allowFiles: asList(args['allow-files']), filters: asList(args.filter), openOptions: asList(args['open-option']) }))
    .command('check <file>', 'check image metadata (like qemu-img check); exit 0 clean, 2 corrupt, 3 leaks, 1 failed, 63 no check for the format', (y: any) => y
          .positional('file', { type: 'string', demandOption: true })
          .option('format', { alias: 'f', type: 'string', describe: `image format (${readable}); no probing` })
          .option('repair', { alias: 'r', type: 'boolean', default: false, describe: 'repair: -r leaks only leaked clusters, -r all (or a bare -r) everything that can be repaired' })
          .option('output', { choices: outputChoices, default: 'human' })
          .option('filter', { type: 'string', describe: FILTER_HELP }),
      (args: any) => run('check')({ file: args.file, format: args.format, repair: args.repair === true ? level ?? 'all' : undefined, output: args.output, filters: asList(args.filter) }))
    .command('resize <file> <size>', 'change the virtual size of an image (like qemu-img resize); the size is always the last argument', (y: any) => y
          .positional('file', { type: 'string', demandOption: true })
          .positional('size', { type: 'string', demandOption: true, describe: 'the new size, or +SIZE / -SIZE to grow or shrink by SIZE (K, M, G, T suffixes)' })
          .option('format', { alias: 'f', type: 'string', describe: `image format (${readable}); no probing` })
          .option('shrink', { type: 'boolean', default: false, describe: 'allow making the image smaller: the data past the new end is deleted' }),
      (args: any) => run('resize')({
        file: size === undefined ? args.file : args.size,
        size: size === undefined ? args.size : size,
        format: args.format,
        shrink: args.shrink,
      }))
    .command('convert <source> <dest>', 'copy an image into a new image of another format (like qemu-img convert); holes stay holes', (y: any) => y
          .positional('source', { type: 'string', demandOption: true, describe: 'image to read (its whole backing chain)' })
          .positional('dest', { type: 'string', demandOption: true, describe: 'image to write' })
          .option('format', { alias: 'f', type: 'string', describe: `source format (${readable}); no probing` })
          .option('output-format', { alias: 'O', type: 'string', default: 'raw', describe: `destination format (${creatable})` })
          .option('options', { alias: 'o', type: 'string', describe: 'destination format options, as for create -o (repeatable)' })
          .option('compress', { alias: 'c', type: 'boolean', default: false, describe: 'compress the destination where its format can' })
          .option('progress', { alias: 'p', type: 'boolean', default: false, describe: 'show a progress bar on stderr' })
          .option('skip-create', { alias: 'n', type: 'boolean', default: false, describe: 'write into the existing dest instead of creating it (at least as large as source)' })
          .option('sparse-size', { alias: 'S', type: 'string', describe: 'zero runs of this size in data are not written (default 4k; 0: write everything)' })
          .option('snapshot', { alias: 'l', type: 'string', describe: 'convert this internal snapshot: snapshot.name=NAME, snapshot.id=ID, or an id or name' })
          .option('backing', { alias: 'B', type: 'string', describe: "create dest over this backing file (same content as the source's backing chain): only the source's top image is copied" })
          .option('backing-format', { alias: 'F', type: 'string', describe: `format of the -B backing file (${readable})` })
          .option('parallel', { alias: 'm', type: 'string', describe: 'reads in flight, 1..16 (default 8; two buffers are written at a time)' })
          .option('force', { type: 'boolean', default: false, describe: 'overwrite an existing dest (qemu-img does so silently)' })
          .option('allow-files', { type: 'string', describe: ALLOW_FILES_HELP })
          .option('filter', { type: 'string', describe: FILTER_HELP })
          .option('open-option', { type: 'string', describe: OPEN_OPTION_HELP }),
      (args: any) => run('convert')({
        source: args.source, dest: args.dest, format: args.format, outputFormat: args['output-format'], options: asList(args.options),
        compress: args.compress, progress: args.progress, existing: args['skip-create'], sparseSize: args['sparse-size'], snapshot: args.snapshot,
        backing: args.backing, backingFormat: args['backing-format'], parallel: args.parallel, force: args.force,
        allowFiles: asList(args['allow-files']), filters: asList(args.filter), openOptions: asList(args['open-option']),
      }))
    .command('map <file>', 'show where the guest bytes live, data, zero or unallocated, down the backing chain (like qemu-img map)', (y: any) => y
          .positional('file', { type: 'string', demandOption: true })
          .option('format', { alias: 'f', type: 'string', describe: `image format (${readable}); no probing` })
          .option('snapshot', { alias: 's', type: 'string', describe: 'map this internal snapshot (id or name) instead of the current state' })
          .option('allow-files', { type: 'string', describe: ALLOW_FILES_HELP })
          .option('filter', { type: 'string', describe: FILTER_HELP })
          .option('open-option', { type: 'string', describe: OPEN_OPTION_HELP })
          .option('output', { choices: outputChoices, default: 'human', describe: "human: qemu-img's table of data runs; json: every run, as qemu-img map --output=json" }),
      (args: any) => run('map')({ file: args.file, format: args.format, snapshot: args.snapshot, allowFiles: asList(args['allow-files']), output: args.output, filters: asList(args.filter), openOptions: asList(args['open-option']) }))
    .command('$0 [paths..]', 'mount IMAGE... at MOUNTPOINT: one raw file per image (disk.qed -> disk.raw)', (y: any) => y
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
          .option('idle-clean', { type: 'string', describe: 'seconds without writes after which each image is flushed and marked clean (QED need-check, qcow2 dirty bit) until its next write, so a crash after that needs no repair (default 5; 0: only at unmount)' })
          .option('busy-poll', { type: 'string', describe: 'microseconds the daemon keeps reading for the next request after answering its last one, adapted to how soon requests come (lower latency at queue depth 1 for some CPU; default 50, 0: off)' })
          .option('filter', { type: 'string', describe: FILTER_HELP })
          .option('open-option', { type: 'string', describe: OPEN_OPTION_HELP })
          .option('options', { alias: 'o', type: 'string', describe: 'mount(8)-style options: ro, allow_other, format=FMT, snapshot=ID, name=NAME, log=FILE, debug, foreground, nonempty, cache_size=SIZE, idle_clean=SECONDS, busy_poll=MICROSECONDS' })
          .option('unmount', { alias: 'u', type: 'boolean', describe: 'unmount MOUNTPOINT (same as imgmount unmount)' }),
      (args: any) => run('mount')({ paths: args.paths ?? [], format: args.format, snapshot: args.snapshot, allowFiles: asList(args['allow-files']), readOnly: args['read-only'], allowOther: args['allow-other'], name: args.name, foreground: args.foreground, debug: args.debug, log: args.log, cacheSize: args['cache-size'], idleClean: args['idle-clean'], busyPoll: args['busy-poll'], filters: asList(args.filter), openOptions: asList(args['open-option']), options: asList(args.options), unmount: args.unmount }))
    .command('unmount <mountpoint>', 'unmount and wait until every image is closed cleanly', (y: any) => y.positional('mountpoint', { type: 'string', demandOption: true }), (args: any) => run('unmount')({ mountpoint: args.mountpoint }))
    .strict()
    .demandCommand(1, 'give a command (create, info, check, map) or IMAGE... MOUNTPOINT to mount')
    .help().alias('help', 'h').version(false)
    .wrap(Math.min(100, columns))
    .fail((message, error) => { throw error ?? new Error(`${message} (see imgmount --help)`); });
    await parser.parseAsync();
    return result ? { ok: result } : { none: true };
  } catch (error) {
    const marker = (error as { exitMarker?: number }).exitMarker;
    if (marker !== undefined) return { help: out.join('\n') };
    return { error: String((error as Error).message) };
  } finally {
    console.log = log;
    process.exit = exit;
  }
}

/** The same through the new parser. */
function ours(argv: string[], columns = 100): Outcome {
  const outcome = parseCommandLine(program(formats), argv, Math.min(100, columns));
  if (outcome.kind === 'error') return { error: outcome.message };
  if (outcome.kind === 'help') return { help: outcome.text };
  return { ok: invocation(outcome.parsed) };
}

/** Drops undefined values (yargs handlers built objects whose absent options are undefined too). */
function normal(outcome: Outcome): unknown {
  return JSON.parse(JSON.stringify(outcome));
}

async function expectSame(argv: string[], columns = 100): Promise<void> {
  expect(normal(ours(argv, columns)), JSON.stringify(argv)).toEqual(normal(await reference(argv, columns)));
}

const corpus: string[][] = [
  [],
  ['convert', 'a.qcow2', 'b.qed'],
  ['convert', '-O', 'qed', '-f', 'qcow2', '-o', 'cluster_size=4096', '-o', 'table_size=2', 'a', 'b'],
  ['convert', '-pcn', '-S', '0', '-m', '4', '-l', 'snapshot.name=s', 'a', 'b'],
  ['convert', '-B', 'base.raw', '-F', 'raw', '--force', '--filter', 'blkdebug:event=read_aio,errno=5', 'a', 'b'],
  ['convert', 'a'],
  ['convert', 'a', 'b', 'c'],
  ['convert', '--no-skip-create', '--sparse-size=4k', '--output-format=raw', 'a', 'b'],
  ['disk.qed', '/mnt/x'],
  ['-r', 'a.qed', 'b.qcow2', '/mnt/x'],
  ['--read-only', '-f', 'qed', '--name', 'x.raw', 'a', 'm'],
  ['-o', 'ro,allow_other', '-o', 'nonempty', 'a', 'm'],
  ['--log', '/tmp/l', '-d', 'a', 'm'],
  ['--cache-size', '64M', '--allow-files', '/d', '--allow-files', '/e', 'a', 'm'],
  ['--idle-clean', '1.5', 'a', 'm'],
  ['--idle-clean=0', '-o', 'idle_clean=0', 'a', 'm'],
  ['--busy-poll', '0', '-o', 'busy_poll=0', 'a', 'm'],
  ['a', 'm', '--busy-poll=20'],
  ['a', 'm', '--idle-clean'],
  ['--foreground', '--allow-other', 'a', 'm'],
  ['--filter', 'blkdebug:event=l2_update,errno=5,once=on', 'disk.qed', '/mnt/x'],
  ['--filter', 'blkdebug:event=l2_load,errno=5', '--filter=blkverify:reference=r.raw', 'a', 'm'],
  ['info', '--filter', 'blkdebug:event=read_aio,errno=5', 'x'],
  ['info', '--open-option', 'force_size_calc=chs', 'x.vhd'],
  ['--open-option=force_size_calc=current_size', '-r', 'x.vhd', '/mnt/x'],
  ['convert', '-O', 'raw', '--open-option', 'a=b', '--open-option', 'c=d', 'x', 'y'],
  ['check', '-r', '--filter', 'blkdebug:config=c.ini', 'x'],
  ['map', 'x', '--filter'],
  ['-u', 'm'],
  ['-s', 'snap1', 'a', 'm'],
  ['unmount', '/mnt/x'],
  ['unmount'],
  ['unmount', 'a', 'b'],
  ['info', 'disk.qed'],
  ['info', '--output=json', 'disk.qed'],
  ['info', '--output', 'json', '--backing-chain', 'disk.qed'],
  ['info', '-f', 'qcow2', '-s', 'snap', '--allow-files', 'd', 'x'],
  ['info'],
  ['info', 'a', 'b'],
  ['info', '--output', 'xml', 'a'],
  ['info', '--output=', 'a'],
  ['info', '--output', 'json', '--output', 'human', 'a'],
  ['info', '--output', 'json', '--output', 'xml', 'a'],
  ['info', '--output', '5', 'a'],
  ['info', '--output', 'a'],
  ['info', 'a', '--output'],
  ['info', '--no-output', 'a'],
  ['info', 'a', 'map'],
  ['info', 'a', '--version'],
  ['info', 'a', '--backing-chain', 'false'],
  ['info', 'a', '--backing-chain=yes'],
  ['info', 'a', '--backingChain'],
  ['info', 'a', '--'],
  ['info', '--', 'a'],
  ['check', 'a.qed'],
  ['check', '-r', 'a.qed'],
  ['check', '-r', 'true', 'a.qed'],
  ['check', 'x', '-r', 'yes'],
  ['check', '--repair', '--output', 'json', 'a'],
  ['check', '-r', 'leaks', 'a.qcow2'],
  ['check', '-r', 'all', 'a.qcow2'],
  ['check', '-r', 'a.qcow2', '-f', 'qcow2'],
  ['check', '--repair=leaks', 'a'],
  ['check', '--repair', 'all', '--output=json', 'a'],
  ['check', '-r=all', 'a'],
  ['check', '-r', 'leaks'],
  ['check', '-r', 'some', 'a'],
  ['check', 'a', '-r', 'leaks', '-r'],
  ['check', '-r', 'false', '-r', 'leaks', 'a'],
  ['check', '-r', 'leaks', '--no-repair', 'a'],
  ['check', '-fr', 'leaks', 'a'],
  ['check', 'a', '--', '-r', 'leaks'],
  ['-r', 'leaks', 'check', 'a'],
  ['-r', 'leaks', 'b'],
  ['check', '-r', 'true', 'a.qed'],
  ['check'],
  ['resize', 'a.qcow2', '1G'],
  ['resize', 'a.qcow2', '-1G'],
  ['resize', 'a.qcow2', '+512M'],
  ['resize', '--shrink', 'a.qcow2', '-1G'],
  ['resize', 'a.qcow2', '--shrink', '-1G'],
  ['resize', '-f', 'qcow2', '--shrink', 'a', '-5'],
  ['resize', '-f', 'raw', 'a', '-.5G'],
  ['resize', 'a', '--', '-1G'],
  ['resize', 'a', '-'],
  ['resize', 'a', '--shrink'],
  ['resize', 'a', '-f'],
  ['resize', '-f', 'qed', '1G'],
  ['resize', '-f', '1G'],
  ['resize', 'a'],
  ['resize'],
  ['resize', 'a', 'b', '1G'],
  ['resize', 'a', '--bogus', '1G'],
  ['resize', '--no-shrink', 'a', '1G'],
  ['resize', '--shrink=false', 'a', '1G'],
  ['resize', 'a', '1G', '-h'],
  ['resize', '-h', 'a', '1G'],
  ['-f', 'qcow2', 'resize', 'a', '-1G'],
  ['map', 'a', '--output=json'],
  ['map', '-f'],
  ['map', '-s', 'snap', 'a'],
  ['create', '-f', 'qed', '-o', 'cluster_size=16K,table_size=8', 'a.qed', '1G'],
  ['create', '-f', 'qed', '-b', 'base.raw', '-F', 'raw', 'top.qed'],
  ['create', '--force', 'a', '1M'],
  ['create', 'a', '1e3'],
  ['create', '0x10', '08'],
  ['create', 'a', '1M', 'extra'],
  ['create', 'a', '-o', 'x', '-o', 'y'],
  ['create', '-F'],
  ['-f'],
  ['--format'],
  ['a', '--format'],
  ['-f', 'a', '-f', 'b', 'x', 'y'],
  ['-rf', 'qed', 'a', 'b'],
  ['-fqed', 'a', 'b'],
  ['-f=qed', 'a', 'b'],
  ['-f', '-r', 'a', 'b'],
  ['-f', '-', 'a', 'b'],
  ['--format', '-', 'a', 'b'],
  ['--log', '-r', 'a'],
  ['--readOnly', 'a', 'b'],
  ['--no-read-only', 'a', 'b'],
  ['--no-format', 'a', 'b'],
  ['-r=false', 'a', 'b'],
  ['--foreground=false', 'a', 'b'],
  ['--bogus', 'a', 'b'],
  ['--bogus=1', '--foo', 'a', 'b'],
  ['--bogus-x', 'a', 'b'],
  ['--no-bogus', 'a'],
  ['-x', '-y', 'a'],
  ['-r', 'info', 'a'],
  ['-f', 'raw', 'info', 'a'],
  ['--output', 'json', 'a', 'b'],
  ['a', '--', 'b'],
  ['a', '--', '-b', 'c'],
  ['--allow-files', 'd', '--', 'a', 'b'],
  ['1.0', 'x'],
  ['-5', 'x'],
  ['', 'x'],
  ['info', ''],
  ['info', 'a', ''],
  ['---', 'x'],
  ['-', 'x'],
  ['--help=false', 'a', 'b'],
  ['--no-help', 'a', 'b'],
];

const helps: string[][] = [
  ['--help'],
  ['-h'],
  ['info', '--help'],
  ['--help', 'info'],
  ['info', '-h'],
  ['create', '--help'],
  ['create', '-h', 'x'],
  ['check', '--help'],
  ['resize', '--help'],
  ['resize', 'a', '-h', '-1G'],
  ['map', '--help'],
  ['convert', '--help'],
  ['convert', '-h', 'a', 'b'],
  ['unmount', '--help'],
  ['a', 'b', '--help'],
  ['--bogus', '--help'],
  ['-f', '--help'],
  ['info', 'a', 'b', '-h'],
];

describe('help texts', () => {
  it('name the formats of the list of formats', () => {
    // Written out in commands.ts so that --help loads no format driver: update it with the list.
    expect(HELP_FORMAT_NAMES).toEqual(formatNames(formatDrivers));
  });
});

describe('the command-line parser gives what yargs gave', () => {
  it('for the corpus of command lines', async () => {
    for (const argv of corpus) await expectSame(argv);
  });

  it('for help, at several widths', async () => {
    for (const argv of helps) for (const columns of [100, 80, 60, 40, 30, 200]) await expectSame(argv, columns);
  });

  it('for random mixes of options, values and positionals', async () => {
    const token = fc.constantFrom(
      'info', 'check', 'map', 'create', 'unmount', 'a.qed', 'b', '/mnt/x', '1M', '', '-', '--', '---',
      '-r', '-f', '-s', '-o', '-u', '-d', '-b', '-F', '-h', '-x', '-rf', '-rd', '-fr', '-f=qed', '-r=true',
      '--read-only', '--no-read-only', '--readOnly', '--format', '--format=raw', '--snapshot', '--name', '--log',
      '--output', '--output=json', 'json', 'human', 'true', 'false', '--backing-chain', '--no-backing-chain',
      '--repair', '--force', '--allow-files', '--allowFiles', '--allow-other', '--foreground', '--debug',
      '--cache-size', '--idle-clean', '--busy-poll', '--filter', 'blkdebug:event=l2_update,errno=5', '--options', '--unmount', '--backing', '--backing-format', '--bogus', '--no-bogus', '--a-b',
      '--help', '-5', '12', 'ro,nonempty', 'leaks', 'all', '-r=all', '--repair=leaks', '--no-repair',
      'resize', '--shrink', '+1G',
      'convert', '-O', '-n', '-p', '-c', '-S', '-l', '-B', '-m', '--skip-create', '--output-format',
    );
    await fc.assert(
      fc.asyncProperty(fc.array(token, { maxLength: 7 }), async (argv) => {
        const [mine, theirs] = [ours(argv), await reference(argv)];
        // yargs left out of its help every dashed option given with --help (--read-only -h: no
        // --read-only line); ours lists every option. Help texts are compared in the test above.
        if ('help' in theirs) expect('help' in mine, JSON.stringify(argv)).toBe(true);
        else expect(normal(mine), JSON.stringify(argv)).toEqual(normal(theirs));
      }),
      { numRuns: Number(process.env.CLI_ARGS_RUNS ?? 1000) },
    );
  }, 120_000);
});
