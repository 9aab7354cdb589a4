/**
 * The interfaces between the layers of the block stack:
 *
 *   Protocol     - where the raw bytes live (a host file); byte-addressed positional I/O.
 *   FormatDriver - a format module (qed, qcow2, raw...): probe, open, create, check; one exported
 *                  object each. Formats we recognize but cannot read yet are drivers too, whose
 *                  `open` refuses by name.
 *   FormatImage  - an opened format: answers "where does guest offset X live?" with runs of
 *                  mappings, and handles allocation on write. It never walks the backing chain.
 *   FileGate     - the only way a driver opens another file an image names (an external data
 *                  file, later VMDK extents): resolved, checked against the policy, closed by the
 *                  generic layer.
 *
 * The generic layer (src/block/image.ts) moves the bytes, follows mappings down the backing
 * chain, decodes encoded clusters through the driver's `decode` (with a cache), and checks
 * ranges once, so drivers do not repeat it. Optional methods are optional abilities: a missing
 * one means "not supported", and the generic layer says so once.
 */

import type { BlockEvent } from './events.js';

/** A byte offset as the guest (the user of the virtual disk) sees it. */
export type GuestOffset = number;
/** A byte offset inside a host file that stores the image. */
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
  /** Frees [offset, offset + length) of the host file, which then reads as zeros (size kept). Optional: missing means not supported. */
  punchHole?(offset: HostOffset, length: number): Promise<void>;
  /** The next offset at or after `offset` holding data, and the next hole (the end of the file counts as one); undefined past the end. Optional. */
  nextData?(offset: HostOffset): Promise<HostOffset | undefined>;
  nextHole?(offset: HostOffset): Promise<HostOffset>;
  close(): Promise<void>;
  /** A format driver reached a named point (events.ts); only filters implement it. */
  event?(name: BlockEvent): void;
}

/** Encoded (compressed) bytes that decode to one whole cluster of guest data. */
export interface EncodedCluster {
  /** Identifies these encoded bytes inside the image: the decoded-cluster cache key. */
  readonly key: string;
  /** Guest offset of the first byte of the decoded cluster. */
  readonly guestStart: GuestOffset;
  /** Bytes the cluster decodes to. */
  readonly decodedLength: number;
  /** Where the encoded bytes start in the image file, and how many there are at most. */
  readonly hostOffset: HostOffset;
  readonly hostLength: number;
}

/** One run of a mapping answer; runs are contiguous and cover the asked range in order. */
export type Mapping =
  /** Stored as is at `hostOffset` of `file` (the image's own file when omitted). */
  | { kind: 'data'; guestOffset: GuestOffset; length: number; hostOffset: HostOffset; file?: Protocol }
  /** Part of an encoded cluster, decoded by the driver's `decode`. */
  | { kind: 'encoded'; guestOffset: GuestOffset; length: number; cluster: EncodedCluster }
  /** Reads as zeros; `hostOffset` when host space stays allocated there (qcow2 zero-alloc clusters), for `map`. */
  | { kind: 'zero'; guestOffset: GuestOffset; length: number; hostOffset?: HostOffset; file?: Protocol }
  /** Not stored in this layer; `hostOffset` when host space is allocated all the same (an unallocated subcluster of an allocated qcow2 cluster), for `map`. */
  | { kind: 'backing'; guestOffset: GuestOffset; length: number; hostOffset?: HostOffset; file?: Protocol };

/** Reads guest bytes from the layer below a format (its backing file), zeros past its end. */
export type BackingReader = (offset: GuestOffset, buffer: Buffer) => Promise<void>;

/** What a format image says about its backing file. */
export interface BackingReference {
  /** The name as stored in the image (may be relative to the image's directory). */
  filename: string;
  /** A format that must be used without probing ('raw' for QED_F_BACKING_FORMAT_NO_PROBE, qcow2's backing format extension). */
  format?: string;
  /** Without `format`: the format info names while the parent is not opened (the parent is probed when it is). */
  assumedFormat?: string;
}

/** An internal snapshot, with qemu-img's fields. */
export interface SnapshotInfo {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockSec: number;
  vmClockNsec: number;
  icount?: number;
  /** Virtual size of the disk when the snapshot was taken. */
  diskSize?: number;
}

