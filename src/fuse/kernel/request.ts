/**
 * Request bytes -> one typed request: `parseRequest(buffer, length)` turns what
 * one read of /dev/fuse returned into a `Request`, a union discriminated by
 * `kind`, one member per opcode the file system answers; every other opcode
 * becomes `{ kind: 'unknown' }` so the session can answer ENOSYS.
 *
 * This is the one place that checks a request's bytes: a buffer shorter than
 * the header, a header `len` other than the bytes read, a body shorter than
 * the opcode's struct, an unterminated name, WRITE data of another size than
 * `fuse_write_in.size`, or a 64-bit number the request needs as a JavaScript
 * number but that is above 2^53 - 1: each throws one WireError naming the
 * opcode and what was wrong. When `error.header` is set, the header was
 * readable and the session can answer the request (EINVAL or EIO); without
 * it there is no request to answer.
 *
 * Pure functions, no I/O. Field widths: `unique`, `nodeid` and `lock_owner`
 * (which the kernel fills with all 64 bits) are bigint; file handles, offsets,
 * sizes and lookup counts are numbers, refused above 2^53 - 1 (a file handle
 * is whatever the session put in its OPEN reply, so it hands out small ones);
 * SETATTR times are signed seconds. The parser assumes a negotiated minor
 * version of at least 7.9 (40-byte fuse_read_in/fuse_write_in), as any kernel
 * of the last decade speaks.
 *
 * Views, not copies: `WriteRequest.data` and `LookupRequest.nameBytes` are
 * subarrays of `buffer`, valid until the buffer is reused for the next read;
 * answer a request only after every use of its data has finished. A READ
 * allocates the request object, its header and three bigints (unique, nodeid,
 * lock_owner), a WRITE also the data view: about 70 ns and 120 ns here.
 */
import {
  FUSE_ACCESS,
  FUSE_BATCH_FORGET,
  FUSE_DESTROY,
  FUSE_FALLOCATE,
  FUSE_FLUSH,
  FUSE_FORGET,
  FUSE_FSYNC,
  FUSE_GETATTR,
  FUSE_INIT,
  FUSE_INIT_EXT,
  FUSE_INTERRUPT,
  FUSE_LOOKUP,
  FUSE_LSEEK,
  FUSE_OPEN,
  FUSE_OPENDIR,
  FUSE_READ,
  FUSE_READDIR,
  FUSE_READDIRPLUS,
  FUSE_RELEASE,
  FUSE_RELEASEDIR,
  FUSE_SETATTR,
  FUSE_STATFS,
  FUSE_WRITE,
  fuse_access_in,
  fuse_batch_forget_in,
  fuse_fallocate_in,
  fuse_flush_in,
  fuse_forget_in,
  fuse_forget_one,
  fuse_fsync_in,
  fuse_getattr_in,
  fuse_in_header,
  fuse_init_in,
  fuse_interrupt_in,
  fuse_lseek_in,
  fuse_open_in,
  fuse_read_in,
  fuse_release_in,
  fuse_setattr_in,
  fuse_write_in,
  opcodeInfo,
  opcodeName,
  type OpcodeInfo,
} from './abi.js';

/** fuse_in_header, the 40 bytes that start every request. */
export interface InHeader {
  /** Bytes of the whole request, header and extensions included. */
  readonly len: number;
  readonly opcode: number;
  /** Echoed in the reply; an INTERRUPT's own unique has bit 0 set. */
  readonly unique: bigint;
  /** The inode the request is about (FUSE_ROOT_ID = 1n for the root). */
  readonly nodeid: bigint;
  readonly uid: number;
  readonly gid: number;
  readonly pid: number;
  /** Length of the request extensions that end the request, in units of 8 bytes (7.38). */
  readonly totalExtlen: number;
}

interface RequestBase {
  readonly header: InHeader;
}

/** FUSE_INIT: the kernel's version and offer; `flags` joins flags and flags2 (when FUSE_INIT_EXT is set). */
export interface InitRequest extends RequestBase {
  readonly kind: 'init';
  readonly major: number;
  readonly minor: number;
  readonly maxReadahead: number;
  /** Every INIT flag the kernel offers, bits 32..63 from flags2 (abi.ts FUSE_* bigints). */
  readonly flags: bigint;
}

