#!/usr/bin/env python3
"""Checks what eval.nix produced (see ../check.sh) and renders docs/options.md.

Usage: check.py EVAL_JSON STORE_ROOT DOCS_OUT [--contract-only]

- every farm service's command line (systemd ExecStart, launchd
  ProgramArguments) is taken apart and run against the real binary with
  `--help` appended: clap parses (and value-checks) every argument before it
  reaches `--help`, so exit status 0 means the binary accepts them all; the
  flag names must also appear in the binary's own `--help` text.
- the generated TOML and key files (read back from the throw-away store) hold
  exactly what the options said, under keys the binary knows.
- the client's nix.buildMachines entry, rendered as NixOS renders
  /etc/nix/machines, equals the line `farm machines` prints for the same
  builders (computed here independently, from the format in the design), and
  its substituter settings are there.
- the configurations that must be refused are refused by an assertion.
"""

import base64
import json
import os
import re
import subprocess
import sys
import tomllib

FAILURES = []


def check(cond, what):
    print(("ok    " if cond else "FAIL  ") + what)
    if not cond:
        FAILURES.append(what)
    return cond


# ----------------------------------------------------------- systemd words
def systemd_words(line, unit):
    """Split an ExecStart= value the way systemd does for what the modules
    emit: double-quoted words with C escapes, bare words, `%%`/`%d`
    specifiers and `$$`. Anything else systemd would expand is an error."""
    words, i, n = [], 0, len(line)
    while i < n:
        if line[i].isspace():
            i += 1
            continue
        word = []
        if line[i] == '"':
            i += 1
            while i < n and line[i] != '"':
                if line[i] == "\\":
                    esc = line[i + 1]
                    word.append({"n": "\n", "t": "\t", "\\": "\\", '"': '"'}[esc])
                    i += 2
                else:
                    word.append(line[i])
                    i += 1
            if i >= n:
                raise ValueError("unterminated quote in ExecStart")
            i += 1
        else:
            while i < n and not line[i].isspace():
                word.append(line[i])
                i += 1
        words.append(expand(''.join(word), unit))
    return words


def expand(word, unit):
    out, i = [], 0
    while i < len(word):
        c = word[i]
        if c in "%$":
            nxt = word[i + 1] if i + 1 < len(word) else ""
            if nxt == c:
                out.append(c)
            elif c == "%" and nxt == "d":
                out.append(f"/run/credentials/{unit}.service")
            else:
                raise ValueError(f"unescaped {c}{nxt} in ExecStart word {word!r}")
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


# ----------------------------------------------------------- binaries
# Fallback when the binaries are not built: the flags the design and the
# helpers' contracts (COORD.md, the coordinator's and builder's config.rs as
# they were written) name. Used only with --contract-only, and said so.
CONTRACT_FLAGS = {
    "farm-coordinator": {
        "--config", "--state-dir", "--grpc", "--http", "--ssh", "--public-host",
        "--cache-key-name", "--cache-key-file", "--authorized-keys", "--admin-keys",
        "--read-keys", "--push-keys",
        "--builder-keys", "--tls", "--tls-cert", "--tls-key", "--zstd-level",
        "--builder-grace", "--max-retries", "--cache-dir", "--cache-priority",
        "--insecure-plaintext", "--unschedulable-wait", "--recent-builder-window",
    },
    "farm-builder": {
        "--config", "--coordinator", "--state-dir", "--key", "--name", "--max-jobs",
        "--speed-factor", "--system", "--feature", "--mandatory-feature", "--ca-cert",
        "--load-interval", "--nix-bin-dir",
    },
}
HELP_CACHE = {}


def help_flags(binary, contract_only):
    name = os.path.basename(binary)
    if binary in HELP_CACHE:
        return HELP_CACHE[binary]
    if not os.path.exists(binary):
        if contract_only:
            HELP_CACHE[binary] = ("contract", CONTRACT_FLAGS[name])
        else:
            check(False, f"{name}: binary {binary} exists (build it, or pass --contract-only)")
            HELP_CACHE[binary] = ("missing", set())
        return HELP_CACHE[binary]
    out = run([binary, "--help"])
    flags = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", out.stdout))
    check(out.returncode == 0 and len(flags) > 3,
          f"{name} --help exits 0 and lists its flags ({len(flags)} found)")
    HELP_CACHE[binary] = ("binary", flags)
    return HELP_CACHE[binary]


