/**
 * Typed replies -> bytes: each function returns the whole message for one
 * write(2) (or, for replyData, the iovecs for one writev(2)) to /dev/fuse,
 * starting with the 16-byte fuse_out_header { len, error, unique }. The
 * layouts are protocol 7.38's (abi.ts), which the kernel takes from a server
 * that negotiated minor 9 or later (older minors had the shorter
 * FUSE_COMPAT_*_SIZE entry, attr and statfs replies).
 *
 * Pure functions, no I/O. Every field is checked against its C type before it
 * is written; a value that does not fit (negative, fractional, too large) is
 * the caller's mistake and throws RangeError naming the function and the
 * field, so a bad reply never reaches the kernel (which would fail the request
 * with EINVAL, or worse take a wrong value).
 *
 * Numbers and bigints: `unique` is a bigint (echo the request's
 * header.unique); node IDs, generations and inode numbers take a number or a
 * bigint; file handles are numbers (request.ts refuses handles above 2^53 - 1,
 * so hand out small ones); sizes, offsets and times are numbers, times signed
 * seconds. Padding and unused fields are zero.
 *
 * Directory listings: DirentWriter (READDIR) and DirentPlusWriter
 * (READDIRPLUS) pack records into one reply of at most the request's `size`
 * bytes; `add` returns false when the next record does not fit, and `reply`
 * gives the message.
 */
import {
  FUSE_INIT_EXT,
  FUSE_NAME_MAX,
  fuse_attr,
  fuse_attr_out,
  fuse_dirent,
  fuse_direntplus,
  fuse_entry_out,
  fuse_init_out,
  fuse_kstatfs,
  fuse_lseek_out,
  fuse_open_out,
  fuse_out_header,
  fuse_statfs_out,
  fuse_write_out,
  fuseRecAlign,
} from './abi.js';

/** struct fuse_attr: what stat(2) shows of a node. */
export interface FuseAttr {
  readonly ino: number | bigint;
  readonly size: number;
  /** 512-byte blocks allocated. */
  readonly blocks: number;
  /** Seconds since the epoch (negative before 1970) and nanoseconds. */
  readonly atime: number;
  readonly mtime: number;
  readonly ctime: number;
  readonly atimensec: number;
  readonly mtimensec: number;
  readonly ctimensec: number;
  /** st_mode: file type and permission bits (0o100600 for a regular file rw-------). */
  readonly mode: number;
  readonly nlink: number;
  readonly uid: number;
  readonly gid: number;
  readonly rdev: number;
  /** The I/O size the kernel reports as st_blksize. */
  readonly blksize: number;
  /** FUSE_ATTR_* bits. */
  readonly flags: number;
}

/** FUSE_INIT reply (fuse_init_out, 64 bytes). */
export interface InitReply {
  readonly major: number;
  readonly minor: number;
  readonly maxReadahead: number;
  /** The INIT flags we accept (a subset of the kernel's offer); bits 32..63 go into flags2. */
  readonly flags: bigint;
  readonly maxBackground: number;
  readonly congestionThreshold: number;
  /** Largest WRITE the kernel sends (the read buffer must hold it: abi.ts minReadBufferSize). */
  readonly maxWrite: number;
  /** Timestamp granularity in nanoseconds (1 = ns, 1e9 = s). */
  readonly timeGran: number;
  /** Largest request in pages, with FUSE_MAX_PAGES (256 = 1 MiB). */
  readonly maxPages: number;
}

/** LOOKUP reply (fuse_entry_out); nodeid 0 is a negative entry cached for entryValid. */
export interface EntryReply {
  readonly nodeid: number | bigint;
  readonly generation: number | bigint;
  /** How long the kernel may cache the name, in seconds + nanoseconds. */
  readonly entryValid: number;
  readonly entryValidNsec?: number;
  /** How long the kernel may cache the attributes. */
  readonly attrValid: number;
  readonly attrValidNsec?: number;
  readonly attr: FuseAttr;
}

/** GETATTR / SETATTR reply (fuse_attr_out). */
export interface AttrReply {
  readonly attrValid: number;
  readonly attrValidNsec?: number;
  readonly attr: FuseAttr;
}

/** OPEN / OPENDIR reply (fuse_open_out). */
export interface OpenReply {
  /** Our handle, echoed in later requests on this open file. */
  readonly fh: number;
  /** FOPEN_* bits. */
  readonly openFlags: number;
}