/** FUSE_LOOKUP of `name` in the directory header.nodeid. */
export interface LookupRequest extends RequestBase {
  readonly kind: 'lookup';
  /** The name decoded as UTF-8 (invalid bytes become U+FFFD; compare nameBytes for exactness). */
  readonly name: string;
  /** The name's bytes without the NUL: a view into the request buffer. */
  readonly nameBytes: Buffer;
}

/** FUSE_FORGET (no reply): drop `nlookup` lookups of header.nodeid. */
export interface ForgetRequest extends RequestBase {
  readonly kind: 'forget';
  readonly nlookup: number;
}

/** One node of a FUSE_BATCH_FORGET. */
export interface ForgetOne {
  readonly nodeid: bigint;
  readonly nlookup: number;
}

/** FUSE_BATCH_FORGET (no reply). */
export interface BatchForgetRequest extends RequestBase {
  readonly kind: 'batchForget';
  readonly forgets: readonly ForgetOne[];
}

/** FUSE_GETATTR; `fh` is meant only when getattrFlags has FUSE_GETATTR_FH. */
export interface GetattrRequest extends RequestBase {
  readonly kind: 'getattr';
  readonly getattrFlags: number;
  readonly fh: number;
}

/** FUSE_SETATTR; `valid` (FATTR_*) says which fields are meant, the others are 0. */
export interface SetattrRequest extends RequestBase {
  readonly kind: 'setattr';
  readonly valid: number;
  readonly fh: number;
  readonly size: number;
  readonly lockOwner: bigint;
  /** Seconds since the epoch, negative before 1970. */
  readonly atime: number;
  readonly mtime: number;
  readonly ctime: number;
  readonly atimensec: number;
  readonly mtimensec: number;
  readonly ctimensec: number;
  readonly mode: number;
  readonly uid: number;
  readonly gid: number;
}

/** FUSE_OPEN / FUSE_OPENDIR: `flags` are open(2)'s, `openFlags` FUSE_OPEN_*. */
export interface OpenRequest extends RequestBase {
  readonly kind: 'open';
  readonly flags: number;
  readonly openFlags: number;
}
export interface OpendirRequest extends RequestBase {
  readonly kind: 'opendir';
  readonly flags: number;
  readonly openFlags: number;
}

/** FUSE_READ of `size` bytes at `offset`. */
export interface ReadRequest extends RequestBase {
  readonly kind: 'read';
  readonly fh: number;
  readonly offset: number;
  readonly size: number;
  readonly readFlags: number;
  /** Meant only when readFlags has FUSE_READ_LOCKOWNER. */
  readonly lockOwner: bigint;
  /** The file's open(2) flags. */
  readonly flags: number;
}

/** FUSE_WRITE of `data` (data.length === size) at `offset`. */
export interface WriteRequest extends RequestBase {
  readonly kind: 'write';
  readonly fh: number;
  readonly offset: number;
  readonly size: number;
  readonly writeFlags: number;
  /** Meant only when writeFlags has FUSE_WRITE_LOCKOWNER. */
  readonly lockOwner: bigint;
  readonly flags: number;
  /** The bytes to write: a view into the request buffer, not a copy. */
  readonly data: Buffer;
}

/** FUSE_RELEASE / FUSE_RELEASEDIR: the last close of `fh`. */
export interface ReleaseRequest extends RequestBase {
  readonly kind: 'release';
  readonly fh: number;
  readonly flags: number;
  readonly releaseFlags: number;
  readonly lockOwner: bigint;
}
export interface ReleasedirRequest extends RequestBase {
  readonly kind: 'releasedir';
  readonly fh: number;
  readonly flags: number;
  readonly releaseFlags: number;
  readonly lockOwner: bigint;
}

/** FUSE_FLUSH: a close(2) of a descriptor of `fh`. */
export interface FlushRequest extends RequestBase {
  readonly kind: 'flush';
  readonly fh: number;
  readonly lockOwner: bigint;
}

/** FUSE_FSYNC; fsyncFlags has FUSE_FSYNC_FDATASYNC for fdatasync(2). */
export interface FsyncRequest extends RequestBase {
  readonly kind: 'fsync';
  readonly fh: number;
  readonly fsyncFlags: number;
}

/** FUSE_STATFS (no body). */
export interface StatfsRequest extends RequestBase {
  readonly kind: 'statfs';
}

/** FUSE_READDIR / FUSE_READDIRPLUS: entries after cookie `offset` (0 = from the start), at most `size` bytes. */
export interface ReaddirRequest extends RequestBase {
  readonly kind: 'readdir';
  readonly fh: number;
  readonly offset: number;
  readonly size: number;
}
export interface ReaddirplusRequest extends RequestBase {
  readonly kind: 'readdirplus';
  readonly fh: number;
  readonly offset: number;
  readonly size: number;
}

