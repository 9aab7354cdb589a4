/**
 * blkverify: every read of the image is compared with the same range of a raw
 * reference file; a difference fails the read with EIO and is logged with the
 * offset of the first differing byte and the read's range. Writes, zeroes
 * and discards accepted by the image are mirrored into the reference (as
 * QEMU's blkverify does), so a read-write mount keeps being comparable; the
 * reference is then opened read-write and locked like an image.
 *
 *   --filter blkverify:reference=disk.raw
 *
 * Concurrency: a read is compared after both reads finished; mirrored writes
 * run after the image's write and are awaited before the request is answered.
 */
import { BlockError, InvalidArgumentError } from '../errors.js';
import { FileProtocol } from '../file.js';
import { constants as osConstants } from 'node:os';
import createDebug from 'debug';
import type { FilterDefinition } from './types.js';

const log = createDebug('imgmount:blkverify');

export const blkverify: FilterDefinition = {
  name: 'blkverify',
  summary: 'compare every read with a raw reference file: reference=FILE',
  keys: ['reference'],
  validate(options) {
    if (options.reference === undefined || options.reference === '') {
      throw new InvalidArgumentError('filter blkverify: reference= is needed (the raw file to compare reads with)');
    }
  },
  async openImageFilter(options, context) {
    const reference = await FileProtocol.open(options.reference!, context.readOnly).catch((error: unknown) => {
      throw error instanceof BlockError ? new BlockError(`filter blkverify: reference: ${error.message}`, error.errno) : error;
    });
    const referenceSize = await reference.size();
    if (referenceSize !== context.virtualSize) {
      await reference.close();
      throw new InvalidArgumentError(
        `filter blkverify: reference ${reference.path} is ${referenceSize} bytes, but ${context.imagePath} has a virtual size of ${context.virtualSize}`,
      );
    }
    const report = (line: string) => {
      log(line);
      context.notice(line);
    };
    return {
      async afterRead(offset, buffer) {
        const expected = Buffer.allocUnsafe(buffer.length);
        await reference.read(offset, expected);
        if (expected.equals(buffer)) return;
        let first = 0;
        while (buffer[first] === expected[first]) first += 1;
        const line = `blkverify: ${context.imagePath} differs from ${reference.path} at offset ${offset + first} (read of ${buffer.length} bytes at ${offset})`;
        report(line);
        throw new BlockError(line, osConstants.errno.EIO);
      },
      afterWrite: (offset, buffer) => reference.write(offset, buffer),
      async afterChange(offset, length, read) {
        const chunk = 1 << 20;
        for (let at = offset; at < offset + length; at += chunk) {
          const part = Buffer.alloc(Math.min(chunk, offset + length - at));
          await read(at, part);
          await reference.write(at, part);
        }
      },
      afterFlush: () => reference.flush(),
      close: () => reference.close(),
    };
  },
};
