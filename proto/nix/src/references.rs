//! Reference scanning, as Nix does it after a build: which of a set of candidate
//! store paths does a NAR mention? A path is referenced when its 32-character
//! nix32 hash part occurs anywhere in the bytes (file contents, symlink
//! targets, entry names: Nix scans the whole NAR serialisation, and so does
//! [`RefScanner`] when it is fed the NAR stream).
//!
//! Streaming and bounded: [`RefScanner::update`] takes chunks of any size and
//! keeps only the last 31 bytes between them, so a hash split across two
//! chunks is still found; memory is the candidate set plus that tail. The
//! search slides a 32-byte window and checks its bytes from the end: a byte
//! outside the nix32 alphabet lets the window jump past it, so binary data is
//! skipped quickly and only runs of nix32 characters are looked up.

use std::collections::{BTreeSet, HashSet};

use crate::nixbase32::ALPHABET;
use crate::store_path::StorePath;

/// Length of a store path's hash part in nix32 characters.
pub const HASH_PART_LEN: usize = 32;

const fn nix32_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        t[ALPHABET[i] as usize] = true;
        i += 1;
    }
    t
}

static IS_NIX32: [bool; 256] = nix32_table();

/// Finds which candidate hash parts occur in a byte stream.
#[derive(Debug, Clone)]
pub struct RefScanner {
    /// Hash parts not seen yet.
    pending: HashSet<[u8; HASH_PART_LEN]>,
    /// Hash parts seen.
    found: HashSet<[u8; HASH_PART_LEN]>,
    /// The last bytes of the previous chunks (fewer than [`HASH_PART_LEN`]).
    tail: Vec<u8>,
}

impl RefScanner {
    /// Scan for the hash parts of `candidates`.
    pub fn new<'a>(candidates: impl IntoIterator<Item = &'a StorePath>) -> RefScanner {
        let pending = candidates
            .into_iter()
            .filter_map(|p| <[u8; HASH_PART_LEN]>::try_from(p.hash_part().as_bytes()).ok())
            .collect();
        RefScanner {
            pending,
            found: HashSet::new(),
            tail: Vec::with_capacity(2 * HASH_PART_LEN),
        }
    }

    /// Feed the next chunk of the stream.
    pub fn update(&mut self, data: &[u8]) {
        if self.pending.is_empty() || data.is_empty() {
            return;
        }
        // Windows that start in the tail and end in `data`.
        let head = data.len().min(HASH_PART_LEN - 1);
        if !self.tail.is_empty() {
            let mut joined = std::mem::take(&mut self.tail);
            joined.extend_from_slice(&data[..head]);
            self.search(&joined);
            self.tail = joined;
            let keep = self.tail.len() - head;
            self.tail.truncate(keep);
        }
        self.search(data);
        // Keep the last HASH_PART_LEN - 1 bytes of everything seen so far.
        if data.len() >= HASH_PART_LEN - 1 {
            self.tail.clear();
            self.tail
                .extend_from_slice(&data[data.len() - (HASH_PART_LEN - 1)..]);
        } else {
            self.tail.extend_from_slice(data);
            let excess = self.tail.len().saturating_sub(HASH_PART_LEN - 1);
            self.tail.drain(..excess);
        }
    }

    fn search(&mut self, s: &[u8]) {
        let mut i = 0;
        'window: while i + HASH_PART_LEN <= s.len() {
            for j in (0..HASH_PART_LEN).rev() {
                if !IS_NIX32[s[i + j] as usize] {
                    // No window containing byte i + j can match.
                    i += j + 1;
                    continue 'window;
                }
            }
            let window: [u8; HASH_PART_LEN] =
                s[i..i + HASH_PART_LEN].try_into().expect("window length");
            if self.pending.remove(&window) {
                self.found.insert(window);
                if self.pending.is_empty() {
                    return;
                }
            }
            i += 1;
        }
    }

    /// Whether the hash part of `path` occurred in what was fed so far.
    pub fn is_found(&self, path: &StorePath) -> bool {
        <[u8; HASH_PART_LEN]>::try_from(path.hash_part().as_bytes())
            .is_ok_and(|h| self.found.contains(&h))
    }

    /// The hash parts found so far.
    pub fn found(&self) -> BTreeSet<String> {
        self.found
            .iter()
            .map(|h| String::from_utf8_lossy(h).into_owned())
            .collect()
    }
}

/// The `candidates` whose hash parts occur in `data`.
pub fn scan_bytes(data: &[u8], candidates: &BTreeSet<StorePath>) -> BTreeSet<StorePath> {
    let mut s = RefScanner::new(candidates);
    s.update(data);
    candidates
        .iter()
        .filter(|p| s.is_found(p))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(h: &str, name: &str) -> StorePath {
        StorePath::parse(&format!("/nix/store/{h}-{name}")).unwrap()
    }

    const A: &str = "0c8ncgwl9rfsjzf5cfrwf4asaq7hc0ii";
    const B: &str = "sc8xk2mv7k1vj4ihj6yzrnjbl1l7pl3w";
    const C: &str = "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz";

    fn cands() -> BTreeSet<StorePath> {
        [p(A, "a"), p(B, "b"), p(C, "c")].into()
    }

    #[test]
    fn finds_hash_parts_anywhere_in_the_bytes() {
        let data = format!("\0\x01binary /nix/store/{A}-a/bin/x and {B}\n");
        let found = scan_bytes(data.as_bytes(), &cands());
        assert_eq!(found, [p(A, "a"), p(B, "b")].into());
        // a hash part right at the start and at the end
        let found = scan_bytes(C.as_bytes(), &cands());
        assert_eq!(found, [p(C, "c")].into());
    }

    #[test]
    fn a_hash_part_inside_a_longer_nix32_run_is_found() {
        // Nix matches every window, so a hash part embedded in a longer run counts.
        let data = format!("aaaa{A}aaaa");
        assert_eq!(scan_bytes(data.as_bytes(), &cands()), [p(A, "a")].into());
    }

    #[test]
    fn near_misses_are_not_found() {
        let cut = &A[..31];
        let mut wrong = A.to_string();
        wrong.replace_range(5..6, "e"); // 'e' is not nix32
        let data = format!("{cut}-{wrong}-{}", A.to_uppercase());
        assert!(scan_bytes(data.as_bytes(), &cands()).is_empty());
    }

    #[test]
    fn split_across_chunks_of_every_size() {
        let data = format!("xx\0{A}\x7f{B}yy{C}");
        for chunk in 1..=data.len() {
            let c = cands();
            let mut s = RefScanner::new(&c);
            for piece in data.as_bytes().chunks(chunk) {
                s.update(piece);
            }
            assert_eq!(s.found().len(), 3, "chunk size {chunk}");
            assert!(s.is_found(&p(A, "a")) && s.is_found(&p(B, "b")) && s.is_found(&p(C, "c")));
            assert!(s.tail.len() < HASH_PART_LEN);
        }
    }
}