/** FUSE_ACCESS; `mask` is access(2)'s (R_OK | W_OK | X_OK, or F_OK = 0). */
export interface AccessRequest extends RequestBase {
  readonly kind: 'access';
  readonly mask: number;
}

/** FUSE_INTERRUPT (no reply unless EAGAIN): the request whose unique is `interruptedUnique`. */
export interface InterruptRequest extends RequestBase {
  readonly kind: 'interrupt';
  readonly interruptedUnique: bigint;
}

/** FUSE_LSEEK with whence SEEK_DATA or SEEK_HOLE. */
export interface LseekRequest extends RequestBase {
  readonly kind: 'lseek';
  readonly fh: number;
  readonly offset: number;
  readonly whence: number;
}

/** FUSE_FALLOCATE; `mode` is FALLOC_FL_* bits (0 = allocate). */
export interface FallocateRequest extends RequestBase {
  readonly kind: 'fallocate';
  readonly fh: number;
  readonly offset: number;
  readonly length: number;
  readonly mode: number;
}

/** FUSE_DESTROY (no body; sent on fuseblk mounts only). */
export interface DestroyRequest extends RequestBase {
  readonly kind: 'destroy';
}

/** Any other opcode: answer ENOSYS (never for LSEEK or FALLOCATE, which are parsed). */
export interface UnknownRequest extends RequestBase {
  readonly kind: 'unknown';
  readonly opcode: number;
}

/** One request from /dev/fuse. */
export type Request =
  | InitRequest
  | LookupRequest
  | ForgetRequest
  | BatchForgetRequest
  | GetattrRequest
  | SetattrRequest
  | OpenRequest
  | ReadRequest
  | WriteRequest
  | ReleaseRequest
  | FlushRequest
  | FsyncRequest
  | StatfsRequest
  | OpendirRequest
  | ReaddirRequest
  | ReaddirplusRequest
  | ReleasedirRequest
  | AccessRequest
  | InterruptRequest
  | LseekRequest
  | FallocateRequest
  | DestroyRequest
  | UnknownRequest;

/** The `kind` strings of Request. */
export type RequestKind = Request['kind'];

/** A request whose bytes break the protocol. */
export class WireError extends Error {
  /** The request's header when it was readable (then the request can be answered), else undefined. */
  readonly header: InHeader | undefined;
  constructor(message: string, header: InHeader | undefined) {
    super(message);
    this.name = 'WireError';
    this.header = header;
  }
}

const HEADER = fuse_in_header.sizeof;
/** Offset of the body: every request struct starts right after the header. */
const B = HEADER;
const TWO_32 = 0x1_0000_0000;
/** Above this, the high 32-bit word of a u64 makes it exceed 2^53 - 1. */
const MAX_SAFE_HIGH = 0x1f_ffff;
const INIT_EXT_LOW = Number(FUSE_INIT_EXT);

/**
 * Parses one request: `buffer` holds it from byte 0, `length` is what the read
 * of /dev/fuse returned. Throws WireError for a request that breaks the
 * protocol (see the top of this file); RangeError when `length` does not fit
 * `buffer`, which is the caller's mistake.
 */
export function parseRequest(buffer: Buffer, length: number): Request {
  if (!Number.isInteger(length) || length < 0 || length > buffer.length) {
    throw new RangeError(`parseRequest: length ${length} is not within the ${buffer.length}-byte buffer`);
  }
  if (length < HEADER) {
    throw new WireError(`FUSE request: the read returned ${length} bytes, less than the ${HEADER}-byte fuse_in_header`, undefined);
  }
  const view = viewOf(buffer);
  const header: InHeader = {
    len: view.getUint32(fuse_in_header.len, true),
    opcode: view.getUint32(fuse_in_header.opcode, true),
    unique: view.getBigUint64(fuse_in_header.unique, true),
    nodeid: view.getBigUint64(fuse_in_header.nodeid, true),
    uid: view.getUint32(fuse_in_header.uid, true),
    gid: view.getUint32(fuse_in_header.gid, true),
    pid: view.getUint32(fuse_in_header.pid, true),
    totalExtlen: view.getUint16(fuse_in_header.total_extlen, true),
  };
  if (header.len !== length) {
    throw new WireError(`${opcodeName(header.opcode)} request: fuse_in_header.len is ${header.len} but the read returned ${length} bytes`, header);
  }
  const extensionBytes = header.totalExtlen * 8;
  if (extensionBytes > length - HEADER) {
    throw new WireError(
      `${opcodeName(header.opcode)} request: total_extlen ${header.totalExtlen} (${extensionBytes} bytes) is longer than the ${length - HEADER}-byte body`,
      header,
    );
  }
  const decoder = decoders[header.opcode];
  if (decoder === undefined) return { kind: 'unknown', header, opcode: header.opcode };
  const bodyEnd = length - extensionBytes;
  if (bodyEnd - B < decoder.info.inSize) {
    throw new WireError(
      `${opcodeName(header.opcode)} request: the body is ${bodyEnd - B} bytes, ${decoder.info.inStruct ?? 'it'} needs ${decoder.info.inSize}`,
      header,
    );
  }
  return decoder.decode(buffer, view, header, bodyEnd);
}

