/**
 * Turning a file name as stored in an image (a backing file, an external
 * data file) into a path to open: relative names resolve against the
 * directory of the image that names them; protocols other than plain files
 * (`json:`, `nbd://`...) are refused.
 */
import { dirname, isAbsolute, resolve } from 'node:path';
import { UnsupportedFeatureError } from './errors.js';

export function resolveBackingName(imagePath: string, name: string, role = 'backing file'): string {
  if (name.startsWith('json:') || /^[a-z][a-z0-9+.-]*:\/\//i.test(name)) {
    throw new UnsupportedFeatureError(`${imagePath}: ${role} '${name}' uses a protocol other than plain files, which is not supported`);
  }
  const plain = name.startsWith('file:') ? name.slice('file:'.length) : name;
  return isAbsolute(plain) ? plain : resolve(dirname(imagePath), plain);
}
