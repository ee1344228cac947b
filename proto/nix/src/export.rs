//! The `nix-store --export` / `--import` stream: a sequence of store paths,
//! each with its NAR and metadata. [`ExportReader`] validates each NAR while
//! streaming it to a writer the caller gives; [`write_export_entry`] and
//! [`finish`] write such a stream.
//!
//! # Layout
//!
//! Integers are `u64` little-endian; strings are wire strings (`u64` length,
//! bytes, zero padding to a multiple of 8).
//!
//! ```text
//! stream = { u64(1) entry } u64(0)
//! entry  = NAR u64(0x4558494e) str(path) u64(n) n*str(reference) str(deriver or "") sig
//! sig    = u64(0) | u64(1) str(legacy signature, ignored)
//! ```
//!
//! References are written sorted (a set); store paths are full (`/nix/store/…`).

use std::collections::BTreeSet;
use std::path::Path;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::nar::{self, NarError, NarLimits, NarSummary};
use crate::path_info::ValidPathInfo;
use crate::store_path::StorePath;
use crate::wire::{
    self, Limits, WireError, read_bytes, read_count, read_opt_store_path, read_store_path,
    read_u64, write_bytes, write_opt_store_path, write_store_path, write_store_paths, write_u64,
};

/// The magic number after each NAR ("NIXE" little-endian).
pub const EXPORT_MAGIC: u64 = 0x4558_494e;
/// Longest legacy signature string accepted (and skipped) by default.
const MAX_SIG_LEN: u64 = 4096;
/// Most references accepted for one path by default.
pub const MAX_REFERENCES: u64 = 1 << 16;

/// Why an export stream could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// I/O, truncation, or a malformed string, path or reference list.
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("in a NAR: {0}")]
    Nar(#[from] NarError),
    #[error("expected 1 (another path) or 0 (end), found {0}")]
    BadMarker(u64),
    #[error("expected a signature flag of 0 or 1, found {0}")]
    BadSignatureFlag(u64),
}

impl From<std::io::Error> for ExportError {
    fn from(e: std::io::Error) -> Self {
        ExportError::Wire(WireError::from_io(e))
    }
}

/// The metadata of one path read from an export stream, with the size and
/// hash of its NAR as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedPath {
    pub path: StorePath,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    pub nar: NarSummary,
}

impl ExportedPath {
    /// A path info with what the stream tells (no signatures, no CA, time 0).
    pub fn to_path_info(&self) -> ValidPathInfo {
        let mut info = ValidPathInfo::new(
            self.path.clone(),
            self.nar.nar_hash.clone(),
            self.nar.nar_size,
        );
        info.references = self.references.clone();
        info.deriver = self.deriver.clone();
        info
    }
}

/// Reads an export stream path by path.
pub struct ExportReader<'a, R> {
    r: &'a mut R,
    limits: Limits,
    nar_limits: NarLimits,
    done: bool,
}

impl<'a, R: AsyncRead + Unpin> ExportReader<'a, R> {
    /// Read from `r`, validating each NAR against `limits`; at most
    /// [`MAX_REFERENCES`] references per path.
    pub fn new(r: &'a mut R, limits: &NarLimits) -> Self {
        let wire_limits = Limits {
            max_string: MAX_SIG_LEN,
            max_list: MAX_REFERENCES,
            ..Limits::default()
        };
        Self::with_limits(r, &wire_limits, limits)
    }

    /// Read from `r`: references per path bounded by `limits.max_list`, a
    /// legacy signature by `limits.max_string`, each NAR by `nar_limits`.
    pub fn with_limits(r: &'a mut R, limits: &Limits, nar_limits: &NarLimits) -> Self {
        ExportReader {
            r,
            limits: *limits,
            nar_limits: nar_limits.clone(),
            done: false,
        }
    }

    /// Read the next path: its NAR is validated and copied to `nar_out`
    /// (flushed), then its metadata returned. `None` at the end marker; the
    /// reader then reads nothing more (check for trailing bytes with
    /// [`crate::nar::expect_eof`] if the stream should end there).
    pub async fn next_path<W: AsyncWrite + Unpin>(
        &mut self,
        nar_out: &mut W,
    ) -> Result<Option<ExportedPath>, ExportError> {
        if !self.has_next().await? {
            return Ok(None);
        }
        Ok(Some(self.read_entry(nar_out).await?.0))
    }