// ---------------------------------------------------------------------------
// Field readers. Reads go through a DataView of the request buffer (half the
// cost of Buffer's readBigUInt64LE); the view of the last buffer is kept, so a
// session that reads every request into the same buffer creates it once.

let lastBuffer: Buffer | undefined;
let lastView: DataView | undefined;

function viewOf(buffer: Buffer): DataView {
  if (buffer !== lastBuffer || lastView === undefined) {
    lastView = new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
    lastBuffer = buffer;
  }
  return lastView;
}

/** An unsigned 64-bit field at `at` as a number; WireError above 2^53 - 1. `field` names it. */
function u64(view: DataView, at: number, header: InHeader, field: string): number {
  const high = view.getUint32(at + 4, true);
  if (high > MAX_SAFE_HIGH) {
    throw new WireError(`${opcodeName(header.opcode)} request: ${field} ${view.getBigUint64(at, true)} is above 2^53 - 1`, header);
  }
  return high * TWO_32 + view.getUint32(at, true);
}

/** A signed 64-bit field (times) as a number; WireError outside ±(2^53 - 1). */
function i64(view: DataView, at: number, header: InHeader, field: string): number {
  const high = view.getInt32(at + 4, true);
  const value = high * TWO_32 + view.getUint32(at, true);
  if (high > MAX_SAFE_HIGH || high < -MAX_SAFE_HIGH - 1 || !Number.isSafeInteger(value)) {
    throw new WireError(`${opcodeName(header.opcode)} request: ${field} ${view.getBigInt64(at, true)} is outside ±(2^53 - 1)`, header);
  }
  return value;
}

// ---------------------------------------------------------------------------
// The decoders, one per parsed opcode, indexed by opcode. parseRequest has
// checked that the body holds info.inSize bytes; a decoder checks only the
// variable part after it. `end` is where the body ends (extensions excluded).

interface Decoder {
  readonly info: OpcodeInfo;
  readonly decode: (buffer: Buffer, view: DataView, header: InHeader, end: number) => Request;
}

const decoders: Array<Decoder | undefined> = [];

function define(opcode: number, decode: Decoder['decode']): void {
  const info = opcodeInfo(opcode);
  if (info === undefined) throw new Error(`request.ts: opcode ${opcode} is not in the opcode table`);
  decoders[opcode] = { info, decode };
}

define(FUSE_INIT, (buffer, view, header, end) => {
  const low = view.getUint32(B + fuse_init_in.flags, true);
  let flags = BigInt(low);
  // flags2 exists since 7.36 and is meant only with FUSE_INIT_EXT (as libfuse reads it)
  if ((low & INIT_EXT_LOW) !== 0 && end - B >= fuse_init_in.flags2 + 4) {
    flags |= BigInt(view.getUint32(B + fuse_init_in.flags2, true)) << 32n;
  }
  return {
    kind: 'init',
    header,
    major: view.getUint32(B + fuse_init_in.major, true),
    minor: view.getUint32(B + fuse_init_in.minor, true),
    maxReadahead: view.getUint32(B + fuse_init_in.max_readahead, true),
    flags,
  };
});

define(FUSE_LOOKUP, (buffer, view, header, end) => {
  const nameBytes = nulTerminated(buffer, header, B, end, 'the name');
  return { kind: 'lookup', header, name: nameBytes.toString('utf8'), nameBytes };
});

define(FUSE_FORGET, (buffer, view, header) => ({
  kind: 'forget',
  header,
  nlookup: u64(view, B + fuse_forget_in.nlookup, header, 'fuse_forget_in.nlookup'),
}));

