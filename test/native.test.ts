/**
 * The native addon (src/native/index.ts over native/imgmount.c) against the
 * real system: socketpairs, sparse files on the temp directory's file system,
 * qemu-io's own locks, tmpfs and FUSE mounts (root). Each mount is taken down
 * in a finally, lazily (MNT_DETACH), so a failure never leaves one behind.
 */
import { execFileSync, spawn } from 'node:child_process';
import { closeSync, constants as fsConstants, existsSync, fstatSync, fsyncSync, openSync, readFileSync, readSync, statSync, writeSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import * as native from '../src/native/index.js';
import { makeTempDir, skipWithoutQemu } from './helpers/qemu.js';

const { constants: c } = native;
const { EBADF } = osConstants.errno;
const MiB = 1024 * 1024;
const isRoot = process.getuid?.() === 0;
const fuseMissing = !existsSync('/dev/fuse');

/** Resolves when `ready()` holds, checked after each callback (`poke`), or rejects after `ms`. */
function waitFor(ready: () => boolean, what: string, ms = 2000): { poke: () => void; done: Promise<void> } {
  let poke = () => {};
  const done = new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    poke = () => {
      if (ready()) {
        clearTimeout(timer);
        resolve();
      }
    };
  });
  return { poke: () => poke(), done };
}

const turns = async (n: number) => {
  for (let i = 0; i < n; i++) await new Promise((resolve) => setTimeout(resolve, 5));
};

/** O_NONBLOCK of an fd, from /proc (what the kernel holds, not what was asked). */
function nonblocking(fd: number): boolean {
  const flags = /^flags:\s+([0-7]+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))?.[1];
  return (parseInt(flags ?? '0', 8) & fsConstants.O_NONBLOCK) !== 0;
}

function mountLine(dir: string): string | undefined {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .find((line) => line.split(' ')[4] === dir);
}

