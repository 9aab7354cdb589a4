/**
 * The FUSE kernel ABI, protocol 7.38, as `/usr/include/linux/fuse.h` defines it:
 * opcodes, flag bits, struct layouts (byte offsets of the named fields and
 * `sizeof`), and the one table of opcodes the request parser dispatches on.
 *
 * This module holds values only, no code that touches bytes: `request.ts`
 * turns request bytes into typed requests with these offsets and `reply.ts`
 * turns typed replies into bytes. Names are the header's, so a reader can grep
 * fuse.h for any of them; every value here is checked against the C compiler
 * reading the real header (test/fixtures/fuse-wire/gen.c).
 *
 * Conventions:
 * - INIT flags are `bigint`: the protocol has 64 of them, bits 32..63 travel
 *   in `flags2` (fuse_init_in/fuse_init_out), and FUSE_INIT_EXT says so.
 * - Every other flag is a `number` (32-bit fields).
 * - A layout object gives `sizeof` and the offset of each named field (never
 *   padding); offsets are from the start of the struct, and request bodies
 *   start after the 40-byte fuse_in_header.
 * - FUSE structs are in the host's byte order; request.ts and reply.ts read
 *   and write little-endian, so this module refuses to load on a big-endian host.
 * - Opcodes beyond 7.38 (FUSE_STATX = 52...) and INIT bits of later kernels
 *   (FUSE_DIRECT_IO_ALLOW_MMAP = 1 << 36, 7.39...) are not named. A newer
 *   kernel may still send such an opcode (it parses as unknown; ENOSYS turns
 *   it off for the connection) and offer such bits (they stay in the INIT
 *   request's flags; a server accepts only the bits it names).
 */

import { endianness } from 'node:os';

if (endianness() !== 'LE') {
  throw new Error('src/fuse/kernel: the FUSE protocol is in host byte order and this module speaks little-endian; this host is big-endian');
}

/** Protocol version we speak (fuse.h: FUSE_KERNEL_VERSION / FUSE_KERNEL_MINOR_VERSION). */
export const FUSE_KERNEL_VERSION = 7;
export const FUSE_KERNEL_MINOR_VERSION = 38;

/** The node ID of the root inode (header.nodeid is a bigint). */
export const FUSE_ROOT_ID = 1n;

/** The kernel refuses to read requests into a buffer smaller than this (and see minReadBufferSize). */
export const FUSE_MIN_READ_BUFFER = 8192;

/**
 * Longest name in a fuse_dirent the kernel accepts (fs/fuse/fuse_i.h, not in the
 * uapi header): a longer one makes the kernel fail the whole READDIR with EIO.
 */
export const FUSE_NAME_MAX = 1024;

/** Reply sizes of older minor versions (the kernel accepts them from such servers). */
export const FUSE_COMPAT_ENTRY_OUT_SIZE = 120;
export const FUSE_COMPAT_ATTR_OUT_SIZE = 96;
export const FUSE_COMPAT_INIT_OUT_SIZE = 8;
export const FUSE_COMPAT_22_INIT_OUT_SIZE = 24;
export const FUSE_COMPAT_WRITE_IN_SIZE = 24;
export const FUSE_COMPAT_STATFS_SIZE = 48;

// ---------------------------------------------------------------------------
// Opcodes (enum fuse_opcode)

export const FUSE_LOOKUP = 1;
export const FUSE_FORGET = 2; // no reply
export const FUSE_GETATTR = 3;
export const FUSE_SETATTR = 4;
export const FUSE_READLINK = 5;
export const FUSE_SYMLINK = 6;
export const FUSE_MKNOD = 8;
export const FUSE_MKDIR = 9;
export const FUSE_UNLINK = 10;
export const FUSE_RMDIR = 11;
export const FUSE_RENAME = 12;
export const FUSE_LINK = 13;
export const FUSE_OPEN = 14;
export const FUSE_READ = 15;
export const FUSE_WRITE = 16;
export const FUSE_STATFS = 17;
export const FUSE_RELEASE = 18;
export const FUSE_FSYNC = 20;
export const FUSE_SETXATTR = 21;
export const FUSE_GETXATTR = 22;
export const FUSE_LISTXATTR = 23;
export const FUSE_REMOVEXATTR = 24;
export const FUSE_FLUSH = 25;
export const FUSE_INIT = 26;
export const FUSE_OPENDIR = 27;
export const FUSE_READDIR = 28;
export const FUSE_RELEASEDIR = 29;
export const FUSE_FSYNCDIR = 30;
export const FUSE_GETLK = 31;
export const FUSE_SETLK = 32;
export const FUSE_SETLKW = 33;
export const FUSE_ACCESS = 34;
export const FUSE_CREATE = 35;
export const FUSE_INTERRUPT = 36; // no reply, except EAGAIN for an unknown request
export const FUSE_BMAP = 37;
export const FUSE_DESTROY = 38;
export const FUSE_IOCTL = 39;
export const FUSE_POLL = 40;
export const FUSE_NOTIFY_REPLY = 41;
export const FUSE_BATCH_FORGET = 42; // no reply
export const FUSE_FALLOCATE = 43;
export const FUSE_READDIRPLUS = 44;
export const FUSE_RENAME2 = 45;
export const FUSE_LSEEK = 46;
export const FUSE_COPY_FILE_RANGE = 47;
export const FUSE_SETUPMAPPING = 48;
export const FUSE_REMOVEMAPPING = 49;
export const FUSE_SYNCFS = 50;
export const FUSE_TMPFILE = 51;
export const CUSE_INIT = 4096;

