//! What an uploaded path's name and content address promise about its bytes,
//! checked at ingest before anything is published. The policy is here (which
//! claim needs which check); the addresses and paths are farm-nix's
//! [`farm_nix::content_address`].
//!
//! - A path named `*.drv` is a derivation: its NAR must be one regular file, an
//!   ATerm that parses, whose references are exactly its input sources and input
//!   derivations, and whose store path is the text path of its contents.
//! - A `ca` claim must match the bytes (the single file's hash for `text:` and
//!   flat `fixed:`, the NAR's hash for `fixed:r:`) and the path it gives.
//! - Every claimed reference other than the path itself must occur in the NAR
//!   (its hash part, found by farm-nix's [`RefScanner`] over the NAR stream, as
//!   Nix's own scan after a build) and be in the cache already, visible to the
//!   uploader ([`check_references`]): a narinfo never names a path it does not
//!   contain, nor one nobody can fetch.
//! - Which tier a path is published in ([`tier`]): a verified path (a `.drv`,
//!   or a checked `ca`) is signed whoever uploads it, as long as everything it
//!   references is signed; anything else is signed only for a trusted
//!   uploader, and is otherwise the uploader's unsigned claim.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use farm_nix::content_address::{ContentAddress, make_fixed_output_path, make_text_path};
use farm_nix::derivation::{Derivation, MAX_DRV_SIZE};
use farm_nix::hash::{Hash, HashAlgo, Hasher};
use farm_nix::nar::{NarError, NarEvent, NarLimits, NarReader, NarSummary, copy_nar};
use farm_nix::path_info::ValidPathInfo;
use farm_nix::references::RefScanner;
use farm_nix::store_path::StorePath;
use tokio::io::{AsyncRead, AsyncWrite};

/// What ingest must learn about the NAR beyond its hash and size.
#[derive(Debug, Default)]
pub(crate) struct ContentCheck {
    /// Keep the single file's bytes (a `.drv`, up to [`MAX_DRV_SIZE`]).
    pub keep_bytes: bool,
    /// Hash the single file's contents with these algorithms.
    pub algos: Vec<HashAlgo>,
    /// The parsed `ca` claim.
    pub ca: Option<ContentAddress>,
    /// Hash the whole NAR with this algorithm too (a recursive non-sha256 `ca`).
    pub nar_algo: Option<HashAlgo>,
    /// The claimed references to look for in the NAR (all but the path itself).
    pub refs: BTreeSet<StorePath>,
}

impl ContentCheck {
    /// What `claimed` needs checked (a malformed `ca` is an error).
    pub(crate) fn for_claim(claimed: &ValidPathInfo) -> Result<ContentCheck, String> {
        let ca = claimed
            .ca
            .as_deref()
            .map(ContentAddress::parse)
            .transpose()
            .map_err(|e| e.to_string())?;
        let keep_bytes = claimed.path.is_derivation();
        let mut algos = Vec::new();
        if keep_bytes {
            algos.push(HashAlgo::Sha256);
        }
        if let Some(a) = ca.as_ref().and_then(|c| c.flat_algo())
            && !algos.contains(&a)
        {
            algos.push(a);
        }
        let nar_algo = match &ca {
            Some(ContentAddress::Fixed {
                recursive: true,
                hash,
            }) if hash.algo() != HashAlgo::Sha256 => Some(hash.algo()),
            _ => None,
        };
        let refs = claimed
            .references
            .iter()
            .filter(|r| **r != claimed.path)
            .cloned()
            .collect();
        Ok(ContentCheck {
            keep_bytes,
            algos,
            ca,
            nar_algo,
            refs,
        })
    }

    /// Whether the checks prove the path's contents belong at its name (a
    /// `.drv`, or a `ca` claim), so that it may be signed whoever uploads it.
    pub(crate) fn verifies_content(&self) -> bool {
        self.keep_bytes || self.ca.is_some()
    }