def run(argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})


def check_command(label, argv, contract_only):
    binary = argv[0]
    name = os.path.basename(binary)
    source, known = help_flags(binary, contract_only)
    used = [a for a in argv[1:] if a.startswith("--")]
    unknown = sorted(set(used) - known)
    check(not unknown and source != "missing",
          f"{label}: flags {sorted(set(used))} are all in {name}'s "
          + {"binary": "--help", "contract": "contract list (NOT the real binary)",
             "missing": "--help (binary missing)"}[source]
          + (f"; unknown: {unknown}" if unknown else ""))
    if source == "binary":
        res = run(argv + ["--help"])
        check(res.returncode == 0,
              f"{label}: `{name} <the service's arguments> --help` accepts every argument"
              + ("" if res.returncode == 0 else f": {res.stderr.strip()[:400]}"))
    return known


def check_config_file(label, argv, settings, known, store_root):
    if "--config" not in argv:
        check(settings == {}, f"{label}: no --config file, and no settings")
        return
    path = argv[argv.index("--config") + 1]
    with open(store_root + path, "rb") as f:
        parsed = tomllib.load(f)
    check(parsed == settings, f"{label}: {os.path.basename(path)} parses as TOML and equals the settings option")
    flags = {"--" + k for k, v in parsed.items() if not isinstance(v, dict)}
    check(flags <= known, f"{label}: TOML keys {sorted(parsed)} are the binary's long flag names")


# ----------------------------------------------------------- machines line
def farm_machines_line(host, host_key, builders, protocol="ssh-ng"):
    """The line `farm machines` prints (format from the design):
    `ssh-ng://HOST SYSTEMS - MAXJOBS SPEED FEATURES MANDATORY BASE64HOSTKEY`,
    over every builder's advertisement."""
    bs = list(builders.values())
    systems = sorted({s for b in bs for s in b["systems"]})
    max_jobs = sum(b["maxJobs"] for b in bs)
    speed = max([1] + [b["speedFactor"] for b in bs])
    mandatory = set(bs[0]["mandatoryFeatures"]) if bs else set()
    for b in bs[1:]:
        mandatory &= set(b["mandatoryFeatures"])
    features = sorted({f for b in bs for f in b["supportedFeatures"] + b["mandatoryFeatures"]})
    csv = lambda xs: ",".join(xs) if xs else "-"
    key = base64.b64encode(host_key.encode()).decode() if host_key else "-"
    return " ".join([f"{protocol}://{host}", csv(systems), "-", str(max_jobs), str(speed),
                     csv(features), csv(sorted(mandatory)), key])


def nixos_machines_line(m):
    """/etc/nix/machines as NixOS writes one nix.buildMachines entry."""
    proto = f"{m['protocol']}://" if m["protocol"] else ""
    user = f"{m['sshUser']}@" if m["sshUser"] else ""
    systems = m["system"] if m["system"] else (",".join(m["systems"]) if m["systems"] else "-")
    feats = m["supportedFeatures"] + m["mandatoryFeatures"]
    return " ".join([proto + user + m["hostName"], systems, m["sshKey"] or "-", str(m["maxJobs"]),
                     str(m["speedFactor"]), ",".join(feats) if feats else "-",
                     ",".join(m["mandatoryFeatures"]) or "-", m["publicHostKey"] or "-"])


def fields_as_sets(line):
    return [set(f.split(",")) if i in (1, 5, 6) else f for i, f in enumerate(line.split(" "))]