// ---------------------------------------------------------------------------
// INIT flags (fuse_init_in.flags / fuse_init_out.flags, and flags2 for bits 32..63)

export const FUSE_ASYNC_READ = 1n << 0n;
export const FUSE_POSIX_LOCKS = 1n << 1n;
export const FUSE_FILE_OPS = 1n << 2n;
export const FUSE_ATOMIC_O_TRUNC = 1n << 3n;
export const FUSE_EXPORT_SUPPORT = 1n << 4n;
export const FUSE_BIG_WRITES = 1n << 5n;
export const FUSE_DONT_MASK = 1n << 6n;
export const FUSE_SPLICE_WRITE = 1n << 7n;
export const FUSE_SPLICE_MOVE = 1n << 8n;
export const FUSE_SPLICE_READ = 1n << 9n;
export const FUSE_FLOCK_LOCKS = 1n << 10n;
export const FUSE_HAS_IOCTL_DIR = 1n << 11n;
export const FUSE_AUTO_INVAL_DATA = 1n << 12n;
export const FUSE_DO_READDIRPLUS = 1n << 13n;
export const FUSE_READDIRPLUS_AUTO = 1n << 14n;
export const FUSE_ASYNC_DIO = 1n << 15n;
export const FUSE_WRITEBACK_CACHE = 1n << 16n;
export const FUSE_NO_OPEN_SUPPORT = 1n << 17n;
export const FUSE_PARALLEL_DIROPS = 1n << 18n;
export const FUSE_HANDLE_KILLPRIV = 1n << 19n;
export const FUSE_POSIX_ACL = 1n << 20n;
export const FUSE_ABORT_ERROR = 1n << 21n;
/** fuse_init_out.max_pages is valid: requests of up to max_pages pages (the default is 32, 128 KiB). */
export const FUSE_MAX_PAGES = 1n << 22n;
export const FUSE_CACHE_SYMLINKS = 1n << 23n;
export const FUSE_NO_OPENDIR_SUPPORT = 1n << 24n;
export const FUSE_EXPLICIT_INVAL_DATA = 1n << 25n;
export const FUSE_MAP_ALIGNMENT = 1n << 26n;
export const FUSE_SUBMOUNTS = 1n << 27n;
export const FUSE_HANDLE_KILLPRIV_V2 = 1n << 28n;
export const FUSE_SETXATTR_EXT = 1n << 29n;
/** flags2 is valid (in both directions); replyInit sets it whenever a flag above bit 31 is given. */
export const FUSE_INIT_EXT = 1n << 30n;
export const FUSE_INIT_RESERVED = 1n << 31n;
export const FUSE_SECURITY_CTX = 1n << 32n;
export const FUSE_HAS_INODE_DAX = 1n << 33n;
// bit 34 (FUSE_CREATE_SUPP_GROUP) came with later 7.38 headers; this header has no name for it
export const FUSE_HAS_EXPIRE_ONLY = 1n << 35n;

// ---------------------------------------------------------------------------
// Other flag fields

/** fuse_open_out.open_flags (OPEN and OPENDIR replies). */
export const FOPEN_DIRECT_IO = 1 << 0;
export const FOPEN_KEEP_CACHE = 1 << 1;
export const FOPEN_NONSEEKABLE = 1 << 2;
export const FOPEN_CACHE_DIR = 1 << 3;
export const FOPEN_STREAM = 1 << 4;
export const FOPEN_NOFLUSH = 1 << 5;
/** Concurrent direct writes on one inode (new in 7.38). */
export const FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6;

