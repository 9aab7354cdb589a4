/**
 * Converting an image to another format (qemu-img convert), generically over
 * the block layer: the source is opened read-only through openImage (any
 * readable format, its whole backing chain), the destination is created with
 * the target driver's `create` (createImage, the same -o options as
 * `imgmount create`) or, with `existing` (-n), opened read-write as it is.
 *
 * What is copied comes from the source's `map`, not from reading zeros: runs
 * no layer stores are holes and are not read at all; data runs are read and,
 * with `sparseSize` (qemu's -S, 4 KiB by default), blocks of zeros found in
 * them are skipped too. A freshly created destination without a backing file
 * reads as zeros, so holes are left alone there; into an existing image (-n)
 * or over a backing file (-B) they are written as zeros, as qemu does. With
 * -B only what the source's top image stores is copied (qemu's meaning: the
 * new backing file has the content of the source's backing chain).
 *
 * The copy itself (which ranges become what, reads in parallel, writes in
 * order) is convert-copy.ts. The destination is write-locked by its open (no
 * other imgmount writer); the source is only read, so a writer elsewhere (a
 * read-write mount of it) is not kept out by this layer.
 *
 * On failure a destination this call created is removed (a partly converted
 * image is never left looking like a good one); an existing destination (-n)
 * is left as it is and the error says that it was partly written.
 */
import { rm, stat } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import createDebug from 'debug';
import { BlockError, InvalidArgumentError, UnsupportedFeatureError } from './errors.js';
import { FileProtocol, pathExists } from './file.js';
import { resolveBackingName } from './backing-name.js';
import type { FilePolicy } from './gate.js';
import type { BlockImage, ImageInfo } from './image.js';
import { copy, DEFAULT_BUFFER_SIZE, WRITE_BACK_EVERY, type CopySettings } from './convert-copy.js';
import { createImage, openImage } from './open.js';
import { sampleFile, type FormatList } from './probe.js';
import type { FilterSpec } from './filters/index.js';

const log = createDebug('imgmount:convert');

export { DEFAULT_BUFFER_SIZE };

/** qemu-img's default -S: zero blocks of 4 KiB in data are not written. */
export const DEFAULT_SPARSE_SIZE = 4096;
/** qemu-img's default -m: 8 requests in flight. */
export const DEFAULT_PARALLEL = 8;
/** Largest -m qemu-img accepts. */
export const MAX_PARALLEL = 16;
/** Largest -S qemu-img accepts (its MAX_BUF_SECTORS: 16 MiB). */
export const MAX_SPARSE_SIZE = 16 * 1024 * 1024;

export interface ConvertImageOptions extends FilePolicy {
  formats: FormatList;
  /** The destination's format (-O). */
  targetFormat: string;
  /** The source's format (-f); probed when omitted. */
  sourceFormat?: string;
  /** Open options of the source's format (`--open-option`: vpc's force_size_calc). */
  sourceOpenOptions?: Readonly<Record<string, string>>;
  /** Format options of the destination (-o), as for createImage. */
  options?: Record<string, string>;
  /** An internal snapshot of the source (id or name) to convert instead of its current state (-l). */
  snapshot?: string;
  /** Write into an existing destination instead of creating it (-n). */
  existing?: boolean;
  /** Overwrite an existing destination (qemu-img does so silently; here it must be asked for). */
  force?: boolean;
  /** Compress the destination's clusters (-c); refused by name where the target cannot. */
  compress?: boolean;
  /** Zero blocks of this many bytes in data are not written (-S); 0 writes everything, fully allocating the destination. */
  sparseSize?: number;
  /** Create the destination over this backing file (-B); only what the source's top image stores is copied. */
  backingFile?: string;
  /** The format of `backingFile` (-F). */
  backingFormat?: string;
  /** Reads in flight (-m, 1..16); at most two of them are being written at a time (convert-copy.ts). */
  parallel?: number;
  /** Bytes per request. */
  bufferSize?: number;
  /** Called with (bytes done, virtual size) as the conversion goes. */
  progress?: (done: number, total: number) => void;
  /** Filters on the source (openImage's `filters`). */
  filters?: readonly FilterSpec[];
  /** Lines the user should see (notices of opening). */
  notice?: (line: string) => void;
  /** Stops the conversion (SIGINT of the command line): it fails as on an error, DEST removed. */
  signal?: AbortSignal;
}

export interface ConvertReport {
  /** Virtual size of the source (and of what was written). */
  size: number;
  /** True when the destination was created by this call. */
  created: boolean;
  /** Guest bytes written as data, and made zero by request (not counting holes left alone). */
  bytesWritten: number;
  bytesZeroed: number;
}

