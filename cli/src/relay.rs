//! `farm nix-relay --socket PATH`: the remote program of the machines line
//! `farm up` prints. Nix runs it locally (`bash -c`, host `localhost`) with
//! `--stdio` (ssh-ng://) or `--serve --write` (ssh://) appended; it relays the
//! session over the coordinator's relay socket with
//! [`farm_coordinator::nix_endpoint::stdio::relay`], which decides (by the
//! caller's uid) whether to serve it.

use std::process::ExitCode;

use crate::args::NixRelayArgs;

/// The command the relay socket is asked to run, from what Nix appended.
pub fn nix_command(nix_args: &[String]) -> Result<String, String> {
    let program = if nix_args.iter().any(|a| a == "--stdio") {
        "nix-daemon"
    } else if nix_args.iter().any(|a| a == "--serve") {
        "nix-store"
    } else {
        return Err(format!(
            "expected the arguments Nix appends (--stdio, or --serve --write), not {nix_args:?}"
        ));
    };
    let mut words = vec![program.to_owned()];
    words.extend(nix_args.iter().map(|a| {
        if a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=".contains(&b))
        {
            a.clone()
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    }));
    Ok(words.join(" "))
}

#[cfg(feature = "up")]
pub fn run(args: &NixRelayArgs) -> ExitCode {
    let fail = |why: &str| {
        eprintln!("error: nix-farm: {why}");
        ExitCode::from(1)
    };
    let command = match nix_command(&args.nix_args) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let client = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| format!("uid {}", rustix::process::getuid().as_raw()));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(farm_coordinator::nix_endpoint::stdio::relay(
        &args.socket,
        &command,
        &client,
        tokio::io::stdin(),
        tokio::io::stdout(),
        tokio::io::stderr(),
    ));
    // tokio's stdin reads on a thread that cannot be cancelled: do not wait for
    // it (Nix may keep our stdin open after the session ended).
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(farm_coordinator::nix_endpoint::stdio::RelayError::Connect { path, source })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            fail(&format!(
                "this farm refuses you: its relay socket {path} is only for the user who ran `farm up` (and root) ({source})"
            ))
        }
        Err(e) => fail(&e.to_string()),
    }
}

#[cfg(not(feature = "up"))]
pub fn run(_args: &NixRelayArgs) -> ExitCode {
    eprintln!(
        "error: nix-farm: this farm binary was built without `farm up` (cargo feature `up`), which `nix-relay` needs"
    );
    ExitCode::from(crate::error::EXIT_USAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_nix_appends_becomes_the_program() {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(nix_command(&s(&["--stdio"])).unwrap(), "nix-daemon --stdio");
        assert_eq!(
            nix_command(&s(&["--serve", "--write"])).unwrap(),
            "nix-store --serve --write"
        );
        assert_eq!(
            nix_command(&s(&["--serve", "--write", "--store", "a b"])).unwrap(),
            "nix-store --serve --write --store 'a b'"
        );
        assert!(nix_command(&s(&["rm", "-rf"])).is_err());
        assert!(nix_command(&[]).is_err());
    }
}