/** fuse_setattr_in.valid: which fields of a SETATTR are meant. */
export const FATTR_MODE = 1 << 0;
export const FATTR_UID = 1 << 1;
export const FATTR_GID = 1 << 2;
export const FATTR_SIZE = 1 << 3;
export const FATTR_ATIME = 1 << 4;
export const FATTR_MTIME = 1 << 5;
export const FATTR_FH = 1 << 6;
export const FATTR_ATIME_NOW = 1 << 7;
export const FATTR_MTIME_NOW = 1 << 8;
export const FATTR_LOCKOWNER = 1 << 9;
export const FATTR_CTIME = 1 << 10;
export const FATTR_KILL_SUIDGID = 1 << 11;

/** fuse_release_in.release_flags */
export const FUSE_RELEASE_FLUSH = 1 << 0;
export const FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1;
/** fuse_getattr_in.getattr_flags: fh is valid. */
export const FUSE_GETATTR_FH = 1 << 0;
/** fuse_write_in.write_flags */
export const FUSE_WRITE_CACHE = 1 << 0;
export const FUSE_WRITE_LOCKOWNER = 1 << 1;
export const FUSE_WRITE_KILL_SUIDGID = 1 << 2;
/** fuse_read_in.read_flags */
export const FUSE_READ_LOCKOWNER = 1 << 1;
/** fuse_fsync_in.fsync_flags: fdatasync, not fsync. */
export const FUSE_FSYNC_FDATASYNC = 1 << 0;
/** fuse_open_in.open_flags */
export const FUSE_OPEN_KILL_SUIDGID = 1 << 0;
/** fuse_attr.flags */
export const FUSE_ATTR_SUBMOUNT = 1 << 0;
export const FUSE_ATTR_DAX = 1 << 1;

/** fuse_fallocate_in.mode (linux/falloc.h). */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_NO_HIDE_STALE = 0x04;
export const FALLOC_FL_COLLAPSE_RANGE = 0x08;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const FALLOC_FL_INSERT_RANGE = 0x20;
export const FALLOC_FL_UNSHARE_RANGE = 0x40;

/** fuse_lseek_in.whence (linux/fs.h). The kernel sends LSEEK only for SEEK_DATA and SEEK_HOLE. */
export const SEEK_SET = 0;
export const SEEK_CUR = 1;
export const SEEK_END = 2;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

/** fuse_dirent.type: the d_type of readdir(3), (mode & S_IFMT) >> 12. */
export const DT_UNKNOWN = 0;
export const DT_FIFO = 1;
export const DT_CHR = 2;
export const DT_DIR = 4;
export const DT_BLK = 6;
export const DT_REG = 8;
export const DT_LNK = 10;
export const DT_SOCK = 12;

// ---------------------------------------------------------------------------
// Struct layouts: sizeof and the offsets of named fields (padding is never named)

