/**
 * Turning a backing file name as stored in an image into a path to open:
 * relative names resolve against the directory of the image that names
 * them; protocols other than plain files are refused.
 */
import { dirname, isAbsolute, resolve } from 'node:path';
import { UnsupportedFeatureError } from './errors.js';

export function resolveBackingName(imagePath: string, name: string): string {
  if (name.startsWith('json:') || /^[a-z][a-z0-9+.-]*:\/\//i.test(name)) {
    throw new UnsupportedFeatureError(`${imagePath}: backing file '${name}' uses a protocol other than plain files, which is not supported`);
  }
  const plain = name.startsWith('file:') ? name.slice('file:'.length) : name;
  return isAbsolute(plain) ? plain : resolve(dirname(imagePath), plain);
}
