/**
 * The command-line parser and help printer, written for imgmount's commands
 * instead of loading yargs (with its cliui, string-width and yargs-parser,
 * about 80 ms of the start of every command on a small machine). It accepts
 * what imgmount accepted through yargs 18 (strict mode, `--no-` negation,
 * camelCase spellings, short-option groups, `--key=value`, repeated options
 * giving arrays, `--` ending the options) and prints the same help and the
 * same error messages; test/cli-args.test.ts compares both, argv by argv.
 *
 * A command has positionals (`<file>` required, `[size]` optional, `[paths..]`
 * every remaining one) and string or boolean options; one command is the
 * default, run when the first positional names no other.
 */

export interface OptionSpec {
  name: string;
  /** A one-letter alias (`-f`). */
  alias?: string;
  /** Untyped (no type shown in help, numbers read as numbers): an option with `choices`. */
  type?: 'string' | 'boolean';
  describe?: string;
  default?: string | boolean;
  choices?: readonly string[];
  /**
   * A boolean option that also takes one of these words as its value (`-r
   * leaks`, `--repair=all`): the next argument only when it is one of them.
   */
  values?: readonly string[];
}

export interface PositionalSpec {
  name: string;
  describe?: string;
}

export interface CommandSpec {
  /** The name typed (`info`), or undefined for the default command. */
  name?: string;
  /** How help shows it: `info <file>`, `[paths..]`. */
  usage: string;
  describe: string;
  positionals: readonly PositionalSpec[];
  options: readonly OptionSpec[];
  /**
   * The last positional of `usage`, taken from the end of the command line
   * before the options are read, so that it may start with `-` (qemu-img
   * resize's `-1G`); not taken when the line ends with -h or --help.
   */
  lastArgument?: boolean;
}

export interface Program {
  scriptName: string;
  /** Usage lines of the top-level help. */
  usage: string;
  commands: readonly CommandSpec[];
}

/** An option's value: repeated string options give an array (as yargs did). */
export type Value = Scalar | Scalar[];
type Scalar = string | boolean | number;

export interface Parsed {
  command: CommandSpec;
  /** Option values by option name (`backing-format`), defaults applied. */
  options: Record<string, Value | undefined>;
  /** Positional values by positional name; `paths..` gives an array. */
  positionals: Record<string, string | string[] | undefined>;
}

/** The outcome: run a command, print help (status 0), or fail with a message. */
export type Outcome = { kind: 'run'; parsed: Parsed } | { kind: 'help'; text: string } | { kind: 'error'; message: string };

const HELP: OptionSpec = { name: 'help', alias: 'h', type: 'boolean', describe: 'Show help' };

interface Positional {
  name: string;
  required: boolean;
  variadic: boolean;
}

function positionalsOf(command: CommandSpec): Positional[] {
  const words = command.usage.split(' ').slice(command.name === undefined ? 0 : 1);
  return words.map((word) => ({
    name: word.replace(/^[<[]|[>\]]$/g, '').replace(/\.\.$/, ''),
    required: word.startsWith('<'),
    variadic: word.endsWith('..]') || word.endsWith('..>'),
  }));
}

/** yargs-parser's numbers (values of untyped and unknown keys that look like one become numbers). */
function isNumber(value: string): boolean {
  if (/^0x[0-9a-f]+$/i.test(value)) return true;
  if (/^0[^.]/.test(value)) return false;
  return /^[-]?(?:\d+(?:\.\d*)?|\.\d+)(e[-+]?\d+)?$/.test(value) && Number.isSafeInteger(Math.floor(parseFloat(value)));
}

/** A negative number, which yargs-parser takes as a value, not an option. */
const NEGATIVE = /^-+([0-9]+(\.[0-9]+)?|\.[0-9]+)$/;

function camelCase(key: string): string {
  return key.replace(/-+([^-])/g, (_, letter: string) => letter.toUpperCase());
}

/**
 * The tokens of argv as yargs-parser reads them, given the known options:
 * every key set (in order, as written) and the positionals before `--`.
 */
class Tokens {
  /** Keys as written (after dashes), in the order first set, with their values. */
  readonly keys = new Map<string, Value>();
  readonly positionals: string[] = [];
  /** Where in argv each positional was. */
  readonly positionalIndexes: number[] = [];
  private readonly byKey = new Map<string, OptionSpec>();
  /** The argument being read. */
  private at = 0;