# ----------------------------------------------------------- hosts
def check_nixos_host(host, h, store_root, contract_only):
    check(h["failedAssertions"] == [], f"{host}: no failed assertions {h['failedAssertions']}")
    for unit, u in sorted(h["services"].items()):
        sc = u["serviceConfig"]
        label = f"{host}: {unit}.service"
        argv = systemd_words(sc["ExecStart"], unit)
        known = check_command(label, argv, contract_only)
        kind = "coordinator" if "coordinator" in unit else "builder"
        check_config_file(label, argv, h["settings"][kind], known, store_root)
        creds = {c.split(":", 1)[0] for c in sc.get("LoadCredential", [])}
        cred_dir = f"/run/credentials/{unit}.service/"
        used = {a[len(cred_dir):] for a in argv if a.startswith(cred_dir)}
        check(used == creds, f"{label}: credentials used {sorted(used)} are the ones loaded {sorted(creds)}")
        check(sc["User"] not in ("root", None) and u["user"] and u["user"]["isSystemUser"],
              f"{label}: runs as its own system user {sc['User']}")
        check(sc["StateDirectory"] and sc["ProtectSystem"] == "strict" and sc["NoNewPrivileges"]
              and sc["ProtectHome"] and sc["PrivateTmp"] and sc["PrivateDevices"],
              f"{label}: StateDirectory={sc['StateDirectory']}, ProtectSystem=strict, NoNewPrivileges, ProtectHome, PrivateTmp, PrivateDevices")
        for kf, keys in sorted(h["keys"].items()):
            flag = "--" + kf.replace("_", "-")
            if keys:
                with open(store_root + argv[argv.index(flag) + 1]) as f:
                    check(f.read().splitlines() == keys, f"{label}: {flag} file holds exactly the {len(keys)} {kf}")
            else:
                check(flag not in argv, f"{label}: no {flag} when none are configured")


def check_client(host, c, expected, farm_host, host_key):
    check(len(c["buildMachines"]) == 1 and c["distributedBuilds"], f"{host}: one build machine, distributedBuilds on")
    m = c["buildMachines"][0]
    line = nixos_machines_line(m)
    print(f"      {host} /etc/nix/machines:  {line}")
    if m["sshKey"] is None:
        check(line == expected, f"{host}: machines line is byte-identical to `farm machines`")
    else:
        want, got = fields_as_sets(expected), fields_as_sets(line)
        want[2] = m["sshKey"]
        check(got == want, f"{host}: machines line equals `farm machines` but for its own ssh key {m['sshKey']}")
    if host_key:
        check(base64.b64decode(m["publicHostKey"]).decode() == host_key,
              f"{host}: publicHostKey is base64 of the coordinator's host key line")
        check(any(k["publicKey"] == host_key for k in c["knownHosts"].values()), f"{host}: host key in known hosts")
    s = c["nixSettings"]
    check(s["substituters"] == [f"http://{farm_host}:7080"], f"{host}: farm cache is a substituter {s['substituters']}")
    check(len(s["trusted-public-keys"]) == 1 and re.fullmatch(r"[^:]+:[A-Za-z0-9+/]{43}=", s["trusted-public-keys"][0]),
          f"{host}: farm cache key trusted {s['trusted-public-keys']}")
    check(s.get("builders-use-substitutes") is True, f"{host}: builders-use-substitutes = true")
    check(f"Host {farm_host}\n  Port 7022\n  HostKeyAlias {farm_host}\n" in c["sshConfig"],
          f"{host}: ssh_config sends {farm_host} to port 7022")


# ----------------------------------------------------------- docs
def render_value(v):
    if isinstance(v, dict) and v.get("_type") in ("literalExpression", "literalMD"):
        text = v["text"].strip()
        if v["_type"] == "literalMD":
            return text.replace("\n", " ")
        return f"`{text}`" if "\n" not in text else f"\n\n```nix\n{text}\n```\n"
    return f"`{json.dumps(v)}`"