export const fuse_in_header = { sizeof: 40, len: 0, opcode: 4, unique: 8, nodeid: 16, uid: 24, gid: 28, pid: 32, total_extlen: 36 } as const;
export const fuse_out_header = { sizeof: 16, len: 0, error: 4, unique: 8 } as const;
export const fuse_init_in = { sizeof: 64, major: 0, minor: 4, max_readahead: 8, flags: 12, flags2: 16 } as const;
export const fuse_init_out = {
  sizeof: 64,
  major: 0,
  minor: 4,
  max_readahead: 8,
  flags: 12,
  max_background: 16, // uint16
  congestion_threshold: 18, // uint16
  max_write: 20,
  time_gran: 24,
  max_pages: 28, // uint16
  map_alignment: 30, // uint16
  flags2: 32,
} as const;
export const fuse_attr = {
  sizeof: 88,
  ino: 0,
  size: 8,
  blocks: 16,
  atime: 24, // seconds, signed 64-bit in the kernel (time64_t)
  mtime: 32,
  ctime: 40,
  atimensec: 48,
  mtimensec: 52,
  ctimensec: 56,
  mode: 60,
  nlink: 64,
  uid: 68,
  gid: 72,
  rdev: 76,
  blksize: 80,
  flags: 84,
} as const;
export const fuse_kstatfs = { sizeof: 80, blocks: 0, bfree: 8, bavail: 16, files: 24, ffree: 32, bsize: 40, namelen: 44, frsize: 48 } as const;
export const fuse_entry_out = {
  sizeof: 128,
  nodeid: 0,
  generation: 8,
  entry_valid: 16,
  attr_valid: 24,
  entry_valid_nsec: 32,
  attr_valid_nsec: 36,
  attr: 40,
} as const;
export const fuse_attr_out = { sizeof: 104, attr_valid: 0, attr_valid_nsec: 8, attr: 16 } as const;
export const fuse_forget_in = { sizeof: 8, nlookup: 0 } as const;
export const fuse_forget_one = { sizeof: 16, nodeid: 0, nlookup: 8 } as const;
export const fuse_batch_forget_in = { sizeof: 8, count: 0 } as const;
export const fuse_getattr_in = { sizeof: 16, getattr_flags: 0, fh: 8 } as const;
export const fuse_setattr_in = {
  sizeof: 88,
  valid: 0,
  fh: 8,
  size: 16,
  lock_owner: 24,
  atime: 32, // seconds, signed
  mtime: 40,
  ctime: 48,
  atimensec: 56,
  mtimensec: 60,
  ctimensec: 64,
  mode: 68,
  uid: 76,
  gid: 80,
} as const;
export const fuse_open_in = { sizeof: 8, flags: 0, open_flags: 4 } as const;
export const fuse_open_out = { sizeof: 16, fh: 0, open_flags: 8 } as const;
export const fuse_release_in = { sizeof: 24, fh: 0, flags: 8, release_flags: 12, lock_owner: 16 } as const;
export const fuse_flush_in = { sizeof: 24, fh: 0, lock_owner: 16 } as const;
export const fuse_read_in = { sizeof: 40, fh: 0, offset: 8, size: 16, read_flags: 20, lock_owner: 24, flags: 32 } as const;
export const fuse_write_in = { sizeof: 40, fh: 0, offset: 8, size: 16, write_flags: 20, lock_owner: 24, flags: 32 } as const;
export const fuse_write_out = { sizeof: 8, size: 0 } as const;
export const fuse_statfs_out = { sizeof: 80, st: 0 } as const;
export const fuse_fsync_in = { sizeof: 16, fh: 0, fsync_flags: 8 } as const;
export const fuse_access_in = { sizeof: 8, mask: 0 } as const;
export const fuse_interrupt_in = { sizeof: 8, unique: 0 } as const;
export const fuse_fallocate_in = { sizeof: 32, fh: 0, offset: 8, length: 16, mode: 24 } as const;
export const fuse_lseek_in = { sizeof: 24, fh: 0, offset: 8, whence: 16 } as const;
export const fuse_lseek_out = { sizeof: 8, offset: 0 } as const;
/** A READDIR record: this fixed part, then namelen bytes of name, zero-padded to a multiple of 8. */
export const fuse_dirent = { sizeof: 24, ino: 0, off: 8, namelen: 16, type: 20 } as const;
/** A READDIRPLUS record: a fuse_entry_out, then a fuse_dirent with its name, padded to 8. */
export const fuse_direntplus = { sizeof: 152, entry_out: 0, dirent: 128 } as const;
/** Request extensions (total_extlen) start with this header. */
export const fuse_ext_header = { sizeof: 8, size: 0, type: 4 } as const;

// Input structs of opcodes the parser knows only by name (their sizes fill the opcode table).
export const fuse_mknod_in = { sizeof: 16 } as const;
export const fuse_mkdir_in = { sizeof: 8 } as const;
export const fuse_rename_in = { sizeof: 8 } as const;
export const fuse_rename2_in = { sizeof: 16 } as const;
export const fuse_link_in = { sizeof: 8 } as const;
export const fuse_create_in = { sizeof: 16 } as const;
export const fuse_setxattr_in = { sizeof: 16 } as const;
export const fuse_getxattr_in = { sizeof: 8 } as const;
export const fuse_lk_in = { sizeof: 48 } as const;
export const fuse_bmap_in = { sizeof: 16 } as const;
export const fuse_ioctl_in = { sizeof: 32 } as const;
export const fuse_poll_in = { sizeof: 24 } as const;
export const fuse_notify_retrieve_in = { sizeof: 40 } as const;
export const fuse_copy_file_range_in = { sizeof: 56 } as const;
export const fuse_setupmapping_in = { sizeof: 40 } as const;
export const fuse_removemapping_in = { sizeof: 4 } as const;
export const fuse_syncfs_in = { sizeof: 8 } as const;
export const cuse_init_in = { sizeof: 16 } as const;