  /**
   * `valuesAfter`: the argv index of the command's name; an option's `values`
   * words count only after it (yargs read what comes before for the default command).
   */
  constructor(argv: readonly string[], options: readonly OptionSpec[], private readonly valuesAfter = -1) {
    for (const option of options) {
      this.byKey.set(option.name, option);
      this.byKey.set(camelCase(option.name), option);
      if (option.alias !== undefined) this.byKey.set(option.alias, option);
    }
    this.read(argv);
  }

  option(key: string): OptionSpec | undefined {
    return this.byKey.get(key);
  }

  /**
   * Gives `key` its value: the next argument when it is one (not an option by
   * `optionLike`, or a negative number) and the key is not boolean, or an
   * explicit true/false; else the flag's own value. True when `next` was used.
   */
  private takeValue(key: string, next: string | undefined, optionLike: RegExp, negative: RegExp): boolean {
    if (
      next !== undefined &&
      (((!optionLike.test(next) || negative.test(next)) && !this.isBoolean(key)) || /^(true|false)$/.test(next) || this.isValueWord(key, next))
    ) {
      this.set(key, next);
      return true;
    }
    this.set(key, this.flagValue(key));
    return false;
  }

  /** True when `word` is one of the words `key` takes as its value (see OptionSpec.values). */
  private isValueWord(key: string, word: string): boolean {
    return this.at > this.valuesAfter && this.byKey.get(key)?.values?.includes(word) === true;
  }

  private isBoolean(key: string): boolean {
    return this.byKey.get(key)?.type === 'boolean';
  }

  /** A key given with no value: a string or untyped option's default, else '' for a string option, true otherwise. */
  private flagValue(key: string): Scalar {
    const option = this.byKey.get(key);
    if (option?.type !== 'boolean' && option?.default !== undefined) return option.default;
    return option?.type === 'string' ? '' : true;
  }

  private set(key: string, value: Scalar): void {
    const option = this.byKey.get(key);
    let stored: Scalar = value;
    if (option?.type === 'boolean' && typeof value === 'string') stored = this.isValueWord(key, value) ? value : value === 'true';
    else if (option?.type !== 'string' && typeof value === 'string' && isNumber(value)) stored = Number(value);
    // An option is stored under its name; an unknown key under the key as written
    // (and, with dashes, its camelCase spelling too, which strict mode names as well).
    const names = option !== undefined ? [option.name] : /-/.test(key) ? [key, camelCase(key)] : [key];
    for (const name of names) {
      const previous = this.keys.get(name);
      if (previous === undefined || option?.type === 'boolean') this.keys.set(name, stored);
      else this.keys.set(name, Array.isArray(previous) ? [...previous, stored] : [previous, stored]);
    }
  }

  private read(argv: readonly string[]): void {
    const negative = NEGATIVE;
    for (let i = 0; i < argv.length; i++) {
      const arg = argv[i]!;
      this.at = i;
      let match: RegExpMatchArray | null;
      if (/^---+(=|$)/.test(arg)) {
        this.positionals.push(arg);
        this.positionalIndexes.push(i);
      } else if ((match = arg.match(/^--([^=]+)=([\s\S]*)$/)) !== null) {
        this.set(match[1]!, match[2]!);
      } else if ((match = arg.match(/^--no-(.+)/)) !== null) {
        this.set(match[1]!, false);
      } else if ((match = arg.match(/^--(.+)/)) !== null) {
        if (this.takeValue(match[1]!, argv[i + 1], /^-/, negative)) i++;
      } else if (/^-[^-]+/.test(arg) && !negative.test(arg)) {
        const letters = arg.slice(1, -1).split('');
        let broken = false;
        for (let j = 0; j < letters.length; j++) {
          const rest = arg.slice(j + 2);
          const letter = letters[j]!;
          if (letters[j + 1] === '=') {
            this.set(letter, arg.slice(j + 3));
            broken = true;
            break;
          }
          if (rest === '-') {
            this.set(letter, rest);
            continue;
          }
          if (/[A-Za-z]/.test(letter) && /^-?\d+(\.\d*)?(e-?\d+)?$/.test(rest) && !this.isBoolean(rest)) {
            this.set(letter, rest);
            broken = true;
            break;
          }
          if (letters[j + 1] !== undefined && /\W/.test(letters[j + 1]!)) {
            this.set(letter, rest);
            broken = true;
            break;
          }
          this.set(letter, this.flagValue(letter));
        }
        const key = arg.slice(-1);
        if (!broken && key !== '-' && this.takeValue(key, argv[i + 1], /^(-|--)[^-]/, negative)) i++;
      } else if (arg === '--') {
        // yargs let what follows `--` fill no positional of imgmount's commands.
        break;
      } else {
        this.positionals.push(arg);
        this.positionalIndexes.push(i);
      }
    }
  }
}