    /// Read the marker before the next path: whether one follows.
    pub(crate) async fn has_next(&mut self) -> Result<bool, ExportError> {
        if self.done {
            return Ok(false);
        }
        match read_u64(self.r).await? {
            0 => {
                self.done = true;
                Ok(false)
            }
            1 => Ok(true),
            other => Err(ExportError::BadMarker(other)),
        }
    }

    /// Read one path after its marker: the NAR (copied to `nar_out`), the
    /// metadata, and the legacy signature if there is one (Nix reads and
    /// ignores it).
    pub(crate) async fn read_entry<W: AsyncWrite + Unpin>(
        &mut self,
        nar_out: &mut W,
    ) -> Result<(ExportedPath, Option<Vec<u8>>), ExportError> {
        let nar = nar::copy_nar(self.r, nar_out, &self.nar_limits).await?;
        wire::expect_u64(self.r, EXPORT_MAGIC).await?;
        let path = read_store_path(self.r).await?;
        let count = read_count(self.r, &self.limits).await?;
        let mut references = BTreeSet::new();
        for _ in 0..count {
            references.insert(read_store_path(self.r).await?);
        }
        let deriver = read_opt_store_path(self.r).await?;
        let signature = match read_u64(self.r).await? {
            0 => None,
            1 => Some(read_bytes(self.r, self.limits.max_string).await?),
            other => return Err(ExportError::BadSignatureFlag(other)),
        };
        let entry = ExportedPath {
            path,
            references,
            deriver,
            nar,
        };
        Ok((entry, signature))
    }
}

/// Write one path of an export stream: the NAR read from `nar` (validated
/// against `limits` as it is copied; reads not past its end), then the
/// metadata. Returns the NAR's size and hash.
pub async fn write_export_entry<W: AsyncWrite + Unpin, R: AsyncRead + Unpin>(
    w: &mut W,
    path: &StorePath,
    references: &BTreeSet<StorePath>,
    deriver: Option<&StorePath>,
    nar: &mut R,
    limits: &NarLimits,
) -> Result<NarSummary, ExportError> {
    write_u64(w, 1).await?;
    let summary = nar::copy_nar(nar, w, limits).await?;
    write_trailer(w, path, references, deriver, None).await?;
    Ok(summary)
}

/// Like [`write_export_entry`], with the NAR dumped from the filesystem at
/// `fs_path` (e.g. the store path's real location).
pub async fn write_export_entry_from_path<W: AsyncWrite + Unpin>(
    w: &mut W,
    path: &StorePath,
    references: &BTreeSet<StorePath>,
    deriver: Option<&StorePath>,
    fs_path: &Path,
) -> Result<NarSummary, ExportError> {
    write_u64(w, 1).await?;
    let summary = nar::dump_path(fs_path, w).await?;
    write_trailer(w, path, references, deriver, None).await?;
    Ok(summary)
}

/// End an export stream (the `u64 0` marker) and flush.
pub async fn finish<W: AsyncWrite + Unpin>(w: &mut W) -> Result<(), ExportError> {
    write_u64(w, 0).await?;
    w.flush().await?;
    Ok(())
}

