//! The options prefix of an `authorized_keys` line, as OpenSSH defines it
//! (`sshd(8)`, AUTHORIZED_KEYS FILE FORMAT), and what the farm makes of each.
//!
//! Nix users copy these lines from their own `~/.ssh/authorized_keys`, so an
//! option is either honoured or refused loudly (a parse error naming the file
//! and line); none is ever silently ignored:
//!
//! - `from="pattern-list"`: the key is accepted only from the client
//!   addresses the list admits (SSH and gRPC alike). Patterns are addresses,
//!   `*`/`?` wildcards over them, or CIDR blocks, each optionally negated with
//!   `!` (a matching negated pattern refuses). Host names are refused: the
//!   farm never resolves names (sshd with `UseDNS no`, its default, matches
//!   addresses only too).
//! - `command="…"`: the key may run only that Nix program over SSH
//!   (`nix-store --serve [--write]` or `nix-daemon --stdio`, the commands the
//!   farm's endpoint runs), whatever the client asks for; such a key is not
//!   accepted for the CLI's gRPC calls. Any other command is refused.
//! - `restrict`, `no-pty`, `no-port-forwarding`, `no-agent-forwarding`,
//!   `no-X11-forwarding`, `no-user-rc`: honoured by construction; the farm
//!   offers no terminal, forwarding or rc files to anybody.
//! - Anything else (`permitopen`, `environment`, `cert-authority`, `pty`, …)
//!   is refused: it would grant or restrict something the farm cannot do.

use std::net::IpAddr;

/// What an entry's options ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyOptions {
    /// `from=`: the address patterns, in order (`None`: any address).
    pub from: Option<Vec<AddressPattern>>,
    /// `command=`: the only program this key may run (the command as written).
    pub command: Option<String>,
    /// `restrict` was given.
    pub restrict: bool,
}

/// One pattern of a `from=` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPattern {
    /// `!pattern`: a match refuses.
    pub negated: bool,
    pub kind: PatternKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternKind {
    /// An address with `*` / `?` wildcards (or none), matched on its text.
    Glob(String),
    /// A CIDR block.
    Cidr { network: IpAddr, prefix: u8 },
}

/// Options that change nothing here (the farm offers none of what they forbid).
const NO_OPS: &[&str] = &[
    "no-pty",
    "no-port-forwarding",
    "no-agent-forwarding",
    "no-x11-forwarding",
    "no-user-rc",
];

