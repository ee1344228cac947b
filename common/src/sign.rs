//! Signing a `FarmService` call, and checking one: the `farm` CLI signs
//! ([`CliSigner`]), the coordinator checks ([`verify_request`], then
//! [`ReplayGuard::remember`] and [`VerifiedCall::check_body`]). The bytes
//! signed and the metadata keys are the contract in `farm_proto::auth`
//! (scheme v2: time, method, coordinator identity, nonce, body digest); the
//! signature is always ed25519 (other key types in the key files serve the
//! SSH endpoint only).
//!
//! Why each part is there: the method and the body digest stop a captured
//! signature from authorising any other call; the nonce, remembered by the
//! coordinator for the whole validity window, stops the same call being made
//! twice; the coordinator identity (its cache public key, proven by the
//! coordinator's signature over a challenge of ours, not merely announced)
//! stops it being made against another coordinator that trusts the same key.
//! The identity is a key and not the URL authority the client dialled: the
//! coordinator cannot know every name it is reached by (proxies, NAT, port
//! forwards) and a name says nothing when two farms share one (two
//! `farm up` on 127.0.0.1:7070 one after the other), while its key is one
//! thing it alone holds and already the name clients trust its cache by.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use base64::Engine;
use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use farm_proto::auth::{
    CLI_BODY_METADATA, CLI_KEY_METADATA, CLI_NONCE_LEN, CLI_NONCE_METADATA, CLI_SIG_METADATA,
    CLI_TIME_METADATA, cli_auth_message,
};
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use crate::Error;
use crate::keys::parse_ed25519_line;

/// How far a CLI call's timestamp may be from the checker's clock.
pub const CLI_TIME_SKEW_SECS: i64 = 300;
/// Longest base64 signature accepted (an ed25519 one is 88 characters).
const MAX_SIG_B64: usize = 256;
/// Most nonces a [`ReplayGuard`] remembers at once by default (about 40 MiB
/// at most; ~800 signed calls a second sustained over the whole window).
pub const DEFAULT_MAX_NONCES: usize = 500_000;
/// Width of one [`ReplayGuard`] time bucket, in seconds.
const BUCKET_SECS: i64 = 60;

