/**
 * Bundles entry points into `dist/` with esbuild so the host runs from the
 * bundle alone: `./deno run -A dist/host.js --help`.
 *
 * Workers: code starts them with `new Worker(new URL("./x_worker.ts",
 * import.meta.url), { type: "module" })`. After bundling, `import.meta.url`
 * is the URL of whichever bundle the code was inlined into, so every bundle
 * goes flat into one directory and a plugin rewrites each
 * `new URL("<relative>.ts", import.meta.url)` whose target exists into
 * `new URL("./<basename>.js", import.meta.url)`, and bundles that target as an
 * entry of its own (found transitively, plus any listed with `--worker`).
 * Two bundled files with the same basename are an error.
 *
 * Usage: `./deno task build [--outdir dist] [--entry src.ts[=out.js]]... [--worker src.ts]...`
 * With no `--entry`: dataplane/main.ts -> host.js, plus the worker entry
 * files aio/iothread_worker.ts and aio/thread_pool_worker.ts (missing ones are
 * skipped with a warning).
 *
 * @module
 */

import * as esbuild from "esbuild";
import { basename, dirname, isAbsolute, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

/** One bundle to produce. */
export interface BuildEntry {
  /** Source file (absolute or relative to the working directory). */
  entry: string;
  /** Output file name inside `outdir` (default: the entry's basename with .js). */
  out?: string;
}

/** What {@link buildBundles} builds. */
export interface BuildOptions {
  entries: readonly BuildEntry[];
  /** Extra worker entry files to bundle even if no `new URL(...)` refers to them. */
  workers?: readonly string[];
  outdir: string;
  /** Minify (default false: readable stack traces). */
  minify?: boolean;
  /** Called with warnings (default console.warn). */
  warn?: (msg: string) => void;
}

/** One produced bundle. */
export interface BuiltBundle {
  entry: string;
  outfile: string;
  bytes: number;
}

const WORKER_URL = /new\s+URL\(\s*(["'])(\.{1,2}\/[^"'\n]+?\.ts)\1\s*,\s*import\.meta\.url\s*\)/g;

function jsName(file: string): string {
  return basename(file).replace(/\.(ts|tsx|mts|js|mjs)$/, "") + ".js";
}

function exists(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

/**
 * Rewrites the module-relative `.ts` URLs in `source` (a file at `file`) to
 * `./<basename>.js` and reports each target file that exists through `found`.
 * URLs whose target does not exist are left alone.
 *
 * @example
 * ```ts
 * import { rewriteWorkerUrls } from "./build.ts";
 * const found: string[] = [];
 * const out = rewriteWorkerUrls(
 *   'new Worker(new URL("./build.ts", import.meta.url), { type: "module" })',
 *   new URL(import.meta.url).pathname,
 *   (f) => found.push(f),
 * );
 * if (!out.includes('new URL("./build.js", import.meta.url)') || found.length !== 1) {
 *   throw new Error(out);
 * }
 * ```
 */
export function rewriteWorkerUrls(
  source: string,
  file: string,
  found: (target: string) => void,
): string {
  return source.replace(WORKER_URL, (whole, _q: string, rel: string) => {
    const target = resolve(dirname(file), rel);
    if (!exists(target)) return whole;
    found(target);
    return `new URL("./${jsName(target)}", import.meta.url)`;
  });
}

/**
 * Bundles every entry (ESM, `node:*` left external) and every worker entry it
 * reaches into `outdir`, flat. Returns the bundles written.
 *
 * @example
 * ```ts ignore
 * import { buildBundles } from "./build.ts";
 * await buildBundles({ entries: [{ entry: "dataplane/main.ts", out: "host.js" }], outdir: "dist" });
 * ```
 */
export async function buildBundles(opts: BuildOptions): Promise<BuiltBundle[]> {
  const warn = opts.warn ?? ((m: string) => console.warn(m));
  const queue: { entry: string; out: string }[] = opts.entries.map((e) => ({
    entry: resolve(e.entry),
    out: e.out ?? jsName(e.entry),
  }));
  for (const w of opts.workers ?? []) queue.push({ entry: resolve(w), out: jsName(w) });
  const byOut = new Map<string, string>(); // out name -> source, to catch collisions
  const built: BuiltBundle[] = [];
  const workerUrls: esbuild.Plugin = {
    name: "worker-urls",
    setup(b) {
      b.onLoad({ filter: /\.(ts|tsx|mts)$/ }, async (args) => {
        const source = await Deno.readTextFile(args.path);
        const contents = rewriteWorkerUrls(source, args.path, (target) => {
          if (![...queue].some((q) => q.entry === target)) {
            queue.push({ entry: target, out: jsName(target) });
          }
        });
        return { contents, loader: args.path.endsWith(".tsx") ? "tsx" : "ts" };
      });
    },
  };
  await Deno.mkdir(opts.outdir, { recursive: true });
  for (let i = 0; i < queue.length; i++) {
    const { entry, out } = queue[i];
    const prev = byOut.get(out);
    if (prev !== undefined && prev !== entry) {
      throw new Error(`build: ${entry} and ${prev} would both be ${out} in ${opts.outdir}`);
    }
    if (prev !== undefined) continue;
    byOut.set(out, entry);
    const outfile = join(opts.outdir, out);
    const result = await esbuild.build({
      entryPoints: [entry],
      outfile,
      bundle: true,
      format: "esm",
      platform: "neutral",
      target: "esnext",
      mainFields: ["module", "main"],
      external: ["node:*"],
      minify: opts.minify ?? false,
      sourcemap: false,
      logLevel: "silent",
      plugins: [workerUrls],
    });
    for (const w of result.warnings) warn(`build: ${w.text}`);
    built.push({ entry, outfile, bytes: (await Deno.stat(outfile)).size });
  }
  return built;
}

const REPO_ROOT = fileURLToPath(new URL("..", import.meta.url));

const DEFAULT_ENTRIES: readonly BuildEntry[] = [{ entry: "dataplane/main.ts", out: "host.js" }];
const DEFAULT_WORKERS: readonly string[] = ["aio/iothread_worker.ts", "aio/thread_pool_worker.ts"];

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      outdir: { type: "string" },
      entry: { type: "string", multiple: true },
      worker: { type: "string", multiple: true },
      minify: { type: "boolean", default: false },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(
      "usage: deno task build [--outdir dist] [--entry src.ts[=out.js]]... [--worker src.ts]... [--minify]",
    );
    return 0;
  }
  const fromRepo = (p: string) => (isAbsolute(p) ? p : join(REPO_ROOT, p));
  const explicit = values.entry !== undefined;
  const entries = (values.entry ?? DEFAULT_ENTRIES.map((e) => `${e.entry}=${e.out}`)).map(
    (spec) => {
      const [entry, out] = spec.split("=");
      return { entry: explicit ? resolve(entry) : fromRepo(entry), out };
    },
  );
  const workers = values.worker?.map((w) => resolve(w)) ??
    (explicit ? [] : DEFAULT_WORKERS.map(fromRepo));
  const present = (p: string, what: string) => {
    if (exists(p)) return true;
    console.warn(`build: skipping missing ${what} ${relative(Deno.cwd(), p)}`);
    return false;
  };
  const outdir = values.outdir !== undefined ? resolve(values.outdir) : fromRepo("dist");
  const built = await buildBundles({
    entries: entries.filter((e) => present(e.entry, "entry")),
    workers: workers.filter((w) => present(w, "worker entry")),
    outdir,
    minify: values.minify,
  });
  for (const b of built) {
    console.log(
      `build: ${relative(Deno.cwd(), b.entry)} -> ${
        relative(Deno.cwd(), b.outfile)
      } (${b.bytes} bytes)`,
    );
  }
  if (built.length === 0) console.warn("build: nothing to build");
  return 0;
}

if (import.meta.main) {
  try {
    Deno.exitCode = await main();
  } finally {
    await esbuild.stop();
  }
}
