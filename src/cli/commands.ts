/**
 * imgmount's commands as the parser (args.ts) reads them: each command's
 * positionals and options with their help texts, and how a parsed command
 * line becomes the arguments of the command's handler.
 */
import type { CommandSpec, Parsed, Program, Value } from './args.js';
import type { CheckArguments } from './check.js';
import type { ConvertArguments } from './convert.js';
import type { CreateArguments } from './create.js';
import type { InfoArguments } from './info.js';
import type { MapArguments } from './map.js';
import type { MountArguments } from './mount.js';
import type { ResizeArguments } from './resize.js';

/** A repeatable string option: the parser gives a string, an array or nothing. */
export function asList(value: Value | undefined): string[] {
  return value === undefined ? [] : ((Array.isArray(value) ? value : [value]) as string[]);
}

const outputChoices = ['human', 'json'] as const;

const OPEN_OPTION_HELP = "an option of the image's format for opening it, KEY=VALUE (repeatable; vpc: force_size_calc=chs|current_size)";
const FILTER_HELP =
  'a filter between the layers, NAME[:key=value,...] (repeatable, applied in order; layer=N picks the image of the backing chain): ' +
  'blkdebug:event=NAME,errno=N[,once=on][,nth=K] or blkdebug:config=FILE, blkverify:reference=FILE, log-writes:log=FILE; see docs/filters.md';

const ALLOW_FILES_HELP =
  'backing files and external data files an image names must lie in DIR (repeatable); by default any regular file you can read';

/** The formats the help texts name: every readable one, and those that can be created. */
export interface FormatNames {
  readable: string;
  creatable: string;
}

/** The names, as the help texts list them, of a list of format drivers. */
export function formatNames(drivers: readonly { name: string; recognizedOnly?: boolean; create?: unknown }[]): FormatNames {
  return {
    readable: drivers.filter((driver) => !driver.recognizedOnly).map((driver) => driver.name).join(', '),
    creatable: drivers.filter((driver) => driver.create !== undefined).map((driver) => driver.name).join(', '),
  };
}

/**
 * formatNames(formatDrivers), written out so that `imgmount --help` need not load
 * every format driver (about 40 ms); test/cli-args.test.ts fails when the list of
 * formats (src/formats/index.ts) and these names disagree.
 */
export const HELP_FORMAT_NAMES: FormatNames = { readable: 'qcow2, qed, raw, vdi, vhdx, vmdk, vpc, qcow, parallels, bochs, cloop, dmg', creatable: 'qcow2, qed, raw, vdi, vhdx, vmdk, vpc' };