define(FUSE_BATCH_FORGET, (buffer, view, header, end) => {
  const count = view.getUint32(B + fuse_batch_forget_in.count, true);
  const first = B + fuse_batch_forget_in.sizeof;
  const available = Math.floor((end - first) / fuse_forget_one.sizeof);
  if (count > available) {
    throw new WireError(
      `${opcodeName(header.opcode)} request: fuse_batch_forget_in.count is ${count} but the body holds ${available} fuse_forget_one entries`,
      header,
    );
  }
  const forgets: ForgetOne[] = new Array<ForgetOne>(count);
  for (let index = 0; index < count; index++) {
    const at = first + index * fuse_forget_one.sizeof;
    forgets[index] = {
      nodeid: view.getBigUint64(at + fuse_forget_one.nodeid, true),
      nlookup: u64(view, at + fuse_forget_one.nlookup, header, `fuse_forget_one[${index}].nlookup`),
    };
  }
  return { kind: 'batchForget', header, forgets };
});

define(FUSE_GETATTR, (buffer, view, header) => ({
  kind: 'getattr',
  header,
  getattrFlags: view.getUint32(B + fuse_getattr_in.getattr_flags, true),
  fh: u64(view, B + fuse_getattr_in.fh, header, 'fuse_getattr_in.fh'),
}));

define(FUSE_SETATTR, (buffer, view, header) => ({
  kind: 'setattr',
  header,
  valid: view.getUint32(B + fuse_setattr_in.valid, true),
  fh: u64(view, B + fuse_setattr_in.fh, header, 'fuse_setattr_in.fh'),
  size: u64(view, B + fuse_setattr_in.size, header, 'fuse_setattr_in.size'),
  lockOwner: view.getBigUint64(B + fuse_setattr_in.lock_owner, true),
  atime: i64(view, B + fuse_setattr_in.atime, header, 'fuse_setattr_in.atime'),
  mtime: i64(view, B + fuse_setattr_in.mtime, header, 'fuse_setattr_in.mtime'),
  ctime: i64(view, B + fuse_setattr_in.ctime, header, 'fuse_setattr_in.ctime'),
  atimensec: view.getUint32(B + fuse_setattr_in.atimensec, true),
  mtimensec: view.getUint32(B + fuse_setattr_in.mtimensec, true),
  ctimensec: view.getUint32(B + fuse_setattr_in.ctimensec, true),
  mode: view.getUint32(B + fuse_setattr_in.mode, true),
  uid: view.getUint32(B + fuse_setattr_in.uid, true),
  gid: view.getUint32(B + fuse_setattr_in.gid, true),
}));

define(FUSE_OPEN, (buffer, view, header) => ({
  kind: 'open',
  header,
  flags: view.getUint32(B + fuse_open_in.flags, true),
  openFlags: view.getUint32(B + fuse_open_in.open_flags, true),
}));

define(FUSE_OPENDIR, (buffer, view, header) => ({
  kind: 'opendir',
  header,
  flags: view.getUint32(B + fuse_open_in.flags, true),
  openFlags: view.getUint32(B + fuse_open_in.open_flags, true),
}));

define(FUSE_READ, (buffer, view, header) => ({
  kind: 'read',
  header,
  fh: u64(view, B + fuse_read_in.fh, header, 'fuse_read_in.fh'),
  offset: u64(view, B + fuse_read_in.offset, header, 'fuse_read_in.offset'),
  size: view.getUint32(B + fuse_read_in.size, true),
  readFlags: view.getUint32(B + fuse_read_in.read_flags, true),
  lockOwner: view.getBigUint64(B + fuse_read_in.lock_owner, true),
  flags: view.getUint32(B + fuse_read_in.flags, true),
}));

define(FUSE_WRITE, (buffer, view, header, end) => {
  const size = view.getUint32(B + fuse_write_in.size, true);
  const dataStart = B + fuse_write_in.sizeof;
  if (end - dataStart !== size) {
    throw new WireError(
      `${opcodeName(header.opcode)} request: fuse_write_in.size is ${size} but ${end - dataStart} bytes of data follow`,
      header,
    );
  }
  return {
    kind: 'write',
    header,
    fh: u64(view, B + fuse_write_in.fh, header, 'fuse_write_in.fh'),
    offset: u64(view, B + fuse_write_in.offset, header, 'fuse_write_in.offset'),
    size,
    writeFlags: view.getUint32(B + fuse_write_in.write_flags, true),
    lockOwner: view.getBigUint64(B + fuse_write_in.lock_owner, true),
    flags: view.getUint32(B + fuse_write_in.flags, true),
    data: buffer.subarray(dataStart, end),
  };
});