/** Converts `source` to a new (or, with `existing`, an existing) image `dest` of `options.targetFormat`. */
export async function convertImage(source: string, dest: string, options: ConvertImageOptions): Promise<ConvertReport> {
  const settings = checkSettings(options);
  const target = options.formats.named(options.targetFormat);
  if (!options.existing && !target.create) throw new UnsupportedFeatureError(`convert: creating ${target.name} images is not supported`);
  if (options.compress && options.existing) {
    throw new InvalidArgumentError('convert -c cannot be used with -n: compressed clusters are written only into unallocated clusters of a new image');
  }
  if (options.existing && (options.backingFile !== undefined || options.options !== undefined && Object.keys(options.options).length > 0)) {
    throw new InvalidArgumentError('convert -n writes into an existing image: -B and -o, which only apply when creating it, cannot be used with it');
  }
  const destExists = await pathExists(dest);
  if (options.existing && !destExists) throw new InvalidArgumentError(`convert -n: ${dest} does not exist`);
  if (!options.existing && destExists && !options.force) {
    throw new InvalidArgumentError(`convert: ${dest} already exists; pass --force to overwrite it or -n to write into it`);
  }

  const input = await openImage(source, {
    formats: options.formats,
    format: options.sourceFormat,
    readOnly: true,
    snapshot: options.snapshot,
    formatOptions: options.sourceOpenOptions,
    filters: options.filters,
    notice: options.notice,
    allowFiles: options.allowFiles,
    idleCleanSeconds: 0,
  });
  try {
    if (destExists) await refuseSourceAsDest(input, dest);
    if (options.existing) await refuseOtherFormat(dest, target.name, options.formats);
    // A file the destination's options name (a qcow2 data_file) that this call creates goes with it on failure.
    const dataFile = options.options?.data_file ? resolveBackingName(dest, options.options.data_file, 'data file') : undefined;
    const removeAlso = dataFile !== undefined && !(await pathExists(dataFile)) ? [dataFile] : [];
    let created = false;
    let writing = false;
    let output: BlockImage | undefined;
    try {
      if (!options.existing) {
        try {
          // The other files create made (a VMDK's extents) go with DEST on failure too.
          const made = await createImage(dest, target.name, {
            formats: options.formats,
            size: input.length,
            options: options.options,
            force: options.force,
            backingFile: options.backingFile,
            backingFormat: options.backingFormat,
          });
          removeAlso.push(...made);
        } catch (error) {
          // A create that failed on the host (EFBIG, ENOSPC) may leave a partial new file; a refused
          // one (a bad option, DEST appearing meanwhile, an EBUSY lock of an existing DEST) wrote nothing.
          if (!destExists && !(error instanceof InvalidArgumentError)) created = (await pathExists(dest)) || removeAlso.length > 0;
          throw error;
        }
        created = true;
      }
      const notices: string[] = [];
      output = await openImage(dest, {
        formats: options.formats,
        format: target.name,
        notice: (line) => notices.push(line),
        allowFiles: options.allowFiles,
        idleCleanSeconds: 0,
        compressedWrites: true,
      });
      if (output.readOnly) {
        throw new UnsupportedFeatureError(`convert: ${dest} cannot be written${notices.length > 0 ? ` (${notices.join('; ')})` : ` (${target.name} images open read-only here)`}`);
      }
      for (const line of notices) (options.notice ?? ((text: string) => log(text)))(line);
      if (output.length < input.length) {
        throw new InvalidArgumentError(`convert -n: ${dest} (${output.length} bytes) is smaller than ${source} (${input.length} bytes)`);
      }
      if (options.existing && output.compressedOnly) {
        throw new InvalidArgumentError(`convert -n: ${dest} takes only compressed clusters written once, in order (a ${target.name} stream); convert into a new DEST instead`);
      }
      const fresh = created && options.backingFile === undefined;
      // A destination that takes only compressed writes (a VMDK stream) is written compressed with or without -c, as qemu-img does.
      const cluster = options.compress || output.compressedOnly ? await compressionCluster(output, target.name) : undefined;
      writing = true;
      const report = await copy(input, output, { ...settings, fresh, topOnly: options.backingFile !== undefined, progress: options.progress, cluster, signal: options.signal, writeBackEvery: WRITE_BACK_EVERY });
      const finished = output;
      output = undefined;
      await finished.flush();
      await finished.close();
      log('converted %s to %s (%s): %d bytes written, %d zeroed', source, dest, target.name, report.bytesWritten, report.bytesZeroed);
      return { size: input.length, created, ...report };
    } catch (error) {
      await output?.close().catch(() => undefined);
      throw await cleanUp(error, dest, created, writing, removeAlso);
    }
  } finally {
    await input.close();
  }
}

