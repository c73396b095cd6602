#!/usr/bin/env bash
# Install MathJax 3 with npm into an ignored folder, so the book renders its math offline.
# Usage: tools/mathjax.sh DEST   (DEST gets tex-chtml.js and the files it loads)
set -euo pipefail
dest=$1
if ! command -v npm >/dev/null; then
  echo "npm is needed to install MathJax for the book (install Node.js, then retry)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
npm install --prefix "$work" --no-audit --no-fund --silent mathjax@3 >/dev/null
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
cp -r "$work/node_modules/mathjax/es5" "$dest"
cp "$work/node_modules/mathjax/LICENSE" "$dest/LICENSE"
echo "MathJax $(node -p "require('$work/node_modules/mathjax/package.json').version") installed in $dest"
