//! Hashes as Nix writes them: `algo:base16`, `algo:nix32`, `algo:base64`, SRI
//! (`algo-base64`), and the bare forms the wire protocols use.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::Digest;
use std::fmt;
use std::str::FromStr;

use crate::nixbase32;

/// A hash algorithm Nix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    /// Digest size in bytes.
    pub const fn size(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    /// The name Nix prints (`sha256`, …).
    pub const fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Hash a byte slice in one go.
    pub fn digest(self, data: &[u8]) -> Hash {
        let mut h = Hasher::new(self);
        h.update(data);
        h.finish()
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        match s {
            "md5" => Ok(HashAlgo::Md5),
            "sha1" => Ok(HashAlgo::Sha1),
            "sha256" => Ok(HashAlgo::Sha256),
            "sha512" => Ok(HashAlgo::Sha512),
            _ => Err(HashError::UnknownAlgo(s.chars().take(32).collect())),
        }
    }
}

/// Why a hash did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("unknown hash algorithm {0:?}")]
    UnknownAlgo(String),
    #[error("hash {0:?} has no algorithm prefix")]
    MissingAlgo(String),
    #[error("hash has the wrong length for {algo}: {len} characters")]
    BadLength { algo: HashAlgo, len: usize },
    #[error("invalid hash encoding: {0}")]
    BadEncoding(String),
}

/// A digest together with its algorithm.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: HashAlgo,
    bytes: [u8; 64],
}

impl Hash {
    /// Build from raw digest bytes; the length must match the algorithm.
    pub fn from_bytes(algo: HashAlgo, digest: &[u8]) -> Result<Hash, HashError> {
        if digest.len() != algo.size() {
            return Err(HashError::BadLength {
                algo,
                len: digest.len(),
            });
        }
        let mut bytes = [0u8; 64];
        bytes[..digest.len()].copy_from_slice(digest);
        Ok(Hash { algo, bytes })
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The raw digest.
    pub fn digest(&self) -> &[u8] {
        &self.bytes[..self.algo.size()]
    }

    /// Lower-case hexadecimal, no prefix.
    pub fn to_base16(&self) -> String {
        let mut s = String::with_capacity(self.algo.size() * 2);
        for b in self.digest() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// nix32, no prefix.
    pub fn to_nix32(&self) -> String {
        nixbase32::encode(self.digest())
    }

    /// Standard padded base64, no prefix.
    pub fn to_base64(&self) -> String {
        B64.encode(self.digest())
    }

    /// `algo-base64` (Subresource Integrity).
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, self.to_base64())
    }

    /// `algo:nix32`, the form narinfo files and fingerprints use.
    pub fn to_nix32_prefixed(&self) -> String {
        format!("{}:{}", self.algo, self.to_nix32())
    }

    /// `algo:base16`.
    pub fn to_base16_prefixed(&self) -> String {
        format!("{}:{}", self.algo, self.to_base16())
    }

    /// Parse `algo:…` (base16, nix32 or base64 by length) or SRI `algo-base64`.
    pub fn parse_any(s: &str) -> Result<Hash, HashError> {
        if let Some((algo, rest)) = s.split_once(':') {
            return Hash::parse_bare(algo.parse()?, rest);
        }
        if let Some((algo, rest)) = s.split_once('-')
            && let Ok(algo) = algo.parse::<HashAlgo>()
        {
            return Hash::parse_base64(algo, rest);
        }
        Err(HashError::MissingAlgo(s.chars().take(80).collect()))
    }

    /// Parse a digest without prefix whose algorithm is known; the encoding is
    /// told by the length (as Nix does).
    pub fn parse_bare(algo: HashAlgo, s: &str) -> Result<Hash, HashError> {
        let size = algo.size();
        if s.len() == size * 2 {
            let mut out = Vec::with_capacity(size);
            for i in 0..size {
                let byte = u8::from_str_radix(s.get(2 * i..2 * i + 2).unwrap_or("zz"), 16)
                    .map_err(|_| HashError::BadEncoding("not hexadecimal".into()))?;
                out.push(byte);
            }
            Hash::from_bytes(algo, &out)
        } else if s.len() == nixbase32::encoded_len(size) {
            let out = nixbase32::decode(s).map_err(|e| HashError::BadEncoding(e.to_string()))?;
            Hash::from_bytes(algo, &out)
        } else if s.len() == size.div_ceil(3) * 4 {
            Hash::parse_base64(algo, s)
        } else {
            Err(HashError::BadLength { algo, len: s.len() })
        }
    }

    fn parse_base64(algo: HashAlgo, s: &str) -> Result<Hash, HashError> {
        let out = B64
            .decode(s)
            .map_err(|e| HashError::BadEncoding(e.to_string()))?;
        Hash::from_bytes(algo, &out)
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_nix32_prefixed())
    }
}

/// Displays as `algo:nix32`.
impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix32_prefixed())
    }
}

impl FromStr for Hash {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        Hash::parse_any(s)
    }
}