/// The metadata after a path's NAR (with `signature`, a legacy signature
/// flag of 1 and the signature), written in one piece and flushed.
pub(crate) async fn write_trailer<W: AsyncWrite + Unpin>(
    w: &mut W,
    path: &StorePath,
    references: &BTreeSet<StorePath>,
    deriver: Option<&StorePath>,
    signature: Option<&[u8]>,
) -> Result<(), ExportError> {
    let mut buf = Vec::with_capacity(256 + 80 * references.len());
    write_u64(&mut buf, EXPORT_MAGIC).await?;
    write_store_path(&mut buf, path).await?;
    write_store_paths(&mut buf, references).await?;
    write_opt_store_path(&mut buf, deriver).await?;
    match signature {
        None => write_u64(&mut buf, 0).await?,
        Some(sig) => {
            write_u64(&mut buf, 1).await?;
            write_bytes(&mut buf, sig).await?;
        }
    }
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Hash;
    use crate::nar::nar_of_bytes;
    use farm_testkit::Actor;
    use farm_testkit::host::{nix_dump, rt};

    fn sp(s: &str) -> StorePath {
        StorePath::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    /// Fill a store with a few paths: added files and trees, text files
    /// referring to each other, a built output with a deriver. Returns
    /// the closure of them in dependency order.
    fn populate(store: &Actor) -> Vec<StorePath> {
        let src = tempfile::tempdir().unwrap();
        let file = src.path().join("hello.txt");
        std::fs::write(&file, "hello\n").unwrap();
        let tree = src.path().join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/run"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            tree.join("bin/run"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("bin/run", tree.join("link")).unwrap();
        std::fs::create_dir(tree.join("empty")).unwrap();
        std::fs::write(tree.join("ünïcode"), vec![7u8; 3 << 20]).unwrap();
        let added = store
            .run(
                "nix-store",
                &["--add", file.to_str().unwrap(), tree.to_str().unwrap()],
            )
            .unwrap()
            .trim()
            .to_string();
        let text = store
            .run(
                "nix-instantiate",
                &[
                    "--eval",
                    "--read-write-mode",
                    "-E",
                    "let a = builtins.toFile \"a\" \"hello\"; \
                 in builtins.toFile \"b\" \"see ${a} and ${builtins.toFile \"c\" \"${a}\"}\"",
                ],
            )
            .unwrap()
            .trim()
            .to_string();
        let built = store
            .run(
                "nix-build",
                &[
                    "--no-out-link",
                    "-E",
                    "derivation { name = \"out\"; system = builtins.currentSystem; \
                 builder = \"/bin/sh\"; args = [\"-c\" \"echo built > $out\"]; }",
                ],
            )
            .unwrap()
            .trim()
            .to_string();
        let mut roots: Vec<String> = added.lines().map(str::to_string).collect();
        roots.push(text.trim_matches('"').to_string());
        roots.push(built);
        let mut args = vec!["-qR"];
        args.extend(roots.iter().map(String::as_str));
        store
            .run("nix-store", &args)
            .unwrap()
            .trim()
            .to_string()
            .lines()
            .map(sp)
            .collect()
    }

    fn query(store: &Actor, q: &str, p: &StorePath) -> String {
        store
            .run("nix-store", &["-q", q, &p.to_string()])
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn export_golden_read_write_import() {
        let store = Actor::new("export").expect("a private store");
        let paths = populate(&store);
        assert!(paths.len() >= 6, "{paths:?}");
        let mut args = vec!["--export".to_string()];
        args.extend(paths.iter().map(|p| p.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let exported = store.run_bytes("nix-store", &args).unwrap();

        let rt = rt();
        // Read it: paths, references, derivers, NAR hashes as Nix has them.
        let mut r = exported.as_slice();
        let mut entries = Vec::new();
        rt.block_on(async {
            let mut reader = ExportReader::new(&mut r, &NarLimits::default());
            loop {
                let mut nar = Vec::new();
                match reader.next_path(&mut nar).await.unwrap() {
                    Some(e) => entries.push((e, nar)),
                    None => break,
                }
            }
            assert!(reader.next_path(&mut Vec::new()).await.unwrap().is_none());
        });
        assert!(r.is_empty(), "{} bytes left unread", r.len());
        assert_eq!(
            entries
                .iter()
                .map(|(e, _)| e.path.clone())
                .collect::<Vec<_>>(),
            paths
        );
        let mut saw_refs = false;
        let mut saw_deriver = false;
        for (e, nar) in &entries {
            let refs: BTreeSet<StorePath> = query(&store, "--references", &e.path)
                .lines()
                .map(sp)
                .collect();
            assert_eq!(e.references, refs, "{}", e.path);
            saw_refs |= e.references.iter().any(|r| *r != e.path);
            let deriver = query(&store, "--deriver", &e.path);
            match &e.deriver {
                Some(d) => {
                    assert_eq!(d.to_string(), deriver);
                    saw_deriver = true;
                }
                None => assert_eq!(deriver, "unknown-deriver"),
            }
            let hash = Hash::parse_any(&query(&store, "--hash", &e.path)).unwrap();
            assert_eq!(e.nar.nar_hash, hash, "{}", e.path);
            let size: u64 = query(&store, "--size", &e.path).parse().unwrap();
            assert_eq!(e.nar.nar_size, size);
            assert!(*nar == nix_dump(&store.store_dir_on_host().join(e.path.base_name())));
            let info = e.to_path_info();
            assert_eq!(info.nar_hash, hash);
            assert_eq!(info.references, e.references);
        }
        assert!(saw_refs && saw_deriver);

        // Write it back from the parsed entries: byte-identical.
        let rewritten = rt.block_on(async {
            let mut out = Vec::new();
            for (e, nar) in &entries {
                let s = write_export_entry(
                    &mut out,
                    &e.path,
                    &e.references,
                    e.deriver.as_ref(),
                    &mut nar.as_slice(),
                    &NarLimits::default(),
                )
                .await
                .unwrap();
                assert_eq!(s, e.nar);
            }
            finish(&mut out).await.unwrap();
            out
        });
        assert!(rewritten == exported, "rewritten stream differs");

        // Write a stream from the filesystem and import it into a fresh store.
        let ours = rt.block_on(async {
            let mut out = Vec::new();
            for (e, _) in &entries {
                write_export_entry_from_path(
                    &mut out,
                    &e.path,
                    &e.references,
                    e.deriver.as_ref(),
                    &store.store_dir_on_host().join(e.path.base_name()),
                )
                .await
                .unwrap();
            }
            finish(&mut out).await.unwrap();
            out
        });
        assert!(ours == exported);
        let fresh = Actor::new("export").expect("a private store");
        let imported = String::from_utf8(
            fresh
                .run_with_input("nix-store", &["--import"], &ours)
                .unwrap(),
        )
        .unwrap()
        .lines()
        .map(sp)
        .collect::<Vec<_>>();
        assert_eq!(imported, paths);
        for (e, _) in &entries {
            fresh
                .run("nix-store", &["--verify-path", &e.path.to_string()])
                .unwrap();
            let hash = Hash::parse_any(&query(&fresh, "--hash", &e.path)).unwrap();
            assert_eq!(hash, e.nar.nar_hash);
            let refs: BTreeSet<StorePath> = query(&fresh, "--references", &e.path)
                .lines()
                .map(sp)
                .collect();
            assert_eq!(refs, e.references);
        }
    }

    /// A one-path stream with a small NAR, built by hand.
    fn one_entry() -> Vec<u8> {
        let path = sp("/nix/store/00000000000000000000000000000000-a");
        let dep = sp("/nix/store/11111111111111111111111111111111-b");
        let nar = nar_of_bytes(b"x");
        rt().block_on(async {
            let mut out = Vec::new();
            write_export_entry(
                &mut out,
                &path,
                &BTreeSet::from([dep.clone()]),
                Some(&dep),
                &mut nar.as_slice(),
                &NarLimits::default(),
            )
            .await
            .unwrap();
            finish(&mut out).await.unwrap();
            out
        })
    }

    fn read_all(stream: &[u8]) -> Result<Vec<ExportedPath>, ExportError> {
        rt().block_on(async {
            let mut r = stream;
            let mut reader = ExportReader::new(&mut r, &NarLimits::default());
            let mut v = Vec::new();
            while let Some(e) = reader.next_path(&mut tokio::io::sink()).await? {
                v.push(e);
            }
            Ok(v)
        })
    }

    #[test]
    fn reads_hand_built_stream_and_legacy_signature() {
        let good = one_entry();
        let v = read_all(&good).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].deriver.as_ref().unwrap().name(), "b");
        // Replace the final "no signature" with a legacy signature: ignored.
        let mut with_sig = good[..good.len() - 16].to_vec();
        with_sig.extend_from_slice(&1u64.to_le_bytes());
        rt().block_on(wire::write_string(&mut with_sig, "key:c2ln"))
            .unwrap();
        with_sig.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(read_all(&with_sig).unwrap(), v);

        // The serve protocol's pass-through copy (ImportPaths) parses with
        // the same reader and reproduces both streams byte for byte.
        for stream in [&good, &with_sig] {
            let mut out = Vec::new();
            let entries = rt()
                .block_on(crate::serve::copy_export_stream(
                    &mut &stream[..],
                    &mut out,
                    &Limits::default(),
                    &NarLimits::default(),
                ))
                .unwrap();
            assert_eq!(entries, v);
            assert!(out == *stream, "copied stream differs");
        }
        // Its own limit on the number of paths.
        let two = [&good[..good.len() - 8], &good[..]].concat();
        let tight = Limits {
            max_list: 1,
            ..Limits::default()
        };
        let e = rt()
            .block_on(crate::serve::copy_export_stream(
                &mut &two[..],
                &mut Vec::new(),
                &tight,
                &NarLimits::default(),
            ))
            .unwrap_err();
        assert!(
            matches!(
                e,
                crate::serve::ServeError::Wire(WireError::TooLong {
                    what: "export stream",
                    len: 2,
                    max: 1
                })
            ),
            "{e}"
        );
    }

    #[test]
    fn rejects_malformed_streams() {
        let good = one_entry();
        let n = good.len();
        let err = |stream: &[u8]| read_all(stream).unwrap_err();

        let mut bad = good.clone();
        bad[0] = 2;
        assert!(matches!(err(&bad), ExportError::BadMarker(2)));

        let nar_len = good[8..]
            .windows(8)
            .position(|w| w == EXPORT_MAGIC.to_le_bytes())
            .unwrap();
        let mut bad = good.clone();
        bad[8 + nar_len] = 0;
        assert!(matches!(
            err(&bad),
            ExportError::Wire(WireError::BadMagic {
                expected: EXPORT_MAGIC,
                got: 0x4558_4900
            })
        ));

        let mut bad = good.clone();
        bad[n - 16] = 7;
        assert!(matches!(err(&bad), ExportError::BadSignatureFlag(7)));

        // A NAR error surfaces as such.
        let mut bad = good.clone();
        bad[8] = 14;
        assert!(matches!(
            err(&bad),
            ExportError::Nar(NarError::BadMagic { .. })
        ));

        // Every proper prefix is truncated (in the NAR or after it).
        for len in 0..n {
            let e = err(&good[..len]);
            assert!(
                matches!(
                    e,
                    ExportError::Wire(WireError::UnexpectedEof)
                        | ExportError::Nar(NarError::Truncated)
                ),
                "prefix {len}: {e:?}"
            );
        }

        // Path string: absurd length, not a store path, bad padding.
        let path_at = 8 + nar_len + 8;
        let mut bad = good.clone();
        bad[path_at..path_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            err(&bad),
            ExportError::Wire(WireError::TooLong {
                what: "string",
                len: u64::MAX,
                ..
            })
        ));
        let mut bad = good.clone();
        bad[path_at + 8] = b'/';
        bad[path_at + 9] = b'x';
        assert!(matches!(
            err(&bad),
            ExportError::Wire(WireError::StorePath(_))
        ));
        let mut bad = good.clone();
        let plen = u64::from_le_bytes(good[path_at..path_at + 8].try_into().unwrap()) as usize;
        assert_ne!(plen % 8, 0);
        bad[path_at + 8 + plen] = 1;
        assert!(matches!(
            err(&bad),
            ExportError::Wire(WireError::NonZeroPadding)
        ));

        // Reference count over the limit.
        let count_at = path_at + 8 + plen + (8 - plen % 8) % 8;
        assert_eq!(good[count_at], 1);
        let mut bad = good.clone();
        bad[count_at..count_at + 8].copy_from_slice(&(MAX_REFERENCES + 1).to_le_bytes());
        assert!(matches!(
            err(&bad),
            ExportError::Wire(WireError::TooLong {
                what: "list",
                len,
                max: MAX_REFERENCES
            }) if len == MAX_REFERENCES + 1
        ));
    }
}
