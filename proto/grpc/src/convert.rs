//! Conversions between `farm.v1` messages and `farm-nix` domain types.
//!
//! Everything coming off the wire is untrusted: store paths are parsed and
//! validated, hashes parsed, list lengths bounded, and each failure names the
//! field it came from.

use std::collections::BTreeSet;

use farm_nix::hash::Hash;
use farm_nix::path_info::ValidPathInfo;
use farm_nix::store_path::StorePath;

use crate::v1;

/// Most references a path info may carry on the wire.
pub const MAX_REFERENCES: usize = 100_000;
/// Most signatures a path info may carry on the wire.
pub const MAX_SIGS: usize = 64;
/// Longest signature or content-address string accepted.
pub const MAX_SHORT_STRING: usize = 1024;

/// A message that does not describe a valid domain value.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{field}: invalid store path {value:?}: {reason}")]
    StorePath {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("{field}: invalid hash {value:?}: {reason}")]
    Hash {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("{field}: too many entries ({len} > {max})")]
    TooMany {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field}: value too long ({len} > {max} bytes)")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{0} is required")]
    Missing(&'static str),
}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Parse one full store path (`/nix/store/…`) from field `field`.
pub fn parse_store_path(field: &'static str, s: &str) -> Result<StorePath, ConvertError> {
    if s.len() > MAX_SHORT_STRING {
        return Err(ConvertError::TooLong {
            field,
            len: s.len(),
            max: MAX_SHORT_STRING,
        });
    }
    StorePath::parse(s).map_err(|e| ConvertError::StorePath {
        field,
        value: s.to_owned(),
        reason: e.to_string(),
    })
}

/// Parse a list of full store paths, at most `max` of them.
pub fn parse_store_paths(
    field: &'static str,
    list: &[String],
    max: usize,
) -> Result<Vec<StorePath>, ConvertError> {
    if list.len() > max {
        return Err(ConvertError::TooMany {
            field,
            len: list.len(),
            max,
        });
    }
    list.iter().map(|s| parse_store_path(field, s)).collect()
}

fn bounded(field: &'static str, s: String) -> Result<String, ConvertError> {
    if s.len() > MAX_SHORT_STRING {
        Err(ConvertError::TooLong {
            field,
            len: s.len(),
            max: MAX_SHORT_STRING,
        })
    } else {
        Ok(s)
    }
}

impl From<&ValidPathInfo> for v1::PathInfo {
    fn from(info: &ValidPathInfo) -> v1::PathInfo {
        v1::PathInfo {
            store_path: info.path.to_string(),
            deriver: info
                .deriver
                .as_ref()
                .map(|d| d.to_string())
                .unwrap_or_default(),
            nar_hash: info.nar_hash.to_nix32_prefixed(),
            nar_size: info.nar_size,
            references: info.references.iter().map(|r| r.to_string()).collect(),
            sigs: info.sigs.iter().cloned().collect(),
            ca: info.ca.clone().unwrap_or_default(),
        }
    }
}

impl From<ValidPathInfo> for v1::PathInfo {
    fn from(info: ValidPathInfo) -> v1::PathInfo {
        v1::PathInfo::from(&info)
    }
}

/// `registration_time` and `ultimate` do not travel; they come back as 0 and false.
impl TryFrom<v1::PathInfo> for ValidPathInfo {
    type Error = ConvertError;

