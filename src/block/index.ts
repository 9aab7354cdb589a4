/**
 * The block layer's public surface: open / read / write / flush / map / close
 * by byte offset, plus create and check.
 */
export { openImage, createImage, checkImage, MAX_CHAIN_DEPTH } from './open.js';
export { resolveBackingName } from './backing-name.js';
export type { OpenImageOptions, CreateImageOptions, CheckImageOptions, CheckReport } from './open.js';
export { BlockImage } from './image.js';
export type { MapRun, ImageInfo } from './image.js';
export * from './errors.js';
export { parseSize } from './size.js';
export type * from './types.js';