/** STATFS reply (fuse_kstatfs). */
export interface Kstatfs {
  readonly blocks: number;
  readonly bfree: number;
  readonly bavail: number;
  readonly files: number;
  readonly ffree: number;
  readonly bsize: number;
  readonly namelen: number;
  readonly frsize: number;
}

const OUT = fuse_out_header.sizeof;
const TWO_32 = 0x1_0000_0000;
const U64_MAX = (1n << 64n) - 1n;
/** The kernel takes an error reply only with error in (-512, 0) (fs/fuse/dev.c: ERESTARTSYS). */
const ERRNO_LIMIT = 512;

/**
 * Writes a bigint as 8 bytes through a one-element BigUint64Array: a third of
 * the cost of Buffer.writeBigUInt64LE. Typed arrays are in host byte order,
 * which is the protocol's (abi.ts refuses to load on a big-endian host).
 */
const scratch64 = new BigUint64Array(1);
const scratch64Bytes = new Uint8Array(scratch64.buffer);
function putBigUint64(target: Buffer, at: number, value: bigint): void {
  scratch64[0] = value;
  target.set(scratch64Bytes, at);
}

/**
 * Writes a fuse_out_header at offset 0 of `target`: for a session that keeps
 * its own header buffers. `length` is the whole message, header included.
 */
export function writeOutHeader(target: Buffer, unique: bigint, error: number, length: number): void {
  u32(target, fuse_out_header.len, length, 'writeOutHeader', 'len');
  if (!Number.isInteger(error) || error > 0 || error <= -ERRNO_LIMIT) {
    throw new RangeError(`writeOutHeader: error ${error} is not 0 or a negative errno above -${ERRNO_LIMIT}`);
  }
  target.writeInt32LE(error, fuse_out_header.error);
  if (typeof unique !== 'bigint' || unique < 0n || unique > U64_MAX) {
    throw new RangeError(`writeOutHeader: unique ${String(unique)} is not an unsigned 64-bit bigint`);
  }
  putBigUint64(target, fuse_out_header.unique, unique);
}

/** A reply of `bodySize` zero bytes after its header; the caller fills the body at offset 16. */
function message(unique: bigint, bodySize: number): Buffer {
  const reply = Buffer.alloc(OUT + bodySize);
  writeOutHeader(reply, unique, 0, reply.length);
  return reply;
}

/** An error reply: the header alone, error = -errno (errno 1..511, e.g. os.constants.errno.ENOENT). */
export function replyError(unique: bigint, errno: number): Buffer {
  if (!Number.isInteger(errno) || errno <= 0 || errno >= ERRNO_LIMIT) {
    throw new RangeError(`replyError: errno ${errno} is not in 1..${ERRNO_LIMIT - 1}`);
  }
  const reply = Buffer.alloc(OUT);
  writeOutHeader(reply, unique, -errno, OUT);
  return reply;
}

/** Success with no body: FLUSH, RELEASE(DIR), FSYNC, ACCESS, FALLOCATE (SETATTR answers with replyAttr). */
export function replyEmpty(unique: bigint): Buffer {
  return message(unique, 0);
}

/** FUSE_INIT reply. Sets FUSE_INIT_EXT itself when a flag above bit 31 is given. */
export function replyInit(unique: bigint, init: InitReply): Buffer {
  const where = 'replyInit';
  if (typeof init.flags !== 'bigint' || init.flags < 0n || init.flags > U64_MAX) {
    throw new RangeError(`${where}: flags ${String(init.flags)} is not an unsigned 64-bit bigint`);
  }
  const high = Number(init.flags >> 32n);
  let low = Number(init.flags & 0xffff_ffffn);
  if (high !== 0) low = (low | Number(FUSE_INIT_EXT)) >>> 0;
  const reply = message(unique, fuse_init_out.sizeof);
  u32(reply, OUT + fuse_init_out.major, init.major, where, 'major');
  u32(reply, OUT + fuse_init_out.minor, init.minor, where, 'minor');
  u32(reply, OUT + fuse_init_out.max_readahead, init.maxReadahead, where, 'maxReadahead');
  u32(reply, OUT + fuse_init_out.flags, low, where, 'flags');
  u16(reply, OUT + fuse_init_out.max_background, init.maxBackground, where, 'maxBackground');
  u16(reply, OUT + fuse_init_out.congestion_threshold, init.congestionThreshold, where, 'congestionThreshold');
  u32(reply, OUT + fuse_init_out.max_write, init.maxWrite, where, 'maxWrite');
  u32(reply, OUT + fuse_init_out.time_gran, init.timeGran, where, 'timeGran');
  u16(reply, OUT + fuse_init_out.max_pages, init.maxPages, where, 'maxPages');
  u32(reply, OUT + fuse_init_out.flags2, high, where, 'flags (bits 32..63)');
  return reply;
}

