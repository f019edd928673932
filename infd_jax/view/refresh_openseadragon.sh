#!/usr/bin/env bash
# Replaces the vendored OpenSeadragon (static/openseadragon/) with a release from the
# npm registry: its built openseadragon.min.js, button images and licence.
# Usage: bash infd_jax/view/refresh_openseadragon.sh [VERSION]   (needs npm)
set -euo pipefail
version="${1:-6.1.1}"
dest="$(cd "$(dirname "$0")" && pwd)/static/openseadragon"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "openseadragon@$version" > /dev/null && tar xzf ./*.tgz)
build="$work/package/build/openseadragon"
rm -rf "$dest/images"
mkdir -p "$dest/images"
cp "$build/openseadragon.min.js" "$dest/"
cp "$build/images/"*.png "$dest/images/"
cp "$work/package/LICENSE.txt" "$dest/"
sed -i "s/^Version: .*/Version: $version/" "$dest/README.md"
echo "OpenSeadragon $version in $dest"
