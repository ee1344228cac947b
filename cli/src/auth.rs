//! What a CLI call signs, and the metadata that carries the proof.
//!
//! Mirrors the contract written in `proto/farm.proto` (and
//! `farm_proto::auth` on the coordinator's side):
//! `"nix-farm cli auth v1\n" || time || "\n" || method path`.

/// Metadata key carrying the CLI user's OpenSSH public key line.
pub const CLI_KEY_METADATA: &str = "x-farm-key";
/// Metadata key carrying the CLI call's unix time in seconds.
pub const CLI_TIME_METADATA: &str = "x-farm-time";
/// Metadata key carrying the base64 ed25519 signature of [`cli_auth_message`].
pub const CLI_SIG_METADATA: &str = "x-farm-sig";

/// The bytes a CLI user signs for one call.
pub fn cli_auth_message(unix_time: i64, method_path: &str) -> Vec<u8> {
    format!("nix-farm cli auth v1\n{unix_time}\n{method_path}").into_bytes()
}

/// gRPC method paths of `FarmService`, as signed in [`cli_auth_message`].
pub mod methods {
    pub const STATUS: &str = "/farm.v1.FarmService/Status";
    pub const SUBMIT: &str = "/farm.v1.FarmService/Submit";
    pub const LOGS: &str = "/farm.v1.FarmService/Logs";
    pub const CANCEL: &str = "/farm.v1.FarmService/Cancel";
    pub const SET_DRAIN: &str = "/farm.v1.FarmService/SetDrain";
    pub const QUERY_VALID_PATHS: &str = "/farm.v1.FarmService/QueryValidPaths";
    pub const UPLOAD_NAR: &str = "/farm.v1.FarmService/UploadNar";
    pub const MACHINES: &str = "/farm.v1.FarmService/Machines";
}

#[cfg(test)]
mod tests {
    #[test]
    fn message_layout() {
        assert_eq!(
            super::cli_auth_message(1700000000, super::methods::STATUS),
            b"nix-farm cli auth v1\n1700000000\n/farm.v1.FarmService/Status"
        );
    }
}