describe('native addon: fds', () => {
  it('poll: the callback fires when the other end is written, readInto drains to -EAGAIN, pollStop stops callbacks', async () => {
    const [a, b] = native.socketpair();
    const statuses: number[] = [];
    const chunks: string[] = [];
    let id = 0;
    try {
      const got = waitFor(() => chunks.join('') === 'hello, poll', 'the poll callback');
      id = native.pollStart(a, (status) => {
        statuses.push(status);
        const buffer = Buffer.alloc(4);
        for (let n; (n = native.readInto(a, buffer, 1, 3)) > 0; ) chunks.push(buffer.toString('latin1', 1, 1 + n));
        got.poke();
      });
      expect(id).toBeGreaterThan(0);
      expect(nonblocking(a)).toBe(true); // uv_poll_init sets O_NONBLOCK
      writeSync(b, 'hello, poll');
      await got.done;
      expect(statuses.every((s) => s === 0)).toBe(true);
      expect(native.readInto(a, Buffer.alloc(16))).toBe(-osConstants.errno.EAGAIN);

      native.pollRef(id, false);
      native.pollRef(id, true);
      native.pollStop(id);
      const before = statuses.length;
      writeSync(b, 'unseen');
      await turns(4);
      expect(statuses.length).toBe(before);
      expect(() => native.pollStop(id)).toThrow(expect.objectContaining({ code: 'ENOENT' }));
      id = 0;
      const buffer = Buffer.alloc(16);
      expect(buffer.toString('latin1', 0, native.readInto(a, buffer))).toBe('unseen');
    } finally {
      if (id) native.pollStop(id);
      closeSync(a);
      closeSync(b);
    }
  });

  it('pollStop from inside its own callback: no further callback', async () => {
    const [a, b] = native.socketpair();
    let calls = 0;
    try {
      const id = native.pollStart(a, () => {
        calls++;
        native.pollStop(id); // data left unread: a level-triggered poll would fire again
      });
      writeSync(b, 'x');
      await turns(6);
      expect(calls).toBe(1);
    } finally {
      closeSync(a);
      closeSync(b);
    }
  });

  it('writev of 3 buffers arrives as one concatenation', () => {
    const [a, b] = native.socketpair();
    try {
      const parts = [Buffer.from('header:'), Buffer.alloc(0), new Uint8Array(Buffer.from('payload-').subarray(0, 7)), Buffer.from('!')];
      expect(native.writev(a, parts)).toBe(15);
      const back = Buffer.alloc(64);
      expect(back.toString('latin1', 0, native.readInto(b, back))).toBe('header:payload!');
    } finally {
      closeSync(a);
      closeSync(b);
    }
  });

  it('bad arguments give EINVAL, never a crash', () => {
    const [a, b] = native.socketpair();
    try {
      const bad = expect.objectContaining({ code: 'EINVAL', errno: osConstants.errno.EINVAL });
      expect(() => native.readInto(a, 'text' as unknown as Buffer, 0, 1)).toThrow(bad);
      expect(() => native.readInto(a, Buffer.alloc(4), 2, 3)).toThrow(bad); // past the buffer
      expect(() => native.readInto(-1, Buffer.alloc(4))).toThrow(bad);
      expect(() => native.readInto(1.5, Buffer.alloc(4))).toThrow(bad);
      expect(() => native.writev(a, [Buffer.alloc(1), 'x' as unknown as Buffer])).toThrow(bad);
      expect(() => native.writev(a, {} as unknown as Buffer[])).toThrow(bad);
      expect(() => native.lseek(a, 2 ** 60, c.SEEK_SET)).toThrow(bad); // beyond 2^53
      expect(() => native.lseek(a, Number.NaN, c.SEEK_SET)).toThrow(bad);
      expect(() => native.pollStart(a, 'not a function' as unknown as () => void)).toThrow(bad);
      expect(() => native.ofdLock(a, 7, 0, 1)).toThrow(bad);
      expect(() => native.mount('x', '/tmp\0/evil', 'tmpfs')).toThrow(bad);
      expect(() => native.mount('x', 'y'.repeat(5000), 'tmpfs')).toThrow(expect.objectContaining({ code: 'ENAMETOOLONG' }));
      expect(() => native.readInto(987654, Buffer.alloc(4))).toThrow(expect.objectContaining({ code: 'EBADF', syscall: 'read' }));
    } finally {
      closeSync(a);
      closeSync(b);
    }
  });

  it('socketpair + recvFd: a temp file opened by a python3 child arrives over SCM_RIGHTS and reads through the received fd', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'passed.txt');
    await writeFile(path, 'sent over SCM_RIGHTS');
    const [ours, theirs] = native.socketpair();
    let received = -1;
    try {
      expect(nonblocking(ours)).toBe(false);
      expect(() => native.recvFd(ours)).toThrow(expect.objectContaining({ code: 'EAGAIN' })); // never blocks
      const sender = 'import os, socket, sys\ns = socket.socket(fileno=3)\nsocket.send_fds(s, [b"F"], [os.open(sys.argv[1], os.O_RDONLY)])\n';
      const child = spawn('python3', ['-c', sender, path], { stdio: ['ignore', 'inherit', 'inherit', theirs] });
      closeSync(theirs);
      const code = await new Promise((resolve, reject) => child.on('error', reject).on('exit', resolve));
      expect(code).toBe(0);
      received = native.recvFd(ours);
      const back = Buffer.alloc(64);
      expect(back.toString('utf8', 0, readSync(received, back, 0, 64, 0))).toBe('sent over SCM_RIGHTS');
      expect(fstatSync(received).ino).toBe(statSync(path).ino);
      expect(() => native.recvFd(ours)).toThrow(expect.objectContaining({ code: 'ENOMSG' })); // end of stream
    } finally {
      if (received >= 0) closeSync(received);
      closeSync(ours);
    }
  });
});

