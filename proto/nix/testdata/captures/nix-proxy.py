#!/usr/bin/env python3
"""Logging proxy between a Nix client and a real Nix server, for protocol captures.

Nix runs this as the `remote-program` of `ssh://localhost` (with `--serve --write`)
or `ssh-ng://localhost` (with `--stdio`). It starts the real server
(`nix-store --serve --write` or `nix-daemon --stdio`) in a new mount namespace
where `$SERVER_ROOT/nix` is bound on `/nix` and `NIX_CONF_DIR=$SERVER_ROOT/conf`,
then relays bytes both ways, appending each direction of each connection to
`$CAPTURE_PREFIX.<n>.c2s` / `.s2c` (and the server's stderr to `.err`), where
<n> numbers the connections in the order they were opened.
"""
import os, subprocess, sys, threading

prefix = os.environ["CAPTURE_PREFIX"]
root = os.environ["SERVER_ROOT"]
args = sys.argv[1:]
if "--serve" in args:
    server = "nix-store --serve --write"
elif "--stdio" in args:
    server = "nix-daemon --stdio"
else:
    sys.exit("nix-proxy: expected --serve or --stdio, got %r" % args)

# Pick the next free connection number (atomically, by exclusive create).
n = 0
while True:
    try:
        fd = os.open("%s.%d.c2s" % (prefix, n), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        break
    except FileExistsError:
        n += 1
c2s = os.fdopen(fd, "wb")
s2c = open("%s.%d.s2c" % (prefix, n), "wb")
err = open("%s.%d.err" % (prefix, n), "wb")

env = dict(os.environ, NIX_CONF_DIR=root + "/conf")
env.pop("NIX_REMOTE", None)
child = subprocess.Popen(
    ["unshare", "--mount", "sh", "-c", 'mount --bind "$0/nix" /nix && exec ' + server, root],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0)

def pump(src, dst, log, close_dst):
    while True:
        data = os.read(src, 65536)
        if not data:
            break
        log.write(data); log.flush()
        try:
            while data:
                data = data[os.write(dst, data):]
        except BrokenPipeError:
            break
    close_dst()

t_in = threading.Thread(target=pump, args=(0, child.stdin.fileno(), c2s, child.stdin.close), daemon=True)
t_err = threading.Thread(target=pump, args=(child.stderr.fileno(), 2, err, lambda: None), daemon=True)
t_in.start(); t_err.start()
pump(child.stdout.fileno(), 1, s2c, lambda: os.close(1))
child.wait(); t_err.join(timeout=5)
for f in (c2s, s2c, err):
    f.flush()
sys.exit(child.returncode or 0)
