/**
 * The interfaces between the layers of the block stack:
 *
 *   Protocol     - where the raw bytes live (a host file); byte-addressed positional I/O.
 *   FormatDriver - a format module (qed, raw): probe, open, create, check; one exported object each.
 *   FormatImage  - an opened format: answers "where does guest offset X live?" with runs of
 *                  mappings, and handles allocation on write. It never walks the backing chain.
 *
 * The generic layer (src/block/image.ts) moves the bytes, follows mappings down the backing
 * chain and checks ranges once, so drivers do not repeat it.
 */

/** A byte offset as the guest (the user of the virtual disk) sees it. */
export type GuestOffset = number;
/** A byte offset inside the host file that stores the image. */
export type HostOffset = number;

/** Raw byte storage under a format: a host file. */
export interface Protocol {
  readonly path: string;
  readonly readOnly: boolean;
  /** Reads into `buffer`; bytes past the end of the file read as zeros. */
  read(offset: HostOffset, buffer: Buffer): Promise<void>;
  write(offset: HostOffset, buffer: Buffer): Promise<void>;
  /** Makes written data durable (fdatasync). */
  flush(): Promise<void>;
  size(): Promise<number>;
  /** Bytes the file occupies on disk (st_blocks * 512). */
  allocatedSize(): Promise<number>;
  truncate(length: number): Promise<void>;
  close(): Promise<void>;
}

/** One run of a mapping answer; runs are contiguous and cover the asked range in order. */
export type Mapping =
  | { kind: 'data'; guestOffset: GuestOffset; length: number; hostOffset: HostOffset }
  | { kind: 'zero'; guestOffset: GuestOffset; length: number }
  | { kind: 'backing'; guestOffset: GuestOffset; length: number };

/** Reads guest bytes from the layer below a format (its backing file), zeros past its end. */
export type BackingReader = (offset: GuestOffset, buffer: Buffer) => Promise<void>;

/** What a format image says about its backing file. */
export interface BackingReference {
  /** The name as stored in the image (may be relative to the image's directory). */
  filename: string;
  /** A format that must be used without probing ('raw' for QED_F_BACKING_FORMAT_NO_PROBE). */
  format?: string;
}

/** Facts an opened image reports for `info`. */
export interface FormatInfo {
  clusterSize?: number;
  /** The need-check / dirty state, when the format has one. */
  dirty?: boolean;
  /** Format-specific details for `info` (table size, header size...). */
  specific?: Record<string, string | number | boolean>;
}

/** An opened image of one format over one protocol. */
export interface FormatImage {
  readonly virtualSize: number;
  readonly backing: BackingReference | undefined;
  /** Answers where [offset, offset + length) lives; the caller keeps the range inside the image. */
  map(offset: GuestOffset, length: number): Promise<Mapping[]>;
  /**
   * Writes guest bytes (range already checked). Allocating formats fill the
   * untouched part of a new cluster through `readBacking` (or zeros without one).
   */
  write(offset: GuestOffset, data: Buffer): Promise<void>;
  /** Makes everything written so far durable. */
  flush(): Promise<void>;
  /** Flushes, marks the image clean and releases it. */
  close(): Promise<void>;
  info(): FormatInfo;
  /** Set by the generic layer once the backing chain is open. */
  attachBacking?(reader: BackingReader | undefined): void;
}

export interface OpenOptions {
  readOnly: boolean;
  /** Upper bound of the metadata (L2 table) cache in bytes; the format picks a default. */
  metadataCacheBytes?: number;
  /** Log lines a user should see (repairs done on open); defaults to the debug log. */
  notice?: (message: string) => void;
}

export interface CreateOptions {
  size: number;
  backingFile?: string;
  backingFormat?: string;
  /** Format options as key=value strings (cluster_size, table_size). */
  options?: Record<string, string>;
}

/** What a consistency check found (and, with repair, fixed). */
export interface CheckResult {
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  /** Problems found, one line each. */
  messages: string[];
  /** Offset just past the last used cluster (qemu-img's image-end-offset). */
  imageEndOffset?: number;
  totalClusters?: number;
  allocatedClusters?: number;
}

export interface CheckOptions {
  repair: boolean;
  /** Called with (done, total) while checking; for progress bars. */
  progress?: (done: number, total: number) => void;
}

/** A format module: one exported object per format, listed in src/formats/index.ts. */
export interface FormatDriver {
  readonly name: string;
  /** How sure (0-100) this format is that the file is one of its images. Pure. */
  probe(firstBytes: Buffer, filename: string): number;
  /** File name extensions that claim this format ('.qed'). */
  readonly extensions: readonly string[];
  open(file: Protocol, options: OpenOptions): Promise<FormatImage>;
  create(path: string, options: CreateOptions): Promise<void>;
  /** Optional: consistency check with optional repair; missing means not supported. */
  check?(file: Protocol, options: CheckOptions): Promise<CheckResult>;
}
