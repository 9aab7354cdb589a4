/**
 * The shapes shared by filters: how a user names one (FilterSpec), the
 * options after parsing, and the hooks an image filter gives the generic layer.
 */
import type { GuestOffset, Protocol } from '../types.js';

/**
 * One filter as the user gives it: `{ name: 'blkverify', reference: 'ref.raw' }`
 * in the library, `--filter blkverify:reference=ref.raw` on the command line.
 * `layer` picks the image of the backing chain it applies to (0, the default,
 * is the top image; 1 its backing file...). Every other key is the filter's.
 */
export interface FilterSpec {
  name: string;
  layer?: number | string;
  [key: string]: string | number | boolean | undefined;
}

/** A filter's options as strings, keyed by name; `layer` taken out. */
export type FilterOptions = Readonly<Record<string, string>>;

/** What a filter is told about where it sits. */
export interface FilterContext {
  /** The image file of the layer the filter applies to. */
  imagePath: string;
  /** The layer (0 = top image). */
  layer: number;
  readOnly: boolean;
  /** Lines the user should see. */
  notice: (line: string) => void;
}

/** Reads guest bytes of the image under an image filter (the image as the format shows it). */
export type ImageReader = (offset: GuestOffset, buffer: Buffer) => Promise<void>;

/**
 * An image filter: sees each request of one opened image after the format
 * answered it. A throw fails the request with the error's errno.
 */
export interface ImageFilter {
  /** The bytes a read returned, before the caller sees them. */
  afterRead?(offset: GuestOffset, buffer: Buffer): Promise<void>;
  /** A write the image accepted. */
  afterWrite?(offset: GuestOffset, buffer: Buffer): Promise<void>;
  /** A zero or discard of [offset, offset + length) the image accepted; `read` shows what the range reads as now. */
  afterChange?(offset: GuestOffset, length: number, read: ImageReader): Promise<void>;
  afterFlush?(): Promise<void>;
  close?(): Promise<void>;
}

/** One filter type: its name, its options, and what it wraps. */
export interface FilterDefinition {
  readonly name: string;
  /** One line for --help and messages. */
  readonly summary: string;
  /** The option keys it takes. */
  readonly keys: readonly string[];
  /** Checks the options without touching any file (so a bad option fails before an image opens). */
  validate(options: FilterOptions): void;
  /** Wraps the layer's image file (filters below the format). */
  wrapProtocol?(inner: Protocol, options: FilterOptions, context: FilterContext): Promise<Protocol>;
  /** Filters the layer's opened image (filters above the format). */
  openImageFilter?(options: FilterOptions, context: FilterContext & { virtualSize: number }): Promise<ImageFilter>;
}