/** Facts an opened image reports for `info`. */
export interface FormatInfo {
  clusterSize?: number;
  /** The need-check / dirty state, when the format has one. */
  dirty?: boolean;
  /** Format-specific details for `info` (qemu-img's `format-specific.data`). */
  specific?: Record<string, unknown>;
  snapshots?: SnapshotInfo[];
}

/** An opened image of one format over one protocol. */
export interface FormatImage {
  readonly virtualSize: number;
  readonly backing: BackingReference | undefined;
  /** Answers where [offset, offset + length) lives; the caller keeps the range inside the image. */
  map(offset: GuestOffset, length: number): Promise<Mapping[]>;
  /**
   * Decodes an encoded cluster a `map` returned into `decodedLength` bytes; required when `map` returns encoded runs.
   * `parallel`: the read has other clusters to decode; the driver may decode this one on a worker thread (decode-pool.ts).
   */
  decode?(cluster: EncodedCluster, parallel?: boolean): Promise<Buffer>;
  /**
   * Optional, with `endRead`: the generic layer calls `beginRead` before the `map` of a
   * read and `endRead(token)` once every byte it mapped was read (or failed), so a format
   * that frees host clusters while open (qcow2) hands none out again under a read
   * that may still be reading it. Both are synchronous and cheap.
   */
  beginRead?(): number;
  endRead?(token: number): void;
  /**
   * Writes guest bytes (range already checked). Allocating formats fill the
   * untouched part of a new cluster through the backing reader (or zeros without one).
   * Missing: the format cannot write, and its images open read-only.
   */
  write?(offset: GuestOffset, data: Buffer): Promise<void>;
  /**
   * Writes one whole cluster (`data` from a cluster-aligned `offset`, shorter only at the
   * end of the image) compressed, into a cluster that holds no data yet (qemu-img convert -c).
   * Missing: the format does not write compressed clusters.
   */
  writeCompressed?(offset: GuestOffset, data: Buffer): Promise<void>;
  /** True when the image takes only `writeCompressed` (a VMDK stream): convert then compresses without -c. */
  readonly compressedOnly?: boolean;
  /** Makes [offset, offset + length) read as zeros (range checked). Missing: EOPNOTSUPP, the image stays writable. */
  zero?(offset: GuestOffset, length: number): Promise<void>;
  /** Lets the format free [offset, offset + length); it then reads as zeros or as the backing file. Missing: EOPNOTSUPP. */
  discard?(offset: GuestOffset, length: number): Promise<void>;
  /** Makes everything written so far durable. */
  flush(): Promise<void>;
  /**
   * Idle clean (idle-clean.ts): makes everything written so far durable (deferred
   * metadata too), then marks the image clean on disk (need-check / dirty bit cleared
   * with a durable header write), so a crash from now on needs no repair. The next
   * metadata change marks the image again, durably, first. Called after a while
   * without writes, never during one. Missing: the format has nothing to mark.
   */
  markClean?(): Promise<void>;
  /** Flushes, marks the image clean and releases its own file. Files opened through the gate are closed by the generic layer. */
  close(): Promise<void>;
  info(): FormatInfo;
  /** Bytes on disk qemu-img shows as actual-size, when it counts more than the image's own file (VMDK: the descriptor and its extents). */
  allocatedSize?(): Promise<number>;
  /** Set by the generic layer once the backing chain is open. */
  attachBacking?(reader: BackingReader | undefined): void;
  /**
   * Optional: checks that the opened backing image is the one this image was made
   * over (a differencing VHD's parent UUID), from what the backing image's `info`
   * says; throws (CorruptImageError) naming both when it is not. Called once the
   * backing image is open, before any read.
   */
  verifyBacking?(backing: { path: string; format: string; specific: Record<string, unknown> | undefined }): void;
}

/** How a driver opens the other files an image names. */
export interface FileGate {
  /**
   * Opens `name` as stored in the image (relative names resolve against the image's
   * directory), after the policy allows it. `role` names the file in messages
   * ('external data file'). Read-write only for the top image's own files.
   * `confined` (VMDK extents): unless the user gave allowed directories, the
   * name must be relative and resolve inside the image's own directory.
   */
  open(name: string, role: string, options: { readOnly: boolean; confined?: boolean }): Promise<Protocol>;
}

