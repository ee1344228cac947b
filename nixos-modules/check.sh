#!/usr/bin/env bash
# Check the nix-farm NixOS / nix-darwin modules with nixpkgs' own module system
# and the real farm binaries, and regenerate docs/options.md.
#
#   nixos-modules/check.sh NIXPKGS_LIB_DIR [--bin-dir DIR] [--contract-only]
#
# NIXPKGS_LIB_DIR  the `lib` directory of nixpkgs (or of
#                  github:nix-community/nixpkgs.lib); not part of this repo.
# --bin-dir DIR    where farm-coordinator and farm-builder are
#                  (default: $CARGO_TARGET_DIR/debug, else target/debug).
# --contract-only  check flags against the documented contract when the
#                  binaries are not built (says so in its output).
#
# Every .nix file is parsed first (what CI runs without nixpkgs, see
# tests/tests/nix_modules.rs). Evaluation uses a throw-away chroot store under
# a temporary directory: nothing touches /nix.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"

if [ $# -lt 1 ]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
lib_dir="$(cd "$1" && pwd)"
shift
bin_dir="${CARGO_TARGET_DIR:-$repo/target}/debug"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --contract-only) extra+=(--contract-only); shift ;;
    *) echo "check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -f "$lib_dir/modules.nix" ] || { echo "check.sh: $lib_dir is not a nixpkgs lib directory" >&2; exit 2; }

tmp="$(mktemp -d)"
trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
mkdir -p "$tmp/store" "$tmp/conf" "$tmp/package/bin"
# No host nix.conf, no channels, no substituters.
export NIX_CONF_DIR="$tmp/conf" NIX_PATH= HOME="$tmp"
printf 'substituters =\nexperimental-features =\n' > "$tmp/conf/nix.conf"

echo "== parse: nix-instantiate --parse on every .nix file"
count=0
while IFS= read -r -d '' f; do
  nix-instantiate --store dummy:// --parse "$f" > /dev/null
  echo "ok    ${f#"$repo"/}"
  count=$((count + 1))
done < <(find "$repo" \( -name target -o -name .git \) -prune -o -name '*.nix' -type f -print0 | sort -z)
echo "      $count files parsed"

# The package the modules point at: a directory with the real binaries.
for b in farm-coordinator farm-builder farm; do
  if [ -x "$bin_dir/$b" ]; then ln -s "$(cd "$bin_dir" && pwd)/$b" "$tmp/package/bin/$b"; fi
done
echo "== eval: lib.evalModules from $lib_dir ($(nix-instantiate --store dummy:// --eval -E "(import $lib_dir).version" 2>/dev/null || echo '?'))"
echo "      binaries from $bin_dir: $(ls "$tmp/package/bin" | tr '\n' ' ')"
nix-instantiate --store "$tmp/store" --read-write-mode --eval --strict --json \
  "$here/check/eval.nix" \
  --arg nixpkgsLib "$lib_dir" \
  --argstr packageDir "$tmp/package" \
  --argstr nixDir "$(dirname "$(dirname "$(command -v nix-store)")")" \
  > "$tmp/eval.json"

python3 "$here/check/check.py" "$tmp/eval.json" "$tmp/store" "$repo/docs/options.md" "${extra[@]}"