/** offsetof(struct fuse_dirent, name) */
export const FUSE_NAME_OFFSET = fuse_dirent.sizeof;
/** offsetof(struct fuse_direntplus, dirent.name) */
export const FUSE_NAME_OFFSET_DIRENTPLUS = fuse_direntplus.sizeof;

/** FUSE_REC_ALIGN: records in a READDIR(PLUS) reply start at multiples of 8. */
export function fuseRecAlign(length: number): number {
  return (length + 7) & ~7;
}

/**
 * The smallest buffer the kernel accepts for one read of /dev/fuse once INIT
 * negotiated `maxWrite` (fs/fuse/dev.c: a smaller one makes the read fail with
 * EINVAL): a WRITE of maxWrite bytes with its two headers, and at least
 * FUSE_MIN_READ_BUFFER.
 */
export function minReadBufferSize(maxWrite: number): number {
  return Math.max(FUSE_MIN_READ_BUFFER, fuse_in_header.sizeof + fuse_write_in.sizeof + maxWrite);
}

// ---------------------------------------------------------------------------
// The opcode table

/** One opcode of the protocol. */
export interface OpcodeInfo {
  /** The value in fuse_in_header.opcode. */
  readonly code: number;
  /** The name in fuse.h (`FUSE_READ`). */
  readonly name: string;
  /** The struct that starts the request body, or null when the body is only names or nothing. */
  readonly inStruct: string | null;
  /**
   * Bytes of body the parser requires before any name or data: sizeof(inStruct),
   * except INIT, whose body kernels before 7.36 sent as its first 16 bytes.
   */
  readonly inSize: number;
}

function op(code: number, name: string, inStruct: { readonly sizeof: number } | null, structName: string | null): OpcodeInfo {
  return Object.freeze({ code, name, inStruct: structName, inSize: inStruct === null ? 0 : inStruct.sizeof });
}