/** LOOKUP reply. */
export function replyEntry(unique: bigint, entry: EntryReply): Buffer {
  const reply = message(unique, fuse_entry_out.sizeof);
  writeEntryOut(reply, OUT, entry, 'replyEntry');
  return reply;
}

/** GETATTR and SETATTR reply. */
export function replyAttr(unique: bigint, attr: AttrReply): Buffer {
  const where = 'replyAttr';
  const reply = message(unique, fuse_attr_out.sizeof);
  u64(reply, OUT + fuse_attr_out.attr_valid, attr.attrValid, where, 'attrValid');
  u32(reply, OUT + fuse_attr_out.attr_valid_nsec, attr.attrValidNsec ?? 0, where, 'attrValidNsec');
  writeAttr(reply, OUT + fuse_attr_out.attr, attr.attr, where);
  return reply;
}

/** OPEN and OPENDIR reply. */
export function replyOpen(unique: bigint, open: OpenReply): Buffer {
  const where = 'replyOpen';
  const reply = message(unique, fuse_open_out.sizeof);
  u64(reply, OUT + fuse_open_out.fh, open.fh, where, 'fh');
  u32(reply, OUT + fuse_open_out.open_flags, open.openFlags, where, 'openFlags');
  return reply;
}

/** WRITE reply: `size` bytes were written. */
export function replyWrite(unique: bigint, size: number): Buffer {
  const reply = message(unique, fuse_write_out.sizeof);
  u32(reply, OUT + fuse_write_out.size, size, 'replyWrite', 'size');
  return reply;
}

/** STATFS reply. */
export function replyStatfs(unique: bigint, st: Kstatfs): Buffer {
  const where = 'replyStatfs';
  const reply = message(unique, fuse_statfs_out.sizeof);
  const at = OUT + fuse_statfs_out.st;
  u64(reply, at + fuse_kstatfs.blocks, st.blocks, where, 'blocks');
  u64(reply, at + fuse_kstatfs.bfree, st.bfree, where, 'bfree');
  u64(reply, at + fuse_kstatfs.bavail, st.bavail, where, 'bavail');
  u64(reply, at + fuse_kstatfs.files, st.files, where, 'files');
  u64(reply, at + fuse_kstatfs.ffree, st.ffree, where, 'ffree');
  u32(reply, at + fuse_kstatfs.bsize, st.bsize, where, 'bsize');
  u32(reply, at + fuse_kstatfs.namelen, st.namelen, where, 'namelen');
  u32(reply, at + fuse_kstatfs.frsize, st.frsize, where, 'frsize');
  return reply;
}

/** LSEEK reply: the offset SEEK_DATA / SEEK_HOLE found (ENXIO goes through replyError). */
export function replyLseek(unique: bigint, offset: number): Buffer {
  const reply = message(unique, fuse_lseek_out.sizeof);
  u64(reply, OUT + fuse_lseek_out.offset, offset, 'replyLseek', 'offset');
  return reply;
}

/**
 * READ reply without copying the data: [header, ...data] for one writev(2),
 * the header's len covering all of it. Give at most the request's size
 * (fewer bytes mean end of file); the data buffers must stay unchanged until
 * the write has finished.
 */
export function replyData(unique: bigint, data: Buffer | readonly Buffer[]): Buffer[] {
  const header = Buffer.allocUnsafe(OUT); // writeOutHeader sets all of it
  if (Buffer.isBuffer(data)) {
    writeOutHeader(header, unique, 0, OUT + data.length);
    return [header, data];
  }
  let length = OUT;
  for (const part of data) length += part.length;
  writeOutHeader(header, unique, 0, length);
  return [header, ...data];
}

// ---------------------------------------------------------------------------
// Directory listings

/** One READDIR entry. */
export interface Dirent {
  readonly ino: number | bigint;
  /** The cookie of the entry after this one: a READDIR with this offset continues there. */
  readonly offset: number;
  /** DT_* (abi.ts), e.g. direntType(mode). */
  readonly type: number;
  /** 1..FUSE_NAME_MAX bytes, no '/' or NUL. */
  readonly name: string | Buffer;
}