/** Every command with its options; the help texts name the formats (only help needs them). */
export function program(formats: FormatNames = { readable: '', creatable: '' }): Program {
  const { readable, creatable } = formats;
  return {
    scriptName: 'imgmount',
    usage: '$0 [options] IMAGE... MOUNTPOINT\n$0 <command> [options]\n$0 --version',
    commands: [
      {
        name: 'create',
        usage: 'create <file> [size]',
        describe: 'create a disk image (like qemu-img create)',
        positionals: [
          { name: 'file', describe: 'image file to create' },
          { name: 'size', describe: 'virtual size, with an optional K, M, G or T suffix' },
        ],
        options: [
          { name: 'format', alias: 'f', type: 'string', default: 'raw', describe: `image format (${creatable})` },
          { name: 'backing', alias: 'b', type: 'string', describe: 'backing file' },
          { name: 'backing-format', alias: 'F', type: 'string', describe: `backing file format (${readable})` },
          { name: 'options', alias: 'o', type: 'string', describe: 'format options: cluster_size=N,table_size=N (repeatable)' },
          { name: 'force', type: 'boolean', default: false, describe: 'overwrite an existing file' },
        ],
      },
      {
        name: 'info',
        usage: 'info <file>',
        describe: 'show what an image is (like qemu-img info)',
        positionals: [{ name: 'file' }],
        options: [
          { name: 'format', alias: 'f', type: 'string', describe: `image format (${readable}); no probing` },
          { name: 'snapshot', alias: 's', type: 'string', describe: 'describe this internal snapshot (id or name) instead of the current state' },
          { name: 'output', choices: outputChoices, default: 'human' },
          { name: 'backing-chain', type: 'boolean', default: false, describe: 'describe every image of the backing chain' },
          { name: 'allow-files', type: 'string', describe: ALLOW_FILES_HELP },
          { name: 'filter', type: 'string', describe: FILTER_HELP },
          { name: 'open-option', type: 'string', describe: OPEN_OPTION_HELP },
        ],
      },
      {
        name: 'check',
        usage: 'check <file>',
        describe: 'check image metadata (like qemu-img check); exit 0 clean, 2 corrupt, 3 leaks, 1 failed, 63 no check for the format',
        positionals: [{ name: 'file' }],
        options: [
          { name: 'format', alias: 'f', type: 'string', describe: `image format (${readable}); no probing` },
          {
            name: 'repair',
            alias: 'r',
            type: 'boolean',
            values: ['leaks', 'all'],
            default: false,
            describe: 'repair: -r leaks only leaked clusters, -r all (or a bare -r) everything that can be repaired',
          },
          { name: 'output', choices: outputChoices, default: 'human' },
          { name: 'filter', type: 'string', describe: FILTER_HELP },
        ],
      },
      {
        name: 'resize',
        usage: 'resize <file> <size>',
        describe: 'change the virtual size of an image (like qemu-img resize); the size is always the last argument',
        positionals: [
          { name: 'file' },
          { name: 'size', describe: 'the new size, or +SIZE / -SIZE to grow or shrink by SIZE (K, M, G, T suffixes)' },
        ],
        lastArgument: true,
        options: [
          { name: 'format', alias: 'f', type: 'string', describe: `image format (${readable}); no probing` },
          { name: 'shrink', type: 'boolean', default: false, describe: 'allow making the image smaller: the data past the new end is deleted' },
        ],
      },
      {
        name: 'convert',
        usage: 'convert <source> <dest>',
        describe: 'copy an image into a new image of another format (like qemu-img convert); holes stay holes',
        positionals: [
          { name: 'source', describe: 'image to read (its whole backing chain)' },
          { name: 'dest', describe: 'image to write' },
        ],
        options: [
          { name: 'format', alias: 'f', type: 'string', describe: `source format (${readable}); no probing` },
          { name: 'output-format', alias: 'O', type: 'string', default: 'raw', describe: `destination format (${creatable})` },
          { name: 'options', alias: 'o', type: 'string', describe: 'destination format options, as for create -o (repeatable)' },
          { name: 'compress', alias: 'c', type: 'boolean', default: false, describe: 'compress the destination where its format can' },
          { name: 'progress', alias: 'p', type: 'boolean', default: false, describe: 'show a progress bar on stderr' },
          { name: 'skip-create', alias: 'n', type: 'boolean', default: false, describe: 'write into the existing dest instead of creating it (at least as large as source)' },
          { name: 'sparse-size', alias: 'S', type: 'string', describe: 'zero runs of this size in data are not written (default 4k; 0: write everything)' },
          { name: 'snapshot', alias: 'l', type: 'string', describe: 'convert this internal snapshot: snapshot.name=NAME, snapshot.id=ID, or an id or name' },
          { name: 'backing', alias: 'B', type: 'string', describe: "create dest over this backing file (same content as the source's backing chain): only the source's top image is copied" },
          { name: 'backing-format', alias: 'F', type: 'string', describe: `format of the -B backing file (${readable})` },
          { name: 'parallel', alias: 'm', type: 'string', describe: 'reads in flight, 1..16 (default 8; two buffers are written at a time)' },
          { name: 'force', type: 'boolean', default: false, describe: 'overwrite an existing dest (qemu-img does so silently)' },
          { name: 'allow-files', type: 'string', describe: ALLOW_FILES_HELP },
          { name: 'filter', type: 'string', describe: FILTER_HELP },
          { name: 'open-option', type: 'string', describe: OPEN_OPTION_HELP },
        ],
      },
      {
        name: 'map',
        usage: 'map <file>',
        describe: 'show where the guest bytes live, data, zero or unallocated, down the backing chain (like qemu-img map)',
        positionals: [{ name: 'file' }],
        options: [
          { name: 'format', alias: 'f', type: 'string', describe: `image format (${readable}); no probing` },
          { name: 'snapshot', alias: 's', type: 'string', describe: 'map this internal snapshot (id or name) instead of the current state' },
          { name: 'allow-files', type: 'string', describe: ALLOW_FILES_HELP },
          { name: 'filter', type: 'string', describe: FILTER_HELP },
          { name: 'open-option', type: 'string', describe: OPEN_OPTION_HELP },
          {
            name: 'output',
            choices: outputChoices,
            default: 'human',
            describe: "human: qemu-img's table of data runs; json: every run, as qemu-img map --output=json",
          },
        ],
      },
      {
        usage: '[paths..]',
        describe: 'mount IMAGE... at MOUNTPOINT: one raw file per image (disk.qed -> disk.raw)',
        positionals: [{ name: 'paths', describe: 'IMAGE... MOUNTPOINT' }],
        options: [
          { name: 'read-only', alias: 'r', type: 'boolean', describe: 'open the images read-only; writes fail with EROFS' },
          { name: 'format', alias: 'f', type: 'string', describe: `image format (${readable}); no probing` },
          { name: 'snapshot', alias: 's', type: 'string', describe: 'mount this internal snapshot (id or name) read-only; the file keeps its usual name' },
          { name: 'name', type: 'string', describe: 'file name in the mount (one image only)' },
          { name: 'allow-files', type: 'string', describe: ALLOW_FILES_HELP },
          { name: 'allow-other', type: 'boolean', describe: 'let other users open the files' },
          { name: 'foreground', type: 'boolean', describe: 'stay attached instead of returning once the mount is ready' },
          { name: 'debug', alias: 'd', type: 'boolean', describe: 'log every FUSE operation (implies --foreground without --log)' },
          { name: 'log', type: 'string', describe: "append the daemon's log to this file" },
          {
            name: 'cache-size',
            type: 'string',
            describe:
              'L2-table cache per image (default 16M: every table of a 128 GiB default-geometry QED image); a size below 4 tables, 0 included, is raised to 4 tables, with a notice',
          },
          {
            name: 'idle-clean',
            type: 'string',
            describe:
              'seconds without writes after which each image is flushed and marked clean (QED need-check, qcow2 dirty bit) until its next write, so a crash after that needs no repair (default 5; 0: only at unmount)',
          },
          {
            name: 'busy-poll',
            type: 'string',
            describe:
              'microseconds the daemon keeps reading for the next request after answering its last one, adapted to how soon requests come (lower latency at queue depth 1 for some CPU; default 50, 0: off)',
          },
          { name: 'filter', type: 'string', describe: FILTER_HELP },
          { name: 'open-option', type: 'string', describe: OPEN_OPTION_HELP },
          {
            name: 'options',
            alias: 'o',
            type: 'string',
            describe: 'mount(8)-style options: ro, allow_other, format=FMT, snapshot=ID, name=NAME, log=FILE, debug, foreground, nonempty, cache_size=SIZE, idle_clean=SECONDS, busy_poll=MICROSECONDS',
          },
          { name: 'unmount', alias: 'u', type: 'boolean', describe: 'unmount MOUNTPOINT (same as imgmount unmount)' },
        ],
      },
      {
        name: 'unmount',
        usage: 'unmount <mountpoint>',
        describe: 'unmount and wait until every image is closed cleanly',
        positionals: [{ name: 'mountpoint' }],
        options: [],
      },
    ] satisfies CommandSpec[],
  };
}