    fn try_from(p: v1::PathInfo) -> Result<ValidPathInfo, ConvertError> {
        let path = parse_store_path("store_path", &p.store_path)?;
        let deriver = if p.deriver.is_empty() {
            None
        } else {
            Some(parse_store_path("deriver", &p.deriver)?)
        };
        if p.nar_hash.len() > MAX_SHORT_STRING {
            return Err(ConvertError::TooLong {
                field: "nar_hash",
                len: p.nar_hash.len(),
                max: MAX_SHORT_STRING,
            });
        }
        let nar_hash = Hash::parse_any(&p.nar_hash).map_err(|e| ConvertError::Hash {
            field: "nar_hash",
            value: p.nar_hash.clone(),
            reason: e.to_string(),
        })?;
        let references: BTreeSet<StorePath> =
            parse_store_paths("references", &p.references, MAX_REFERENCES)?
                .into_iter()
                .collect();
        if p.sigs.len() > MAX_SIGS {
            return Err(ConvertError::TooMany {
                field: "sigs",
                len: p.sigs.len(),
                max: MAX_SIGS,
            });
        }
        let sigs = p
            .sigs
            .into_iter()
            .map(|s| bounded("sigs", s))
            .collect::<Result<BTreeSet<String>, _>>()?;
        let ca = if p.ca.is_empty() {
            None
        } else {
            Some(bounded("ca", p.ca)?)
        };
        Ok(ValidPathInfo {
            path,
            deriver,
            nar_hash,
            references,
            registration_time: 0,
            nar_size: p.nar_size,
            ultimate: false,
            sigs,
            ca,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_nix::hash::HashAlgo;

    fn sp(s: &str) -> StorePath {
        StorePath::parse(s).unwrap()
    }

    fn sample() -> ValidPathInfo {
        let mut info = ValidPathInfo::new(
            sp("/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab-hello-2.12"),
            HashAlgo::Sha256.digest(b"some nar"),
            4242,
        );
        info.deriver = Some(sp(
            "/nix/store/0yk6qgfdpnp97aa113k14bn130rvjqab-hello-2.12.drv",
        ));
        info.references
            .insert(sp("/nix/store/zzk6qgfdpnp97aa113k14bn130rvjqab-glibc"));
        info.references.insert(info.path.clone());
        info.sigs.insert("cache-1:c2lnbmF0dXJl".into());
        info.ca =
            Some("fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into());
        info
    }

    #[test]
    fn path_info_roundtrip() {
        let info = sample();
        let msg = v1::PathInfo::from(&info);
        assert_eq!(msg.nar_hash, info.nar_hash.to_nix32_prefixed());
        assert_eq!(msg.references.len(), 2);
        let back = ValidPathInfo::try_from(msg).unwrap();
        assert_eq!(back, info);
    }

    #[test]
    fn path_info_empty_optionals() {
        let mut info = sample();
        info.deriver = None;
        info.ca = None;
        info.sigs.clear();
        let msg = v1::PathInfo::from(&info);
        assert_eq!(msg.deriver, "");
        assert_eq!(msg.ca, "");
        assert_eq!(ValidPathInfo::try_from(msg).unwrap(), info);
    }

    #[test]
    fn path_info_rejects_bad_fields() {
        let good = v1::PathInfo::from(&sample());

        let mut m = good.clone();
        m.store_path = "/tmp/evil".into();
        let e = ValidPathInfo::try_from(m).unwrap_err();
        assert!(e.to_string().starts_with("store_path:"), "{e}");

        let mut m = good.clone();
        m.references.push("/nix/store/short-x".into());
        assert!(matches!(
            ValidPathInfo::try_from(m),
            Err(ConvertError::StorePath {
                field: "references",
                ..
            })
        ));

        let mut m = good.clone();
        m.nar_hash = "sha256:nothex".into();
        assert!(matches!(
            ValidPathInfo::try_from(m),
            Err(ConvertError::Hash { .. })
        ));

        let mut m = good.clone();
        m.sigs = vec!["k:x".into(); MAX_SIGS + 1];
        assert!(matches!(
            ValidPathInfo::try_from(m),
            Err(ConvertError::TooMany { field: "sigs", .. })
        ));

        let mut m = good;
        m.ca = "x".repeat(MAX_SHORT_STRING + 1);
        assert!(matches!(
            ValidPathInfo::try_from(m),
            Err(ConvertError::TooLong { field: "ca", .. })
        ));
    }

    #[test]
    fn store_path_list_bounded() {
        let list = vec!["/nix/store/ayk6qgfdpnp97aa113k14bn130rvjqab-a".to_string(); 3];
        assert_eq!(parse_store_paths("p", &list, 3).unwrap().len(), 3);
        assert!(parse_store_paths("p", &list, 2).is_err());
    }
}