/// An incremental hasher for any [`HashAlgo`].
#[derive(Clone)]
pub enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algo: HashAlgo) -> Hasher {
        match algo {
            HashAlgo::Md5 => Hasher::Md5(md5::Md5::new()),
            HashAlgo::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            HashAlgo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            HashAlgo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Hash {
        let (algo, digest): (HashAlgo, Vec<u8>) = match self {
            Hasher::Md5(h) => (HashAlgo::Md5, h.finalize().to_vec()),
            Hasher::Sha1(h) => (HashAlgo::Sha1, h.finalize().to_vec()),
            Hasher::Sha256(h) => (HashAlgo::Sha256, h.finalize().to_vec()),
            Hasher::Sha512(h) => (HashAlgo::Sha512, h.finalize().to_vec()),
        };
        Hash::from_bytes(algo, &digest).expect("digest size matches its algorithm")
    }
}

/// XOR-fold a digest to `size` bytes, as Nix's `compressHash` does for store paths.
pub fn compress(digest: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    for (i, b) in digest.iter().enumerate() {
        out[i % size] ^= b;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_of_the_empty_sha256() {
        let h = HashAlgo::Sha256.digest(b"");
        assert_eq!(
            h.to_base16(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            h.to_nix32(),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            h.to_sri(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        for s in [
            h.to_base16_prefixed(),
            h.to_nix32_prefixed(),
            format!("sha256:{}", h.to_base64()),
            h.to_sri(),
        ] {
            assert_eq!(Hash::parse_any(&s).unwrap(), h, "{s}");
        }
    }

    #[test]
    fn rejects() {
        assert!(matches!(
            Hash::parse_any("sha256:abc"),
            Err(HashError::BadLength { .. })
        ));
        assert!(matches!(
            Hash::parse_any("foo:abc"),
            Err(HashError::UnknownAlgo(_))
        ));
        assert!(matches!(
            Hash::parse_any("abc"),
            Err(HashError::MissingAlgo(_))
        ));
        let bad_hex = format!("sha1:{}", "g".repeat(40));
        assert!(matches!(
            Hash::parse_any(&bad_hex),
            Err(HashError::BadEncoding(_))
        ));
    }

    /// Every format of sha1, sha256 and sha512 hashes against Nix 2.8's own
    /// conversions (`nix-hash --to-base32/--to-base16`, `nix hash to-sri/to-base64`)
    /// and `nix-hash --flat` of the same bytes.
    #[test]
    fn formats_match_nix() {
        use farm_testkit::host::run;
        use std::process::Command;
        let lines = |mut cmd: Command| -> Vec<String> {
            cmd.arg("--extra-experimental-features").arg("nix-command");
            String::from_utf8(run(cmd, None))
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        };
        let nix_hash = |args: &[&str], hashes: &[String]| {
            let mut cmd = Command::new("nix-hash");
            cmd.args(args).args(hashes);
            // nix-hash takes no --extra-experimental-features.
            String::from_utf8(run(cmd, None))
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let dir = tempfile::tempdir().unwrap();
        let inputs: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"abc".to_vec(),
            (0..=255u8).cycle().take(1000).collect(),
        ];
        let mut files = Vec::new();
        for (i, data) in inputs.iter().enumerate() {
            let f = dir.path().join(format!("in{i}"));
            std::fs::write(&f, data).unwrap();
            files.push(f.to_str().unwrap().to_owned());
        }
        for (algo, name) in [
            (HashAlgo::Sha1, "sha1"),
            (HashAlgo::Sha256, "sha256"),
            (HashAlgo::Sha512, "sha512"),
        ] {
            let ours: Vec<Hash> = inputs.iter().map(|d| algo.digest(d)).collect();
            let hex: Vec<String> = ours.iter().map(Hash::to_base16).collect();
            let nix32: Vec<String> = ours.iter().map(Hash::to_nix32).collect();
            let sri: Vec<String> = ours.iter().map(Hash::to_sri).collect();
            assert_eq!(nix_hash(&["--type", name, "--flat"], &files), hex, "{name}");
            assert_eq!(
                nix_hash(&["--type", name, "--to-base32"], &hex),
                nix32,
                "{name}"
            );
            assert_eq!(
                nix_hash(&["--type", name, "--to-base16"], &nix32),
                hex,
                "{name}"
            );
            let mut cmd = Command::new("nix");
            cmd.args(["hash", "to-sri", "--type", name]).args(&nix32);
            let nix_sri = lines(cmd);
            assert_eq!(nix_sri, sri, "{name}");
            let mut cmd = Command::new("nix");
            cmd.args(["hash", "to-base64", "--type", name]).args(&hex);
            let nix_b64 = lines(cmd);
            for (i, h) in ours.iter().enumerate() {
                assert_eq!(nix_b64[i], h.to_base64(), "{name}");
                // Everything Nix printed parses back to the same hash.
                for s in [
                    format!("{name}:{}", hex[i]),
                    format!("{name}:{}", nix32[i]),
                    format!("{name}:{}", nix_b64[i]),
                    nix_sri[i].clone(),
                ] {
                    assert_eq!(Hash::parse_any(&s).unwrap(), *h, "{s}");
                }
                assert_eq!(Hash::parse_bare(algo, &nix32[i]).unwrap(), *h);
                assert_eq!(Hash::parse_bare(algo, &hex[i]).unwrap(), *h);
            }
        }
    }

    #[test]
    fn every_algo_round_trips() {
        for algo in [
            HashAlgo::Md5,
            HashAlgo::Sha1,
            HashAlgo::Sha256,
            HashAlgo::Sha512,
        ] {
            let h = algo.digest(b"nix-farm");
            for s in [h.to_base16_prefixed(), h.to_nix32_prefixed(), h.to_sri()] {
                assert_eq!(Hash::parse_any(&s).unwrap(), h, "{s}");
            }
        }
    }
}