/** Parses `argv` for `program`: which command, its values, or help, or the error yargs gave. */
export function parseCommandLine(program: Program, argv: readonly string[], width: number): Outcome {
  // First pass, knowing only --help: the first positional picks the command.
  const first = new Tokens(argv, [HELP]);
  const named = program.commands.find((command) => command.name !== undefined && command.name === first.positionals[0]);
  const command = named ?? program.commands.find((candidate) => candidate.name === undefined)!;
  const options = [HELP, ...command.options];
  let rest = argv;
  let last: string | undefined;
  if (named?.lastArgument && argv.length - 1 > first.positionalIndexes[0]! && !['-h', '--help'].includes(argv[argv.length - 1]!)) {
    last = argv[argv.length - 1]!;
    rest = argv.slice(0, -1);
  }
  const tokens = new Tokens(rest, options, named === undefined ? -1 : first.positionalIndexes[0]);
  // Either reading may find --help (yargs took an unknown `-r -- --help` as `-r=--`, then --help).
  if (first.keys.get('help') === true || tokens.keys.get('help') === true) return { kind: 'help', text: help(program, command, width) };

  const given = named === undefined ? tokens.positionals : tokens.positionals.slice(1);
  const positionals = positionalsOf(command);
  const required = positionals.filter((positional) => positional.required).length;
  const fail = (message: string): Outcome => ({ kind: 'error', message: `${message} (see ${program.scriptName} --help)` });
  const supplied = given.length + (last === undefined ? 0 : 1);
  if (named !== undefined && supplied < required) {
    return fail(`Not enough non-option arguments: got ${supplied}, need at least ${required}`);
  }

  // yargs read each positional value again as `--NAME VALUE`: a value that looks like
  // an option (`-`, `---`) is left out of an array and empties a single value.
  const kept = (value: string): boolean => !/^-/.test(value) || NEGATIVE.test(value);
  const values: Record<string, string | string[] | undefined> = {};
  let at = 0;
  for (const [index, positional] of positionals.entries()) {
    if (last !== undefined && index === positionals.length - 1) {
      values[positional.name] = last;
    } else if (positional.variadic) {
      values[positional.name] = given.slice(at).filter(kept);
      at = given.length;
    } else {
      const value = given[at];
      values[positional.name] = value === undefined || kept(value) ? value : '';
      at = Math.min(at + 1, given.length);
    }
  }

  const unknown: string[] = [];
  for (const key of tokens.keys.keys()) {
    if (tokens.option(key) === undefined && !positionals.some((positional) => positional.name === key)) unknown.push(key);
  }
  unknown.push(...given.slice(at)); // as yargs listed them: after the keys, repeats included
  if (unknown.length > 0) {
    const list = unknown.map((key) => (key.trim() ? key : `"${key}"`)).join(', ');
    return fail(`${unknown.length === 1 ? 'Unknown argument' : 'Unknown arguments'}: ${list}`);
  }

  const result: Record<string, Value | undefined> = {};
  for (const option of command.options) result[option.name] = tokens.keys.get(option.name) ?? option.default;

  const invalid = command.options.flatMap((option) => {
    if (option.choices === undefined || !tokens.keys.has(option.name)) return [];
    const wrong = ([] as Scalar[]).concat(result[option.name]!).filter((value) => !option.choices!.includes(value as string));
    return wrong.length === 0 ? [] : [`Argument: ${option.name}, Given: ${quoted(wrong)}, Choices: ${quoted(option.choices)}`];
  });
  if (invalid.length > 0) return fail(`Invalid values:\n  ${invalid.join('\n  ')}`);
  return { kind: 'run', parsed: { command, options: result, positionals: values } };
}

function quoted(values: readonly Scalar[]): string {
  return values.map((value) => JSON.stringify(value)).join(', ');
}

// ---------------------------------------------------------------------------
// Help, laid out as yargs laid it out through cliui (and wrap-ansi, hard wrap).

