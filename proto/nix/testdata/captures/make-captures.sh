#!/bin/sh
# Record real Nix 2.8 client <-> server conversations through nix-proxy.py.
# Usage: make-captures.sh [OUT_DIR] ; needs root (mount namespaces), nix 2.8 in /usr/bin.
# Every actor has its own /nix: the client runs in one mount namespace, the
# proxy starts the server in another one (see nix-proxy.py).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE}
WORK=$(mktemp -d /tmp/nix-captures.XXXXXX)
PROXY=$HERE/nix-proxy.py
SYSTEM=x86_64-linux

mkroot() {
    mkdir -p "$1/nix/store" "$1/nix/var/nix" "$1/conf"
    cat > "$1/conf/nix.conf" <<CONF
sandbox = false
substituters =
build-users-group =
experimental-features = nix-command
CONF
}

# run ROOT CMD...: CMD with ROOT/nix on /nix and ROOT/conf as NIX_CONF_DIR
run() {
    root=$1; shift
    unshare --mount sh -c 'mount --bind "$0/nix" /nix && NIX_CONF_DIR="$0/conf" exec "$@"' "$root" "$@"
}

cat > "$WORK/test.nix" <<'NIX'
{ salt ? "" }:
let
  dep = derivation {
    name = "capdep"; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo dep ${salt} > $out" ];
  };
  src = builtins.toFile "capsrc.txt" "source file\n";
in derivation {
  name = "capture-test"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo building ${salt} >&2; /bin/cat ${src} ${dep} > $out; echo ${dep} >> $out" ];
}
NIX

# scenario NAME: fresh client and server roots; sets C, S, URL vars
scenario() {
    name=$1; C=$WORK/$name/client; S=$WORK/$name/server
    mkroot "$C"; mkroot "$S"
    export CAPTURE_PREFIX="$OUT/$name" SERVER_ROOT="$S"
    rm -f "$OUT/$name".*
}

# --- serve protocol (ssh://) ---
scenario serve-build-hook
run "$C" nix-build --no-out-link --max-jobs 0 --builders "ssh://localhost?remote-program=$PROXY $SYSTEM" "$WORK/test.nix" --argstr salt serve-hook

scenario serve-copy
P=$(echo "to serve" > "$WORK/f1" && run "$C" nix-store --add "$WORK/f1")
run "$C" nix copy --to "ssh://localhost?remote-program=$PROXY" "$P"
Q=$(echo "from serve" > "$WORK/f2" && run "$S" nix-store --add "$WORK/f2")
run "$C" nix copy --no-check-sigs --from "ssh://localhost?remote-program=$PROXY" "$Q"
run "$C" nix store ping --store "ssh://localhost?remote-program=$PROXY"

# --- worker protocol (ssh-ng://) ---
scenario worker-build-hook
run "$C" nix-build --no-out-link --max-jobs 0 --builders "ssh-ng://localhost?remote-program=$PROXY $SYSTEM" "$WORK/test.nix" --argstr salt worker-hook

scenario worker-copy
OUTP=$(run "$C" nix-build --no-out-link "$WORK/test.nix" --argstr salt worker-copy)
run "$C" nix copy --no-check-sigs --to "ssh-ng://localhost?remote-program=$PROXY" "$OUTP"
Q=$(echo "from daemon" > "$WORK/f3" && run "$S" nix-store --add "$WORK/f3")
run "$C" nix copy --no-check-sigs --from "ssh-ng://localhost?remote-program=$PROXY" "$Q"
run "$C" nix path-info --store "ssh-ng://localhost?remote-program=$PROXY" -r "$OUTP"
run "$C" nix store ping --store "ssh-ng://localhost?remote-program=$PROXY"

scenario worker-store-build
run "$C" nix build --no-link --store "ssh-ng://localhost?remote-program=$PROXY" --eval-store auto -f "$WORK/test.nix" --argstr salt store-build

rm -rf "$WORK"
ls -l "$OUT"
