/**
 * imgmount as a library: the block layer's public API, wired to the default
 * list of formats. `openImage`, `createImage`, `checkImage`, `resizeImage` and `convertImage` here take the
 * same options as the block layer's, with `formats` optional.
 */
import * as block from './block/index.js';
import { defaultFormats } from './formats/index.js';
import * as resizing from './block/open.js';

export * from './block/index.js';
export { defaultFormats, formatDrivers } from './formats/index.js';

type WithDefaultFormats<T extends { formats: block.FormatList }> = Omit<T, 'formats'> & { formats?: block.FormatList };

export type OpenImageOptions = WithDefaultFormats<block.OpenImageOptions>;
export type CreateImageOptions = WithDefaultFormats<block.CreateImageOptions>;
export type CheckImageOptions = WithDefaultFormats<block.CheckImageOptions>;
export type ConvertImageOptions = WithDefaultFormats<block.ConvertImageOptions>;
export type ResizeImageOptions = WithDefaultFormats<resizing.ResizeImageOptions>;
export type { ResizeReport, ResizeTarget } from './block/open.js';

/** Opens an image and its backing chain (formats probed unless `format` is given). */
export function openImage(path: string, options: OpenImageOptions = {}): Promise<block.BlockImage> {
  return block.openImage(path, { ...options, formats: options.formats ?? defaultFormats });
}

/** Creates an image file; refuses to overwrite unless `force`. Resolves with the other files it made beside `path` (a VMDK's extents). */
export function createImage(path: string, format: string, options: CreateImageOptions): Promise<string[]> {
  return block.createImage(path, format, { ...options, formats: options.formats ?? defaultFormats });
}

/** Checks (and with `repair`, repairs) an image's metadata. */
export function checkImage(path: string, options: CheckImageOptions = {}): Promise<block.CheckReport> {
  return block.checkImage(path, { ...options, formats: options.formats ?? defaultFormats });
}

/** Changes an image's virtual size (qemu-img resize); a shrink needs `shrink: true`. */
export function resizeImage(path: string, size: resizing.ResizeTarget, options: ResizeImageOptions = {}): Promise<resizing.ResizeReport> {
  return resizing.resizeImage(path, size, { ...options, formats: options.formats ?? defaultFormats });
}

/** Converts an image to another format (qemu-img convert): a new destination, or an existing one with `existing`. */
export function convertImage(source: string, dest: string, options: ConvertImageOptions): Promise<block.ConvertReport> {
  return block.convertImage(source, dest, { ...options, formats: options.formats ?? defaultFormats });
}