/** The help of `command` (the top-level help for the default command), `width` columns wide. */
export function help(program: Program, command: CommandSpec, width: number): string {
  const ui = new Layout(width);
  const base = program.scriptName;
  if (command.name === undefined) {
    ui.div({ text: program.usage.replace(/\$0/g, base) });
    ui.div();
    ui.div({ text: 'Commands:' });
    const commandWidth = maxWidth(
      program.commands.map((entry) => ({ text: `${base} ${entry.usage}` })),
      width,
    );
    for (const entry of program.commands) {
      ui.span({ text: `${base} ${entry.usage}`, padding: [0, 2, 0, 2], width: commandWidth + 4 }, { text: entry.describe });
      if (entry.name === undefined) ui.div({ text: '[default]', padding: [0, 0, 0, 2], align: 'right' });
      else ui.div();
    }
    ui.div();
  } else {
    ui.div({ text: `${base} ${command.usage}` });
    ui.div({ text: command.describe, padding: [1, 0, 0, 0] });
    ui.div();
  }

  const positionals = positionalsOf(command);
  const descriptions = new Map(command.positionals.map((positional) => [positional.name, positional.describe]));
  if (positionals.length > 0) {
    ui.div({ text: 'Positionals:' });
    const rows = positionals.map((positional) => ({ text: positional.name }));
    const columnWidth = maxWidth(rows, width) + 4;
    for (const positional of positionals) {
      const extra = ['[string]', positional.required ? '[required]' : undefined].filter(Boolean).join(' ');
      ui.span({ text: positional.name, padding: [0, 2, 0, 2], width: columnWidth }, colFromString(descriptions.get(positional.name) ?? ''));
      ui.div({ text: extra, padding: [0, 0, 0, 2], align: 'right' });
    }
    ui.div();
  }

  const options = [HELP, ...command.options];
  const switches = options.map((option) => {
    if (option.alias !== undefined) return { text: `-${option.alias}, --${option.name}`, indentation: 0 };
    return { text: `--${option.name}`, indentation: 0 };
  });
  if (options.some((option) => option.alias !== undefined)) {
    for (const entry of switches) if (entry.text.startsWith('--')) entry.indentation = '-x, '.length;
  }
  ui.div({ text: 'Options:' });
  const columnWidth = maxWidth(switches, width) + 4;
  options.forEach((option, index) => {
    const entry = switches[index]!;
    const extra = [
      option.type !== undefined ? `[${option.type}]` : undefined,
      option.choices ? `[choices: ${quoted(option.choices)}]` : undefined,
      option.default !== undefined ? `[default: ${typeof option.default === 'string' ? `"${option.default}"` : option.default}]` : undefined,
    ]
      .filter(Boolean)
      .join(' ');
    ui.span({ text: entry.text, padding: [0, 2, 0, 2 + entry.indentation], width: columnWidth }, colFromString(option.describe ?? ''));
    ui.div({ text: extra, padding: [0, 0, 0, 2], align: 'right' });
  });
  ui.div();
  return ui.toString().replace(/\s*$/, '');
}

function maxWidth(rows: readonly { text: string; indentation?: number }[], width: number): number {
  let widest = 0;
  for (const row of rows) widest = Math.max(widest, row.text.length + (row.indentation ?? 0));
  return Math.min(widest, Math.trunc(width * 0.5));
}

type Padding = [number, number, number, number];

interface Column {
  text: string;
  padding?: Padding;
  width?: number;
  align?: 'right';
}

function colFromString(text: string): Column {
  return { text, padding: [0, text.match(/\s*$/)![0].length, 0, text.match(/^\s*/)![0].length] };
}

interface Line {
  text: string;
  span?: boolean;
  hidden?: boolean;
}

/** cliui's layout (columns, padding, right alignment, spans that later rows may join), for plain text. */
class Layout {
  private readonly rows: (Column[] & { span?: boolean })[] = [];

  constructor(private readonly width: number) {}

  div(...columns: Column[]): void {
    if (columns.length === 0) this.rows.push([colFromString('')]);
    else this.rows.push(columns);
  }

  span(...columns: Column[]): void {
    const row: Column[] & { span?: boolean } = columns;
    row.span = true;
    this.rows.push(row);
  }

  toString(): string {
    const lines: Line[] = [];
    for (const row of this.rows) this.rowToString(row, lines);
    return lines
      .filter((line) => !line.hidden)
      .map((line) => line.text)
      .join('\n');
  }

  private rowToString(row: Column[] & { span?: boolean }, lines: Line[]): void {
    this.rasterize(row).forEach((rasterRow, r) => {
      let text = '';
      rasterRow.forEach((cell, c) => {
        const column = row[c]!;
        const wrapWidth = innerWidth(column);
        let ts = cell;
        if (wrapWidth > ts.length) ts += ' '.repeat(wrapWidth - ts.length);
        if (column.align === 'right') {
          ts = alignRight(ts, wrapWidth);
          if (ts.length < wrapWidth) ts += ' '.repeat((column.width ?? 0) - ts.length - 1);
        }
        const padding = column.padding ?? [0, 0, 0, 0];
        if (padding[3]) text += ' '.repeat(padding[3]);
        text += ts;
        if (padding[1]) text += ' '.repeat(padding[1]);
        if (r === 0 && lines.length > 0) text = renderInline(text, lines[lines.length - 1]!);
      });
      lines.push({ text: text.replace(/ +$/, ''), span: row.span });
    });
  }

