//! The hashes modulo ([`hash_derivation_modulo`]) of derivations whose output
//! paths this coordinator has checked itself ([`Derivation::check_output_paths`]),
//! by the `.drv`'s hash part: what a submission needs of every derivation in
//! its `.drv` closure, so that a graph whose `.drv` files arrived before (or
//! were checked by an earlier submission) is not read from storage again.
//!
//! Sound without any trust in the uploader: a `.drv` is admitted to the cache
//! only when its path is the text path of its contents (`content::verify`),
//! so a `.drv`'s hash part fixes its contents (as Nix's store assumes), and a
//! hash is remembered only after the check passed, from the bytes the
//! coordinator read and the remembered hashes of its inputs. Ingest fills it
//! (a `.drv` arrives after its input derivations, which must be in the cache
//! first); a submission fills it for what it had to read (after a restart
//! the memo starts empty).
//!
//! Bounded: two generations of [`GENERATION`] entries each (about 64 bytes
//! an entry); a hit in the older one moves to the newer, and when the newer
//! is full the older is dropped, so what is used stays.

use std::collections::HashMap;
use std::sync::Mutex;

use farm_nix::derivation::{Derivation, hash_derivation_modulo, name_from_drv_path};
use farm_nix::hash::{Hash, HashAlgo};
use farm_nix::store_path::StorePath;

/// Entries per generation.
pub(crate) const GENERATION: usize = 200_000;

/// A printed hash part (32 nix32 characters), inline.
type Key = [u8; 32];
/// A sha256 digest (every hash modulo is one).
type Digest = [u8; 32];

fn key(p: &StorePath) -> Option<Key> {
    p.hash_part().as_bytes().try_into().ok()
}

#[derive(Default)]
struct Gens {
    current: HashMap<Key, Digest>,
    previous: HashMap<Key, Digest>,
}

/// The memo's lock; a panic while it was held leaves whole entries only.
/// (The cache does not use `domain::lock`: it sits below the domain.)
fn lock(m: &Mutex<Gens>) -> std::sync::MutexGuard<'_, Gens> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// See the module docs.
#[derive(Default)]
pub struct DrvHashes {
    gens: Mutex<Gens>,
}

impl DrvHashes {
    /// The remembered hash modulo of the derivation at `drv`.
    pub fn get(&self, drv: &StorePath) -> Option<Hash> {
        let k = key(drv)?;
        let mut g = lock(&self.gens);
        let d = match g.current.get(&k) {
            Some(d) => *d,
            None => {
                let d = g.previous.remove(&k)?;
                Self::put(&mut g, k, d);
                d
            }
        };
        Hash::from_bytes(HashAlgo::Sha256, &d).ok()
    }

    /// Remember `hash` for `drv`: only for a derivation whose output paths
    /// were checked, with the hashes of its inputs.
    pub fn insert(&self, drv: &StorePath, hash: &Hash) {
        let (Some(k), Ok(d)) = (key(drv), Digest::try_from(hash.digest())) else {
            return;
        };
        if hash.algo() != HashAlgo::Sha256 {
            return;
        }
        Self::put(&mut lock(&self.gens), k, d);
    }

    fn put(g: &mut Gens, k: Key, d: Digest) {
        if g.current.len() >= GENERATION && !g.current.contains_key(&k) {
            g.previous = std::mem::take(&mut g.current);
        }
        g.current.insert(k, d);
    }

    /// Check `drv` (the verified contents at `path`) against the remembered
    /// hashes of its inputs and remember its own: `false` (nothing
    /// remembered) when an input is not known here or the check fails, which
    /// a submission then finds out by reading the graph.
    pub fn learn(&self, path: &StorePath, drv: &Derivation) -> bool {
        // Looked up once each, outside the lock the lookups take.
        let mut inputs: HashMap<&StorePath, Hash> = HashMap::new();
        for i in drv.input_drvs.keys() {
            match self.get(i) {
                Some(h) => {
                    inputs.insert(i, h);
                }
                None => return false,
            }
        }
        match checked_modulo(path, drv, &|i| inputs.get(i).cloned()) {
            Ok(h) => {
                self.insert(path, &h);
                true
            }
            Err(_) => false,
        }
    }

    /// Entries held (both generations).
    #[cfg(test)]
    fn entries(&self) -> usize {
        let g = lock(&self.gens);
        g.current.len() + g.previous.len()
    }
}

/// The hash modulo of `drv`, the contents at `path`, after checking that
/// its declared output paths are the ones its contents and its inputs'
/// hashes (`known`) give; why not, as a message naming `path`. The one check
/// both the memo ([`DrvHashes::learn`]) and a submission's walk make.
pub fn checked_modulo(
    path: &StorePath,
    drv: &Derivation,
    known: &dyn Fn(&StorePath) -> Option<Hash>,
) -> Result<Hash, String> {
    let name = name_from_drv_path(path).map_err(|e| format!("{path}: {e}"))?;
    drv.check_output_paths(&name, known)
        .map_err(|e| format!("{path}: {e}; refused"))?;
    hash_derivation_modulo(drv, known).map_err(|e| format!("{path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(s: &str) -> StorePath {
        StorePath::parse(s).unwrap()
    }

    #[test]
    fn remembers_and_moves_hits_to_the_newer_generation() {
        let m = DrvHashes::default();
        let a = sp("/nix/store/fpfzx999brqs5x1w0n2dpyya4v8d43lh-a.drv");
        let h = HashAlgo::Sha256.digest(b"a");
        assert_eq!(m.get(&a), None);
        m.insert(&a, &h);
        assert_eq!(m.get(&a), Some(h.clone()));
        // Fill a generation: `a` moves to the older one, a hit brings it back.
        for i in 0..GENERATION {
            let mut k = [b'0'; 32];
            k[..8].copy_from_slice(format!("{i:08}").as_bytes());
            fill_one(&m, k);
        }
        assert_eq!(m.get(&a), Some(h.clone()));
        assert!(m.entries() <= 2 * GENERATION);
        // Not sha256: not remembered.
        let b = sp("/nix/store/clvrfiq699vwn0pddcx6b2ilqh8i102y-b.drv");
        m.insert(&b, &HashAlgo::Sha1.digest(b"b"));
        assert_eq!(m.get(&b), None);
    }

    fn fill_one(m: &DrvHashes, k: Key) {
        DrvHashes::put(&mut lock(&m.gens), k, [0; 32]);
    }
}
