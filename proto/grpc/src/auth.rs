//! What the farm's parties sign, and where the proofs travel.
//!
//! Builder session (stream `BuilderService.Session`): the coordinator sends a
//! 32-byte nonce; the builder answers with an ed25519 signature over
//! `"nix-farm builder auth v1\n" || nonce || name` (name as sent in `Hello`).
//! Later data calls carry the `Welcome` session token in metadata
//! [`SESSION_METADATA`].
//!
//! CLI calls (`FarmService`): metadata [`CLI_KEY_METADATA`] (OpenSSH public key
//! line), [`CLI_TIME_METADATA`] (unix seconds, decimal) and [`CLI_SIG_METADATA`]
//! (standard base64 of an ed25519 signature over
//! `"nix-farm cli auth v1\n" || time || "\n" || method path`), the method path
//! being the gRPC path, e.g. `/farm.v1.FarmService/Status`.

/// Metadata key carrying the builder's session token on data calls.
pub const SESSION_METADATA: &str = "x-farm-session";
/// Metadata key carrying the CLI user's OpenSSH public key line.
pub const CLI_KEY_METADATA: &str = "x-farm-key";
/// Metadata key carrying the CLI call's unix time in seconds.
pub const CLI_TIME_METADATA: &str = "x-farm-time";
/// Metadata key carrying the base64 ed25519 signature of [`cli_auth_message`].
pub const CLI_SIG_METADATA: &str = "x-farm-sig";

/// Length of the builder challenge nonce.
pub const NONCE_LEN: usize = 32;

/// The bytes a builder signs to prove its key: `"nix-farm builder auth v1\n" || nonce || name`.
pub fn builder_auth_message(nonce: &[u8], name: &str) -> Vec<u8> {
    const PREFIX: &[u8] = b"nix-farm builder auth v1\n";
    let mut m = Vec::with_capacity(PREFIX.len() + nonce.len() + name.len());
    m.extend_from_slice(PREFIX);
    m.extend_from_slice(nonce);
    m.extend_from_slice(name.as_bytes());
    m
}

/// The bytes a CLI user signs for one call:
/// `"nix-farm cli auth v1\n" || time || "\n" || method_path`.
pub fn cli_auth_message(unix_time: i64, method_path: &str) -> Vec<u8> {
    format!("nix-farm cli auth v1\n{unix_time}\n{method_path}").into_bytes()
}

/// gRPC method paths of `FarmService`, as signed in [`cli_auth_message`].
pub mod methods {
    pub const STATUS: &str = "/farm.v1.FarmService/Status";
    pub const SUBMIT: &str = "/farm.v1.FarmService/Submit";
    pub const WATCH: &str = "/farm.v1.FarmService/Watch";
    pub const LOGS: &str = "/farm.v1.FarmService/Logs";
    pub const CANCEL: &str = "/farm.v1.FarmService/Cancel";
    pub const SET_DRAIN: &str = "/farm.v1.FarmService/SetDrain";
    pub const QUERY_VALID_PATHS: &str = "/farm.v1.FarmService/QueryValidPaths";
    pub const UPLOAD_NAR: &str = "/farm.v1.FarmService/UploadNar";
    pub const DOWNLOAD_NAR: &str = "/farm.v1.FarmService/DownloadNar";
    pub const MACHINES: &str = "/farm.v1.FarmService/Machines";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_layout() {
        let m = builder_auth_message(&[1, 2, 3], "b1");
        assert_eq!(m, b"nix-farm builder auth v1\n\x01\x02\x03b1");
        assert_eq!(
            cli_auth_message(1700000000, methods::STATUS),
            b"nix-farm cli auth v1\n1700000000\n/farm.v1.FarmService/Status"
        );
    }
}
