/**
 * The FUSE wire module (src/fuse/kernel) against the C compiler reading the
 * real <linux/fuse.h>: test/fixtures/fuse-wire/gen.c prints the header's
 * constants, struct layouts, requests as the kernel writes them and replies as
 * it expects them; fixtures.txt is its committed output, and the first test
 * recompiles gen.c and checks the output has not drifted from the header.
 *
 * Then: every request fixture parses to the values gen.c put in it, every
 * reply we encode equals gen.c's bytes, WRITE data is a view into the request
 * buffer, a truncated request throws WireError naming its opcode, offsets from
 * 2^53 up are refused, and READDIR packing stops at the request's size. The
 * property tests encode random requests with the layouts gen.c printed (not
 * with abi.ts) and parse them back.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import fc from 'fast-check';
import { describe, expect, test } from 'vitest';
import * as abi from '../src/fuse/kernel/abi.js';
import { parseRequest, WireError, type InHeader, type Request } from '../src/fuse/kernel/request.js';
import {
  DirentPlusWriter,
  DirentWriter,
  direntType,
  replyAttr,
  replyData,
  replyEmpty,
  replyEntry,
  replyError,
  replyInit,
  replyLseek,
  replyOpen,
  replyStatfs,
  replyWrite,
  type Dirent,
  type EntryReply,
  type FuseAttr,
} from '../src/fuse/kernel/reply.js';

// ---------------------------------------------------------------------------
// The fixtures

const fixtureDir = fileURLToPath(new URL('./fixtures/fuse-wire/', import.meta.url));
const fixturesText = readFileSync(join(fixtureDir, 'fixtures.txt'), 'utf8');

interface Field {
  readonly offset: number;
  readonly width: number;
}
interface Layout {
  readonly sizeof: number;
  readonly fields: ReadonlyMap<string, Field>;
}

const constants = new Map<string, bigint>();
const layouts = new Map<string, Layout>();
const requests = new Map<string, Buffer>();
const replies = new Map<string, Buffer>();
for (const line of fixturesText.split('\n')) {
  if (line === '') continue;
  const [key, ...rest] = line.split(' ');
  const dot = key!.indexOf('.');
  const kind = key!.slice(0, dot);
  const name = key!.slice(dot + 1);
  if (kind === 'const') constants.set(name, BigInt(rest[0]!));
  else if (kind === 'layout') {
    const fields = new Map<string, Field>();
    for (const spec of rest.slice(1)) {
      const [field, offset, width] = spec.split(':');
      fields.set(field!, { offset: Number(offset), width: Number(width) });
    }
    layouts.set(name, { sizeof: Number(rest[0]), fields });
  } else if (kind === 'req') requests.set(name, Buffer.from(rest[0]!, 'hex'));
  else if (kind === 'rep') replies.set(name, Buffer.from(rest[0]!, 'hex'));
  else throw new Error(`fixtures.txt: unknown line ${line}`);
}

function layout(name: string): Layout {
  const found = layouts.get(name);
  if (found === undefined) throw new Error(`fixtures.txt has no layout of ${name}`);
  return found;
}
function request(name: string): Buffer {
  const found = requests.get(name);
  if (found === undefined) throw new Error(`fixtures.txt has no request ${name}`);
  return found;
}
function reply(name: string): Buffer {
  const found = replies.get(name);
  if (found === undefined) throw new Error(`fixtures.txt has no reply ${name}`);
  return found;
}

/** Parses a fixture from a copy, as from a read of /dev/fuse into a fresh buffer. */
function parse(bytes: Buffer): Request {
  const copy = Buffer.from(bytes);
  return parseRequest(copy, copy.length);
}

/** The value of abi.ts's export `name`, for checks by name. */
function abiValue(name: string): unknown {
  return (abi as Record<string, unknown>)[name];
}

// ---------------------------------------------------------------------------
// The values gen.c puts in its structs

const UNIQUE = (opcode: number): bigint => 0x1122334455667700n + BigInt(opcode);
const NODEID = 0x99aabbccddeeff01n;
const FH = 0x000f1e2d3c4b5a69;
const OFFSET = 0x0001020304050607;
const LOCK_OWNER = 0x8877665544332211n;
const OPEN_FLAGS_RW = 0x8002;
const WRITE_DATA = Buffer.from('hello, fuse!\n');

function header(opcode: number, nodeid: bigint, bytes: Buffer, changes: Partial<InHeader> = {}): InHeader {
  return { len: bytes.length, opcode, unique: UNIQUE(opcode), nodeid, uid: 1001, gid: 1002, pid: 0x12345, totalExtlen: 0, ...changes };
}

function attrOf(ino: number): FuseAttr {
  return {
    ino,
    size: 2 ** 40,
    blocks: 2 ** 31,
    atime: -86400,
    mtime: 1700000000,
    ctime: 0x0000000123456789,
    atimensec: 1,
    mtimensec: 2,
    ctimensec: 999999999,
    mode: 0o100600,
    nlink: 1,
    uid: 1000,
    gid: 1001,
    rdev: 0x0803,
    blksize: 4096,
    flags: abi.FUSE_ATTR_DAX,
  };
}