/**
 * One READDIRPLUS entry: a dirent and the LOOKUP reply for it. The kernel
 * counts an entry with a nonzero entry.nodeid as one lookup of that node (not
 * for "." and ".."), to be forgotten later like any LOOKUP; entry null sends a
 * zeroed fuse_entry_out (nodeid 0: the kernel does not instantiate the node).
 */
export interface DirentPlus extends Dirent {
  readonly entry: EntryReply | null;
}

/** The DT_* type of a readdir entry from an st_mode: (mode & S_IFMT) >> 12. */
export function direntType(mode: number): number {
  return (mode & 0o170000) >>> 12;
}

/** Packs records into one READDIR/READDIRPLUS reply; use one writer per request. */
abstract class DirentBuffer {
  /** The request's size: the most bytes of records the reply may hold. */
  readonly size: number;
  protected readonly buffer: Buffer;
  private used = 0;
  private added = 0;
  private full = false;

  constructor(size: number, where: string) {
    if (!Number.isInteger(size) || size < 0 || size > 0xffff_ffff - OUT) {
      throw new RangeError(`${where}: size ${size} is not a request size`);
    }
    this.size = size;
    this.buffer = Buffer.alloc(OUT + size);
  }

  /** Bytes of records so far. */
  get byteLength(): number {
    return this.used;
  }

  /** Records added so far. */
  get count(): number {
    return this.added;
  }

  /** The reply: header and the records added (no records = end of the directory). */
  reply(unique: bigint): Buffer {
    writeOutHeader(this.buffer, unique, 0, OUT + this.used);
    return this.buffer.subarray(0, OUT + this.used);
  }

  /**
   * Appends one record of `fixedSize` bytes plus the name, padded to 8, whose
   * fuse_dirent starts `direntAt` bytes into it; `fill` writes the rest. False,
   * with nothing added, when it does not fit, and from then on for every entry:
   * the listing continues in the next READDIR at the last cookie added, so a
   * later, shorter entry must not jump the queue. A throw leaves nothing behind.
   */
  protected append(entry: Dirent, fixedSize: number, direntAt: number, where: string, fill?: (recordAt: number) => void): boolean {
    const nameLength = checkName(entry.name, where);
    const recordSize = fuseRecAlign(fixedSize + nameLength);
    if (this.full || this.used + recordSize > this.size) {
      this.full = true;
      return false;
    }
    const recordAt = OUT + this.used;
    try {
      const at = recordAt + direntAt;
      u64(this.buffer, at + fuse_dirent.ino, entry.ino, where, 'ino');
      u64(this.buffer, at + fuse_dirent.off, entry.offset, where, 'offset');
      u32(this.buffer, at + fuse_dirent.namelen, nameLength, where, 'name length');
      u32(this.buffer, at + fuse_dirent.type, entry.type, where, 'type');
      const nameAt = at + fuse_dirent.sizeof;
      if (typeof entry.name === 'string') this.buffer.write(entry.name, nameAt, 'utf8');
      else entry.name.copy(this.buffer, nameAt);
      fill?.(recordAt);
    } catch (error) {
      this.buffer.fill(0, recordAt, recordAt + recordSize);
      throw error;
    }
    this.used += recordSize;
    this.added++;
    return true;
  }
}

/** READDIR: fuse_dirent records. */
export class DirentWriter extends DirentBuffer {
  constructor(size: number) {
    super(size, 'DirentWriter');
  }

  /** Adds one entry; false when it (or an earlier one) did not fit in the size left: nothing was added. */
  add(entry: Dirent): boolean {
    return this.append(entry, fuse_dirent.sizeof, 0, 'DirentWriter.add');
  }
}

/** READDIRPLUS: fuse_direntplus records (fuse_entry_out + fuse_dirent). */
export class DirentPlusWriter extends DirentBuffer {
  constructor(size: number) {
    super(size, 'DirentPlusWriter');
  }

  /** Adds one entry; false when it (or an earlier one) did not fit: nothing was added, no lookup counted. */
  add(entry: DirentPlus): boolean {
    const where = 'DirentPlusWriter.add';
    const lookup = entry.entry;
    return this.append(entry, fuse_direntplus.sizeof, fuse_direntplus.dirent, where, (recordAt) => {
      if (lookup !== null) writeEntryOut(this.buffer, recordAt + fuse_direntplus.entry_out, lookup, where);
    });
  }
}