/** RELEASE and RELEASEDIR share fuse_release_in. */
function releaseFields(view: DataView, header: InHeader) {
  return {
    header,
    fh: u64(view, B + fuse_release_in.fh, header, 'fuse_release_in.fh'),
    flags: view.getUint32(B + fuse_release_in.flags, true),
    releaseFlags: view.getUint32(B + fuse_release_in.release_flags, true),
    lockOwner: view.getBigUint64(B + fuse_release_in.lock_owner, true),
  };
}

define(FUSE_RELEASE, (_buffer, view, header) => ({ kind: 'release', ...releaseFields(view, header) }));

define(FUSE_RELEASEDIR, (_buffer, view, header) => ({ kind: 'releasedir', ...releaseFields(view, header) }));

define(FUSE_FLUSH, (buffer, view, header) => ({
  kind: 'flush',
  header,
  fh: u64(view, B + fuse_flush_in.fh, header, 'fuse_flush_in.fh'),
  lockOwner: view.getBigUint64(B + fuse_flush_in.lock_owner, true),
}));

define(FUSE_FSYNC, (buffer, view, header) => ({
  kind: 'fsync',
  header,
  fh: u64(view, B + fuse_fsync_in.fh, header, 'fuse_fsync_in.fh'),
  fsyncFlags: view.getUint32(B + fuse_fsync_in.fsync_flags, true),
}));

define(FUSE_STATFS, (_buffer, view, header) => ({ kind: 'statfs', header }));

define(FUSE_READDIR, (buffer, view, header) => ({
  kind: 'readdir',
  header,
  fh: u64(view, B + fuse_read_in.fh, header, 'fuse_read_in.fh'),
  offset: u64(view, B + fuse_read_in.offset, header, 'fuse_read_in.offset'),
  size: view.getUint32(B + fuse_read_in.size, true),
}));

define(FUSE_READDIRPLUS, (buffer, view, header) => ({
  kind: 'readdirplus',
  header,
  fh: u64(view, B + fuse_read_in.fh, header, 'fuse_read_in.fh'),
  offset: u64(view, B + fuse_read_in.offset, header, 'fuse_read_in.offset'),
  size: view.getUint32(B + fuse_read_in.size, true),
}));

define(FUSE_ACCESS, (buffer, view, header) => ({
  kind: 'access',
  header,
  mask: view.getUint32(B + fuse_access_in.mask, true),
}));

define(FUSE_INTERRUPT, (buffer, view, header) => ({
  kind: 'interrupt',
  header,
  interruptedUnique: view.getBigUint64(B + fuse_interrupt_in.unique, true),
}));

define(FUSE_LSEEK, (buffer, view, header) => ({
  kind: 'lseek',
  header,
  fh: u64(view, B + fuse_lseek_in.fh, header, 'fuse_lseek_in.fh'),
  offset: u64(view, B + fuse_lseek_in.offset, header, 'fuse_lseek_in.offset'),
  whence: view.getUint32(B + fuse_lseek_in.whence, true),
}));

define(FUSE_FALLOCATE, (buffer, view, header) => ({
  kind: 'fallocate',
  header,
  fh: u64(view, B + fuse_fallocate_in.fh, header, 'fuse_fallocate_in.fh'),
  offset: u64(view, B + fuse_fallocate_in.offset, header, 'fuse_fallocate_in.offset'),
  length: u64(view, B + fuse_fallocate_in.length, header, 'fuse_fallocate_in.length'),
  mode: view.getUint32(B + fuse_fallocate_in.mode, true),
}));

define(FUSE_DESTROY, (_buffer, view, header) => ({ kind: 'destroy', header }));

/** The bytes from `start` up to a NUL before `end` (a view); WireError when there is none. */
function nulTerminated(buffer: Buffer, header: InHeader, start: number, end: number, what: string): Buffer {
  const body = buffer.subarray(start, end);
  const nul = body.indexOf(0);
  if (nul < 0) {
    throw new WireError(`${opcodeName(header.opcode)} request: ${what} is not NUL-terminated within the ${end - start}-byte body`, header);
  }
  return body.subarray(0, nul);
}
