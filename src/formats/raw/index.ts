/**
 * The raw format: guest offset X is host offset X, the virtual size is the
 * file size. It probes with the lowest confidence so any real format wins.
 * Holes of the host file (SEEK_DATA / SEEK_HOLE) map as zeros, as qemu-img map
 * shows them, and are not read; zero and discard punch holes.
 */
import { open } from 'node:fs/promises';
import { hostIoError, InvalidArgumentError } from '../../block/errors.js';
import type { CreateOptions, FormatDriver, FormatImage, Mapping, OpenOptions, Protocol, ResizeOptions } from '../../block/types.js';
import { rejectUnknownOptions } from '../options.js';

class RawImage implements FormatImage {
  readonly backing = undefined;
  constructor(
    private readonly file: Protocol,
    readonly virtualSize: number,
  ) {}

  async map(offset: number, length: number): Promise<Mapping[]> {
    const { nextData, nextHole } = this.file;
    if (!nextData || !nextHole) return [{ kind: 'data', guestOffset: offset, length, hostOffset: offset }];
    const runs: Mapping[] = [];
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const data = await nextData.call(this.file, pos);
      if (data === undefined || data >= end) {
        runs.push({ kind: 'zero', guestOffset: pos, length: end - pos, hostOffset: pos });
        break;
      }
      if (data > pos) runs.push({ kind: 'zero', guestOffset: pos, length: data - pos, hostOffset: pos });
      const hole = Math.min(end, Math.max(data + 1, await nextHole.call(this.file, data)));
      runs.push({ kind: 'data', guestOffset: data, length: hole - data, hostOffset: data });
      pos = hole;
    }
    return runs;
  }

  async zero(offset: number, length: number): Promise<void> {
    await this.punch(offset, length);
  }

  async discard(offset: number, length: number): Promise<void> {
    await this.punch(offset, length);
  }

  private async punch(offset: number, length: number): Promise<void> {
    if (this.file.punchHole) await this.file.punchHole(offset, length);
    else await this.file.write(offset, Buffer.alloc(length));
  }

  async write(offset: number, data: Buffer): Promise<void> {
    await this.file.write(offset, data);
  }

  async flush(): Promise<void> {
    await this.file.flush();
  }

  async close(): Promise<void> {
    await this.file.close();
  }

  info() {
    return { dirty: false }; // raw has no dirty state; qemu-img info shows dirty-flag false
  }
}

export const raw: FormatDriver = {
  name: 'raw',
  extensions: ['.raw', '.img', '.bin', '.iso'],

  probe(): number {
    return 1;
  },

  async open(file: Protocol, _options: OpenOptions): Promise<FormatImage> {
    return new RawImage(file, await file.size());
  },

  /** As qemu-img resize: the file is extended (sparse, reads as zeros) or cut. */
  async resize(file: Protocol, newSize: number, _options: ResizeOptions): Promise<void> {
    await file.truncate(newSize);
  },

  async create(path: string, options: CreateOptions): Promise<void> {
    rejectUnknownOptions('raw', options.options, []);
    if (options.backingFile !== undefined) {
      throw new InvalidArgumentError('raw images cannot have a backing file');
    }
    try {
      const handle = await open(path, 'w');
      try {
        await handle.truncate(options.size);
      } finally {
        await handle.close();
      }
    } catch (error) {
      throw hostIoError('cannot create', path, error);
    }
  },
};