impl KeyOptions {
    /// Parse an options prefix (the text before the key type).
    pub fn parse(text: &str) -> Result<KeyOptions, String> {
        let mut out = KeyOptions::default();
        for opt in split_commas(text)? {
            let (name, value) = match opt.find('=') {
                Some(i) => (&opt[..i], Some(unquote(&opt[i + 1..])?)),
                None => (opt, None),
            };
            let lname = name.to_ascii_lowercase();
            match (lname.as_str(), value) {
                ("restrict", None) => out.restrict = true,
                (n, None) if NO_OPS.contains(&n) => {}
                ("from", Some(v)) => {
                    if out.from.is_some() {
                        return Err("from= given twice".into());
                    }
                    out.from = Some(parse_from(&v)?);
                }
                ("command", Some(v)) => {
                    if out.command.is_some() {
                        return Err("command= given twice".into());
                    }
                    out.command = Some(v);
                }
                _ => {
                    return Err(format!(
                        "option {name:?} is not supported by nix-farm (it honours from=, command= naming a Nix program, restrict and the no-* options); remove it"
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Whether a client at `peer` may use the key (`None`: the address is
    /// unknown, e.g. a Unix socket; only a key without `from=` is accepted).
    pub fn admits(&self, peer: Option<IpAddr>) -> bool {
        let Some(patterns) = &self.from else {
            return true;
        };
        let Some(peer) = peer else {
            return false;
        };
        let peer = peer.to_canonical();
        let mut admitted = false;
        for p in patterns {
            if p.matches(peer) {
                if p.negated {
                    return false;
                }
                admitted = true;
            }
        }
        admitted
    }
}

impl AddressPattern {
    fn matches(&self, peer: IpAddr) -> bool {
        match &self.kind {
            PatternKind::Glob(g) => glob_match(g.as_bytes(), peer.to_string().as_bytes()),
            PatternKind::Cidr { network, prefix } => in_block(peer, *network, *prefix),
        }
    }
}

fn parse_from(list: &str) -> Result<Vec<AddressPattern>, String> {
    let mut out = Vec::new();
    for raw in list.split(',') {
        let (negated, p) = match raw.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, raw),
        };
        if p.is_empty() {
            return Err(format!("from={list:?}: an empty pattern"));
        }
        let kind = if let Some((addr, bits)) = p.split_once('/') {
            let network: IpAddr = addr
                .parse()
                .map_err(|_| format!("from=: {p:?} is not an address/prefix block"))?;
            let max = if network.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = bits
                .parse()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("from=: {p:?} has a bad prefix length"))?;
            PatternKind::Cidr {
                network: network.to_canonical(),
                prefix,
            }
        } else if p
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'*' | b'?'))
            && (p.contains('.') || p.contains(':') || p.bytes().all(|b| b == b'*' || b == b'?'))
        {
            PatternKind::Glob(p.to_ascii_lowercase())
        } else {
            return Err(format!(
                "from=: {p:?} is a host name; nix-farm matches client addresses only (it does not resolve names): use an address, a wildcard over one, or a CIDR block"
            ));
        };
        out.push(AddressPattern { negated, kind });
    }
    Ok(out)
}

/// `*` any run, `?` one character.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = t;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

fn in_block(peer: IpAddr, network: IpAddr, prefix: u8) -> bool {
    match (peer, network) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Split at commas outside double quotes.
fn split_commas(text: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err("unterminated quote in the options".into());
    }
    out.push(&text[start..]);
    if out.iter().any(|o| o.is_empty()) {
        return Err("an empty option".into());
    }
    Ok(out)
}

/// `"value"` with `\"` escapes (a bare value is taken as is).
fn unquote(v: &str) -> Result<String, String> {
    let Some(inner) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return Err(format!("option value {v:?} must be in double quotes"));
    };
    Ok(inner.replace("\\\"", "\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn options_are_honoured_or_refused() {
        let o = KeyOptions::parse(r#"restrict,from="10.0.0.0/8,!10.1.2.3,192.168.1.*",command="nix-daemon --stdio",no-pty"#).unwrap();
        assert!(o.restrict);
        assert_eq!(o.command.as_deref(), Some("nix-daemon --stdio"));
        assert!(o.admits(ip("10.9.9.9")));
        assert!(!o.admits(ip("10.1.2.3")), "negated");
        assert!(o.admits(ip("192.168.1.40")));
        assert!(!o.admits(ip("192.168.2.40")));
        assert!(!o.admits(ip("127.0.0.1")));
        assert!(!o.admits(None), "an unknown address never passes from=");
        assert!(o.admits(ip("::ffff:10.0.0.1")), "mapped v4 is v4");
        let any = KeyOptions::parse("no-agent-forwarding").unwrap();
        assert!(any.admits(None) && any.command.is_none() && !any.restrict);
        let v6 = KeyOptions::parse(r#"from="::1,fd00::/8""#).unwrap();
        assert!(v6.admits(ip("::1")) && v6.admits(ip("fd12::5")) && !v6.admits(ip("fe80::1")));
        for bad in [
            r#"permitopen="x:1""#,
            r#"environment="A=b""#,
            "cert-authority",
            r#"from="*.example.com""#,
            r#"from="laptop""#,
            r#"from="10.0.0.0/33""#,
            "from=10.0.0.1",
            r#"command="a",command="b""#,
            r#"from="10.0.0.1"#,
            "restrict,,no-pty",
        ] {
            assert!(KeyOptions::parse(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"*", b"1.2.3.4"));
        assert!(glob_match(b"1.2.3.?", b"1.2.3.4"));
        assert!(!glob_match(b"1.2.3.?", b"1.2.3.44"));
        assert!(glob_match(b"1.*.4", b"1.2.3.4"));
        assert!(!glob_match(b"1.*.5", b"1.2.3.4"));
    }
}