    fn needs_contents(&self) -> bool {
        self.keep_bytes || !self.algos.is_empty()
    }
}

/// The NAR's root, when it is a single regular file and the check needed it.
#[derive(Debug, Default)]
pub(crate) struct FileContents {
    /// Whether the NAR is one regular file.
    pub regular: bool,
    /// Its bytes, when kept and not larger than [`MAX_DRV_SIZE`].
    pub bytes: Option<Vec<u8>>,
    /// Its size.
    pub size: u64,
    /// Its hashes, one per requested algorithm.
    pub hashes: Vec<Hash>,
    /// The whole NAR's hash in [`ContentCheck::nar_algo`], if asked for.
    pub nar_hash: Option<Hash>,
    /// Which of [`ContentCheck::refs`] occur in the NAR.
    pub found_refs: BTreeSet<StorePath>,
}

/// Forwards writes to `inner`, hashing and scanning what it accepted.
struct HashTee<'a, W> {
    inner: &'a mut W,
    hasher: Option<Hasher>,
    scanner: Option<RefScanner>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for HashTee<'_, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = ready!(Pin::new(&mut *self.inner).poll_write(cx, buf))?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        if let Some(s) = &mut self.scanner {
            s.update(&buf[..n]);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// As [`copy_nar`], also reading the root file's contents when `check` needs them.
pub(crate) async fn copy_inspect<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    limits: &NarLimits,
    check: &ContentCheck,
) -> Result<(NarSummary, FileContents), NarError> {
    let mut tee = HashTee {
        inner: w,
        hasher: check.nar_algo.map(Hasher::new),
        scanner: (!check.refs.is_empty()).then(|| RefScanner::new(&check.refs)),
    };
    let found = |scanner: Option<RefScanner>| -> BTreeSet<StorePath> {
        let Some(s) = scanner else {
            return BTreeSet::new();
        };
        check
            .refs
            .iter()
            .filter(|r| s.is_found(r))
            .cloned()
            .collect()
    };
    if !check.needs_contents() {
        let summary = copy_nar(r, &mut tee, limits).await?;
        let fc = FileContents {
            nar_hash: tee.hasher.map(Hasher::finish),
            found_refs: found(tee.scanner),
            ..FileContents::default()
        };
        return Ok((summary, fc));
    }
    let mut reader = NarReader::new(r, &mut tee, limits);
    let mut fc = FileContents::default();
    if let Some(NarEvent::Regular { size, .. }) = reader.next_event().await? {
        fc.regular = true;
        fc.size = size;
        let mut hashers: Vec<Hasher> = check.algos.iter().map(|a| Hasher::new(*a)).collect();
        let mut bytes = (check.keep_bytes && size <= MAX_DRV_SIZE as u64).then(Vec::new);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read_contents(&mut buf).await?;
            if n == 0 {
                break;
            }
            for h in &mut hashers {
                h.update(&buf[..n]);
            }
            if let Some(b) = &mut bytes {
                b.extend_from_slice(&buf[..n]);
            }
        }
        fc.bytes = bytes;
        fc.hashes = hashers.into_iter().map(Hasher::finish).collect();
    }
    let summary = reader.finish().await?;
    fc.nar_hash = tee.hasher.map(Hasher::finish);
    fc.found_refs = found(tee.scanner);
    Ok((summary, fc))
}

