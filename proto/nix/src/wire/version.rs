//! Protocol versions as the worker (`1.x`) and serve (`2.x`) protocols send
//! them: one `u64`, the major number in bits 8–15 and the minor in bits 0–7
//! (`0x123` is 1.35). Higher bits are ignored, as Nix's
//! `GET_PROTOCOL_MAJOR`/`GET_PROTOCOL_MINOR` masks do. Each protocol module
//! names the versions that brought the features its codecs gate on
//! (`worker::feature`, `serve::feature`); a codec asks
//! [`ProtocolVersion::supports`].

use std::fmt;

/// A negotiated or announced protocol version, ordered by (major, minor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProtocolVersion {
    major: u8,
    minor: u8,
}

impl ProtocolVersion {
    /// `major.minor`.
    pub const fn new(major: u8, minor: u8) -> ProtocolVersion {
        ProtocolVersion { major, minor }
    }

    /// The version a peer sent (bits above the major number ignored).
    pub const fn from_wire(v: u64) -> ProtocolVersion {
        ProtocolVersion {
            major: ((v >> 8) & 0xff) as u8,
            minor: (v & 0xff) as u8,
        }
    }

    /// The `u64` sent for this version.
    pub const fn to_wire(self) -> u64 {
        ((self.major as u64) << 8) | self.minor as u64
    }

    pub const fn major(self) -> u8 {
        self.major
    }

    pub const fn minor(self) -> u8 {
        self.minor
    }

    /// Whether a connection at this version has the feature `since` brought:
    /// the same protocol (major) and at least its minor.
    pub const fn supports(self, since: ProtocolVersion) -> bool {
        self.major == since.major && self.minor >= since.minor
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_and_order() {
        let v = ProtocolVersion::from_wire(0x123);
        assert_eq!(v, ProtocolVersion::new(1, 35));
        assert_eq!(v.to_wire(), 0x123);
        assert_eq!(v.to_string(), "1.35");
        assert_eq!(ProtocolVersion::new(2, 7).to_wire(), 0x207);
        // Nix masks: bits above the major are not part of the version.
        assert_eq!(
            ProtocolVersion::from_wire(0x1_0122),
            ProtocolVersion::new(1, 34)
        );
        assert!(ProtocolVersion::new(1, 38) > ProtocolVersion::new(1, 35));
        assert!(ProtocolVersion::new(2, 0) > ProtocolVersion::new(1, 255));
        assert!(v.supports(ProtocolVersion::new(1, 35)));
        assert!(!v.supports(ProtocolVersion::new(1, 36)));
        // A serve version has no worker feature, however large.
        assert!(!ProtocolVersion::new(2, 7).supports(ProtocolVersion::new(1, 12)));
    }
}
