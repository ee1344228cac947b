//! Where the cache's objects live: a local directory (the default, under the
//! state dir) or an S3-compatible bucket, both behind `object_store`, so the same
//! ingest and serving code runs on a homelab disk and on Garage/MinIO/Ceph/AWS.
//!
//! Object layout (Nix's binary cache layout, relative to the root or prefix):
//! `<hash>.narinfo`, `nar/<filehash>.nar.zst`, `log/<drv base name>` (zstd), and
//! `tmp/…` for uploads in flight (never served; swept when the cache opens).
//! A local directory is wrapped in [`DurableLocal`], so every object written
//! is on disk (file and directory fsynced) when the write returns; S3 is
//! durable when it acknowledges a write.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use serde::Deserialize;

use super::CacheError;
use super::durable::DurableLocal;

/// Where objects are stored.
///
/// TOML (as part of the coordinator's config), local:
/// ```toml
/// [cache.storage]
/// type = "local"
/// root = "/var/lib/farm/cache"
/// ```
/// S3-compatible:
/// ```toml
/// [cache.storage]
/// type = "s3"
/// bucket = "nix-farm"
/// endpoint = "http://garage.lan:3900"   # omit for AWS
/// region = "garage"
/// prefix = "cache"                      # optional key prefix
/// credentials_file = "/run/secrets/s3"  # optional; else AWS_* env vars
/// ```
/// The credentials file holds `key = value` lines: `access_key_id`,
/// `secret_access_key` and optionally `session_token` (`#` starts a comment).
/// Without it, the standard `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN` (and the other `AWS_*` variables `object_store` knows) apply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageConfig {
    /// A directory on the local filesystem (created if missing).
    Local { root: PathBuf },
    /// An S3-compatible bucket.
    S3 {
        bucket: String,
        /// `https://host:port` of an S3-compatible server; `None` for AWS itself.
        #[serde(default)]
        endpoint: Option<String>,
        #[serde(default)]
        region: Option<String>,
        /// Key prefix inside the bucket (no leading or trailing `/`).
        #[serde(default)]
        prefix: Option<String>,
        #[serde(default)]
        credentials_file: Option<PathBuf>,
    },
}

/// Static credentials read from a `credentials_file`. `Debug` shows only the
/// access key id: the secret and the session token are redacted.
#[derive(Default, PartialEq, Eq)]
struct S3Credentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The credentials file is small; anything larger is not one.
const MAX_CREDENTIALS_FILE: u64 = 64 * 1024;

fn parse_credentials(text: &str) -> Result<S3Credentials, String> {
    let mut creds = S3Credentials::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {}: expected key = value", n + 1));
        };
        let value = value.trim().trim_matches('"').to_string();
        match key.trim().to_ascii_lowercase().as_str() {
            "access_key_id" | "aws_access_key_id" => creds.access_key_id = value,
            "secret_access_key" | "aws_secret_access_key" => creds.secret_access_key = value,
            "session_token" | "aws_session_token" => creds.session_token = Some(value),
            other => return Err(format!("line {}: unknown key {other:?}", n + 1)),
        }
    }
    if creds.access_key_id.is_empty() || creds.secret_access_key.is_empty() {
        return Err("access_key_id and secret_access_key are both required".into());
    }
    Ok(creds)
}

fn read_credentials(path: &Path) -> Result<S3Credentials, CacheError> {
    let bad =
        |why: String| CacheError::Config(format!("S3 credentials file {}: {why}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.len() > MAX_CREDENTIALS_FILE {
        return Err(bad("too large".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    parse_credentials(&text).map_err(bad)
}

impl StorageConfig {
    /// Build the object store this configuration names.
    pub fn build(&self) -> Result<Arc<dyn ObjectStore>, CacheError> {
        match self {
            StorageConfig::Local { root } => {
                std::fs::create_dir_all(root).map_err(|e| {
                    CacheError::Config(format!("cache directory {}: {e}", root.display()))
                })?;
                let fs = LocalFileSystem::new_with_prefix(root)?;
                // LocalFileSystem never fsyncs; the wrapper does, before a write returns.
                Ok(Arc::new(DurableLocal::new(root, Arc::new(fs), "tmp")?))
            }
            StorageConfig::S3 {
                bucket,
                endpoint,
                region,
                prefix,
                credentials_file,
            } => {
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
                if let Some(endpoint) = endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                if let Some(region) = region {
                    builder = builder.with_region(region);
                }
                if let Some(file) = credentials_file {
                    let creds = read_credentials(file)?;
                    builder = builder
                        .with_access_key_id(creds.access_key_id)
                        .with_secret_access_key(creds.secret_access_key);
                    if let Some(token) = creds.session_token {
                        builder = builder.with_token(token);
                    }
                }
                let s3 = builder.build()?;
                match prefix.as_deref().map(|p| p.trim_matches('/')) {
                    Some(p) if !p.is_empty() => Ok(Arc::new(PrefixStore::new(s3, p))),
                    _ => Ok(Arc::new(s3)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_file_format() {
        let c = parse_credentials(
            "# garage key\naccess_key_id = GK123\nsecret_access_key = \"s3cr3t\"\n",
        )
        .unwrap();
        assert_eq!(c.access_key_id, "GK123");
        assert_eq!(c.secret_access_key, "s3cr3t");
        assert_eq!(c.session_token, None);
        let shown = format!("{c:?}");
        assert!(
            shown.contains("GK123") && !shown.contains("s3cr3t"),
            "{shown}"
        );
        assert!(parse_credentials("access_key_id = x\n").is_err());
        assert!(parse_credentials("access_key_id = x\nsecret_access_key = y\nfoo = z").is_err());
        assert!(parse_credentials("garbage").is_err());
    }

    #[test]
    fn config_from_toml() {
        #[derive(Deserialize)]
        struct W {
            storage: StorageConfig,
        }
        let w: W = toml::from_str("[storage]\ntype = \"local\"\nroot = \"/x\"\n").unwrap();
        assert_eq!(w.storage, StorageConfig::Local { root: "/x".into() });
        let w: W = toml::from_str(
            "[storage]\ntype = \"s3\"\nbucket = \"b\"\nendpoint = \"http://h:3900\"\nregion = \"garage\"\n",
        )
        .unwrap();
        assert!(matches!(w.storage, StorageConfig::S3 { ref bucket, .. } if bucket == "b"));
        assert!(
            toml::from_str::<W>("[storage]\ntype = \"s3\"\nbucket = \"b\"\nbogus = 1\n").is_err()
        );
    }

    #[test]
    fn s3_store_builds_without_network() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        std::fs::write(&creds, "access_key_id = a\nsecret_access_key = b\n").unwrap();
        let cfg = StorageConfig::S3 {
            bucket: "bucket".into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("garage".into()),
            prefix: Some("cache/".into()),
            credentials_file: Some(creds),
        };
        cfg.build().unwrap();
    }
}