/** Byte length of a dirent name; RangeError for a name the kernel would refuse (EIO for the whole listing). */
function checkName(name: string | Buffer, where: string): number {
  const length = typeof name === 'string' ? Buffer.byteLength(name, 'utf8') : name.length;
  const bad = typeof name === 'string' ? name.includes('/') || name.includes('\0') : name.includes(0x2f) || name.includes(0);
  if (length === 0 || length > FUSE_NAME_MAX || bad) {
    throw new RangeError(`${where}: name ${JSON.stringify(name.toString())} is not 1..${FUSE_NAME_MAX} bytes without '/' or NUL`);
  }
  return length;
}

// ---------------------------------------------------------------------------
// Struct writers and checked field writers

function writeEntryOut(target: Buffer, at: number, entry: EntryReply, where: string): void {
  u64(target, at + fuse_entry_out.nodeid, entry.nodeid, where, 'nodeid');
  u64(target, at + fuse_entry_out.generation, entry.generation, where, 'generation');
  u64(target, at + fuse_entry_out.entry_valid, entry.entryValid, where, 'entryValid');
  u64(target, at + fuse_entry_out.attr_valid, entry.attrValid, where, 'attrValid');
  u32(target, at + fuse_entry_out.entry_valid_nsec, entry.entryValidNsec ?? 0, where, 'entryValidNsec');
  u32(target, at + fuse_entry_out.attr_valid_nsec, entry.attrValidNsec ?? 0, where, 'attrValidNsec');
  writeAttr(target, at + fuse_entry_out.attr, entry.attr, where);
}

function writeAttr(target: Buffer, at: number, attr: FuseAttr, where: string): void {
  u64(target, at + fuse_attr.ino, attr.ino, where, 'attr.ino');
  u64(target, at + fuse_attr.size, attr.size, where, 'attr.size');
  u64(target, at + fuse_attr.blocks, attr.blocks, where, 'attr.blocks');
  i64(target, at + fuse_attr.atime, attr.atime, where, 'attr.atime');
  i64(target, at + fuse_attr.mtime, attr.mtime, where, 'attr.mtime');
  i64(target, at + fuse_attr.ctime, attr.ctime, where, 'attr.ctime');
  u32(target, at + fuse_attr.atimensec, attr.atimensec, where, 'attr.atimensec');
  u32(target, at + fuse_attr.mtimensec, attr.mtimensec, where, 'attr.mtimensec');
  u32(target, at + fuse_attr.ctimensec, attr.ctimensec, where, 'attr.ctimensec');
  u32(target, at + fuse_attr.mode, attr.mode, where, 'attr.mode');
  u32(target, at + fuse_attr.nlink, attr.nlink, where, 'attr.nlink');
  u32(target, at + fuse_attr.uid, attr.uid, where, 'attr.uid');
  u32(target, at + fuse_attr.gid, attr.gid, where, 'attr.gid');
  u32(target, at + fuse_attr.rdev, attr.rdev, where, 'attr.rdev');
  u32(target, at + fuse_attr.blksize, attr.blksize, where, 'attr.blksize');
  u32(target, at + fuse_attr.flags, attr.flags, where, 'attr.flags');
}

function u16(target: Buffer, at: number, value: number, where: string, field: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff) {
    throw new RangeError(`${where}: ${field} ${value} is not an unsigned 16-bit integer`);
  }
  target.writeUInt16LE(value, at);
}

function u32(target: Buffer, at: number, value: number, where: string, field: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff_ffff) {
    throw new RangeError(`${where}: ${field} ${value} is not an unsigned 32-bit integer`);
  }
  target.writeUInt32LE(value, at);
}

/** An unsigned 64-bit field from a safe-integer number or a bigint. */
function u64(target: Buffer, at: number, value: number | bigint, where: string, field: string): void {
  if (typeof value === 'bigint') {
    if (value < 0n || value > U64_MAX) throw new RangeError(`${where}: ${field} ${value} is not an unsigned 64-bit integer`);
    putBigUint64(target, at, value);
    return;
  }
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`${where}: ${field} ${value} is not a non-negative safe integer`);
  }
  const high = Math.floor(value / TWO_32);
  target.writeUInt32LE(value - high * TWO_32, at);
  target.writeUInt32LE(high, at + 4);
}

/** A signed 64-bit field (seconds) from a safe-integer number. */
function i64(target: Buffer, at: number, value: number, where: string, field: string): void {
  if (!Number.isSafeInteger(value)) throw new RangeError(`${where}: ${field} ${value} is not a safe integer`);
  const high = Math.floor(value / TWO_32);
  target.writeUInt32LE(value - high * TWO_32, at);
  target.writeInt32LE(high, at + 4);
}
