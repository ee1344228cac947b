//! What Nix knows about a valid store path (`ValidPathInfo`), and the
//! fingerprint its signatures cover:
//! `1;<storePath>;<narHash as sha256:nix32>;<narSize>;<references, full paths, comma-joined>`.

use std::collections::BTreeSet;

use crate::hash::{Hash, HashAlgo};
use crate::signing::{SigningKey, VerifyingKey};
use crate::store_path::StorePath;

/// A store path's metadata, as the worker protocol's `QueryPathInfo`, the serve
/// protocol's `AddToStoreNar` and narinfo files carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPathInfo {
    pub path: StorePath,
    pub deriver: Option<StorePath>,
    /// sha256 of the NAR serialisation.
    pub nar_hash: Hash,
    /// Sorted as Nix sorts them (by full path).
    pub references: BTreeSet<StorePath>,
    /// Seconds since the epoch; 0 when unknown.
    pub registration_time: u64,
    pub nar_size: u64,
    /// Whether this store built the path itself.
    pub ultimate: bool,
    /// `keyname:base64` signatures of [`ValidPathInfo::fingerprint`].
    pub sigs: BTreeSet<String>,
    /// Content address (`fixed:r:sha256:…`, `text:sha256:…`), if any.
    pub ca: Option<String>,
}

impl ValidPathInfo {
    /// A path info with no references, deriver, signatures or content address.
    pub fn new(path: StorePath, nar_hash: Hash, nar_size: u64) -> ValidPathInfo {
        ValidPathInfo {
            path,
            deriver: None,
            nar_hash,
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        }
    }

    /// The string signatures cover:
    /// `1;/nix/store/…;sha256:<nix32>;<narSize>;/nix/store/a,/nix/store/b`.
    pub fn fingerprint(&self) -> String {
        let mut s = format!(
            "1;{};{};{};",
            self.path,
            self.nar_hash.to_nix32_prefixed(),
            self.nar_size
        );
        for (i, r) in self.references.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&r.to_string());
        }
        s
    }

    /// Whether the info can be signed meaningfully: Nix refuses fingerprints of
    /// non-sha256 NAR hashes and of a zero NAR size.
    pub fn is_signable(&self) -> bool {
        self.nar_hash.algo() == HashAlgo::Sha256 && self.nar_size != 0
    }

    /// Add `key`'s signature of the fingerprint.
    pub fn sign(&mut self, key: &SigningKey) {
        self.sigs.insert(key.sign(&self.fingerprint()));
    }

    /// Whether some signature is valid under one of `keys`.
    pub fn verify_any(&self, keys: &[VerifyingKey]) -> bool {
        let fp = self.fingerprint();
        self.sigs
            .iter()
            .any(|sig| keys.iter().any(|k| k.verify(&fp, sig)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(s: &str) -> StorePath {
        StorePath::parse(s).unwrap()
    }

    #[test]
    fn fingerprint_layout() {
        let h = HashAlgo::Sha256.digest(b"nar");
        let mut info = ValidPathInfo::new(
            sp("/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab-t1"),
            h.clone(),
            120,
        );
        assert_eq!(
            info.fingerprint(),
            format!(
                "1;/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab-t1;{};120;",
                h.to_nix32_prefixed()
            )
        );
        info.references
            .insert(sp("/nix/store/zzk6qgfdpnp97aa113k14bn130rvjqab-z"));
        info.references
            .insert(sp("/nix/store/0yk6qgfdpnp97aa113k14bn130rvjqab-a"));
        assert!(info.fingerprint().ends_with(
            ";120;/nix/store/0yk6qgfdpnp97aa113k14bn130rvjqab-a,/nix/store/zzk6qgfdpnp97aa113k14bn130rvjqab-z"
        ));
        assert!(info.is_signable());
    }

    #[test]
    fn sign_and_verify_any() {
        let h = HashAlgo::Sha256.digest(b"nar");
        let mut info =
            ValidPathInfo::new(sp("/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab-t1"), h, 120);
        let k1 = SigningKey::generate("one").unwrap();
        let k2 = SigningKey::generate("two").unwrap();
        assert!(!info.verify_any(&[k1.verifying_key()]));
        info.sign(&k1);
        assert!(info.verify_any(&[k2.verifying_key(), k1.verifying_key()]));
        assert!(!info.verify_any(&[k2.verifying_key()]));
        assert!(!info.verify_any(&[]));
        // any change to what the fingerprint covers invalidates the signature
        let mut changed = info.clone();
        changed.nar_size = 121;
        assert!(!changed.verify_any(&[k1.verifying_key()]));
        let mut changed = info.clone();
        changed
            .references
            .insert(sp("/nix/store/0yk6qgfdpnp97aa113k14bn130rvjqab-a"));
        assert!(!changed.verify_any(&[k1.verifying_key()]));
    }
}