/// Check the path's name and `ca` claim against what the NAR held; the reason
/// when they do not match. A `.drv` comes back parsed.
pub(crate) fn verify(
    claimed: &ValidPathInfo,
    check: &ContentCheck,
    summary: &NarSummary,
    fc: &FileContents,
) -> Result<Option<Derivation>, String> {
    let path = &claimed.path;
    let mut parsed = None;
    let file_hash = |algo: HashAlgo| fc.hashes.iter().find(|h| h.algo() == algo).cloned();
    if check.keep_bytes {
        if !fc.regular {
            return Err("a .drv must be a single regular file".into());
        }
        let Some(bytes) = &fc.bytes else {
            return Err(format!(
                "the .drv is {} bytes; at most {MAX_DRV_SIZE} are accepted",
                fc.size
            ));
        };
        // Any bytes: Nix accepts them in env values, args and the builder.
        let drv =
            Derivation::parse_aterm(bytes).map_err(|e| format!("the .drv does not parse: {e}"))?;
        let refs: BTreeSet<StorePath> = drv
            .input_srcs
            .iter()
            .chain(drv.input_drvs.keys())
            .cloned()
            .collect();
        if refs != claimed.references {
            return Err(
                "the references claimed for this .drv are not its input sources and input derivations"
                    .into(),
            );
        }
        let hash = file_hash(HashAlgo::Sha256).ok_or("internal: no sha256 of the .drv")?;
        let expected = make_text_path(path.name(), &hash, &refs).map_err(|e| e.to_string())?;
        if &expected != path {
            return Err(format!(
                "the .drv's contents belong at {expected}, not at this path"
            ));
        }
        parsed = Some(drv);
    }
    match &check.ca {
        None => {}
        Some(ContentAddress::Text(h)) => {
            if !fc.regular {
                return Err("a text content address needs a single regular file".into());
            }
            if file_hash(h.algo()).as_ref() != Some(h) {
                return Err("the file's hash does not match its text content address".into());
            }
            let expected =
                make_text_path(path.name(), h, &claimed.references).map_err(|e| e.to_string())?;
            if &expected != path {
                return Err(format!(
                    "the text content address gives the path {expected}"
                ));
            }
        }
        Some(ContentAddress::Fixed { recursive, hash }) => {
            if *recursive {
                let nar_hash = if hash.algo() == HashAlgo::Sha256 {
                    Some(&summary.nar_hash)
                } else {
                    fc.nar_hash.as_ref()
                };
                if nar_hash != Some(hash) {
                    return Err(
                        "the NAR's hash does not match its recursive content address".into(),
                    );
                }
            } else {
                if !fc.regular {
                    return Err("a flat content address needs a single regular file".into());
                }
                if file_hash(hash.algo()).as_ref() != Some(hash) {
                    return Err("the file's hash does not match its flat content address".into());
                }
                if !claimed.references.is_empty() {
                    return Err("a flat fixed-output path cannot have references".into());
                }
            }
            let expected = make_fixed_output_path(
                path.name(),
                *recursive,
                hash,
                &claimed.references,
                Some(path),
            )
            .map_err(|e| e.to_string())?;
            if &expected != path {
                return Err(format!(
                    "the fixed content address gives the path {expected}"
                ));
            }
        }
    }
    Ok(parsed)
}

/// A claimed reference that is not in the NAR: the first, if any.
pub(crate) fn unscanned_reference<'a>(
    check: &'a ContentCheck,
    fc: &FileContents,
) -> Option<&'a StorePath> {
    check.refs.iter().find(|r| !fc.found_refs.contains(*r))
}

/// How a path already in the cache looks to an uploader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presence {
    /// Published and signed.
    Signed,
    /// The uploader's own unsigned claim.
    Claimed,
}

/// Check that every claimed reference but the path itself is in the cache,
/// as `lookup` sees it for the uploader; returns whether all of them are
/// signed. The error names the first missing reference.
pub(crate) fn check_references(
    check: &ContentCheck,
    lookup: impl Fn(&StorePath) -> Option<Presence>,
) -> Result<bool, (StorePath, String)> {
    let mut all_signed = true;
    for r in &check.refs {
        match lookup(r) {
            Some(Presence::Signed) => {}
            Some(Presence::Claimed) => all_signed = false,
            None => {
                return Err((
                    r.clone(),
                    "is not in the cache (upload it first)".to_string(),
                ));
            }
        }
    }
    Ok(all_signed)
}