function checkSettings(options: ConvertImageOptions): Pick<CopySettings, 'sparseSize' | 'parallel' | 'bufferSize'> {
  const sparseSize = options.sparseSize ?? DEFAULT_SPARSE_SIZE;
  if (!Number.isSafeInteger(sparseSize) || sparseSize < 0 || sparseSize % 512 !== 0 || sparseSize > MAX_SPARSE_SIZE) {
    throw new InvalidArgumentError(`convert -S ${sparseSize}: the sparse size must be a multiple of 512 bytes from 0 to ${MAX_SPARSE_SIZE}`);
  }
  const parallel = options.parallel ?? DEFAULT_PARALLEL;
  if (!Number.isSafeInteger(parallel) || parallel < 1 || parallel > MAX_PARALLEL) {
    throw new InvalidArgumentError(`convert -m ${parallel}: the number of requests in flight must be from 1 to ${MAX_PARALLEL}`);
  }
  const bufferSize = Math.max(options.bufferSize ?? DEFAULT_BUFFER_SIZE, sparseSize);
  if (!Number.isSafeInteger(bufferSize) || bufferSize < 512 || bufferSize > 256 * 1024 * 1024) {
    throw new InvalidArgumentError(`convert: a buffer size of ${bufferSize} bytes is outside 512 .. 256 MiB`);
  }
  return { sparseSize, parallel, bufferSize };
}

/**
 * Converting an image into itself, or into a file of its backing chain (or one of
 * the files an image names, an external data file), would destroy what it reads.
 * Files are compared by device and inode, so another name of the same file counts.
 */
async function refuseSourceAsDest(input: BlockImage, dest: string): Promise<void> {
  const target = await stat(dest).catch(() => undefined);
  if (!target) return;
  const top = await input.info();
  for (let info: ImageInfo | undefined = top; info; info = info.backing) {
    const named = [
      { path: info.filename, what: info === top ? 'the source image itself' : `in the source's backing chain (${info.filename})` },
      ...(info.files ?? []).map((file) => ({ path: file.path, what: `the ${file.role} of ${info!.filename}` })),
    ];
    for (const { path, what } of named) {
      const seen = await stat(path).catch(() => undefined);
      if (seen && seen.dev === target.dev && seen.ino === target.ino) {
        throw new InvalidArgumentError(`convert: ${dest} is ${what}; writing it would destroy what is being converted`);
      }
    }
  }
}

/**
 * -n with a format other than the one DEST probes as would overwrite its metadata
 * with guest data (qemu-img does so without a word): refused, naming both.
 */
async function refuseOtherFormat(dest: string, format: string, formats: FormatList): Promise<void> {
  const file = await FileProtocol.open(dest, true);
  let probed: string;
  try {
    probed = formats.probe(await sampleFile(file)).name;
  } finally {
    await file.close();
  }
  if (probed !== format && probed !== 'raw') {
    throw new InvalidArgumentError(`convert -n: ${dest} is a ${probed} image, not ${format}; writing it as ${format} would destroy it (use -O ${probed})`);
  }
}

/** The error to report after a failure, once a destination this call created (and the other files it created: a data file, extents) is removed. */
async function cleanUp(error: unknown, dest: string, created: boolean, written: boolean, alsoCreated: readonly string[]): Promise<unknown> {
  const message = error instanceof Error ? error.message : String(error);
  const errno = error instanceof BlockError ? error.errno : ((error as NodeJS.ErrnoException | undefined)?.errno ?? -osConstants.errno.EIO);
  let what: string;
  if (created) {
    const files = [dest, ...alsoCreated];
    what = await Promise.all(files.map((file) => rm(file, { force: true }))).then(
      () => `${files.join(' and ')}, which it had created, ${files.length > 1 ? 'were' : 'was'} removed`,
      (removal: unknown) => `${files.join(' and ')}, which it had created, could not be removed (${(removal as Error).message}) and are incomplete`,
    );
  } else if (written) {
    what = `${dest} (written into with -n) was left partly converted`;
  } else {
    return error;
  }
  return new BlockError(`convert failed: ${message}; ${what}`, Math.abs(errno));
}

/** With -c: the destination's cluster size, the unit of compressed writes. */
async function compressionCluster(output: BlockImage, format: string): Promise<number> {
  if (!output.canWriteCompressed) throw new UnsupportedFeatureError(`convert -c: writing compressed clusters into ${format} images is not supported`);
  const { clusterSize } = await output.info();
  if (clusterSize === undefined || !Number.isSafeInteger(clusterSize) || clusterSize <= 0) {
    throw new UnsupportedFeatureError(`convert -c: ${output.path} has no cluster size to compress by`);
  }
  return clusterSize;
}
