//! `farm machines`: what to put in `/etc/nix/machines` (or `--builders`) and
//! `nix.conf` to use this farm, as the coordinator computes it (it knows its
//! SSH endpoint, host key, builders and cache key). When the SSH endpoint is not
//! on port 22, the coordinator also returns the `ssh_config` lines (a `Host`
//! entry for the URI's host with its `Port` and a `HostKeyAlias`) that the
//! machine URI needs, since Nix 2.8's machine URIs cannot carry a port.

use farm_proto::v1::MachinesResponse;
use serde::Serialize;

use crate::args::MachinesArgs;
use crate::client::Farm;
use crate::error::CliError;
use crate::style::{Colour, Painter};

/// The `--json` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachinesJson {
    pub machines_line: String,
    pub nix_conf_lines: Vec<String>,
    pub ssh_config: String,
}

impl From<MachinesResponse> for MachinesJson {
    fn from(m: MachinesResponse) -> Self {
        MachinesJson {
            machines_line: m.machines_line.trim().to_owned(),
            nix_conf_lines: m
                .nix_conf_lines
                .iter()
                .map(|l| l.trim().to_owned())
                .collect(),
            ssh_config: m.ssh_config,
        }
    }
}

/// The `Host` and `Port` of an ssh_config block, if it has them.
pub fn ssh_config_alias(ssh_config: &str) -> Option<(String, u16)> {
    let mut host = None;
    let mut port = None;
    for line in ssh_config.lines() {
        let mut words = line.split_whitespace();
        match (
            words.next().map(str::to_ascii_lowercase).as_deref(),
            words.next(),
        ) {
            (Some("host"), Some(h)) => host = Some(h.to_owned()),
            (Some("port"), Some(p)) => port = p.parse().ok(),
            _ => {}
        }
    }
    Some((host?, port?))
}

/// Human output: each part under a comment saying where it goes. Comments go
/// through `p` (dimmed on a terminal); the lines themselves stay plain so they
/// can be copied.
pub fn render(m: &MachinesJson, p: &Painter) -> String {
    let mut out = String::new();
    let comment = |s: &str| format!("{}\n", p.paint(Colour::Dim, s));
    out.push_str(&comment(
        "# /etc/nix/machines (nix.buildMachines on NixOS), or nix --builders '…':",
    ));
    out.push_str(&m.machines_line);
    out.push_str("\n\n");
    if !m.nix_conf_lines.is_empty() {
        out.push_str(&comment("# nix.conf (the farm's binary cache):"));
        for l in &m.nix_conf_lines {
            out.push_str(l);
            out.push('\n');
        }
        out.push('\n');
    }
    let ssh = m.ssh_config.trim_end();
    if !ssh.is_empty() {
        out.push_str(&comment(
            "# ssh_config of the user running the builds (root's ~/.ssh/config for nix-daemon):",
        ));
        out.push_str(&comment(
            "# Nix 2.8 machine URIs cannot carry a port: this Host entry gives it.",
        ));
        out.push_str(ssh);
        out.push('\n');
        if let Some((host, port)) = ssh_config_alias(ssh) {
            // HostKeyAlias: Nix files the line's host key under the bare host.
            out.push_str(&comment(&format!(
                "# (for a single command, NIX_SSHOPTS=\"-p {port} -o HostKeyAlias={host}\" does the same)"
            )));
        }
    }
    out
}

/// Run `farm machines`.
pub async fn run(farm: &Farm, args: &MachinesArgs) -> Result<(), CliError> {
    let m: MachinesJson = farm.machines(args.protocol.as_str()).await?.into();
    if m.machines_line.is_empty() {
        return Err(CliError::Refused(format!(
            "the coordinator at {} returned no machines line",
            farm.addr()
        )));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&m).map_err(|e| CliError::Usage(e.to_string()))?
        );
    } else {
        print!(
            "{}",
            render(
                &m,
                &Painter {
                    enabled: crate::style::stdout_colour()
                }
            )
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ssh_config: &str) -> MachinesJson {
        MachinesResponse {
            machines_line: "ssh-ng://farm.example.org x86_64-linux,aarch64-linux - 8 1 kvm,big-parallel - c3NoLWVkMjU1MTkgQUFBQQ==\n".into(),
            nix_conf_lines: vec![
                "extra-substituters = http://farm:7080".into(),
                "extra-trusted-public-keys = farm-1:abc=".into(),
            ],
            ssh_config: ssh_config.into(),
        }
        .into()
    }

    #[test]
    fn renders_every_part_where_it_goes() {
        let m = sample("Host farm.example.org\n  Port 7022\n  HostKeyAlias farm.example.org\n");
        let text = render(&m, &Painter { enabled: false });
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("# /etc/nix/machines"));
        assert_eq!(
            lines[1],
            "ssh-ng://farm.example.org x86_64-linux,aarch64-linux - 8 1 kvm,big-parallel - c3NoLWVkMjU1MTkgQUFBQQ=="
        );
        assert!(text.contains("\nextra-substituters = http://farm:7080\n"));
        assert!(
            text.contains(
                "\nHost farm.example.org\n  Port 7022\n  HostKeyAlias farm.example.org\n"
            )
        );
        assert!(text.contains("NIX_SSHOPTS=\"-p 7022 -o HostKeyAlias=farm.example.org\""));
        // colour only dims the comments
        let coloured = render(&m, &Painter { enabled: true });
        assert!(coloured.contains("\x1b[2m# /etc/nix/machines"));
        assert!(coloured.contains("\nssh-ng://farm.example.org x86_64-linux"));
    }

    #[test]
    fn port_22_needs_no_ssh_config() {
        let text = render(&sample(""), &Painter { enabled: false });
        assert!(!text.contains("ssh_config"));
        assert!(!text.contains("NIX_SSHOPTS"));
    }

    #[test]
    fn alias_parsing() {
        assert_eq!(
            ssh_config_alias("Host farm\n    Port 2222\n"),
            Some(("farm".into(), 2222))
        );
        assert_eq!(ssh_config_alias("Host farm\n"), None);
        assert_eq!(ssh_config_alias(""), None);
    }

    #[test]
    fn json_fields() {
        let j = serde_json::to_value(sample("")).unwrap();
        assert!(
            j["machines_line"]
                .as_str()
                .unwrap()
                .starts_with("ssh-ng://")
        );
        assert_eq!(j["nix_conf_lines"].as_array().unwrap().len(), 2);
        assert_eq!(j["ssh_config"], "");
    }
}