/// Whether an upload is published signed: when its uploader is trusted or its
/// content is verified, and only if every reference is signed too (a signed
/// path's closure is signed). A trusted uploader sees only signed paths, so
/// its references are always signed once [`check_references`] passed.
pub(crate) fn signs(trusted: bool, check: &ContentCheck, refs_signed: bool) -> bool {
    (trusted || check.verifies_content()) && refs_signed
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use farm_nix::signing::SigningKey;
    use object_store::memory::InMemory;

    use super::*;
    use crate::cache::tests::nix_dump;
    use crate::cache::{Cache, CacheConfig, CacheError, Trust};

    const DRVS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/nix/testdata/drv");

    /// Every real `.drv` with its store path (the file name Nix gave it).
    fn real_drvs() -> Vec<(StorePath, Vec<u8>)> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(DRVS).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            if name.ends_with(".drv") {
                let sp = StorePath::parse(&format!("/nix/store/{name}")).unwrap();
                v.push((sp, std::fs::read(&p).unwrap()));
            }
        }
        assert!(v.len() >= 8, "the test data is there");
        v
    }

    fn refs_of(bytes: &[u8]) -> BTreeSet<StorePath> {
        let d = Derivation::parse_aterm(std::str::from_utf8(bytes).unwrap()).unwrap();
        d.input_srcs
            .iter()
            .chain(d.input_drvs.keys())
            .cloned()
            .collect()
    }

    fn nar_of_file(contents: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, contents).unwrap();
        nix_dump(&f)
    }

    async fn cache() -> Cache {
        Cache::with_store(
            CacheConfig::local("/nonexistent-unused"),
            Arc::new(InMemory::new()),
            SigningKey::generate("farm-test-1").unwrap(),
        )
        .await
        .unwrap()
    }

    fn claim(path: &StorePath, nar: &[u8], refs: BTreeSet<StorePath>) -> ValidPathInfo {
        let mut i =
            ValidPathInfo::new(path.clone(), HashAlgo::Sha256.digest(nar), nar.len() as u64);
        i.references = refs;
        i
    }

    fn invalid(r: Result<ValidPathInfo, CacheError>) -> String {
        match r {
            Err(CacheError::InvalidClaim { reason, .. }) => reason,
            other => panic!("expected an invalid claim, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn real_drvs_are_accepted_and_forged_ones_refused() {
        let cache = cache().await;
        // Their input sources first (any content: a plain path's references
        // are not checked against a derivation), then the .drvs in an order
        // where each one's inputs are in the cache before it.
        for (_, bytes) in real_drvs() {
            let d = Derivation::parse_aterm(std::str::from_utf8(&bytes).unwrap()).unwrap();
            for src in d.input_srcs {
                let nar = nar_of_file(b"a source");
                cache
                    .ingest(claim(&src, &nar, BTreeSet::new()), &nar[..], Trust::Signed)
                    .await
                    .unwrap();
            }
        }
        let mut todo = real_drvs();
        while !todo.is_empty() {
            let before = todo.len();
            let mut later = Vec::new();
            for (path, bytes) in todo {
                let nar = nar_of_file(&bytes);
                let refs = refs_of(&bytes);
                // with its Nix content address too
                let mut c = claim(&path, &nar, refs.clone());
                c.ca = Some(format!(
                    "text:{}",
                    HashAlgo::Sha256.digest(&bytes).to_nix32_prefixed()
                ));
                match cache.ingest(c, &nar[..], Trust::Signed).await {
                    Ok(_) => {}
                    Err(CacheError::BadReference { reason, .. })
                        if reason.contains("not in the cache") =>
                    {
                        later.push((path, bytes))
                    }
                    Err(e) => panic!("{path}: {e}"),
                }
            }
            assert!(later.len() < before, "no .drv could be added: {later:?}");
            todo = later;
        }
        // Each one's hash modulo was learnt at its upload (inputs came first),
        // the one a submission computes from the texts.
        let texts: std::collections::HashMap<StorePath, Derivation> = real_drvs()
            .into_iter()
            .map(|(p, b)| (p, Derivation::parse_aterm(&b).unwrap()))
            .collect();
        fn modulo(p: &StorePath, texts: &std::collections::HashMap<StorePath, Derivation>) -> Hash {
            farm_nix::derivation::hash_derivation_modulo(&texts[p], &|i| Some(modulo(i, texts)))
                .unwrap()
        }
        for p in texts.keys() {
            assert_eq!(cache.drv_hashes().get(p), Some(modulo(p, &texts)), "{p}");
        }
        let (path, bytes) = real_drvs().remove(0);
        let refs = refs_of(&bytes);
        let other = StorePath::parse("/nix/store/00000000000000000000000000000000-x").unwrap();
        let x = nar_of_file(b"x");
        cache
            .ingest(claim(&other, &x, BTreeSet::new()), &x[..], Trust::Signed)
            .await
            .unwrap();

        // other contents at a real .drv's path: a fresh path, so nothing is cached yet
        let fake =
            StorePath::parse(&format!("/nix/store/{}-{}", "1".repeat(32), path.name())).unwrap();
        let nar = nar_of_file(&bytes);
        let why = invalid(
            cache
                .ingest(claim(&fake, &nar, refs.clone()), &nar[..], Trust::Signed)
                .await,
        );
        assert!(why.contains("belong at"), "{why}");
        assert!(cache.narinfo(&fake).is_none());

        // references that are not the derivation's inputs
        let mut more = refs.clone();
        more.insert(other.clone());
        let why = invalid(
            cache
                .ingest(claim(&fake, &nar, more), &nar[..], Trust::Signed)
                .await,
        );
        assert!(why.contains("references"), "{why}");

        // not ATerm
        let junk = nar_of_file(b"not a derivation");
        let why = invalid(
            cache
                .ingest(claim(&fake, &junk, refs.clone()), &junk[..], Trust::Signed)
                .await,
        );
        assert!(why.contains("does not parse"), "{why}");

        // not a single regular file
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let dnar = nix_dump(&dir.path().join("d"));
        let why = invalid(
            cache
                .ingest(claim(&fake, &dnar, refs.clone()), &dnar[..], Trust::Signed)
                .await,
        );
        assert!(why.contains("single regular file"), "{why}");
        assert!(cache.narinfo(&fake).is_none());

        // A .drv at its own text path whose declared output is another's: admitted
        // (its path is its text's), but not learnt, so a submission checks it.
        let (simple, text) = real_drvs()
            .into_iter()
            .find(|(p, _)| p.name() == "simple.drv")
            .unwrap();
        let mut forged = Derivation::parse_aterm(&text).unwrap();
        let taken = StorePath::parse(&format!("/nix/store/{}-simple", "2".repeat(32))).unwrap();
        forged.outputs.get_mut("out").unwrap().path = Some(taken.clone());
        forged.env.insert("out".into(), taken.to_string().into());
        let ftext = forged.to_aterm();
        let fpath = forged.drv_path("simple").unwrap();
        assert_ne!(fpath, simple);
        let fnar = nar_of_file(&ftext);
        cache
            .ingest(
                claim(&fpath, &fnar, refs_of(&ftext)),
                &fnar[..],
                Trust::Signed,
            )
            .await
            .unwrap();
        assert_eq!(cache.drv_hashes().get(&fpath), None);
    }

    #[tokio::test]
    async fn content_addresses_are_checked_against_the_nar() {
        let cache = cache().await;
        // The output of fixed-flat.drv as Nix named it ("hello", flat sha256).
        let flat =
            StorePath::parse("/nix/store/34653kz58l0k6y6mhmzz5lih5l1yxhi9-fixed-flat").unwrap();
        let hello = nar_of_file(b"hello");
        // A recursive one (fixed-recursive.drv's declared hash is not that of
        // its build, so the path comes from make_fixed_output_path, which
        // farm-nix's content_address tests check against Nix).
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        std::fs::write(dir.path().join("out/f"), b"hello").unwrap();
        let rec_nar = nix_dump(&dir.path().join("out"));
        let named = StorePath::parse("/nix/store/blcc3vi0sj4wn4rlnz5abnh2cvw6vy18-fixed-recursive")
            .unwrap();
        let rec = make_fixed_output_path(
            named.name(),
            true,
            &HashAlgo::Sha256.digest(&rec_nar),
            &BTreeSet::new(),
            None,
        )
        .unwrap();
        let flat_ca = format!(
            "fixed:{}",
            HashAlgo::Sha256.digest(b"hello").to_nix32_prefixed()
        );
        let rec_ca = format!(
            "fixed:r:{}",
            HashAlgo::Sha256.digest(&rec_nar).to_nix32_prefixed()
        );

        // claims whose hash does not match the bytes
        let mut c = claim(&flat, &hello, BTreeSet::new());
        c.ca = Some(format!(
            "fixed:{}",
            HashAlgo::Sha256.digest(b"bye").to_nix32_prefixed()
        ));
        let why = invalid(cache.ingest(c, &hello[..], Trust::Signed).await);
        assert!(why.contains("flat content address"), "{why}");
        let mut c = claim(&rec, &rec_nar, BTreeSet::new());
        c.ca = Some(format!(
            "fixed:r:{}",
            HashAlgo::Sha256.digest(b"x").to_nix32_prefixed()
        ));
        let why = invalid(cache.ingest(c, &rec_nar[..], Trust::Signed).await);
        assert!(why.contains("recursive content address"), "{why}");
        // the right hash at the wrong path
        let mut c = claim(&rec, &hello, BTreeSet::new());
        c.ca = Some(flat_ca.clone());
        let why = invalid(cache.ingest(c, &hello[..], Trust::Signed).await);
        assert!(why.contains("gives the path"), "{why}");
        // a text address on a directory
        let mut c = claim(&rec, &rec_nar, BTreeSet::new());
        c.ca = Some(format!(
            "text:{}",
            HashAlgo::Sha256.digest(b"x").to_nix32_prefixed()
        ));
        let why = invalid(cache.ingest(c, &rec_nar[..], Trust::Signed).await);
        assert!(why.contains("single regular file"), "{why}");
        assert!(cache.is_empty(), "nothing published");

        // a recursive address in another algorithm: the NAR's own hash in it
        let sha1 = HashAlgo::Sha1.digest(&rec_nar);
        let rec1 =
            make_fixed_output_path(named.name(), true, &sha1, &BTreeSet::new(), None).unwrap();
        let mut c = claim(&rec1, &rec_nar, BTreeSet::new());
        c.ca = Some(format!(
            "fixed:r:{}",
            HashAlgo::Sha1.digest(b"x").to_nix32_prefixed()
        ));
        let why = invalid(cache.ingest(c, &rec_nar[..], Trust::Signed).await);
        assert!(why.contains("recursive content address"), "{why}");
        let mut c = claim(&rec1, &rec_nar, BTreeSet::new());
        c.ca = Some(format!("fixed:r:{}", sha1.to_nix32_prefixed()));
        cache.ingest(c, &rec_nar[..], Trust::Signed).await.unwrap();
        assert!(cache.narinfo(&rec1).is_some());

        // what Nix produced is accepted
        let mut c = claim(&flat, &hello, BTreeSet::new());
        c.ca = Some(flat_ca);
        cache.ingest(c, &hello[..], Trust::Signed).await.unwrap();
        let mut c = claim(&rec, &rec_nar, BTreeSet::new());
        c.ca = Some(rec_ca);
        cache.ingest(c, &rec_nar[..], Trust::Signed).await.unwrap();
        assert_eq!(cache.len(), 3);
    }
}
