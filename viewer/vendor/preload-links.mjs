// Rewrites the modulepreload links in viewer/index.html (between the
// "modulepreload:start" and "modulepreload:end" comments) from the static
// import graph of the page's entry modules, so the browser fetches every
// module at once instead of one import level after another.
//   node viewer/vendor/preload-links.mjs
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const viewer = join(dirname(fileURLToPath(import.meta.url)), '..');
const entries = ['src/sandcast-viewer.js', 'src/viewer.js'];
const seen = new Set();
const walk = (file) => {
  if (seen.has(file)) return;
  seen.add(file);
  const src = readFileSync(join(viewer, file), 'utf8');
  for (const m of src.matchAll(/^\s*(?:import|export)\s[^'"]*?from\s+['"](\.[^'"]+)['"]/gm)) {
    walk(relative(viewer, join(viewer, dirname(file), m[1])));
  }
};
entries.forEach(walk);
const links = [...seen].filter((f) => !entries.includes(f)).sort()
  .map((f) => `  <link rel="modulepreload" href="/assets/${f}">`).join('\n');
const index = join(viewer, 'index.html');
const html = readFileSync(index, 'utf8');
const re = /<!-- modulepreload:start -->[\s\S]*?<!-- modulepreload:end -->/;
if (!re.test(html)) throw new Error(`${index} has no modulepreload:start/end markers`);
writeFileSync(index, html.replace(re, () => `<!-- modulepreload:start -->\n${links}\n  <!-- modulepreload:end -->`));
console.log(`${seen.size - entries.length} modulepreload links written to ${index}`);
