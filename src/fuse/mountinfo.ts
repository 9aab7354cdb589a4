/**
 * Reading the kernel's mount table (/proc/self/mountinfo): is a directory a
 * mount point, of which type, and is a given mount (by its mount ID) still there.
 */
import { readFile } from 'node:fs/promises';

/** One line of /proc/self/mountinfo. */
export interface MountEntry {
  /** Unique while the mount exists. */
  id: number;
  /** major:minor of the file system. */
  device: string;
  mountpoint: string;
  /** The file-system type (`fuse.imgmount`). */
  type: string;
  /** The source column (what mount(8) shows before "on"). */
  source: string;
}

/** Parses mountinfo text; lines that do not have the documented shape are skipped. */
export function parseMountInfo(text: string): MountEntry[] {
  const entries: MountEntry[] = [];
  for (const line of text.split('\n')) {
    // ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER-OPTIONS
    const fields = line.split(' ');
    const separator = fields.indexOf('-', 6);
    if (fields.length < 10 || separator < 0) continue;
    entries.push({
      id: Number(fields[0]),
      device: fields[2],
      mountpoint: unescapeField(fields[4]),
      type: unescapeField(fields[separator + 1]),
      source: unescapeField(fields[separator + 2]),
    });
  }
  return entries;
}

/** mountinfo writes space, tab, newline and backslash as octal escapes (\040). */
function unescapeField(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

export async function readMounts(): Promise<MountEntry[]> {
  return parseMountInfo(await readFile('/proc/self/mountinfo', 'utf8'));
}

/** The mount that is visible at `mountpoint` (the last one mounted there), if any. */
export async function findMount(mountpoint: string): Promise<MountEntry | undefined> {
  const mounts = await readMounts();
  return mounts.filter((entry) => entry.mountpoint === mountpoint).pop();
}

/** Whether the mount with this ID is still in the table. */
export async function isMounted(id: number): Promise<boolean> {
  return (await readMounts()).some((entry) => entry.id === id);
}
