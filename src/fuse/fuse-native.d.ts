/**
 * Types for the parts of fuse-native 2.2.6 (CommonJS, no bundled types) that
 * src/fuse uses. Written from its index.js: every callback takes a result that
 * is 0 or a negative errno first; `read`/`write` answer with the byte count
 * (or a negative errno) alone.
 */
declare module 'fuse-native' {
  namespace Fuse {
    /** What getattr answers; times are Dates or milliseconds since the epoch. */
    interface Stat {
      mode: number;
      uid: number;
      gid: number;
      size: number;
      nlink: number;
      blksize?: number;
      blocks?: number;
      ino?: number;
      dev?: number;
      rdev?: number;
      atime: Date | number;
      mtime: Date | number;
      ctime: Date | number;
    }

    /** What statfs answers; every field is a uint32 in fuse-native's encoding. */
    interface StatFs {
      bsize: number;
      frsize: number;
      blocks: number;
      bfree: number;
      bavail: number;
      files: number;
      ffree: number;
      favail: number;
      fsid: number;
      flag: number;
      namemax: number;
    }

    type Done = (result: number) => void;

    interface Operations {
      init?(done: Done): void;
      statfs?(path: string, done: (result: number, statfs?: StatFs) => void): void;
      getattr?(path: string, done: (result: number, stat?: Stat) => void): void;
      readdir?(path: string, done: (result: number, names?: string[], stats?: Stat[]) => void): void;
      open?(path: string, flags: number, done: (result: number, fileHandle?: number) => void): void;
      release?(path: string, fileHandle: number, done: Done): void;
      read?(path: string, fileHandle: number, buffer: Buffer, length: number, position: number, done: Done): void;
      write?(path: string, fileHandle: number, buffer: Buffer, length: number, position: number, done: Done): void;
      flush?(path: string, fileHandle: number, done: Done): void;
      fsync?(path: string, dataSync: number, fileHandle: number, done: Done): void;
      truncate?(path: string, size: number, done: Done): void;
      ftruncate?(path: string, fileHandle: number, size: number, done: Done): void;
    }

    interface Options {
      /** Milliseconds before fuse-native answers ETIMEDOUT on its own; false disables it. */
      timeout?: number | false;
      force?: boolean;
      mkdir?: boolean;
    }
  }

  class Fuse {
    constructor(mountpoint: string, operations: Fuse.Operations, options?: Fuse.Options);
    readonly mnt: string;
    mount(done: (error: Error | null) => void): void;
    /** Builds the single `-oa,b,c` argument handed to fuse_mount and fuse_new. */
    protected _fuseOptions(): string;
  }

  export = Fuse;
}
