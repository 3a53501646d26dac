#!/bin/sh
# Refreshes viewer/vendor/novnc from the npm package @novnc/novnc.
#   viewer/vendor/update-novnc.sh            # the pinned version below
#   viewer/vendor/update-novnc.sh 1.7.0      # another exact version
# Only what a browser loads is copied: the ES modules in core/, the pako
# inflate/deflate modules they import, and the licences.
set -eu
VERSION="${1:-1.7.0}"
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/novnc"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

npm install --no-audit --no-fund --ignore-scripts --prefix "$tmp" "@novnc/novnc@$VERSION" >/dev/null
src="$tmp/node_modules/@novnc/novnc"
got="$(node -p "require('$src/package.json').version")"
[ "$got" = "$VERSION" ] || { echo "expected @novnc/novnc $VERSION, got $got" >&2; exit 1; }

rm -rf "$dest"
mkdir -p "$dest/docs" "$dest/vendor"
cp -R "$src/core" "$dest/core"
cp -R "$src/vendor/pako" "$dest/vendor/pako"
cp "$src/LICENSE.txt" "$src/AUTHORS" "$dest/"
cp "$src"/docs/LICENSE.* "$dest/docs/"
rm -f "$dest/vendor/pako/README.md"
echo "$VERSION" > "$dest/VERSION"
echo "vendored @novnc/novnc $VERSION into $dest"
node "$here/preload-links.mjs"
