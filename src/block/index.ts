/**
 * The block layer's surface: open / read / write / flush / map / close by
 * byte offset, plus create and check, over a list of formats the caller
 * passes in (src/index.ts wires the default one).
 */
export { openImage, createImage, checkImage, MAX_CHAIN_DEPTH, NoCheckError, NO_CHECK_EXIT_STATUS } from './open.js';
export { convertImage, DEFAULT_SPARSE_SIZE, DEFAULT_PARALLEL, MAX_PARALLEL, MAX_SPARSE_SIZE } from './convert.js';
export type { ConvertImageOptions, ConvertReport } from './convert.js';
export { resolveBackingName } from './backing-name.js';
export type { OpenImageOptions, CreateImageOptions, CheckImageOptions, CheckReport } from './open.js';
export { BlockImage } from './image.js';
export type { MapRun, ImageInfo } from './image.js';
export { FormatList, PROBE_HEAD_BYTES, PROBE_TAIL_BYTES } from './probe.js';
export type { FilePolicy } from './gate.js';
export * from './errors.js';
export { parseSize } from './size.js';
export type * from './types.js';
export { FILTERS, parseFilterArgument } from './filters/index.js';
export type { FilterSpec, FilterDefinition, ImageFilter } from './filters/index.js';
export { markWriteLog } from './filters/log-writes.js';
export { parseWriteLog } from './filters/write-log.js';
export type { WriteLog, WriteLogRecord } from './filters/write-log.js';
export { BLOCK_EVENTS, announce } from './events.js';
export type { BlockEvent } from './events.js';