/** Every opcode of protocol 7.38, in opcode order. */
export const OPCODES: readonly OpcodeInfo[] = Object.freeze([
  op(FUSE_LOOKUP, 'FUSE_LOOKUP', null, null),
  op(FUSE_FORGET, 'FUSE_FORGET', fuse_forget_in, 'fuse_forget_in'),
  op(FUSE_GETATTR, 'FUSE_GETATTR', fuse_getattr_in, 'fuse_getattr_in'),
  op(FUSE_SETATTR, 'FUSE_SETATTR', fuse_setattr_in, 'fuse_setattr_in'),
  op(FUSE_READLINK, 'FUSE_READLINK', null, null),
  op(FUSE_SYMLINK, 'FUSE_SYMLINK', null, null),
  op(FUSE_MKNOD, 'FUSE_MKNOD', fuse_mknod_in, 'fuse_mknod_in'),
  op(FUSE_MKDIR, 'FUSE_MKDIR', fuse_mkdir_in, 'fuse_mkdir_in'),
  op(FUSE_UNLINK, 'FUSE_UNLINK', null, null),
  op(FUSE_RMDIR, 'FUSE_RMDIR', null, null),
  op(FUSE_RENAME, 'FUSE_RENAME', fuse_rename_in, 'fuse_rename_in'),
  op(FUSE_LINK, 'FUSE_LINK', fuse_link_in, 'fuse_link_in'),
  op(FUSE_OPEN, 'FUSE_OPEN', fuse_open_in, 'fuse_open_in'),
  op(FUSE_READ, 'FUSE_READ', fuse_read_in, 'fuse_read_in'),
  op(FUSE_WRITE, 'FUSE_WRITE', fuse_write_in, 'fuse_write_in'),
  op(FUSE_STATFS, 'FUSE_STATFS', null, null),
  op(FUSE_RELEASE, 'FUSE_RELEASE', fuse_release_in, 'fuse_release_in'),
  op(FUSE_FSYNC, 'FUSE_FSYNC', fuse_fsync_in, 'fuse_fsync_in'),
  // 8 bytes (FUSE_COMPAT_SETXATTR_IN_SIZE) unless FUSE_SETXATTR_EXT was negotiated
  op(FUSE_SETXATTR, 'FUSE_SETXATTR', fuse_setxattr_in, 'fuse_setxattr_in'),
  op(FUSE_GETXATTR, 'FUSE_GETXATTR', fuse_getxattr_in, 'fuse_getxattr_in'),
  op(FUSE_LISTXATTR, 'FUSE_LISTXATTR', fuse_getxattr_in, 'fuse_getxattr_in'),
  op(FUSE_REMOVEXATTR, 'FUSE_REMOVEXATTR', null, null),
  op(FUSE_FLUSH, 'FUSE_FLUSH', fuse_flush_in, 'fuse_flush_in'),
  Object.freeze({ code: FUSE_INIT, name: 'FUSE_INIT', inStruct: 'fuse_init_in', inSize: fuse_init_in.flags2 }),
  op(FUSE_OPENDIR, 'FUSE_OPENDIR', fuse_open_in, 'fuse_open_in'),
  op(FUSE_READDIR, 'FUSE_READDIR', fuse_read_in, 'fuse_read_in'),
  op(FUSE_RELEASEDIR, 'FUSE_RELEASEDIR', fuse_release_in, 'fuse_release_in'),
  op(FUSE_FSYNCDIR, 'FUSE_FSYNCDIR', fuse_fsync_in, 'fuse_fsync_in'),
  op(FUSE_GETLK, 'FUSE_GETLK', fuse_lk_in, 'fuse_lk_in'),
  op(FUSE_SETLK, 'FUSE_SETLK', fuse_lk_in, 'fuse_lk_in'),
  op(FUSE_SETLKW, 'FUSE_SETLKW', fuse_lk_in, 'fuse_lk_in'),
  op(FUSE_ACCESS, 'FUSE_ACCESS', fuse_access_in, 'fuse_access_in'),
  op(FUSE_CREATE, 'FUSE_CREATE', fuse_create_in, 'fuse_create_in'),
  op(FUSE_INTERRUPT, 'FUSE_INTERRUPT', fuse_interrupt_in, 'fuse_interrupt_in'),
  op(FUSE_BMAP, 'FUSE_BMAP', fuse_bmap_in, 'fuse_bmap_in'),
  op(FUSE_DESTROY, 'FUSE_DESTROY', null, null),
  op(FUSE_IOCTL, 'FUSE_IOCTL', fuse_ioctl_in, 'fuse_ioctl_in'),
  op(FUSE_POLL, 'FUSE_POLL', fuse_poll_in, 'fuse_poll_in'),
  op(FUSE_NOTIFY_REPLY, 'FUSE_NOTIFY_REPLY', fuse_notify_retrieve_in, 'fuse_notify_retrieve_in'),
  op(FUSE_BATCH_FORGET, 'FUSE_BATCH_FORGET', fuse_batch_forget_in, 'fuse_batch_forget_in'),
  op(FUSE_FALLOCATE, 'FUSE_FALLOCATE', fuse_fallocate_in, 'fuse_fallocate_in'),
  op(FUSE_READDIRPLUS, 'FUSE_READDIRPLUS', fuse_read_in, 'fuse_read_in'),
  op(FUSE_RENAME2, 'FUSE_RENAME2', fuse_rename2_in, 'fuse_rename2_in'),
  op(FUSE_LSEEK, 'FUSE_LSEEK', fuse_lseek_in, 'fuse_lseek_in'),
  op(FUSE_COPY_FILE_RANGE, 'FUSE_COPY_FILE_RANGE', fuse_copy_file_range_in, 'fuse_copy_file_range_in'),
  op(FUSE_SETUPMAPPING, 'FUSE_SETUPMAPPING', fuse_setupmapping_in, 'fuse_setupmapping_in'),
  op(FUSE_REMOVEMAPPING, 'FUSE_REMOVEMAPPING', fuse_removemapping_in, 'fuse_removemapping_in'),
  op(FUSE_SYNCFS, 'FUSE_SYNCFS', fuse_syncfs_in, 'fuse_syncfs_in'),
  op(FUSE_TMPFILE, 'FUSE_TMPFILE', fuse_create_in, 'fuse_create_in'),
  op(CUSE_INIT, 'CUSE_INIT', cuse_init_in, 'cuse_init_in'),
]);

const opcodesByCode: ReadonlyMap<number, OpcodeInfo> = new Map(OPCODES.map((info) => [info.code, info]));

/** The table entry of an opcode, or undefined for a value fuse.h 7.38 does not define. */
export function opcodeInfo(code: number): OpcodeInfo | undefined {
  return opcodesByCode.get(code);
}

/** `FUSE_READ (15)` for a known opcode, `opcode 4242` otherwise: for messages and logs. */
export function opcodeName(code: number): string {
  const info = opcodesByCode.get(code);
  return info === undefined ? `opcode ${code}` : `${info.name} (${code})`;
}