/** What a command's handler receives, by command ('mount' for the default one). */
export type Invocation =
  | { command: 'create'; args: CreateArguments }
  | { command: 'info'; args: InfoArguments }
  | { command: 'check'; args: CheckArguments }
  | { command: 'map'; args: MapArguments }
  | { command: 'convert'; args: ConvertArguments }
  | { command: 'resize'; args: ResizeArguments }
  | { command: 'mount'; args: MountArguments }
  | { command: 'unmount'; args: { mountpoint: string } };

// The values below are typed as the commands declare them; a repeated single-valued
// option arrives as an array, as it did through yargs.
const text = (value: Value | undefined) => value as string | undefined;
const flag = (value: Value | undefined) => value as boolean | undefined;
/** check's -r: a bare flag (or true) repairs everything, -r leaks / -r all say what to repair. */
const repairLevel = (value: Value | undefined): CheckArguments['repair'] => (value === true ? 'all' : value === 'leaks' || value === 'all' ? value : undefined);

/** The handler arguments of a parsed command line, as the yargs handlers built them. */
export function invocation({ command, options: o, positionals: p }: Parsed): Invocation {
  switch (command.name) {
    case 'create':
      return {
        command: 'create',
        args: {
          format: text(o.format)!,
          file: p.file as string,
          size: p.size as string | undefined,
          backing: text(o.backing),
          backingFormat: text(o['backing-format']),
          options: asList(o.options),
          force: flag(o.force)!,
        },
      };
    case 'info':
      return {
        command: 'info',
        args: {
          file: p.file as string,
          format: text(o.format),
          snapshot: text(o.snapshot),
          output: o.output as InfoArguments['output'],
          backingChain: flag(o['backing-chain'])!,
          allowFiles: asList(o['allow-files']),
          filters: asList(o.filter),
          openOptions: asList(o['open-option']),
        },
      };
    case 'check':
      return {
        command: 'check',
        args: {
          file: p.file as string,
          format: text(o.format),
          repair: repairLevel(o.repair),
          output: o.output as CheckArguments['output'],
          filters: asList(o.filter),
        },
      };
    case 'map':
      return {
        command: 'map',
        args: {
          file: p.file as string,
          format: text(o.format),
          snapshot: text(o.snapshot),
          allowFiles: asList(o['allow-files']),
          output: o.output as MapArguments['output'],
          filters: asList(o.filter),
          openOptions: asList(o['open-option']),
        },
      };
    case 'convert':
      return {
        command: 'convert',
        args: {
          source: p.source as string,
          dest: p.dest as string,
          format: text(o.format),
          outputFormat: text(o['output-format'])!,
          options: asList(o.options),
          compress: flag(o.compress)!,
          progress: flag(o.progress)!,
          existing: flag(o['skip-create'])!,
          sparseSize: text(o['sparse-size']),
          snapshot: text(o.snapshot),
          backing: text(o.backing),
          backingFormat: text(o['backing-format']),
          parallel: text(o.parallel),
          force: flag(o.force)!,
          allowFiles: asList(o['allow-files']),
          filters: asList(o.filter),
          openOptions: asList(o['open-option']),
        },
      };
    case 'resize':
      return { command: 'resize', args: { file: p.file as string, size: p.size as string, format: text(o.format), shrink: flag(o.shrink)! } };
    case 'unmount':
      return { command: 'unmount', args: { mountpoint: p.mountpoint as string } };
    default:
      return {
        command: 'mount',
        args: {
          paths: (p.paths as string[] | undefined) ?? [],
          format: text(o.format),
          snapshot: text(o.snapshot),
          allowFiles: asList(o['allow-files']),
          readOnly: flag(o['read-only']),
          allowOther: flag(o['allow-other']),
          name: text(o.name),
          foreground: flag(o.foreground),
          debug: flag(o.debug),
          log: text(o.log),
          cacheSize: text(o['cache-size']),
          idleClean: text(o['idle-clean']),
          busyPoll: text(o['busy-poll']),
          filters: asList(o.filter),
          openOptions: asList(o['open-option']),
          options: asList(o.options),
          unmount: flag(o.unmount),
        },
      };
  }
}
