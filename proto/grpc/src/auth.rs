//! What the farm's parties sign, and where the proofs travel.
//!
//! Builder session (stream `BuilderService.Session`): the coordinator sends a
//! 32-byte nonce; the builder answers with an ed25519 signature over
//! `"nix-farm builder auth v1\n" || nonce || name` (name as sent in `Hello`).
//! Later data calls carry the `Welcome` session token in metadata
//! [`SESSION_METADATA`].
//!
//! CLI calls (`FarmService`), scheme v2: metadata [`CLI_KEY_METADATA`]
//! (OpenSSH public key line), [`CLI_TIME_METADATA`] (unix seconds, decimal),
//! [`CLI_NONCE_METADATA`] (16 random bytes as 32 lowercase hex digits, used
//! once), [`CLI_BODY_METADATA`] (sha256 of the first request message's
//! protobuf encoding, 64 lowercase hex digits: the whole request of a unary or
//! server-streaming call, the `info` header of `UploadNar`, whose NAR hash and
//! size the cache then verifies the rest against) and [`CLI_SIG_METADATA`]
//! (standard base64 of an ed25519 signature over [`cli_auth_message`]):
//!
//! ```text
//! "nix-farm cli auth v2\n" || time || "\n" || method path || "\n"
//!   || coordinator identity || "\n" || nonce hex || "\n" || body sha256 hex
//! ```
//!
//! The method path is the gRPC path, e.g. `/farm.v1.FarmService/Status`; the
//! coordinator identity is its cache public key as `name:base64`, which the
//! CLI learns with `FarmService.Identity`: the coordinator signs
//! [`coordinator_identity_message`] over a fresh challenge of the caller's
//! with that key, so a coordinator cannot pass another one's identity off as
//! its own, and a request signed for one coordinator is refused by every other.

/// Metadata key carrying the builder's session token on data calls.
pub const SESSION_METADATA: &str = "x-farm-session";
/// Metadata key naming the job a builder's data call is for: its fetches then
/// see what that job may use (a claim job's owner's claims too), and its
/// uploads are published as that job's outputs.
pub const JOB_METADATA: &str = "x-farm-job";
/// Metadata key carrying the CLI user's OpenSSH public key line.
pub const CLI_KEY_METADATA: &str = "x-farm-key";
/// Metadata key carrying the CLI call's unix time in seconds.
pub const CLI_TIME_METADATA: &str = "x-farm-time";
/// Metadata key carrying the base64 ed25519 signature of [`cli_auth_message`].
pub const CLI_SIG_METADATA: &str = "x-farm-sig";
/// Metadata key carrying the call's single-use nonce (hex).
pub const CLI_NONCE_METADATA: &str = "x-farm-nonce";
/// Metadata key carrying the sha256 (hex) of the call's first request message.
pub const CLI_BODY_METADATA: &str = "x-farm-body-sha256";
/// Bytes of a CLI call's nonce.
pub const CLI_NONCE_LEN: usize = 16;
/// Bytes of the challenge in `IdentityRequest`.
pub const IDENTITY_CHALLENGE_LEN: usize = 32;

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

/// The bytes a CLI user signs for one call (scheme v2, see the module doc).
/// `identity`, `nonce_hex` and `body_sha256_hex` are the coordinator's cache
/// public key, the nonce and the body digest as sent; none may hold a newline
/// (a path, a Nix key and hex digits never do).
pub fn cli_auth_message(
    unix_time: i64,
    method_path: &str,
    identity: &str,
    nonce_hex: &str,
    body_sha256_hex: &str,
) -> Vec<u8> {
    format!(
        "nix-farm cli auth v2\n{unix_time}\n{method_path}\n{identity}\n{nonce_hex}\n{body_sha256_hex}"
    )
    .into_bytes()
}

/// What the coordinator signs with its cache key to prove its identity:
/// `"nix-farm coordinator identity v1\n" || hex(challenge)`. Never a narinfo
/// fingerprint (those start with `1;`), so the proof cannot be reused as one.
pub fn coordinator_identity_message(challenge: &[u8]) -> String {
    let mut m = String::from("nix-farm coordinator identity v1\n");
    for b in challenge {
        m.push_str(&format!("{b:02x}"));
    }
    m
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
    pub const IDENTITY: &str = "/farm.v1.FarmService/Identity";
    pub const JOBS: &str = "/farm.v1.FarmService/Jobs";
    pub const DASHBOARD_LOGIN: &str = "/farm.v1.FarmService/DashboardLogin";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_layout() {
        let m = builder_auth_message(&[1, 2, 3], "b1");
        assert_eq!(m, b"nix-farm builder auth v1\n\x01\x02\x03b1");
        assert_eq!(
            cli_auth_message(1700000000, methods::STATUS, "farm-1:AAAA", "00ff", "abcd"),
            b"nix-farm cli auth v2\n1700000000\n/farm.v1.FarmService/Status\nfarm-1:AAAA\n00ff\nabcd"
        );
        assert_eq!(
            coordinator_identity_message(&[0, 0xab]),
            "nix-farm coordinator identity v1\n00ab"
        );
    }
}