function entryOf(nodeid: bigint): EntryReply {
  return {
    nodeid,
    generation: 0x0000000700000001,
    entryValid: 0x0000000100000002,
    entryValidNsec: 500000000,
    attrValid: 3600,
    attrValidNsec: 999999999,
    attr: attrOf(0x0000001200000034),
  };
}

/** The four READDIR entries of gen.c: records of 32, 32, 32 and 48 bytes. */
const READDIR_ENTRIES: readonly Dirent[] = [
  { ino: 1, offset: 1, type: abi.DT_DIR, name: '.' },
  { ino: 1, offset: 2, type: abi.DT_DIR, name: '..' },
  { ino: 0x0000001200000034, offset: 3, type: abi.DT_REG, name: 'disk.raw' },
  { ino: NODEID, offset: 0x0001020304050607, type: abi.DT_REG, name: 'a-longer-name.qcow2.raw' },
];

// ---------------------------------------------------------------------------
// An encoder driven by gen.c's layouts (offsets and widths from the C compiler)

type Values = Readonly<Record<string, number | bigint>>;

function putFields(target: Buffer, at: number, struct: string, values: Values): void {
  const { fields } = layout(struct);
  for (const [name, value] of Object.entries(values)) {
    const field = fields.get(name);
    if (field === undefined) throw new Error(`gen.c printed no field ${struct}.${name}`);
    const where = at + field.offset;
    if (field.width === 8) target.writeBigUInt64LE(BigInt.asUintN(64, BigInt(value)), where);
    else if (field.width === 4) target.writeUInt32LE(Number(value), where);
    else if (field.width === 2) target.writeUInt16LE(Number(value), where);
    else throw new Error(`${struct}.${name}: width ${field.width}`);
  }
}

/** A request: fuse_in_header, `struct` filled with `values`, then `tail`. */
function encodeRequest(opcode: number, struct: string, values: Values, tail: Buffer = Buffer.alloc(0)): Buffer {
  const headerSize = layout('fuse_in_header').sizeof;
  const bodySize = layout(struct).sizeof;
  const bytes = Buffer.alloc(headerSize + bodySize + tail.length);
  putFields(bytes, 0, 'fuse_in_header', { len: bytes.length, opcode, unique: UNIQUE(opcode), nodeid: NODEID, uid: 0, gid: 0, pid: 1 });
  putFields(bytes, headerSize, struct, values);
  tail.copy(bytes, headerSize + bodySize);
  return bytes;
}

// ---------------------------------------------------------------------------

