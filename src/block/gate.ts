/**
 * The gate every file an image names goes through: backing files and the
 * files a driver opens (qcow2 external data files, later VMDK extents).
 *
 * - Names resolve against the directory of the image that names them;
 *   `json:` and URL-style names are refused (only plain files are supported).
 * - Policy: by default any regular file the user can read (absolute paths
 *   included: libvirt writes them). With `allowFiles`, the file's real path
 *   must lie inside one of those directories. Devices, FIFOs and sockets are
 *   refused by the file protocol before they are opened.
 * - Confined names (VMDK extents, which a descriptor may point anywhere:
 *   CVE-2022-47951): unless the user gave `allowFiles`, the name must be
 *   relative and its real path must lie in the image's own directory.
 * - Only the top image's own files open read-write; the one-writer lock is
 *   taken by the file protocol for each of them.
 * - Whoever opens a file closes it: the gate remembers what it opened, and
 *   the generic layer closes those files after the image that named them.
 */
import { realpath } from 'node:fs/promises';
import { dirname, isAbsolute, sep } from 'node:path';
import { FileProtocol } from './file.js';
import { hostIoError, InvalidArgumentError } from './errors.js';
import { resolveBackingName } from './backing-name.js';
import type { FileGate, Protocol } from './types.js';

export interface FilePolicy {
  /** Directories files named by images must lie in; undefined allows any regular file. */
  allowFiles?: readonly string[];
}

/** A gate for the files named by the image at `imagePath`. */
export class ImageFileGate implements FileGate {
  /** Files opened through this gate, closed by the generic layer after the image. */
  readonly opened: Protocol[] = [];
  /** Where each name resolved, for `info`. */
  readonly resolved: { role: string; name: string; path: string }[] = [];

  constructor(
    private readonly imagePath: string,
    private readonly policy: FilePolicy,
    /** Whether files of this image may open read-write (only the top image's). */
    private readonly writable: boolean,
  ) {}

  async open(name: string, role: string, options: { readOnly: boolean; confined?: boolean }): Promise<Protocol> {
    const path =
      options.confined && this.policy.allowFiles === undefined
        ? await resolveConfined(this.imagePath, name, role)
        : await resolveAllowed(this.imagePath, name, role, this.policy);
    const file = await FileProtocol.open(path, options.readOnly || !this.writable);
    this.opened.push(file);
    this.resolved.push({ role, name, path });
    return file;
  }

  async closeAll(): Promise<void> {
    const files = this.opened.splice(0);
    const results = await Promise.allSettled(files.map((file) => file.close()));
    const failure = results.find((result): result is PromiseRejectedResult => result.status === 'rejected');
    if (failure) throw failure.reason;
  }
}

/** Resolves a name stored in an image to a path, refusing what the policy does not allow. */
export async function resolveAllowed(imagePath: string, name: string, role: string, policy: FilePolicy): Promise<string> {
  const path = resolveBackingName(imagePath, name, role);
  if (policy.allowFiles === undefined) return path;
  let real: string;
  try {
    real = await realpath(path);
  } catch (error) {
    throw hostIoError(`${role} ${name} of ${imagePath}:`, path, error);
  }
  for (const dir of policy.allowFiles) {
    let allowed: string;
    try {
      allowed = await realpath(dir);
    } catch {
      continue;
    }
    if (real === allowed || real.startsWith(allowed.endsWith(sep) ? allowed : allowed + sep)) return path;
  }
  throw new InvalidArgumentError(
    `${imagePath}: ${role} ${name} resolves to ${real}, outside the allowed directories (${policy.allowFiles.join(', ')}); allow it with --allow-files`,
  );
}

/** A confined name: relative, and resolving (symbolic links followed) inside the image's own directory. */
async function resolveConfined(imagePath: string, name: string, role: string): Promise<string> {
  const path = resolveBackingName(imagePath, name, role);
  const plain = name.startsWith('file:') ? name.slice('file:'.length) : name;
  if (isAbsolute(plain)) {
    throw new InvalidArgumentError(`${imagePath}: ${role} ${name} is an absolute path; only names inside the image's directory open unless allowed with --allow-files`);
  }
  let real: string;
  let dir: string;
  try {
    real = await realpath(path);
    dir = await realpath(dirname(imagePath));
  } catch (error) {
    throw hostIoError(`${role} ${name} of ${imagePath}:`, path, error);
  }
  if (!real.startsWith(dir.endsWith(sep) ? dir : dir + sep)) {
    throw new InvalidArgumentError(
      `${imagePath}: ${role} ${name} resolves to ${real}, outside the image's directory ${dir}; allow it with --allow-files`,
    );
  }
  return path;
}