describe('native addon: sparse files', () => {
  it('lseek SEEK_DATA / SEEK_HOLE on a sparse file give its boundaries, ENXIO past the last data; offsets past 4 GiB', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'sparse.raw');
    const fd = openSync(path, 'w+');
    try {
      execFileSync('truncate', ['-s', '4M', path]);
      writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, 0);
      writeSync(fd, Buffer.alloc(4096, 2), 0, 4096, MiB);
      expect(native.lseek(fd, 0, c.SEEK_DATA)).toBe(0);
      expect(native.lseek(fd, 0, c.SEEK_HOLE)).toBe(4096);
      expect(native.lseek(fd, 4096, c.SEEK_DATA)).toBe(MiB);
      expect(native.lseek(fd, MiB + 100, c.SEEK_DATA)).toBe(MiB + 100);
      expect(native.lseek(fd, MiB, c.SEEK_HOLE)).toBe(MiB + 4096);
      expect(native.lseek(fd, MiB + 4096, c.SEEK_HOLE)).toBe(MiB + 4096);
      expect(() => native.lseek(fd, MiB + 4096, c.SEEK_DATA)).toThrow(expect.objectContaining({ code: 'ENXIO', syscall: 'lseek' }));
      expect(() => native.lseek(fd, 4 * MiB, c.SEEK_HOLE)).toThrow(expect.objectContaining({ code: 'ENXIO' }));

      const far = 5 * 1024 * MiB + 12345 * 4096; // past 2^32
      writeSync(fd, Buffer.alloc(4096, 3), 0, 4096, far);
      expect(native.lseek(fd, MiB + 4096, c.SEEK_DATA)).toBe(far);
      expect(native.lseek(fd, far, c.SEEK_HOLE)).toBe(far + 4096);
      expect(native.lseek(fd, -4096, c.SEEK_END)).toBe(far);
    } finally {
      closeSync(fd);
    }
  });

  it('fallocate PUNCH_HOLE|KEEP_SIZE frees blocks and reads zero, size unchanged; ZERO_RANGE zeroes; an unsupported mode is EOPNOTSUPP', async () => {
    const dir = await makeTempDir();
    const fd = openSync(join(dir, 'punch.raw'), 'w+');
    try {
      writeSync(fd, Buffer.alloc(MiB, 0xaa), 0, MiB, 0);
      fsyncSync(fd);
      const before = fstatSync(fd);
      native.fallocate(fd, c.FALLOC_FL_PUNCH_HOLE | c.FALLOC_FL_KEEP_SIZE, 256 * 1024, 256 * 1024);
      const after = fstatSync(fd);
      expect(after.size).toBe(MiB);
      expect(before.blocks - after.blocks).toBe((256 * 1024) / 512);
      const back = Buffer.alloc(MiB);
      readSync(fd, back, 0, MiB, 0);
      expect(back.subarray(256 * 1024, 512 * 1024).equals(Buffer.alloc(256 * 1024))).toBe(true);
      expect(back.subarray(0, 256 * 1024).every((byte) => byte === 0xaa)).toBe(true);
      expect(back.subarray(512 * 1024).every((byte) => byte === 0xaa)).toBe(true);
      expect(native.lseek(fd, 256 * 1024, c.SEEK_HOLE)).toBe(256 * 1024);

      native.fallocate(fd, c.FALLOC_FL_ZERO_RANGE, 4096, 8192);
      readSync(fd, back, 0, MiB, 0);
      expect(back.subarray(4096, 12288).equals(Buffer.alloc(8192))).toBe(true);
      expect(back[4095]).toBe(0xaa);
      expect(back[12288]).toBe(0xaa);
      expect(fstatSync(fd).size).toBe(MiB);

      // PUNCH_HOLE without KEEP_SIZE is not a mode Linux has; Node names errno 95 ENOTSUP.
      expect(() => native.fallocate(fd, c.FALLOC_FL_PUNCH_HOLE, 0, 4096)).toThrow(expect.objectContaining({ errno: osConstants.errno.EOPNOTSUPP }));
    } finally {
      closeSync(fd);
    }
  });

  it('preadNowait: bytes from the page cache; -EAGAIN for data written with O_DIRECT (not cached) until a normal read brings it in', async () => {
    const dir = await makeTempDir();
    const cached = join(dir, 'cached.raw');
    await writeFile(cached, Buffer.alloc(65536, 0x5a));
    const fd = openSync(cached, 'r');
    try {
      const buffer = Buffer.alloc(8192, 0xff);
      expect(native.preadNowait(fd, buffer, 100, 4096, 4096)).toBe(4096);
      expect(buffer.subarray(100, 4196).every((byte) => byte === 0x5a)).toBe(true);
      expect(buffer[99]).toBe(0xff);
      expect(buffer[4196]).toBe(0xff);
      expect(native.preadNowait(fd, buffer, 0, 8192, 65536 - 1000)).toBe(1000); // short at the end
      expect(native.preadNowait(fd, buffer, 0, 8192, 65536)).toBe(0);
    } finally {
      closeSync(fd);
    }

    const direct = join(dir, 'direct.raw');
    execFileSync('dd', ['if=/dev/urandom', `of=${direct}`, 'bs=64k', 'count=2', 'oflag=direct', 'status=none']);
    const fd2 = openSync(direct, 'r');
    try {
      const buffer = Buffer.alloc(65536);
      const first = native.preadNowait(fd2, buffer, 0, 65536, 65536);
      expect([65536, -osConstants.errno.EAGAIN]).toContain(first); // -EAGAIN here on ext4 (measured)
      const expected = Buffer.alloc(65536);
      readSync(fd2, expected, 0, 65536, 65536);
      expect(native.preadNowait(fd2, buffer, 0, 65536, 65536)).toBe(65536);
      expect(buffer.equals(expected)).toBe(true);
    } finally {
      closeSync(fd2);
    }
  });
});