describe('FUSE wire: the fixtures are the header', () => {
  test('gen.c compiled against this machine\'s <linux/fuse.h> prints exactly the committed fixtures.txt', () => {
    let compiler: string;
    try {
      execFileSync('cc', ['--version'], { stdio: 'ignore' });
      compiler = 'cc';
    } catch {
      throw new Error(
        'cc is not installed: this test compiles test/fixtures/fuse-wire/gen.c against <linux/fuse.h> ' +
          '(apt-get install build-essential linux-libc-dev; CI always has it)',
      );
    }
    const dir = mkdtempSync(join(tmpdir(), 'imgmount-fuse-wire-'));
    try {
      const binary = join(dir, 'gen');
      execFileSync(compiler, ['-std=c11', '-Wall', '-Wextra', '-Werror', '-o', binary, join(fixtureDir, 'gen.c')], { stdio: ['ignore', 'ignore', 'pipe'] });
      const output = execFileSync(binary, { encoding: 'utf8' });
      // On a mismatch regenerate with the command at the top of gen.c, and look at the diff.
      expect(output).toBe(fixturesText);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('every constant of the header has its value in abi.ts, and abi.ts names no other', () => {
    expect(constants.size).toBeGreaterThan(140);
    for (const [name, value] of constants) {
      const ours = abiValue(name);
      expect(typeof ours === 'number' || typeof ours === 'bigint', `abi.ts exports ${name}`).toBe(true);
      expect(BigInt(ours as number | bigint), name).toBe(value);
    }
    const ourOwn = new Set(['FUSE_KERNEL_MINOR_VERSION', 'FUSE_NAME_MAX', 'OPCODES']);
    for (const name of Object.keys(abi)) {
      if (/^[A-Z][A-Z0-9_]+$/.test(name) && !ourOwn.has(name)) expect(constants.has(name), `${name} is in the header`).toBe(true);
    }
    // INIT flags are bigints (64 of them, flags2 holds bits 32..63); the others numbers
    expect(typeof abi.FUSE_ASYNC_READ).toBe('bigint');
    expect(typeof abi.FUSE_HAS_EXPIRE_ONLY).toBe('bigint');
    expect(typeof abi.FOPEN_PARALLEL_DIRECT_WRITES).toBe('number');
    expect(typeof abi.FATTR_SIZE).toBe('number');
  });

  test('abi.ts layouts have the sizeof and field offsets of the C structs', () => {
    expect(layouts.size).toBeGreaterThan(40);
    for (const [struct, { sizeof, fields }] of layouts) {
      const ours = abiValue(struct) as Readonly<Record<string, number>> | undefined;
      expect(ours, `abi.ts exports ${struct}`).toBeDefined();
      expect(ours!.sizeof, `sizeof(struct ${struct})`).toBe(sizeof);
      for (const [field, { offset }] of fields) expect(ours![field], `offsetof(${struct}, ${field})`).toBe(offset);
      for (const field of Object.keys(ours!)) if (field !== 'sizeof') expect(fields.has(field), `${struct}.${field} is a C field`).toBe(true);
    }
    for (const [name, value] of Object.entries(abi)) {
      if (typeof value === 'object' && value !== null && 'sizeof' in value) expect(layouts.has(name), `gen.c prints ${name}`).toBe(true);
    }
  });

  test('the opcode table has every opcode of the header, with its input struct size', () => {
    const opcodeNames = [...constants.keys()].filter(
      (name) => (name.startsWith('FUSE_') || name === 'CUSE_INIT') && abi.OPCODES.some((info) => info.name === name),
    );
    expect(abi.OPCODES.length).toBe(50);
    expect(new Set(abi.OPCODES.map((info) => info.code)).size).toBe(50);
    expect(opcodeNames.length).toBe(50);
    for (const info of abi.OPCODES) {
      expect(BigInt(info.code), info.name).toBe(constants.get(info.name));
      expect(abi.opcodeInfo(info.code)).toBe(info);
      if (info.inStruct === null) expect(info.inSize).toBe(0);
      else if (info.code === abi.FUSE_INIT) expect(info.inSize).toBe(layout('fuse_init_in').fields.get('flags2')!.offset);
      else expect(info.inSize, info.name).toBe(layout(info.inStruct).sizeof);
    }
    expect(abi.opcodeName(abi.FUSE_READ)).toBe('FUSE_READ (15)');
    expect(abi.opcodeName(4242)).toBe('opcode 4242');
    expect(abi.minReadBufferSize(1 << 20)).toBe((1 << 20) + 80);
    expect(abi.minReadBufferSize(4096)).toBe(8192);
  });
});

describe('FUSE wire: requests', () => {
  const expected: Record<string, (bytes: Buffer) => Request> = {
    init: (b) => ({ kind: 'init', header: header(26, 0n, b), major: 7, minor: 41, maxReadahead: 0x20000, flags: 0xc07ff0a1n | (0x1bn << 32n) }),
    init_noext: (b) => ({ kind: 'init', header: header(26, 0n, b), major: 7, minor: 38, maxReadahead: 0x20000, flags: 0x807ff0a1n }),
    init_compat: (b) => ({ kind: 'init', header: header(26, 0n, b), major: 7, minor: 31, maxReadahead: 0x10000, flags: 0x03fffffbn }),
    lookup: (b) => ({ kind: 'lookup', header: header(1, 1n, b), name: 'disk.raw', nameBytes: Buffer.from('disk.raw') }),
    lookup_utf8: (b) => ({ kind: 'lookup', header: header(1, 1n, b), name: 'café.raw', nameBytes: Buffer.from('café.raw') }),
    forget: (b) => ({ kind: 'forget', header: header(2, NODEID, b), nlookup: 0x0000000500000003 }),
    batch_forget: (b) => ({
      kind: 'batchForget',
      header: header(42, 0n, b),
      forgets: [
        { nodeid: 2n, nlookup: 1 },
        { nodeid: NODEID + 1n, nlookup: 2 ** 32 },
        { nodeid: 7n, nlookup: 3 },
      ],
    }),
    getattr: (b) => ({ kind: 'getattr', header: header(3, NODEID, b), getattrFlags: abi.FUSE_GETATTR_FH, fh: FH }),
    setattr: (b) => ({
      kind: 'setattr',
      header: header(4, NODEID, b),
      valid:
        abi.FATTR_MODE | abi.FATTR_UID | abi.FATTR_GID | abi.FATTR_SIZE | abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_FH | abi.FATTR_LOCKOWNER | abi.FATTR_CTIME,
      fh: FH,
      size: 0x0000000240000000,
      lockOwner: LOCK_OWNER,
      atime: -1234567890,
      mtime: 0x000000017f000000,
      ctime: 1700000000,
      atimensec: 111111111,
      mtimensec: 222222222,
      ctimensec: 999999999,
      mode: 0o100644,
      uid: 123456,
      gid: 123457,
    }),
    open: (b) => ({ kind: 'open', header: header(14, NODEID, b), flags: 0x8202, openFlags: abi.FUSE_OPEN_KILL_SUIDGID }),
    read: (b) => ({
      kind: 'read',
      header: header(15, NODEID, b),
      fh: FH,
      offset: OFFSET,
      size: 0x100000,
      readFlags: abi.FUSE_READ_LOCKOWNER,
      lockOwner: LOCK_OWNER,
      flags: OPEN_FLAGS_RW,
    }),
    write: (b) => ({
      kind: 'write',
      header: header(16, NODEID, b),
      fh: FH,
      offset: OFFSET,
      size: WRITE_DATA.length,
      writeFlags: abi.FUSE_WRITE_LOCKOWNER | abi.FUSE_WRITE_KILL_SUIDGID,
      lockOwner: LOCK_OWNER,
      flags: OPEN_FLAGS_RW,
      data: WRITE_DATA,
    }),
    write_ext: (b) => ({
      kind: 'write',
      header: header(16, NODEID, b, { totalExtlen: 2 }),
      fh: FH,
      offset: OFFSET,
      size: WRITE_DATA.length,
      writeFlags: 0,
      lockOwner: 0n,
      flags: OPEN_FLAGS_RW,
      data: WRITE_DATA,
    }),
    release: (b) => ({
      kind: 'release',
      header: header(18, NODEID, b),
      fh: FH,
      flags: OPEN_FLAGS_RW,
      releaseFlags: abi.FUSE_RELEASE_FLUSH | abi.FUSE_RELEASE_FLOCK_UNLOCK,
      lockOwner: LOCK_OWNER,
    }),
    flush: (b) => ({ kind: 'flush', header: header(25, NODEID, b), fh: FH, lockOwner: LOCK_OWNER }),
    fsync: (b) => ({ kind: 'fsync', header: header(20, NODEID, b), fh: FH, fsyncFlags: abi.FUSE_FSYNC_FDATASYNC }),
    statfs: (b) => ({ kind: 'statfs', header: header(17, 1n, b) }),
    opendir: (b) => ({ kind: 'opendir', header: header(27, 1n, b), flags: 0x18800, openFlags: 0 }),
    readdir: (b) => ({ kind: 'readdir', header: header(28, 1n, b), fh: FH, offset: OFFSET, size: 4096 }),
    readdirplus: (b) => ({ kind: 'readdirplus', header: header(44, 1n, b), fh: FH + 1, offset: 2, size: 4096 }),
    releasedir: (b) => ({ kind: 'releasedir', header: header(29, 1n, b), fh: FH, flags: 0x18000, releaseFlags: 0, lockOwner: 0n }),
    access: (b) => ({ kind: 'access', header: header(34, NODEID, b), mask: 6 }),
    interrupt: (b) => ({ kind: 'interrupt', header: header(36, 0n, b, { unique: UNIQUE(15) | 1n }), interruptedUnique: UNIQUE(15) }),
    lseek: (b) => ({ kind: 'lseek', header: header(46, NODEID, b), fh: FH, offset: OFFSET, whence: abi.SEEK_DATA }),
    fallocate: (b) => ({
      kind: 'fallocate',
      header: header(43, NODEID, b),
      fh: FH,
      offset: OFFSET,
      length: 0x0000000300000000,
      mode: abi.FALLOC_FL_PUNCH_HOLE | abi.FALLOC_FL_KEEP_SIZE,
    }),
    destroy: (b) => ({ kind: 'destroy', header: header(38, 0n, b) }),
    create: (b) => ({ kind: 'unknown', header: header(35, 1n, b), opcode: abi.FUSE_CREATE }),
    opcode_4242: (b) => ({ kind: 'unknown', header: header(4242, 1n, b, { unique: UNIQUE(0x42) }), opcode: 4242 }),
  };

  test('every request fixture has an expectation', () => {
    expect([...requests.keys()].filter((name) => name !== 'read_offset_huge').sort()).toEqual(Object.keys(expected).sort());
  });

  test.each(Object.keys(expected))('%s parses to the values gen.c wrote', (name) => {
    const bytes = request(name);
    expect(parse(bytes)).toEqual(expected[name]!(bytes));
  });

  test('a request is read from the first `length` bytes of a larger buffer, whatever follows', () => {
    const pool = Buffer.alloc(1 << 16, 0xa5);
    for (const [name, bytes] of requests) {
      if (name === 'read_offset_huge') continue;
      bytes.copy(pool);
      expect(parseRequest(pool, bytes.length), name).toEqual(expected[name]!(bytes));
    }
  });

  test('WRITE data is a view into the request buffer, not a copy', () => {
    const buffer = Buffer.alloc(1 << 16);
    const bytes = request('write');
    bytes.copy(buffer);
    const parsed = parseRequest(buffer, bytes.length);
    if (parsed.kind !== 'write') throw new Error(parsed.kind);
    expect(parsed.data.buffer).toBe(buffer.buffer);
    expect(parsed.data.byteOffset).toBe(buffer.byteOffset + 80);
    buffer[80] = 0x48;
    expect(parsed.data.toString()).toBe('Hello, fuse!\n');
  });

  test('a truncated request throws WireError naming its opcode (or the header when that is short)', () => {
    let checked = 0;
    for (const [name, bytes] of requests) {
      const opcode = bytes.readUInt32LE(4);
      // the shortest prefix that is still a whole request: INIT's first 16 body bytes, bodiless ones, unknown ones
      const shortestValid = opcode === abi.FUSE_INIT ? 56 : name === 'statfs' || name === 'destroy' || name === 'create' || name === 'opcode_4242' ? 40 : bytes.length;
      for (let cut = 0; cut < bytes.length; cut++) {
        const truncated = Buffer.from(bytes.subarray(0, cut));
        if (cut >= 4) truncated.writeUInt32LE(cut, 0);
        if (cut >= shortestValid) {
          expect(() => parse(truncated), `${name} cut to ${cut}`).not.toThrow();
          continue;
        }
        let error: unknown;
        try {
          parse(truncated);
        } catch (thrown) {
          error = thrown;
        }
        expect(error, `${name} cut to ${cut} bytes`).toBeInstanceOf(WireError);
        const wireError = error as WireError;
        if (cut < 40) {
          expect(wireError.message).toContain('fuse_in_header');
          expect(wireError.header).toBeUndefined();
        } else {
          expect(wireError.message, `${name} cut to ${cut}`).toContain(`${abi.opcodeName(opcode)} request`);
          expect(wireError.header?.unique).toBe(bytes.readBigUInt64LE(8));
        }
        checked++;
      }
    }
    expect(checked).toBeGreaterThan(500);
    expect(() => parse(request('read').subarray(0, 60))).toThrow(/FUSE_READ \(15\) request: fuse_in_header.len is 80 but the read returned 60 bytes/);
  });

  test('specific malformations say what is wrong', () => {
    const cut = (name: string, length: number): Buffer => {
      const bytes = Buffer.from(request(name).subarray(0, length));
      bytes.writeUInt32LE(length, 0);
      return bytes;
    };
    expect(() => parse(cut('read', 70))).toThrow('FUSE_READ (15) request: the body is 30 bytes, fuse_read_in needs 40');
    expect(() => parse(cut('write', 90))).toThrow('FUSE_WRITE (16) request: fuse_write_in.size is 13 but 10 bytes of data follow');
    expect(() => parse(cut('lookup', 45))).toThrow('FUSE_LOOKUP (1) request: the name is not NUL-terminated within the 5-byte body');
    expect(() => parse(cut('batch_forget', 80))).toThrow(
      'FUSE_BATCH_FORGET (42) request: fuse_batch_forget_in.count is 3 but the body holds 2 fuse_forget_one entries',
    );
    const longExtension = Buffer.from(request('getattr'));
    longExtension.writeUInt16LE(3, 36);
    expect(() => parse(longExtension)).toThrow('FUSE_GETATTR (3) request: total_extlen 3 (24 bytes) is longer than the 16-byte body');
    const longerWrite = Buffer.from(request('write'));
    longerWrite.writeUInt32LE(14, 56);
    expect(() => parse(longerWrite)).toThrow('fuse_write_in.size is 14 but 13 bytes of data follow');
  });

  test('the length read must match fuse_in_header.len, both ways', () => {
    const bytes = Buffer.from(request('getattr'));
    expect(() => parseRequest(Buffer.concat([bytes, Buffer.alloc(8)]), bytes.length + 8)).toThrow(
      'FUSE_GETATTR (3) request: fuse_in_header.len is 56 but the read returned 64 bytes',
    );
    bytes.writeUInt32LE(48, 0);
    expect(() => parseRequest(bytes, bytes.length)).toThrow(WireError);
    expect(() => parseRequest(bytes, bytes.length + 1)).toThrow(RangeError);
  });

  test('an opcode the module does not decode parses as unknown with its header, whatever its body', () => {
    for (const opcode of [abi.FUSE_MKNOD, abi.FUSE_FSYNCDIR, abi.FUSE_GETXATTR, abi.FUSE_COPY_FILE_RANGE, abi.CUSE_INIT, 52, 0, 0xffffffff]) {
      const bytes = Buffer.alloc(44);
      bytes.writeUInt32LE(44, 0);
      bytes.writeUInt32LE(opcode, 4);
      bytes.writeBigUInt64LE(77n, 8);
      const parsed = parseRequest(bytes, 44);
      expect(parsed).toMatchObject({ kind: 'unknown', opcode, header: { opcode, unique: 77n, len: 44 } });
    }
  });

  test('64-bit offsets, sizes and handles from 2^53 up are refused; 2^53 - 1 is read exactly', () => {
    expect(() => parse(request('read_offset_huge'))).toThrow(
      'FUSE_READ (15) request: fuse_read_in.offset 1234605616436508552 is above 2^53 - 1',
    );
    const max = Number.MAX_SAFE_INTEGER;
    const cases: Array<[number, string, string]> = [
      [abi.FUSE_READ, 'fuse_read_in', 'offset'],
      [abi.FUSE_READ, 'fuse_read_in', 'fh'],
      [abi.FUSE_LSEEK, 'fuse_lseek_in', 'offset'],
      [abi.FUSE_FALLOCATE, 'fuse_fallocate_in', 'offset'],
      [abi.FUSE_FALLOCATE, 'fuse_fallocate_in', 'length'],
      [abi.FUSE_SETATTR, 'fuse_setattr_in', 'size'],
      [abi.FUSE_READDIR, 'fuse_read_in', 'offset'],
    ];
    for (const [opcode, struct, field] of cases) {
      const good = parseRequest(encodeRequest(opcode, struct, { [field]: max }), 40 + layout(struct).sizeof) as unknown as Record<string, unknown>;
      expect(good[field], `${struct}.${field}`).toBe(max); // the C field names of these are the TypeScript ones
      for (const bad of [2n ** 53n, 2n ** 63n, 2n ** 64n - 1n]) {
        const bytes = encodeRequest(opcode, struct, { [field]: bad });
        expect(() => parseRequest(bytes, bytes.length)).toThrow(`${struct}.${field} ${bad} is above 2^53 - 1`);
      }
    }
    const write = encodeRequest(abi.FUSE_WRITE, 'fuse_write_in', { offset: 2n ** 53n, size: 1 }, Buffer.from('x'));
    expect(() => parseRequest(write, write.length)).toThrow('fuse_write_in.offset 9007199254740992 is above 2^53 - 1');
    const time = encodeRequest(abi.FUSE_SETATTR, 'fuse_setattr_in', { mtime: -(2n ** 53n) });
    expect(() => parseRequest(time, time.length)).toThrow('fuse_setattr_in.mtime -9007199254740992 is outside ±(2^53 - 1)');
    const earliest = encodeRequest(abi.FUSE_SETATTR, 'fuse_setattr_in', { atime: -max });
    expect(parseRequest(earliest, earliest.length)).toMatchObject({ kind: 'setattr', atime: -max });
  });
});

describe('FUSE wire: replies equal the C bytes', () => {
  const unique = UNIQUE;
  const cases: Record<string, () => Buffer> = {
    error_enoent: () => replyError(unique(abi.FUSE_LOOKUP), 2),
    empty: () => replyEmpty(unique(abi.FUSE_FLUSH)),
    init: () =>
      replyInit(unique(abi.FUSE_INIT), {
        major: 7,
        minor: 38,
        maxReadahead: 0x20000,
        // no FUSE_INIT_EXT: replyInit adds it for the flag above bit 31
        flags: abi.FUSE_ASYNC_READ | abi.FUSE_BIG_WRITES | abi.FUSE_ASYNC_DIO | abi.FUSE_PARALLEL_DIROPS | abi.FUSE_MAX_PAGES | abi.FUSE_HAS_EXPIRE_ONLY,
        maxBackground: 64,
        congestionThreshold: 48,
        maxWrite: 0x100000,
        timeGran: 1,
        maxPages: 256,
      }),
    init_noext: () =>
      replyInit(unique(abi.FUSE_INIT), {
        major: 7,
        minor: 31,
        maxReadahead: 0x10000,
        flags: abi.FUSE_ASYNC_READ | abi.FUSE_BIG_WRITES,
        maxBackground: 12,
        congestionThreshold: 9,
        maxWrite: 0x20000,
        timeGran: 1000000000,
        maxPages: 32,
      }),
    entry: () => replyEntry(unique(abi.FUSE_LOOKUP), entryOf(NODEID)),
    attr: () => replyAttr(unique(abi.FUSE_GETATTR), { attrValid: 0x0000000500000006, attrValidNsec: 7, attr: attrOf(2) }),
    open: () => replyOpen(unique(abi.FUSE_OPEN), { fh: FH, openFlags: abi.FOPEN_DIRECT_IO | abi.FOPEN_KEEP_CACHE | abi.FOPEN_PARALLEL_DIRECT_WRITES }),
    write: () => replyWrite(unique(abi.FUSE_WRITE), 0x100000),
    statfs: () =>
      replyStatfs(unique(abi.FUSE_STATFS), {
        blocks: 0x0000001000000000,
        bfree: 0x0000000800000000,
        bavail: 0x0000000700000000,
        files: 0x0000000100000005,
        ffree: 3,
        bsize: 4096,
        namelen: 255,
        frsize: 512,
      }),
    lseek: () => replyLseek(unique(abi.FUSE_LSEEK), OFFSET),
    data: () => Buffer.concat(replyData(unique(abi.FUSE_READ), WRITE_DATA)),
    readdir: () => {
      const writer = new DirentWriter(4096);
      for (const entry of READDIR_ENTRIES) expect(writer.add(entry)).toBe(true);
      return writer.reply(unique(abi.FUSE_READDIR));
    },
    readdirplus: () => {
      const writer = new DirentPlusWriter(4096);
      expect(writer.add({ ino: 1, offset: 1, type: abi.DT_DIR, name: '.', entry: null })).toBe(true);
      expect(writer.add({ ino: 0x0000001200000034, offset: 2, type: direntType(0o100600), name: 'disk.raw', entry: entryOf(NODEID) })).toBe(true);
      return writer.reply(unique(abi.FUSE_READDIRPLUS));
    },
  };

  test('every reply fixture has an encoder call', () => {
    expect([...replies.keys()].sort()).toEqual(Object.keys(cases).sort());
  });

  test.each(Object.keys(cases))('%s', (name) => {
    expect(cases[name]!().toString('hex')).toBe(reply(name).toString('hex'));
  });

  test('replyData gives the header and the caller\'s buffers themselves, for writev', () => {
    const data = Buffer.alloc(1 << 20, 7);
    const [head, body, ...rest] = replyData(5n, data);
    expect(body).toBe(data);
    expect(rest).toEqual([]);
    expect(head!.length).toBe(16);
    expect(head!.readUInt32LE(0)).toBe(16 + (1 << 20));
    const parts = [Buffer.from('ab'), Buffer.from('cde')];
    const iovecs = replyData(6n, parts);
    expect(iovecs.slice(1)).toEqual(parts);
    expect(iovecs[1]).toBe(parts[0]);
    expect(iovecs[0]!.readUInt32LE(0)).toBe(21);
    expect(Buffer.concat(replyData(7n, Buffer.alloc(0))).toString('hex')).toBe(replyEmpty(7n).toString('hex'));
  });

  test('values that do not fit their C field are refused naming the function and field', () => {
    expect(() => replyError(1n, 0)).toThrow('replyError: errno 0 is not in 1..511');
    expect(() => replyError(1n, 512)).toThrow(RangeError);
    expect(() => replyError(-1n, 2)).toThrow('writeOutHeader: unique -1 is not an unsigned 64-bit bigint');
    expect(() => replyWrite(1n, 2 ** 32)).toThrow('replyWrite: size 4294967296 is not an unsigned 32-bit integer');
    expect(() => replyLseek(1n, -1)).toThrow('replyLseek: offset -1 is not a non-negative safe integer');
    expect(() => replyLseek(1n, 2 ** 53)).toThrow(RangeError);
    expect(() => replyAttr(1n, { attrValid: 1, attr: { ...attrOf(2), size: 1.5 } })).toThrow('replyAttr: attr.size 1.5');
    expect(() => replyEntry(1n, { ...entryOf(2n), nodeid: 2n ** 64n })).toThrow('replyEntry: nodeid 18446744073709551616');
    expect(() => replyInit(1n, { major: 7, minor: 38, maxReadahead: 0, flags: 0n, maxBackground: 65536, congestionThreshold: 0, maxWrite: 0, timeGran: 1, maxPages: 1 })).toThrow(
      'replyInit: maxBackground 65536 is not an unsigned 16-bit integer',
    );
    // 64-bit values as bigint: all 64 bits
    const entry = replyEntry(1n, { ...entryOf(2n ** 64n - 1n), generation: 2n ** 63n });
    expect(entry.readBigUInt64LE(16)).toBe(2n ** 64n - 1n);
    expect(entry.readBigUInt64LE(24)).toBe(2n ** 63n);
  });
});

describe('FUSE wire: READDIR packing', () => {
  const records = reply('readdir').subarray(16);
  const recordEnds = [32, 64, 96, 144];

  test('packing stops at the first entry that does not fit in the request size, and stays stopped', () => {
    for (let size = 0; size <= 160; size++) {
      const writer = new DirentWriter(size);
      let fitted = 0;
      for (const entry of READDIR_ENTRIES) {
        if (!writer.add(entry)) break;
        fitted++;
      }
      const expectedCount = recordEnds.filter((end) => end <= size).length;
      expect(fitted, `size ${size}`).toBe(expectedCount);
      expect(writer.count).toBe(expectedCount);
      const used = expectedCount === 0 ? 0 : recordEnds[expectedCount - 1]!;
      expect(writer.byteLength).toBe(used);
      const bytes = writer.reply(UNIQUE(abi.FUSE_READDIR));
      expect(bytes.readUInt32LE(0)).toBe(16 + used);
      expect(bytes.subarray(16).equals(records.subarray(0, used)), `size ${size}`).toBe(true);
    }
    // 130 bytes: three records (96), the fourth (48) does not fit; a later 32-byte one would, but the listing has stopped
    const writer = new DirentWriter(130);
    for (const entry of READDIR_ENTRIES.slice(0, 3)) writer.add(entry);
    expect(writer.add(READDIR_ENTRIES[3]!)).toBe(false);
    expect(writer.add(READDIR_ENTRIES[0]!)).toBe(false);
    expect(writer.byteLength).toBe(96);
  });

  test('READDIRPLUS records are 152 bytes plus the name, padded to 8', () => {
    const writer = new DirentPlusWriter(152 + 8 + 159);
    expect(writer.add({ ino: 1, offset: 1, type: abi.DT_DIR, name: '.', entry: null })).toBe(true);
    expect(writer.byteLength).toBe(160);
    expect(writer.add({ ino: 5, offset: 2, type: abi.DT_REG, name: 'disk.raw', entry: entryOf(5n) })).toBe(false);
    expect(writer.reply(1n).length).toBe(16 + 160);
  });

  test('names the kernel would refuse are refused, and a refused entry leaves no bytes behind', () => {
    const writer = new DirentWriter(4096);
    expect(() => writer.add({ ino: 1, offset: 1, type: abi.DT_REG, name: 'a/b' })).toThrow(RangeError);
    expect(() => writer.add({ ino: 1, offset: 1, type: abi.DT_REG, name: '' })).toThrow(RangeError);
    expect(() => writer.add({ ino: 1, offset: 1, type: abi.DT_REG, name: Buffer.from([0x61, 0]) })).toThrow(RangeError);
    expect(() => writer.add({ ino: 1, offset: 1, type: abi.DT_REG, name: 'x'.repeat(1025) })).toThrow(RangeError);
    expect(writer.add({ ino: 1, offset: 1, type: abi.DT_REG, name: 'x'.repeat(1024) })).toBe(true);
    const plus = new DirentPlusWriter(4096);
    const badEntry = { ...entryOf(9n), attr: { ...attrOf(9), mode: -1 } };
    expect(() => plus.add({ ino: 9, offset: 1, type: abi.DT_REG, name: 'bad.raw', entry: badEntry })).toThrow('DirentPlusWriter.add: attr.mode -1');
    expect(plus.byteLength).toBe(0);
    expect(plus.add({ ino: 1, offset: 1, type: abi.DT_DIR, name: '.', entry: null })).toBe(true);
    expect(plus.reply(1n).subarray(16, 16 + 128).equals(Buffer.alloc(128))).toBe(true);
  });
});

describe('FUSE wire: properties', () => {
  const u64Safe = fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER });
  const u32 = fc.integer({ min: 0, max: 0xffffffff });
  const u64Big = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
  const time = fc.integer({ min: -Number.MAX_SAFE_INTEGER, max: Number.MAX_SAFE_INTEGER });

  test('random READ requests encoded with the C layout parse back to the same values', () => {
    fc.assert(
      fc.property(u64Safe, u64Safe, u32, u32, u64Big, u32, (fh, offset, size, readFlags, lockOwner, flags) => {
        const bytes = encodeRequest(abi.FUSE_READ, 'fuse_read_in', { fh, offset, size, read_flags: readFlags, lock_owner: lockOwner, flags });
        expect(parseRequest(bytes, bytes.length)).toMatchObject({ kind: 'read', fh, offset, size, readFlags, lockOwner, flags });
      }),
      { seed: 20260801, numRuns: 300 },
    );
  });

  test('random WRITE requests parse back, data a view of exactly size bytes', () => {
    fc.assert(
      fc.property(u64Safe, u64Safe, fc.uint8Array({ maxLength: 300 }), u32, u64Big, (fh, offset, data, writeFlags, lockOwner) => {
        const payload = Buffer.from(data);
        const bytes = encodeRequest(abi.FUSE_WRITE, 'fuse_write_in', { fh, offset, size: payload.length, write_flags: writeFlags, lock_owner: lockOwner }, payload);
        const parsed = parseRequest(bytes, bytes.length);
        expect(parsed).toMatchObject({ kind: 'write', fh, offset, size: payload.length, writeFlags, lockOwner });
        if (parsed.kind !== 'write') return;
        expect(parsed.data.equals(payload)).toBe(true);
        expect(parsed.data.buffer).toBe(bytes.buffer);
      }),
      { seed: 20260802, numRuns: 300 },
    );
  });

  test('random SETATTR requests parse back, times signed', () => {
    fc.assert(
      fc.property(
        fc.record({ valid: u32, fh: u64Safe, size: u64Safe, lockOwner: u64Big, atime: time, mtime: time, ctime: time, atimensec: u32, mtimensec: u32, ctimensec: u32, mode: u32, uid: u32, gid: u32 }),
        (values) => {
          const bytes = encodeRequest(abi.FUSE_SETATTR, 'fuse_setattr_in', {
            valid: values.valid,
            fh: values.fh,
            size: values.size,
            lock_owner: values.lockOwner,
            atime: values.atime,
            mtime: values.mtime,
            ctime: values.ctime,
            atimensec: values.atimensec,
            mtimensec: values.mtimensec,
            ctimensec: values.ctimensec,
            mode: values.mode,
            uid: values.uid,
            gid: values.gid,
          });
          expect(parseRequest(bytes, bytes.length)).toMatchObject({ kind: 'setattr', ...values });
        },
      ),
      { seed: 20260803, numRuns: 300 },
    );
  });

  test('random READDIR listings: the records decode (with the C layout) to the entries that fit, in order', () => {
    const { fields } = layout('fuse_dirent');
    const nameOffset = Number(constants.get('FUSE_NAME_OFFSET'));
    const name = fc.string({ minLength: 1, maxLength: 40 }).filter((text) => !text.includes('/') && !text.includes('\0'));
    const entry = fc.record({ ino: u64Safe, offset: u64Safe, type: fc.constantFrom(abi.DT_DIR, abi.DT_REG, abi.DT_LNK), name });
    fc.assert(
      fc.property(fc.array(entry, { maxLength: 30 }), fc.integer({ min: 0, max: 1500 }), (entries, size) => {
        const writer = new DirentWriter(size);
        let fitted = 0;
        while (fitted < entries.length && writer.add(entries[fitted]!)) fitted++;
        const bytes = writer.reply(1n);
        expect(bytes.length - 16).toBeLessThanOrEqual(size);
        let at = 16;
        for (let index = 0; index < fitted; index++) {
          const expected = entries[index]!;
          const namelen = bytes.readUInt32LE(at + fields.get('namelen')!.offset);
          expect(Number(bytes.readBigUInt64LE(at + fields.get('ino')!.offset))).toBe(expected.ino);
          expect(Number(bytes.readBigUInt64LE(at + fields.get('off')!.offset))).toBe(expected.offset);
          expect(bytes.readUInt32LE(at + fields.get('type')!.offset)).toBe(expected.type);
          expect(bytes.toString('utf8', at + nameOffset, at + nameOffset + namelen)).toBe(expected.name);
          const recordSize = Math.ceil((nameOffset + namelen) / 8) * 8;
          expect(bytes.subarray(at + nameOffset + namelen, at + recordSize).every((byte) => byte === 0)).toBe(true);
          at += recordSize;
        }
        expect(at).toBe(bytes.length);
        if (fitted < entries.length) {
          const next = Math.ceil((nameOffset + Buffer.byteLength(entries[fitted]!.name)) / 8) * 8;
          expect(bytes.length - 16 + next).toBeGreaterThan(size);
        }
      }),
      { seed: 20260804, numRuns: 300 },
    );
  });
});