def render_docs(docs, repo):
    out = ["# nix-farm module options",
           "",
           "Generated by `nixos-modules/check.sh` from the option declarations; do not edit.",
           "",
           "NixOS: `imports = [ nix-farm.nixosModules.default ];` (or `.coordinator`,",
           "`.builder`, `.client`). nix-darwin: `nix-farm.darwinModules.builder`.",
           ""]
    for title, opts in (("NixOS", docs["nixos"]), ("nix-darwin", docs["darwin"])):
        out += [f"## {title}", ""]
        for o in sorted(opts, key=lambda o: o["loc"]):
            desc = re.sub(r"\{(option|file|command|env|var)\}`", "`", o["description"].strip())
            out += [f"### `{o['name']}`", "", desc, ""]
            out.append(f"- Type: {o['type']}")
            if "default" in o:
                out.append(f"- Default: {render_value(o['default'])}")
            if "example" in o:
                out.append(f"- Example: {render_value(o['example'])}")
            decl = [os.path.relpath(d, repo) for d in o["declarations"]]
            out += [f"- Declared in: {', '.join(f'`{d}`' for d in decl)}", ""]
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------- main
def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    contract_only = "--contract-only" in sys.argv
    eval_json, store_root, docs_out = args
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(eval_json) as f:
        d = json.load(f)

    print("== services")
    for host, h in sorted(d["nixos"].items()):
        check_nixos_host(host, h, store_root, contract_only)

    mac = d["darwin"]["mac"]
    sc = mac["launchd"]["nix-farm-builder"]["serviceConfig"]
    check(mac["failedAssertions"] == [], "mac: no failed assertions")
    known = check_command("mac: launchd nix-farm-builder", sc["ProgramArguments"], contract_only)
    check_config_file("mac: launchd nix-farm-builder", sc["ProgramArguments"], mac["settings"]["builder"], known, store_root)
    check(sc["KeepAlive"] and sc["RunAtLoad"], "mac: launchd daemon starts at boot and is kept alive")
    check("big-parallel" in mac["nixSettings"]["system-features"], "mac: advertised features are in nix system-features")

    print("== client: nix.buildMachines and substituters")
    expected = farm_machines_line(d["farmHost"], d["farmHostKey"], d["advertised"])
    print("      farm machines (expected): " + expected)
    for host in ("client", "client-hostkey"):
        check_client(host, d["nixos"][host], expected, d["farmHost"], d["farmHostKey"])

    print("== flake.nix: the VM test's nodes (nixos-modules/tests/farm.nix)")
    vm = d["vmTest"]
    check(sorted(vm["nodes"]) == ["builder1", "builder2", "client", "coordinator"],
          f"VM test has a coordinator, two builders and a client: {sorted(vm['nodes'])}")
    for host, h in sorted(vm["nodes"].items()):
        check_nixos_host("vm " + host, h, store_root, contract_only)
    expected = farm_machines_line("coordinator", None, vm["advertised"])
    print("      farm machines (expected): " + expected)
    check_client("vm client", vm["nodes"]["client"], expected, "coordinator", None)
    check(vm["clientEtc"]["nix-farm/client_ed25519"]["mode"] == "0600", "vm client: its SSH key is copied out of the store, mode 0600")

    print("== flake.nix: nixosModules.default, darwinModules.builder")
    fm = d["flakeModules"]
    for unit, u in sorted(fm["nixos"]["services"].items()):
        argv0 = systemd_words(u["serviceConfig"]["ExecStart"], unit)[0]
        check(argv0.startswith(d["packageDir"] + "/bin/"), f"nixosModules.default: {unit} runs the flake's package ({argv0})")
    check(sorted(fm["nixos"]["services"]) == ["nix-farm-builder", "nix-farm-coordinator"],
          "nixosModules.default: coordinator and builder services")
    check(fm["darwin"][0] == d["packageDir"] + "/bin/farm-builder", f"darwinModules.builder runs the flake's package ({fm['darwin'][0]})")

    print("== configurations that must be refused")
    for name, failed in sorted(d["refused"].items()):
        check(len(failed) > 0, f"{name}: refused ({'; '.join(x.strip() for x in failed)})")

    print("== docs")
    for title, opts in d["docs"].items():
        for o in opts:
            if not o.get("description") or o.get("type") in (None, "unspecified"):
                check(False, f"{o['name']}: has a type and a description")
        check(len(opts) > 10, f"{title}: {len(opts)} options documented, each with type and description")
    text = render_docs(d["docs"], repo)
    old = open(docs_out).read() if os.path.exists(docs_out) else None
    with open(docs_out, "w") as f:
        f.write(text)
    print(f"      {os.path.relpath(docs_out, repo)}: " + ("unchanged" if old == text else "REWRITTEN (commit it)"))

    if contract_only:
        print("NOTE: --contract-only: flags were checked against the contract list, not real binaries")
    print(f"\n{len(FAILURES)} failure(s)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