describe('native addon: open-file-description locks', () => {
  it('a write lock through one open makes another open fail to lock (false) and ofdTest report F_WRLCK; after unlock it succeeds', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'locked.raw');
    await writeFile(path, Buffer.alloc(4096));
    const one = openSync(path, 'r+');
    const two = openSync(path, 'r+');
    try {
      expect(native.ofdLock(one, c.F_WRLCK, 100, 1)).toBe(true);
      expect(native.ofdLock(two, c.F_WRLCK, 100, 1)).toBe(false);
      expect(native.ofdLock(two, c.F_RDLCK, 100, 1)).toBe(false);
      expect(native.ofdTest(two, c.F_RDLCK, 100, 1)).toBe(c.F_WRLCK);
      expect(native.ofdTest(two, c.F_WRLCK, 0, 0)).toBe(c.F_WRLCK); // length 0: to the end
      expect(native.ofdTest(two, c.F_WRLCK, 101, 1)).toBe(c.F_UNLCK);
      expect(native.ofdTest(one, c.F_WRLCK, 100, 1)).toBe(c.F_UNLCK); // its own lock never conflicts
      expect(native.ofdLock(one, c.F_UNLCK, 100, 1)).toBe(true);
      expect(native.ofdTest(two, c.F_WRLCK, 100, 1)).toBe(c.F_UNLCK);
      expect(native.ofdLock(two, c.F_WRLCK, 100, 1)).toBe(true);
      expect(native.ofdLock(two, c.F_UNLCK, 100, 1)).toBe(true);

      // Read locks share; a write lock test reports them (F_RDLCK is 0: compare with F_UNLCK).
      expect(native.ofdLock(one, c.F_RDLCK, 200, 1)).toBe(true);
      expect(native.ofdLock(two, c.F_RDLCK, 200, 1)).toBe(true);
      const three = openSync(path, 'r');
      try {
        expect(native.ofdTest(three, c.F_WRLCK, 200, 1)).toBe(c.F_RDLCK);
        expect(native.ofdTest(three, c.F_RDLCK, 200, 1)).toBe(c.F_UNLCK);
      } finally {
        closeSync(three);
      }
    } finally {
      closeSync(one);
      closeSync(two);
    }
  });

  describe.skipIf(skipWithoutQemu('qemu locks through ofdTest'))('with qemu-io', () => {
    it("qemu-io's locks (read locks on 100 + permission bit) show through ofdTest, and a lock of ours on 201 keeps qemu-io from writing", async () => {
      const dir = await makeTempDir();
      const path = join(dir, 'qemu.raw');
      await writeFile(path, Buffer.alloc(MiB));
      const fd = openSync(path, 'r');
      const qemu = spawn('qemu-io', ['-f', 'raw', '-c', 'sleep 3000', path], { stdio: 'ignore' });
      const exited = new Promise((resolve) => qemu.on('exit', resolve));
      try {
        const deadline = Date.now() + 2500;
        while (native.ofdTest(fd, c.F_WRLCK, 100, 1) === c.F_UNLCK && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
        const seen = (base: number) => [0, 1, 2, 3].map((bit) => native.ofdTest(fd, c.F_WRLCK, base + bit, 1));
        // qemu 7.2 (file-posix.c): a shared lock on 100 + bit for each permission it holds
        // (consistent read, write) and on 200 + bit for each it does not share (qemu-io shares all).
        expect(seen(100)).toEqual([c.F_RDLCK, c.F_RDLCK, c.F_UNLCK, c.F_UNLCK]);
        expect(seen(200)).toEqual([c.F_UNLCK, c.F_UNLCK, c.F_UNLCK, c.F_UNLCK]);
        expect(native.ofdTest(fd, c.F_RDLCK, 100, 1)).toBe(c.F_UNLCK); // shared locks: a reader may join
      } finally {
        qemu.kill();
        await exited;
      }

      expect(native.ofdLock(fd, c.F_RDLCK, 201, 1)).toBe(true); // "we do not share write", as qemu says it
      try {
        const writer = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
          const child = spawn('qemu-io', ['-f', 'raw', '-c', 'quit', path], { stdio: ['ignore', 'ignore', 'pipe'] });
          let stderr = '';
          child.stderr.on('data', (d) => (stderr += d));
          child.on('exit', (code) => resolve({ code, stderr }));
        });
        expect(writer.code).not.toBe(0);
        expect(writer.stderr).toMatch(/Failed to get "write" lock/);
      } finally {
        closeSync(fd);
      }
    });
  });
});

