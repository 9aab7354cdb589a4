/**
 * The raw format: guest offset X is host offset X, the virtual size is the
 * file size. It probes with the lowest confidence so any real format wins.
 */
import { open } from 'node:fs/promises';
import { hostIoError, InvalidArgumentError } from '../../block/errors.js';
import type { CreateOptions, FormatDriver, FormatImage, Mapping, OpenOptions, Protocol } from '../../block/types.js';
import { rejectUnknownOptions } from '../options.js';

class RawImage implements FormatImage {
  readonly backing = undefined;
  constructor(
    private readonly file: Protocol,
    readonly virtualSize: number,
  ) {}

  async map(offset: number, length: number): Promise<Mapping[]> {
    return [{ kind: 'data', guestOffset: offset, length, hostOffset: offset }];
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
    return {};
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