export interface OpenOptions {
  readOnly: boolean;
  /** Upper bound of the metadata (L2 table) cache in bytes; the format picks a default. */
  metadataCacheBytes?: number;
  /** Log lines a user should see (repairs done on open); defaults to the debug log. */
  notice?: (message: string) => void;
  /** Opens other files the image names. */
  files: FileGate;
  /** An internal snapshot (id or name) to open instead of the current state; always read-only. */
  snapshot?: string;
  /** Open options of this image's format (only names in the driver's `openOptions` reach it). */
  formatOptions?: Readonly<Record<string, string>>;
  /**
   * The opener writes only whole compressed clusters in guest order (convert): a format whose images
   * take nothing else (a VMDK stream) opens them writable only then, read-only with a notice otherwise.
   */
  compressedWrites?: boolean;
}

export interface CreateOptions {
  size: number;
  backingFile?: string;
  backingFormat?: string;
  /** Format options as key=value strings (cluster_size, table_size). */
  options?: Record<string, string>;
  /** The user asked to overwrite (--force): other files the image creates (a qcow2 data file) may be overwritten too. */
  force?: boolean;
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
  /**
   * What a repair may change (qemu-img check -r leaks|all): 'leaks' only frees
   * leaked clusters, 'all' (the default) also repairs corruptions.
   */
  fix?: 'leaks' | 'all';
  /** Called with (done, total) while checking; for progress bars. */
  progress?: (done: number, total: number) => void;
}

/** What probing sees of a file. */
export interface ProbeSample {
  /** The first bytes of the file (PROBE_HEAD_BYTES; zeros past the end of a short file). */
  head: Buffer;
  /** The last bytes of the file (PROBE_TAIL_BYTES, fewer for a short file): VHD footers, DMG trailers. */
  tail: Buffer;
  fileSize: number;
  filename: string;
}

/** A format module: one exported object per format, listed in src/formats/index.ts. */
export interface FormatDriver {
  readonly name: string;
  /** How sure (0-100) this format is that the file is one of its images. Pure. */
  probe(sample: ProbeSample): number;
  /** File name extensions that claim this format ('.qed'). */
  readonly extensions: readonly string[];
  /**
   * Why images of this format cannot be written here, when they cannot: a read-write
   * open becomes read-only (before the write lock is taken) with a notice saying this.
   */
  readonly readOnlyReason?: string;
  /** True for a format recognized only so that its images are never read as raw: its `open` refuses by name. */
  readonly recognizedOnly?: boolean;
  /** True when `open` understands `options.snapshot`; otherwise `-s` is refused by name. */
  readonly snapshots?: boolean;
  /** Names of the open options (`OpenOptions.formatOptions`) the format takes; others are refused by the generic layer. */
  readonly openOptions?: readonly string[];
  open(file: Protocol, options: OpenOptions): Promise<FormatImage>;
  /**
   * Optional: creating images; missing means not supported. Resolves with the other files it
   * made beside `path` (a VMDK's extent files), if any, so that a caller removing a half-written
   * image (convert) removes them too.
   */
  create?(path: string, options: CreateOptions): Promise<string[] | void>;
  /** Optional: consistency check with optional repair; missing means not supported. */
  check?(file: Protocol, options: CheckOptions): Promise<CheckResult>;
  /**
   * Optional: changes the virtual size to `newSize` (qemu-img resize) on a file opened
   * read-write (the caller holds the image's write lock); missing means not supported.
   * The generic layer has already refused a shrink without `shrink` and sizes <= 0, and
   * afterwards zeroes whatever of the new area would not read as zeros.
   */
  resize?(file: Protocol, newSize: number, options: ResizeOptions): Promise<void>;
}

export interface ResizeOptions {
  /** The user allowed making the image smaller (--shrink); data past the new end is dropped. */
  shrink: boolean;
  /** Lines the user should see (a repair done first). */
  notice: (message: string) => void;
  /** Opens the other files the image names, read-write (a qcow2 external data file, resized with it). */
  files?: FileGate;
}