describe.skipIf(!isRoot)('native addon: mounts (root)', () => {
  it('mount a tmpfs, see it in /proc/self/mountinfo, umount2 it; a bad fstype is ENODEV, umount2 of a non-mount EINVAL', async () => {
    const dir = await makeTempDir();
    let mounted = false;
    try {
      native.mount('imgmount-test', dir, 'tmpfs', c.MS_NOSUID | c.MS_NODEV, 'size=1m,mode=700');
      mounted = true;
      const line = mountLine(dir);
      expect(line).toMatch(/ - tmpfs imgmount-test rw,.*size=1024k/);
      expect(line?.split(' ')[5]).toMatch(/nosuid,nodev/);
      await writeFile(join(dir, 'inside'), 'x');
      native.umount2(dir);
      mounted = false;
      expect(mountLine(dir)).toBeUndefined();
      expect(existsSync(join(dir, 'inside'))).toBe(false);
      expect(() => native.mount('imgmount-test', dir, 'imgmount-no-such-fs', 0)).toThrow(expect.objectContaining({ code: 'ENODEV', syscall: 'mount' }));
      expect(() => native.umount2(dir, c.MNT_DETACH)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    } finally {
      if (mounted) native.umount2(dir, c.MNT_DETACH);
    }
  });

  describe.skipIf(fuseMissing)('FUSE', () => {
    it('mount(2) over a non-blocking /dev/fuse fd: the poll sees FUSE_INIT, read through a FUSE_DEV_IOC_CLONE fd, answered with writev; unmounting ends the connection', async () => {
      const dir = await makeTempDir();
      const fd = openSync('/dev/fuse', fsConstants.O_RDWR | fsConstants.O_NONBLOCK);
      let clone = -1;
      let id = 0;
      let mounted = false;
      try {
        expect(nonblocking(fd)).toBe(true); // Node opens /dev/fuse non-blocking as asked
        expect(() => native.readInto(fd, Buffer.alloc(8192))).toThrow(expect.objectContaining({ code: 'EPERM' })); // not mounted yet
        native.mount('imgmount-test', dir, 'fuse.imgmount-test', c.MS_NOSUID | c.MS_NODEV, `fd=${fd},rootmode=40000,user_id=0,group_id=0`);
        mounted = true;
        expect(mountLine(dir)).toMatch(/ - fuse\.imgmount-test imgmount-test rw,user_id=0,group_id=0$/);
        clone = openSync('/dev/fuse', fsConstants.O_RDWR | fsConstants.O_NONBLOCK);
        native.ioctlClone(clone, fd);
        // A read buffer smaller than max(8192, 80 + max_write) fails before any request is taken.
        expect(() => native.readInto(clone, Buffer.alloc(8191))).toThrow(expect.objectContaining({ code: 'EINVAL' }));

        const requests: Buffer[] = [];
        const statuses: number[] = [];
        const ends: string[] = [];
        const buffer = Buffer.alloc(MiB + 4096);
        const init = waitFor(() => requests.length > 0, 'FUSE_INIT');
        id = native.pollStart(fd, (status) => {
          statuses.push(status);
          if (status < 0) return;
          try {
            for (let n; (n = native.readInto(clone, buffer)) > 0; ) requests.push(Buffer.from(buffer.subarray(0, n)));
          } catch (error) {
            ends.push((error as NodeJS.ErrnoException).code ?? String(error));
          }
          init.poke();
        });
        await init.done;
        const request = requests[0];
        // struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding (40 bytes)
        expect(request.length).toBeGreaterThanOrEqual(40 + 64);
        expect(request.readUInt32LE(0)).toBe(request.length);
        expect(request.readUInt32LE(4)).toBe(26); // FUSE_INIT
        const unique = request.readBigUInt64LE(8);
        expect(unique).not.toBe(0n);
        expect(request.readBigUInt64LE(16)).toBe(0n);
        expect(request.readUInt32LE(40)).toBe(7); // fuse_init_in.major
        expect(request.readUInt32LE(44)).toBeGreaterThanOrEqual(31);

        // The reply: fuse_out_header (len, error, unique) + fuse_init_out (64 bytes), one writev.
        const out = Buffer.alloc(64);
        out.writeUInt32LE(7, 0); // major
        out.writeUInt32LE(31, 4); // minor
        out.writeUInt32LE(MiB, 8); // max_readahead
        out.writeUInt32LE(1 << 22, 12); // flags: FUSE_MAX_PAGES
        out.writeUInt32LE(MiB, 20); // max_write
        out.writeUInt32LE(1, 24); // time_gran
        out.writeUInt16LE(256, 28); // max_pages
        const header = Buffer.alloc(16);
        header.writeUInt32LE(16 + 64, 0);
        header.writeBigUInt64LE(unique, 8);
        // Each /dev/fuse fd has its own list of requests in progress: the reply goes where the request was read.
        expect(() => native.writev(fd, [header, out])).toThrow(expect.objectContaining({ code: 'ENOENT' }));
        expect(native.writev(clone, [header, out])).toBe(80);
        // Now max_write is 1 MiB: reads need 1 MiB + 80 bytes (fuse_in_header + fuse_write_in).
        expect(() => native.readInto(fd, Buffer.alloc(MiB + 79))).toThrow(expect.objectContaining({ code: 'EINVAL' }));
        expect(native.readInto(fd, Buffer.alloc(MiB + 80))).toBe(-osConstants.errno.EAGAIN);

        const ended = waitFor(() => statuses.some((s) => s < 0), 'the end of the connection');
        const poke = setInterval(ended.poke, 5);
        native.umount2(dir, c.MNT_DETACH);
        mounted = false;
        try {
          await ended.done;
        } finally {
          clearInterval(poke);
        }
        expect(statuses.filter((s) => s < 0)).toEqual([-EBADF]); // libuv reports POLLERR as EBADF, and stops the poll
        expect(() => native.readInto(fd, buffer)).toThrow(expect.objectContaining({ code: 'ENODEV' }));
        expect(mountLine(dir)).toBeUndefined();
      } finally {
        if (id) native.pollStop(id);
        if (mounted) native.umount2(dir, c.MNT_DETACH);
        if (clone >= 0) closeSync(clone);
        closeSync(fd);
      }
    });

    it('fusermount3 (the ordinary user route, here as root) hands the /dev/fuse fd back over _FUSE_COMMFD; it arrives blocking', async () => {
      const dir = await makeTempDir();
      const [ours, theirs] = native.socketpair();
      let fd = -1;
      try {
        const child = spawn('fusermount3', ['-o', 'fsname=imgmount-test,subtype=imgmount-test', '--', dir], {
          stdio: ['ignore', 'ignore', 'pipe', theirs],
          env: { ...process.env, _FUSE_COMMFD: '3' },
        });
        closeSync(theirs);
        let stderr = '';
        child.stderr?.on('data', (d) => (stderr += d));
        const code = await new Promise((resolve, reject) => child.on('error', reject).on('exit', resolve));
        expect({ code, stderr }).toEqual({ code: 0, stderr: '' });
        fd = native.recvFd(ours);
        expect(mountLine(dir)).toMatch(/ - fuse\.imgmount-test imgmount-test rw,user_id=0,group_id=0$/);
        expect(nonblocking(fd)).toBe(false);
        native.setNonblocking(fd);
        expect(nonblocking(fd)).toBe(true);
        const buffer = Buffer.alloc(8192);
        const n = native.readInto(fd, buffer);
        expect(n).toBeGreaterThanOrEqual(104);
        expect(buffer.readUInt32LE(4)).toBe(26);
        expect(native.readInto(fd, buffer)).toBe(-osConstants.errno.EAGAIN);
      } finally {
        if (mountLine(dir) !== undefined) native.umount2(dir, c.MNT_DETACH);
        if (fd >= 0) closeSync(fd);
        closeSync(ours);
      }
    });
  });
});
