//! Signing a `FarmService` call, and checking one: the `farm` CLI signs
//! ([`CliSigner`]), the coordinator checks ([`verify_request`]). The bytes
//! signed and the metadata keys are the contract in `farm_proto::auth`; the
//! signature is always ed25519 (other key types in the key files serve the
//! SSH endpoint only).

use base64::Engine;
use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use farm_proto::auth::{CLI_KEY_METADATA, CLI_SIG_METADATA, CLI_TIME_METADATA, cli_auth_message};
use tonic::metadata::MetadataMap;

use crate::Error;
use crate::keys::parse_ed25519_line;

/// How far a CLI call's timestamp may be from the checker's clock.
pub const CLI_TIME_SKEW_SECS: i64 = 300;
/// Longest base64 signature accepted (an ed25519 one is 88 characters).
const MAX_SIG_B64: usize = 256;

/// Seconds since the epoch (0 before it).
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// An ed25519 key and its OpenSSH public line, ready to sign calls.
#[derive(Clone)]
pub struct CliSigner {
    key: ed25519_dalek::SigningKey,
    public_line: String,
}

impl std::fmt::Debug for CliSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CliSigner")
            .field("public_line", &self.public_line)
            .finish_non_exhaustive()
    }
}

impl CliSigner {
    /// `public_line` is sent as is in `x-farm-key` (it may carry a comment).
    pub fn new(key: ed25519_dalek::SigningKey, public_line: impl Into<String>) -> Self {
        CliSigner {
            key,
            public_line: public_line.into().trim().to_owned(),
        }
    }

    /// The OpenSSH public key line sent with each call.
    pub fn public_line(&self) -> &str {
        &self.public_line
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Add the signature metadata for a call to `method` (its gRPC path) at `unix_time`.
    pub fn sign<T>(&self, req: &mut tonic::Request<T>, method: &str, unix_time: i64) {
        let sig = self.key.sign(&cli_auth_message(unix_time, method));
        let md = req.metadata_mut();
        // The public line and numbers are ASCII; base64 too. A public line
        // that is not valid metadata goes unsent and the call fails as unsigned.
        if let Ok(v) = self.public_line.parse() {
            md.insert(CLI_KEY_METADATA, v);
        }
        if let Ok(v) = unix_time.to_string().parse() {
            md.insert(CLI_TIME_METADATA, v);
        }
        if let Ok(v) = base64::engine::general_purpose::STANDARD
            .encode(sig.to_bytes())
            .parse()
        {
            md.insert(CLI_SIG_METADATA, v);
        }
    }
}

/// Verify an ed25519 signature made by `key` over `message`.
pub fn verify_ed25519(key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    let Ok(vk) = VerifyingKey::from_bytes(key) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(signature) else {
        return false;
    };
    vk.verify(message, &sig).is_ok()
}

/// Whether a call's metadata carries a signing key at all.
pub fn is_signed(metadata: &MetadataMap) -> bool {
    metadata.get(CLI_KEY_METADATA).is_some()
}

/// Check the signature on a call to `method` made at most
/// [`CLI_TIME_SKEW_SECS`] from `now_unix`; returns the ed25519 key that made
/// it. Which keys may call what is the caller's policy.
pub fn verify_request(
    metadata: &MetadataMap,
    method: &str,
    now_unix: i64,
) -> Result<[u8; 32], Error> {
    let get = |k: &str| -> Result<&str, Error> {
        metadata
            .get(k)
            .ok_or_else(|| Error::Unauthenticated(format!("missing metadata {k}")))?
            .to_str()
            .map_err(|_| Error::Unauthenticated(format!("metadata {k} is not ASCII")))
    };
    let key = parse_ed25519_line(get(CLI_KEY_METADATA)?)
        .map_err(|e| Error::Unauthenticated(e.to_string()))?;
    let time: i64 = get(CLI_TIME_METADATA)?
        .parse()
        .map_err(|_| Error::Unauthenticated(format!("{CLI_TIME_METADATA} is not a number")))?;
    if time.abs_diff(now_unix) > CLI_TIME_SKEW_SECS.unsigned_abs() {
        return Err(Error::Unauthenticated(format!(
            "{CLI_TIME_METADATA} is too far from the coordinator's clock"
        )));
    }
    let sig_b64 = get(CLI_SIG_METADATA)?;
    if sig_b64.len() > MAX_SIG_B64 {
        return Err(Error::Unauthenticated(format!(
            "{CLI_SIG_METADATA} too long"
        )));
    }
    let sig = base64::engine::general_purpose::STANDARD
        .decode(sig_b64)
        .map_err(|_| Error::Unauthenticated(format!("{CLI_SIG_METADATA} is not base64")))?;
    if !verify_ed25519(&key, &cli_auth_message(time, method), &sig) {
        return Err(Error::Unauthenticated("bad signature".into()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::public_key_line_ed25519;
    use farm_proto::auth::methods;

    fn signer(seed: u8) -> CliSigner {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let line = format!(
            "{} me@test",
            public_key_line_ed25519(&sk.verifying_key().to_bytes())
        );
        CliSigner::new(sk, line)
    }

    fn signed(s: &CliSigner, method: &str, time: i64) -> MetadataMap {
        let mut req = tonic::Request::new(());
        s.sign(&mut req, method, time);
        req.metadata().clone()
    }

    #[test]
    fn a_signed_call_verifies_for_its_method_and_time_only() {
        let s = signer(1);
        let now = 1_700_000_000;
        let md = signed(&s, methods::STATUS, now);
        assert_eq!(md.get(CLI_TIME_METADATA).unwrap(), "1700000000");
        assert_eq!(md.get(CLI_KEY_METADATA).unwrap(), s.public_line());
        assert!(is_signed(&md));
        assert_eq!(
            verify_request(&md, methods::STATUS, now + 10).unwrap(),
            s.verifying_key().to_bytes()
        );
        assert!(verify_request(&md, methods::CANCEL, now).is_err());
        assert!(verify_request(&md, methods::STATUS, now + 1000).is_err());
        assert!(verify_request(&MetadataMap::new(), methods::STATUS, now).is_err());
        assert!(!is_signed(&MetadataMap::new()));
        // Another key's line with this signature.
        let mut forged = md.clone();
        forged.insert(CLI_KEY_METADATA, signer(2).public_line().parse().unwrap());
        assert!(verify_request(&forged, methods::STATUS, now).is_err());
        // Extreme times do not overflow.
        for (time, now) in [(i64::MIN, i64::MAX), (i64::MAX, i64::MIN)] {
            assert!(
                verify_request(&signed(&s, methods::STATUS, time), methods::STATUS, now).is_err()
            );
        }
    }
}