/// Seconds since the epoch (0 before it).
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly `N` bytes from lowercase hex (`None` for anything else).
fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        let pair = s.get(2 * i..2 * i + 2)?;
        if pair
            .bytes()
            .any(|c| !matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        *o = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// The sha256 of a request message's bytes, as signed.
pub fn body_digest(encoded: &[u8]) -> [u8; 32] {
    Sha256::digest(encoded).into()
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

    /// Sign a unary or server-streaming call to `method` (its gRPC path) for
    /// the coordinator `identity`, now, with a fresh random nonce: the body
    /// digest is over the request message's protobuf encoding.
    pub fn sign<T: prost::Message>(
        &self,
        req: &mut tonic::Request<T>,
        method: &str,
        identity: &str,
    ) {
        let encoded = req.get_ref().encode_to_vec();
        self.sign_parts(req, method, identity, &encoded, now_unix(), rand::random());
    }

    /// Add the signature metadata for a call to `method` at `unix_time` with
    /// `nonce`, whose first request message encodes to `first_message` (for a
    /// client-streaming call, its header message).
    pub fn sign_parts<T>(
        &self,
        req: &mut tonic::Request<T>,
        method: &str,
        identity: &str,
        first_message: &[u8],
        unix_time: i64,
        nonce: [u8; CLI_NONCE_LEN],
    ) {
        let nonce = hex(&nonce);
        let body = hex(&body_digest(first_message));
        let sig = self.key.sign(&cli_auth_message(
            unix_time, method, identity, &nonce, &body,
        ));
        let md = req.metadata_mut();
        // The public line and numbers are ASCII; base64 and hex too. A public
        // line that is not valid metadata goes unsent and the call fails as unsigned.
        if let Ok(v) = self.public_line.parse() {
            md.insert(CLI_KEY_METADATA, v);
        }
        let sig = base64::engine::general_purpose::STANDARD.encode(sig.to_bytes());
        for (k, v) in [
            (CLI_TIME_METADATA, unix_time.to_string()),
            (CLI_NONCE_METADATA, nonce),
            (CLI_BODY_METADATA, body),
            (CLI_SIG_METADATA, sig),
        ] {
            if let Ok(v) = v.parse() {
                md.insert(k, v);
            }
        }
    }
}

/// Learn the identity of the coordinator behind `client`, to sign for: its
/// cache public key, which it must prove it holds by signing a fresh random
/// challenge of ours (`FarmService.Identity`). A coordinator that merely
/// repeats another's key fails here, so it cannot collect calls signed for
/// that other one.
pub async fn learn_identity(
    client: &mut farm_proto::v1::farm_service_client::FarmServiceClient<tonic::transport::Channel>,
) -> Result<String, tonic::Status> {
    let challenge: [u8; farm_proto::auth::IDENTITY_CHALLENGE_LEN] = rand::random();
    let resp = client
        .identity(farm_proto::v1::IdentityRequest {
            challenge: challenge.to_vec(),
        })
        .await?
        .into_inner();
    check_identity(&challenge, &resp).map_err(|e| tonic::Status::unauthenticated(e.to_string()))
}

/// The identity in `resp` if it proves the key for `challenge`.
pub fn check_identity(
    challenge: &[u8],
    resp: &farm_proto::v1::IdentityResponse,
) -> Result<String, Error> {
    let bad = |why: &str| {
        Error::Unauthenticated(format!(
            "the coordinator did not prove its identity ({why}); is this the farm you meant?"
        ))
    };
    let key = farm_nix::signing::VerifyingKey::parse(&resp.public_key)
        .map_err(|_| bad("its public key is malformed"))?;
    let message = farm_proto::auth::coordinator_identity_message(challenge);
    if !key.verify(&message, &resp.signature) {
        return Err(bad("bad signature over our challenge"));
    }
    Ok(key.to_string())
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

/// A call whose signature checked out: who made it, and what it vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCall {
    /// The ed25519 key that signed.
    pub key: [u8; 32],
    /// The signed time.
    pub time: i64,
    /// The signed nonce.
    pub nonce: [u8; CLI_NONCE_LEN],
    /// The signed digest of the first request message.
    pub body_sha256: [u8; 32],
}

impl VerifiedCall {
    /// Whether `first_message` (the bytes of the first request message as
    /// received) is the one that was signed.
    pub fn check_body(&self, first_message: &[u8]) -> Result<(), Error> {
        if body_digest(first_message) == self.body_sha256 {
            Ok(())
        } else {
            Err(Error::Unauthenticated(
                "the request body is not the one that was signed".into(),
            ))
        }
    }
}

/// Check the signature on a call to `method` for the coordinator `identity`
/// made at most [`CLI_TIME_SKEW_SECS`] from `now_unix`, from its metadata
/// alone (the body digest it vouches for is checked later, with
/// [`VerifiedCall::check_body`]; the nonce with a [`ReplayGuard`]). Which keys
/// may call what is the caller's policy.
pub fn verify_request(
    metadata: &MetadataMap,
    method: &str,
    identity: &str,
    now_unix: i64,
) -> Result<VerifiedCall, Error> {
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
    let nonce_hex = get(CLI_NONCE_METADATA)?;
    let nonce = unhex::<CLI_NONCE_LEN>(nonce_hex).ok_or_else(|| {
        Error::Unauthenticated(format!(
            "{CLI_NONCE_METADATA} must be {} lowercase hex digits",
            2 * CLI_NONCE_LEN
        ))
    })?;
    let body_hex = get(CLI_BODY_METADATA)?;
    let body_sha256 = unhex::<32>(body_hex).ok_or_else(|| {
        Error::Unauthenticated(format!(
            "{CLI_BODY_METADATA} must be 64 lowercase hex digits"
        ))
    })?;
    let sig_b64 = get(CLI_SIG_METADATA)?;
    if sig_b64.len() > MAX_SIG_B64 {
        return Err(Error::Unauthenticated(format!(
            "{CLI_SIG_METADATA} too long"
        )));
    }
    let sig = base64::engine::general_purpose::STANDARD
        .decode(sig_b64)
        .map_err(|_| Error::Unauthenticated(format!("{CLI_SIG_METADATA} is not base64")))?;
    let message = cli_auth_message(time, method, identity, nonce_hex, body_hex);
    if !verify_ed25519(&key, &message, &sig) {
        return Err(Error::Unauthenticated(
            "bad signature (made for another method or another coordinator?)".into(),
        ));
    }
    Ok(VerifiedCall {
        key,
        time,
        nonce,
        body_sha256,
    })
}

/// The nonces of the signed calls accepted within the validity window, so
/// that none is accepted twice. Bounded: nonces are kept in buckets by their
/// signed time (a replay carries the same signed time, so only its bucket is
/// looked at), a bucket is dropped once every time in it is past the window,
/// and beyond `max` nonces new calls are refused (never is a nonce forgotten
/// early, which would reopen the replay).
#[derive(Debug)]
pub struct ReplayGuard {
    max: usize,
    inner: Mutex<Nonces>,
}

#[derive(Debug, Default)]
struct Nonces {
    buckets: BTreeMap<i64, HashSet<[u8; CLI_NONCE_LEN]>>,
    len: usize,
}

impl Default for ReplayGuard {
    fn default() -> Self {
        ReplayGuard::new(DEFAULT_MAX_NONCES)
    }
}

impl ReplayGuard {
    /// A guard remembering at most `max` nonces.
    pub fn new(max: usize) -> Self {
        ReplayGuard {
            max,
            inner: Mutex::new(Nonces::default()),
        }
    }

    /// Nonces remembered now.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `call`'s nonce is unused so far (a cheap early refusal, before
    /// the body is read; [`ReplayGuard::remember`] decides, atomically, once
    /// the body has been checked: so a copy with a changed body, refused on
    /// its digest, does not use up the nonce of the call it was copied from).
    pub fn unused(&self, call: &VerifiedCall) -> Result<(), Error> {
        let n = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if n.buckets
            .get(&call.time.div_euclid(BUCKET_SECS))
            .is_some_and(|s| s.contains(&call.nonce))
        {
            return Err(replayed());
        }
        Ok(())
    }

    /// Accept `call`'s nonce once: a second use within the window is refused
    /// (`Unauthenticated`), and so is a call when `max` are remembered (`Busy`).
    /// Call it only for a call whose signature and key were accepted, so that
    /// nobody without an authorized key can fill it.
    pub fn remember(&self, call: &VerifiedCall, now_unix: i64) -> Result<(), Error> {
        let mut n = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Drop buckets whose latest time is out of the window.
        while let Some((&b, _)) = n.buckets.first_key_value() {
            let last = b
                .saturating_mul(BUCKET_SECS)
                .saturating_add(BUCKET_SECS - 1);
            if last.saturating_add(CLI_TIME_SKEW_SECS) >= now_unix {
                break;
            }
            if let Some((_, set)) = n.buckets.pop_first() {
                n.len -= set.len();
            }
        }
        let bucket = call.time.div_euclid(BUCKET_SECS);
        if n.buckets
            .get(&bucket)
            .is_some_and(|s| s.contains(&call.nonce))
        {
            return Err(replayed());
        }
        if n.len >= self.max {
            return Err(Error::Busy(format!(
                "more than {} signed calls within {} s; try again shortly",
                self.max,
                2 * CLI_TIME_SKEW_SECS
            )));
        }
        n.buckets.entry(bucket).or_default().insert(call.nonce);
        n.len += 1;
        Ok(())
    }
}

fn replayed() -> Error {
    Error::Unauthenticated(
        "this request was already made once (its nonce is used): replays are refused".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::public_key_line_ed25519;
    use farm_proto::auth::methods;

    const ID: &str = "farm-a:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const OTHER_ID: &str = "farm-b:BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB=";
    const NOW: i64 = 1_700_000_000;

    fn signer(seed: u8) -> CliSigner {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let line = format!(
            "{} me@test",
            public_key_line_ed25519(&sk.verifying_key().to_bytes())
        );
        CliSigner::new(sk, line)
    }

    fn signed(s: &CliSigner, method: &str, body: &[u8], time: i64, nonce: u8) -> MetadataMap {
        let mut req = tonic::Request::new(());
        s.sign_parts(&mut req, method, ID, body, time, [nonce; CLI_NONCE_LEN]);
        req.metadata().clone()
    }

    #[test]
    fn a_signed_call_verifies_for_its_method_body_coordinator_and_time_only() {
        let s = signer(1);
        let md = signed(&s, methods::CANCEL, b"body", NOW, 7);
        assert_eq!(md.get(CLI_TIME_METADATA).unwrap(), "1700000000");
        assert_eq!(md.get(CLI_KEY_METADATA).unwrap(), s.public_line());
        assert_eq!(
            md.get(CLI_NONCE_METADATA).unwrap(),
            "07".repeat(16).as_str()
        );
        assert!(is_signed(&md));
        let call = verify_request(&md, methods::CANCEL, ID, NOW + 10).unwrap();
        assert_eq!(call.key, s.verifying_key().to_bytes());
        assert_eq!(call.nonce, [7; CLI_NONCE_LEN]);
        call.check_body(b"body").unwrap();
        // A changed body.
        assert!(call.check_body(b"bodY").is_err());
        assert!(call.check_body(b"").is_err());
        // A changed method.
        assert!(verify_request(&md, methods::STATUS, ID, NOW).is_err());
        // Another coordinator.
        let e = verify_request(&md, methods::CANCEL, OTHER_ID, NOW).unwrap_err();
        assert!(e.to_string().contains("another coordinator"), "{e}");
        // Expired, or from the future.
        assert!(verify_request(&md, methods::CANCEL, ID, NOW + 301).is_err());
        assert!(verify_request(&md, methods::CANCEL, ID, NOW - 301).is_err());
        assert!(verify_request(&MetadataMap::new(), methods::STATUS, ID, NOW).is_err());
        assert!(!is_signed(&MetadataMap::new()));
        // Another key's line with this signature.
        let mut forged = md.clone();
        forged.insert(CLI_KEY_METADATA, signer(2).public_line().parse().unwrap());
        assert!(verify_request(&forged, methods::CANCEL, ID, NOW).is_err());
        // A claimed digest, nonce or time changed after signing.
        for (k, v) in [
            (CLI_BODY_METADATA, hex(&body_digest(b"other"))),
            (CLI_NONCE_METADATA, "08".repeat(16)),
            (CLI_TIME_METADATA, (NOW + 1).to_string()),
        ] {
            let mut m = md.clone();
            m.insert(k, v.parse().unwrap());
            assert!(verify_request(&m, methods::CANCEL, ID, NOW).is_err(), "{k}");
        }
        // Malformed nonce and digest are refused as such.
        for (k, v) in [
            (CLI_NONCE_METADATA, "07".repeat(15)),
            (CLI_NONCE_METADATA, "0G".repeat(16)),
            (CLI_BODY_METADATA, "AB".repeat(32)),
        ] {
            let mut m = md.clone();
            m.insert(k, v.parse().unwrap());
            let e = verify_request(&m, methods::CANCEL, ID, NOW).unwrap_err();
            assert!(e.to_string().contains("hex digits"), "{k}: {e}");
        }
        // Extreme times do not overflow.
        for (time, now) in [(i64::MIN, i64::MAX), (i64::MAX, i64::MIN)] {
            assert!(
                verify_request(
                    &signed(&s, methods::STATUS, b"", time, 1),
                    methods::STATUS,
                    ID,
                    now
                )
                .is_err()
            );
        }
    }

    #[test]
    fn sign_digests_the_protobuf_encoding() {
        let s = signer(3);
        let msg = farm_proto::v1::CancelRequest { id: "s1".into() };
        let mut req = tonic::Request::new(msg.clone());
        s.sign(&mut req, methods::CANCEL, ID);
        let call = verify_request(req.metadata(), methods::CANCEL, ID, now_unix()).unwrap();
        call.check_body(&prost::Message::encode_to_vec(&msg))
            .unwrap();
        let changed = farm_proto::v1::CancelRequest { id: "s2".into() };
        assert!(
            call.check_body(&prost::Message::encode_to_vec(&changed))
                .is_err()
        );
        // Two signatures of the same call use two nonces.
        let mut again = tonic::Request::new(msg);
        s.sign(&mut again, methods::CANCEL, ID);
        let call2 = verify_request(again.metadata(), methods::CANCEL, ID, now_unix()).unwrap();
        assert_ne!(call.nonce, call2.nonce);
    }

    #[test]
    fn a_nonce_is_accepted_once_within_the_window() {
        let s = signer(1);
        let guard = ReplayGuard::new(3);
        let call = verify_request(
            &signed(&s, methods::CANCEL, b"x", NOW, 1),
            methods::CANCEL,
            ID,
            NOW,
        )
        .unwrap();
        guard.unused(&call).unwrap();
        guard.remember(&call, NOW).unwrap();
        assert!(guard.unused(&call).is_err());
        let e = guard.remember(&call, NOW + 1).unwrap_err();
        assert!(e.to_string().contains("already made once"), "{e}");
        // Still refused at the very end of the window.
        assert!(guard.remember(&call, NOW + CLI_TIME_SKEW_SECS).is_err());
        // Another nonce at the same time is fine.
        let other = verify_request(
            &signed(&s, methods::CANCEL, b"x", NOW, 2),
            methods::CANCEL,
            ID,
            NOW,
        )
        .unwrap();
        guard.remember(&other, NOW).unwrap();
        assert_eq!(guard.len(), 2);
        // Full: refused as busy, without forgetting anything.
        let third = VerifiedCall {
            nonce: [3; 16],
            ..other.clone()
        };
        guard.remember(&third, NOW).unwrap();
        let fourth = VerifiedCall {
            nonce: [4; 16],
            ..other.clone()
        };
        assert!(matches!(guard.remember(&fourth, NOW), Err(Error::Busy(_))));
        assert!(guard.remember(&call, NOW).is_err());
        // Once the window has passed, the bucket goes (verify_request refuses
        // those times anyway) and room is made.
        let later = VerifiedCall {
            time: NOW + 2 * CLI_TIME_SKEW_SECS,
            ..fourth.clone()
        };
        guard
            .remember(&later, NOW + 2 * CLI_TIME_SKEW_SECS + BUCKET_SECS)
            .unwrap();
        assert_eq!(guard.len(), 1);
        // Extreme times neither overflow nor panic.
        let odd = VerifiedCall {
            time: i64::MIN,
            ..fourth.clone()
        };
        let _ = guard.remember(&odd, i64::MAX);
        let odd = VerifiedCall {
            time: i64::MAX,
            ..fourth
        };
        let _ = guard.remember(&odd, i64::MIN);
    }

    #[test]
    fn an_identity_is_learnt_only_with_its_proof() {
        let key = farm_nix::signing::SigningKey::generate("farm-a").unwrap();
        let other = farm_nix::signing::SigningKey::generate("farm-b").unwrap();
        let challenge = [5u8; 32];
        let message = farm_proto::auth::coordinator_identity_message(&challenge);
        let good = farm_proto::v1::IdentityResponse {
            public_key: key.verifying_key().to_string(),
            signature: key.sign(&message),
        };
        assert_eq!(
            check_identity(&challenge, &good).unwrap(),
            key.verifying_key().to_string()
        );
        // Another challenge (a replayed proof).
        assert!(check_identity(&[6u8; 32], &good).is_err());
        // Claiming another coordinator's key without holding it.
        let claimed = farm_proto::v1::IdentityResponse {
            public_key: key.verifying_key().to_string(),
            signature: other.sign(&message),
        };
        let e = check_identity(&challenge, &claimed).unwrap_err();
        assert!(e.to_string().contains("did not prove"), "{e}");
        let junk = farm_proto::v1::IdentityResponse {
            public_key: "nonsense".into(),
            signature: String::new(),
        };
        assert!(check_identity(&challenge, &junk).is_err());
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(hex(&[0, 0xff, 0x10]), "00ff10");
        assert_eq!(unhex::<3>("00ff10"), Some([0, 0xff, 0x10]));
        assert_eq!(unhex::<3>("00ff1"), None);
        assert_eq!(unhex::<1>("+f"), None);
    }
}
