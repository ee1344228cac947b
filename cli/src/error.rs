//! The CLI's errors and the exit status each one maps to.
//!
//! Exit status (documented in `farm --help`, relied on by CI):
//! - 0: everything asked for succeeded;
//! - 1: a build failed (or a command's remote action failed on its own terms);
//! - 2: usage error: bad flags or arguments, unreadable config or key, an
//!   installable that does not evaluate;
//! - 3: the farm is unreachable, or refused the call (authentication,
//!   permission, protocol);
//! - 130: interrupted (Ctrl-C).

use std::path::PathBuf;

/// Exit status: everything succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit status: a build failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit status: usage error.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: farm unreachable or refused.
pub const EXIT_FARM: u8 = 3;
/// Exit status: interrupted by Ctrl-C.
pub const EXIT_INTERRUPTED: u8 = 130;

/// Everything that can make a `farm` command fail.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line or its inputs are wrong.
    #[error("{0}")]
    Usage(String),
    /// A configuration file or key could not be used.
    #[error("{0}")]
    Config(String),
    /// Reading or writing a local file failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// A local Nix command failed (evaluation, store query).
    #[error("{command} failed: {message}")]
    Nix { command: String, message: String },
    /// No connection to the coordinator.
    #[error(
        "cannot reach the coordinator at {addr}: {message}\n  is it running? set --coordinator or FARM_COORDINATOR (or `coordinator` in {config})"
    )]
    Unreachable {
        addr: String,
        message: String,
        config: String,
    },
    /// The coordinator answered with an error.
    #[error("{0}")]
    Refused(String),
    /// The coordinator refused for a reason that is the caller's input.
    #[error("{0}")]
    NotFound(String),
    /// A build failed (its details were printed already).
    #[error("{0}")]
    BuildFailed(String),
    /// The user pressed Ctrl-C.
    #[error("interrupted")]
    Interrupted,
}

impl CliError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_)
            | CliError::Config(_)
            | CliError::Io { .. }
            | CliError::Nix { .. }
            | CliError::NotFound(_) => EXIT_USAGE,
            CliError::Unreachable { .. } | CliError::Refused(_) => EXIT_FARM,
            CliError::BuildFailed(_) => EXIT_FAILED,
            CliError::Interrupted => EXIT_INTERRUPTED,
        }
    }

    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> CliError {
        CliError::Io {
            context: context.into(),
            source,
        }
    }

    /// An I/O error on `path`.
    pub fn io_path(doing: &str, path: &std::path::Path, source: std::io::Error) -> CliError {
        CliError::io(format!("{doing} {}", path.display()), source)
    }
}

/// What the caller was doing when the coordinator answered with `status`, to
/// explain refusals.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The coordinator's address as configured.
    pub addr: String,
    /// The key the call was signed with, if any.
    pub key: Option<PathBuf>,
    /// Whether the call needs an admin key.
    pub admin: bool,
    /// Where the settings come from, for hints.
    pub config_path: String,
}

impl CallContext {
    /// Turn a gRPC status into an error whose message says what to do.
    pub fn status(&self, what: &str, status: tonic::Status) -> CliError {
        use tonic::Code;
        let msg = status.message();
        let key = match &self.key {
            Some(k) => format!("your key {}", k.display()),
            None => "no key (none found at the default path)".to_owned(),
        };
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => CliError::Unreachable {
                addr: self.addr.clone(),
                message: format!("{what}: {msg}"),
                config: self.config_path.clone(),
            },
            Code::Unauthenticated => CliError::Refused(format!(
                "the coordinator at {} did not accept {key} for {what}: {msg}\n  pass --key (or FARM_KEY) an ed25519 SSH key listed in the coordinator's --authorized-keys",
                self.addr
            )),
            Code::PermissionDenied if self.admin => CliError::Refused(format!(
                "the coordinator at {} refused {what} with {key}: {msg}\n  {what} changes the farm: it needs a key listed in the coordinator's --admin-keys",
                self.addr
            )),
            Code::PermissionDenied => CliError::Refused(format!(
                "the coordinator at {} refused {what} with {key}: {msg}\n  the key must be listed in the coordinator's --authorized-keys (or --admin-keys)",
                self.addr
            )),
            Code::NotFound => CliError::NotFound(format!("{what}: {msg}")),
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                CliError::Usage(format!("{what}: the coordinator says: {msg}"))
            }
            Code::Unimplemented => CliError::Refused(format!(
                "{what}: the coordinator at {} does not support this call ({msg}); is it the same version as this farm CLI?",
                self.addr
            )),
            code => CliError::Refused(format!(
                "{what}: the coordinator at {} failed ({code:?}): {msg}",
                self.addr
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(admin: bool) -> CallContext {
        CallContext {
            addr: "http://farm:7070".into(),
            key: Some("/home/u/.ssh/id_ed25519".into()),
            admin,
            config_path: "~/.config/nix-farm/config.toml".into(),
        }
    }

    #[test]
    fn statuses_map_to_exit_codes_and_hints() {
        let e = ctx(false).status("status", tonic::Status::unavailable("connection refused"));
        assert_eq!(e.exit_code(), EXIT_FARM);
        let text = e.to_string();
        assert!(
            text.contains("http://farm:7070") && text.contains("FARM_COORDINATOR"),
            "{text}"
        );

        let e = ctx(true).status("drain", tonic::Status::permission_denied("nope"));
        assert_eq!(e.exit_code(), EXIT_FARM);
        assert!(e.to_string().contains("--admin-keys"), "{e}");

        let e = ctx(false).status("status", tonic::Status::unauthenticated("bad signature"));
        assert_eq!(e.exit_code(), EXIT_FARM);
        assert!(e.to_string().contains("--authorized-keys"), "{e}");

        let e = ctx(false).status("logs", tonic::Status::not_found("no such build"));
        assert_eq!(e.exit_code(), EXIT_USAGE);
        assert_eq!(CliError::BuildFailed("x".into()).exit_code(), EXIT_FAILED);
    }
}