  private rasterize(row: Column[]): string[][] {
    const rasterRows: string[][] = [];
    const widths = this.columnWidths(row);
    row.forEach((column, c) => {
      column.width = widths[c];
      const wrapped = wrapText(column.text, innerWidth(column)).split('\n');
      const padding = column.padding;
      if (padding) {
        wrapped.unshift(...new Array<string>(padding[0] || 0).fill(''));
        wrapped.push(...new Array<string>(padding[2] || 0).fill(''));
      }
      wrapped.forEach((line, r) => {
        if (!rasterRows[r]) rasterRows.push([]);
        const rasterRow = rasterRows[r]!;
        for (let i = 0; i < c; i++) if (rasterRow[i] === undefined) rasterRow.push('');
        rasterRow.push(line);
      });
    });
    return rasterRows;
  }

  private columnWidths(row: Column[]): number[] {
    let unset = row.length;
    let remaining = this.width;
    const widths = row.map((column) => {
      if (column.width) {
        unset--;
        remaining -= column.width;
        return column.width;
      }
      return undefined;
    });
    const unsetWidth = unset ? Math.floor(remaining / unset) : 0;
    return widths.map((width, i) => width ?? Math.max(unsetWidth, 1 + (row[i]!.padding?.[3] ?? 0) + (row[i]!.padding?.[1] ?? 0)));
  }
}

function innerWidth(column: Column): number {
  return (column.width ?? 0) - ((column.padding?.[3] ?? 0) + (column.padding?.[1] ?? 0));
}

function renderInline(source: string, previous: Line): string {
  const leading = source.match(/^ */)![0].length;
  const target = previous.text;
  const targetWidth = target.trimEnd().length;
  if (!previous.span) return source;
  if (leading < targetWidth) return source;
  previous.hidden = true;
  return target.trimEnd() + ' '.repeat(leading - targetWidth) + source.trimStart();
}

function alignRight(text: string, width: number): string {
  const trimmed = text.trim();
  return trimmed.length < width ? ' '.repeat(width - trimmed.length) + trimmed : trimmed;
}

/** wrap-ansi's hard wrap (trimming, word wrap) of plain text, line by line. */
function wrapText(text: string, columns: number): string {
  return text
    .normalize()
    .replaceAll('\r\n', '\n')
    .split('\n')
    .map((line) => wrapLine(line, columns))
    .join('\n');
}

function wrapLine(text: string, columns: number): string {
  if (text.trim() === '') return '';
  const words = text.split(' ');
  let rows = [''];
  words.forEach((word, index) => {
    rows[rows.length - 1] = rows[rows.length - 1]!.trimStart();
    let rowLength = rows[rows.length - 1]!.length;
    if (index !== 0 && rowLength > 0) {
      rows[rows.length - 1] += ' ';
      rowLength++;
    }
    if (word.length > columns) {
      const remaining = columns - rowLength;
      const breaksThisLine = 1 + Math.floor((word.length - remaining - 1) / columns);
      const breaksNextLine = Math.floor((word.length - 1) / columns);
      if (breaksNextLine < breaksThisLine) rows.push('');
      wrapWord(rows, word, columns);
      return;
    }
    if (rowLength + word.length > columns && rowLength > 0 && word.length > 0) rows.push('');
    rows[rows.length - 1] += word;
  });
  rows = rows.map(trimSpacesRight);
  return rows.join('\n');
}

function wrapWord(rows: string[], word: string, columns: number): void {
  const characters = [...word];
  let visible = rows[rows.length - 1]!.length;
  characters.forEach((character, index) => {
    if (visible + 1 <= columns) rows[rows.length - 1] += character;
    else {
      rows.push(character);
      visible = 0;
    }
    visible += 1;
    if (visible === columns && index < characters.length - 1) {
      rows.push('');
      visible = 0;
    }
  });
  if (!visible && rows[rows.length - 1]!.length > 0 && rows.length > 1) rows[rows.length - 2] += rows.pop();
}

function trimSpacesRight(text: string): string {
  const words = text.split(' ');
  let last = words.length;
  while (last > 0 && words[last - 1]!.length === 0) last--;
  if (last === words.length) return text;
  return words.slice(0, last).join(' ') + words.slice(last).join('');
}
