/**
 * The XML property list of a DMG, parsed with `@xmldom/xmldom` (the XML
 * parser `plist` itself uses) and turned into plain values: dict (a
 * prototype-less object), array, string, data (Buffer), integer, real,
 * true/false, date (its text). Parsing goes through xmldom directly, not
 * `plist.parse`, because that one lets xmldom print every syntax error of a
 * damaged image to the console; here the first error stops parsing and
 * becomes the thrown message; a document of more than MAX_TAGS elements is
 * refused before parsing (memory). xmldom is loaded when a DMG is first
 * opened, not with the list of formats (it took 14 ms of every command's start).
 * Pure function; the loaded module is kept.
 */
import { createRequire } from 'node:module';

type XmlDom = typeof import('@xmldom/xmldom');
let xmldom: XmlDom | undefined;

export type PlistValue = string | number | boolean | Buffer | PlistValue[] | { [key: string]: PlistValue };

const ELEMENT_NODE = 1;
/** Deeper nesting than this is no UDIF property list (they nest 5 deep); it would only cost stack. */
const MAX_DEPTH = 32;
/**
 * More tags than this is no UDIF property list (a dozen per partition; the
 * chunk tables are base64 text): a 16 MiB document of tiny elements would
 * make millions of DOM nodes, so it is refused before parsing.
 */
export const MAX_TAGS = 100_000;

interface XmlNode {
  nodeType: number;
  nodeName: string;
  textContent: string | null;
  childNodes: ArrayLike<XmlNode>;
}

function elements(node: XmlNode): XmlNode[] {
  return Array.from(node.childNodes).filter((child) => child.nodeType === ELEMENT_NODE);
}

function value(node: XmlNode, depth: number): PlistValue {
  if (depth > MAX_DEPTH) throw new Error(`nested deeper than ${MAX_DEPTH} levels`);
  const text = node.textContent ?? '';
  switch (node.nodeName) {
    case 'dict': {
      const out: { [key: string]: PlistValue } = Object.create(null);
      const children = elements(node);
      if (children.length % 2 !== 0) throw new Error('a <dict> has a key without a value');
      for (let i = 0; i < children.length; i += 2) {
        const key = children[i]!;
        if (key.nodeName !== 'key') throw new Error(`a <dict> has <${key.nodeName}> where a <key> belongs`);
        out[key.textContent ?? ''] = value(children[i + 1]!, depth + 1);
      }
      return out;
    }
    case 'array':
      return elements(node).map((child) => value(child, depth + 1));
    case 'string':
    case 'date':
      return text;
    case 'data': {
      const compact = text.replace(/\s+/g, '');
      if (!/^[A-Za-z0-9+/]*={0,2}$/.test(compact)) throw new Error('a <data> element is not base64');
      return Buffer.from(compact, 'base64');
    }
    case 'integer':
    case 'real': {
      const number = Number(text.trim());
      if (!Number.isFinite(number)) throw new Error(`<${node.nodeName}> ${JSON.stringify(text.slice(0, 40))} is not a number`);
      return number;
    }
    case 'true':
      return true;
    case 'false':
      return false;
    default:
      throw new Error(`unknown element <${node.nodeName.slice(0, 40)}>`);
  }
}

/** The value of the property list `xml`; throws with the parser's first complaint. */
export function parsePlistXml(xml: string): PlistValue {
  let tags = 0;
  for (let at = xml.indexOf('<'); at !== -1; at = xml.indexOf('<', at + 1)) {
    if (++tags > 2 * MAX_TAGS) throw new Error(`it has more than ${MAX_TAGS} elements`);
  }
  xmldom ??= createRequire(import.meta.url)('@xmldom/xmldom') as XmlDom;
  const parser = new xmldom.DOMParser({
    onError(level: string, message: string) {
      if (level !== 'warning') throw new Error(message);
    },
  });
  const doc = parser.parseFromString(xml, 'text/xml') as unknown as { documentElement: XmlNode | null };
  const root = doc.documentElement;
  if (!root || root.nodeName !== 'plist') throw new Error('the document is not a <plist>');
  const children = elements(root);
  if (children.length !== 1) throw new Error(`<plist> holds ${children.length} values, not 1`);
  return value(children[0]!, 0);
}
