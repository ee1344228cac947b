//! Nix's base-32 encoding ("nix32"): the alphabet without e, o, t, u, read
//! least-significant bit first from the end. Used in store path hash parts and
//! in `sha256:…` hashes.

/// The 32 digits, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Length of the nix32 encoding of `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 { 0 } else { (n * 8 - 1) / 5 + 1 }
}

/// Length in bytes of a nix32 string of `n` characters, if such a length exists.
pub fn decoded_len(n: usize) -> Option<usize> {
    // encoded_len is monotonic; search the (at most two) candidates.
    let guess = n * 5 / 8;
    (guess..=guess + 1).find(|&b| encoded_len(b) == n)
}

/// Encode bytes as nix32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = (bytes[i] as u16) >> j;
        let hi = if i + 1 < bytes.len() {
            (bytes[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// Why a nix32 string did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid nix32 character {0:?}")]
    InvalidChar(char),
    #[error("invalid nix32 length {0}")]
    InvalidLength(usize),
    #[error("nix32 string has bits set beyond its length")]
    TrailingBits,
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Decode a nix32 string.
pub fn decode(s: &str) -> Result<Vec<u8>, DecodeError> {
    let s = s.as_bytes();
    let size = decoded_len(s.len()).ok_or(DecodeError::InvalidLength(s.len()))?;
    let mut out = vec![0u8; size];
    for (idx, &c) in s.iter().enumerate() {
        let d = digit(c).ok_or(DecodeError::InvalidChar(c as char))? as u16;
        let n = s.len() - 1 - idx;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (d << j) as u8;
        let carry = d >> (8 - j);
        if i + 1 < size {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(DecodeError::TrailingBits);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        // `nix-hash --type sha256 --to-base32` of the sha256 of the empty string.
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        assert_eq!(
            encode(&bytes),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            decode("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").unwrap(),
            bytes
        );
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            decode("e0000000000000000000000000000000"),
            Err(DecodeError::InvalidChar('e'))
        );
        assert_eq!(decode("000"), Err(DecodeError::InvalidLength(3)));
        // 52 chars carry 260 bits for 32 bytes: the top digit may only use its lowest bit.
        let top = format!("z{}", "0".repeat(51));
        assert_eq!(decode(&top), Err(DecodeError::TrailingBits));
        assert!(decode(&format!("1{}", "0".repeat(51))).is_ok());
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            prop_assert_eq!(decode(&encode(&bytes)).unwrap(), bytes);
        }
    }
}
