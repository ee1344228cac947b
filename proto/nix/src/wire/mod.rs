//! Primitives of Nix's wire protocols (serve, worker, NAR-bearing streams),
//! async over tokio `AsyncRead`/`AsyncWrite`.
//!
//! Layout:
//! - integers, bools and enums: one `u64`, little-endian (bools are 0 or 1);
//! - string / bytes: `u64 len`, `len` bytes, zero padding to a multiple of 8;
//! - list: `u64 count`, then the elements; a set is a list in sorted order;
//! - map: `u64 count`, then key, value, key, value…;
//! - store paths: full paths as strings, `""` for "none";
//! - framed stream ([`FramedReader`], [`FramedWriter`]): `[u64 len][len bytes]…`, ended by `len = 0`;
//! - protocol versions ([`ProtocolVersion`]): one `u64`, `major << 8 | minor`.
//!
//! Every reader checks a length against its [`Limits`] before allocating,
//! rejects non-zero padding, and reports failures as [`WireError`].
//!
//! Each item is bounded, and so is each message as a whole: a server decodes
//! one request inside [`within_message`], and while it runs every string read
//! ([`read_bytes`]) and every list count ([`read_count`]) is charged to that
//! message's budget (`Limits::max_message_bytes`, `Limits::max_message_items`)
//! before anything is allocated, so no request can make the server hold more
//! than about `max_message_bytes` plus ~100 bytes per element. The budget is a
//! task-local of the decoding future, so the item readers keep their
//! signatures; outside [`within_message`] (clients, tests) only the per-item
//! limits apply. NAR contents are never charged (they are streamed).

mod framed;
pub mod pipe;
mod types;
mod version;

pub use framed::{DEFAULT_FRAME_SIZE, FramedReader, FramedWriter};
#[cfg(test)]
pub(crate) use types::tests as test_support;
pub use types::{
    BuildResult, BuildResultFields, BuildStatus, DerivedPath, HandlerError, OutputsSpec,
    parse_nar_hash, read_basic_derivation, read_path_info, read_path_info_fields,
    write_basic_derivation, write_path_info, write_path_info_fields,
};
pub use version::ProtocolVersion;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::hash::HashError;
use crate::nar::NarSummary;
use crate::path_info::ValidPathInfo;
use crate::store_path::{StorePath, StorePathError};

/// Bounds applied to untrusted input before anything is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest string or byte string (derivation environments can be large).
    pub max_string: u64,
    /// Most elements in one list, set or map.
    pub max_list: u64,
    /// Largest single frame of a framed stream.
    pub max_frame: u64,
    /// Most string bytes one message may carry in all (see [`within_message`]).
    pub max_message_bytes: u64,
    /// Most list, set and map elements one message may carry in all.
    pub max_message_items: u64,
}

/// Default [`Limits::max_message_bytes`]: 64 MiB, far above any real
/// derivation's environment (Linux passes at most 128 KiB per variable to a
/// builder; larger values go through files with `passAsFile` or structured
/// attributes, which still cross the wire, hence the headroom).
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 64 << 20;
/// Default [`Limits::max_message_items`]: 512 Ki elements, e.g. a
/// `QueryValidPaths` of a 500 000-path closure (all of nixpkgs is far less).
pub const DEFAULT_MAX_MESSAGE_ITEMS: u64 = 1 << 19;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_string: 64 << 20,
            max_list: 1 << 20,
            max_frame: 64 << 20,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_message_items: DEFAULT_MAX_MESSAGE_ITEMS,
        }
    }
}

/// What one message being decoded has used of its budget.
struct MessageBudget {
    bytes: Cell<u64>,
    items: Cell<u64>,
    max_bytes: u64,
    max_items: u64,
}

tokio::task_local! {
    static MESSAGE_BUDGET: MessageBudget;
}

/// Run `decode` (the reading of one protocol message) under a fresh budget of
/// `limits.max_message_bytes` string bytes and `limits.max_message_items` list
/// elements; past either, the read fails with [`WireError::MessageTooLarge`]
/// before allocating.
pub async fn within_message<F: Future>(limits: &Limits, decode: F) -> F::Output {
    let budget = MessageBudget {
        bytes: Cell::new(0),
        items: Cell::new(0),
        max_bytes: limits.max_message_bytes,
        max_items: limits.max_message_items,
    };
    MESSAGE_BUDGET.scope(budget, decode).await
}

/// Charge `n` string bytes to the message being decoded, if any.
pub(crate) fn charge_bytes(n: u64) -> Result<(), WireError> {
    charge(n, |b| (&b.bytes, b.max_bytes, "string bytes"))
}

/// Charge `n` list elements to the message being decoded, if any.
pub(crate) fn charge_items(n: u64) -> Result<(), WireError> {
    charge(n, |b| (&b.items, b.max_items, "list elements"))
}

fn charge(
    n: u64,
    pick: impl FnOnce(&MessageBudget) -> (&Cell<u64>, u64, &'static str),
) -> Result<(), WireError> {
    MESSAGE_BUDGET
        .try_with(|b| {
            let (used, max, what) = pick(b);
            let total = used.get().saturating_add(n);
            if total > max {
                return Err(WireError::MessageTooLarge { what, max });
            }
            used.set(total);
            Ok(())
        })
        .unwrap_or(Ok(()))
}

/// Everything that can go wrong reading or writing the wire format.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected end of stream")]
    UnexpectedEof,
    #[error("{what} of length {len} exceeds the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("protocol message too large: more than {max} {what} in one message")]
    MessageTooLarge { what: &'static str, max: u64 },
    #[error("non-zero padding after a string")]
    NonZeroPadding,
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("invalid boolean value {0}")]
    InvalidBool(u64),
    #[error("invalid {what} value {value}")]
    InvalidEnum { what: &'static str, value: u64 },
    #[error("invalid store path: {0}")]
    StorePath(#[from] StorePathError),
    #[error("invalid hash: {0}")]
    Hash(#[from] HashError),
    #[error("bad magic number: expected {expected:#x}, got {got:#x}")]
    BadMagic { expected: u64, got: u64 },
    #[error("unsupported protocol version {0:#x}")]
    UnsupportedVersion(u64),
    #[error("unknown {protocol} operation {op}")]
    UnknownOp { protocol: &'static str, op: u64 },
    #[error("framed stream ended without a terminator")]
    UnterminatedFrames,
    #[error("{0}")]
    Invalid(String),
}

impl WireError {
    /// Map unexpected-EOF I/O errors to [`WireError::UnexpectedEof`].
    pub(crate) fn from_io(e: std::io::Error) -> WireError {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            WireError::UnexpectedEof
        } else {
            WireError::Io(e)
        }
    }

    /// Whether the stream ended (cleanly or not) rather than carrying bad data.
    pub fn is_eof(&self) -> bool {
        matches!(self, WireError::UnexpectedEof)
    }
}

/// A NAR whose size or sha256 is not what its path info announced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "NAR of {path} does not match its info: got {got_size} bytes {got_hash}, expected {expected_size} bytes {expected_hash}"
)]
pub struct NarMismatch {
    pub path: String,
    pub got_size: u64,
    pub got_hash: String,
    pub expected_size: u64,
    pub expected_hash: String,
}

/// Check a NAR as read (`got`) against the `info` it came with.
pub fn check_nar(info: &ValidPathInfo, got: &NarSummary) -> Result<(), NarMismatch> {
    if got.nar_size == info.nar_size && got.nar_hash == info.nar_hash {
        return Ok(());
    }
    Err(NarMismatch {
        path: info.path.to_string(),
        got_size: got.nar_size,
        got_hash: got.nar_hash.to_string(),
        expected_size: info.nar_size,
        expected_hash: info.nar_hash.to_string(),
    })
}

/// Padding after a string of `len` bytes.
pub const fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// Read one little-endian `u64`.
pub async fn read_u64<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<u64, WireError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).await.map_err(WireError::from_io)?;
    Ok(u64::from_le_bytes(b))
}

/// Read a `u64`, or `None` if the stream ends cleanly before its first byte
/// (how a peer closes a connection between operations).
pub async fn read_u64_or_eof<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<Option<u64>, WireError> {
    let mut b = [0u8; 8];
    let n = r.read(&mut b).await?;
    if n == 0 {
        return Ok(None);
    }
    r.read_exact(&mut b[n..])
        .await
        .map_err(WireError::from_io)?;
    Ok(Some(u64::from_le_bytes(b)))
}

/// Read a `u64` that must be 0 or 1.
pub async fn read_bool<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<bool, WireError> {
    match read_u64(r).await? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(WireError::InvalidBool(v)),
    }
}

/// Read a `u64` that must be `expected`.
pub async fn expect_u64<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    expected: u64,
) -> Result<(), WireError> {
    let got = read_u64(r).await?;
    if got != expected {
        return Err(WireError::BadMagic { expected, got });
    }
    Ok(())
}

/// Read and check the zero padding after `len` bytes.
async fn read_padding<R: AsyncRead + Unpin + ?Sized>(r: &mut R, len: u64) -> Result<(), WireError> {
    let n = padding(len);
    if n > 0 {
        let mut pad = [0u8; 8];
        r.read_exact(&mut pad[..n])
            .await
            .map_err(WireError::from_io)?;
        if pad[..n].iter().any(|&b| b != 0) {
            return Err(WireError::NonZeroPadding);
        }
    }
    Ok(())
}

/// Read a byte string of at most `max` bytes (checked before allocating).
pub async fn read_bytes<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    max: u64,
) -> Result<Vec<u8>, WireError> {
    let len = read_u64(r).await?;
    if len > max {
        return Err(WireError::TooLong {
            what: "string",
            len,
            max,
        });
    }
    charge_bytes(len)?;
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await.map_err(WireError::from_io)?;
    read_padding(r, len).await?;
    Ok(buf)
}

/// Read a UTF-8 string of at most `max` bytes.
pub async fn read_string<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    max: u64,
) -> Result<String, WireError> {
    String::from_utf8(read_bytes(r, max).await?).map_err(|_| WireError::InvalidUtf8)
}

/// Read a list count, bounded by `limits.max_list`.
pub async fn read_count<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    limits: &Limits,
) -> Result<u64, WireError> {
    let n = read_u64(r).await?;
    if n > limits.max_list {
        return Err(WireError::TooLong {
            what: "list",
            len: n,
            max: limits.max_list,
        });
    }
    charge_items(n)?;
    Ok(n)
}

/// Read a list of strings.
pub async fn read_strings<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    limits: &Limits,
) -> Result<Vec<String>, WireError> {
    let n = read_count(r, limits).await?;
    let mut v = Vec::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        v.push(read_string(r, limits.max_string).await?);
    }
    Ok(v)
}

/// Read a set of strings (a list; duplicates collapse).
pub async fn read_string_set<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    limits: &Limits,
) -> Result<BTreeSet<String>, WireError> {
    Ok(read_strings(r, limits).await?.into_iter().collect())
}

/// Read a map of strings to strings.
pub async fn read_string_map<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    limits: &Limits,
) -> Result<BTreeMap<String, String>, WireError> {
    let n = read_count(r, limits).await?;
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let k = read_string(r, limits.max_string).await?;
        let v = read_string(r, limits.max_string).await?;
        m.insert(k, v);
    }
    Ok(m)
}

/// Longest full store path string accepted.
pub const MAX_STORE_PATH_LEN: u64 = 512;

/// Read a full store path.
pub async fn read_store_path<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<StorePath, WireError> {
    let s = read_string(r, MAX_STORE_PATH_LEN).await?;
    Ok(StorePath::parse(&s)?)
}

/// Read a store path or `""` (none).
pub async fn read_opt_store_path<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<Option<StorePath>, WireError> {
    let s = read_string(r, MAX_STORE_PATH_LEN).await?;
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(StorePath::parse(&s)?))
    }
}

/// Read a set of store paths.
pub async fn read_store_paths<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    limits: &Limits,
) -> Result<BTreeSet<StorePath>, WireError> {
    let n = read_count(r, limits).await?;
    let mut s = BTreeSet::new();
    for _ in 0..n {
        s.insert(read_store_path(r).await?);
    }
    Ok(s)
}

/// Read an optional string where `""` means none.
pub async fn read_opt_string<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    max: u64,
) -> Result<Option<String>, WireError> {
    let s = read_string(r, max).await?;
    Ok(if s.is_empty() { None } else { Some(s) })
}

/// Write one little-endian `u64`.
pub async fn write_u64<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, v: u64) -> Result<(), WireError> {
    w.write_all(&v.to_le_bytes()).await?;
    Ok(())
}

/// Write a bool as `u64` 0/1.
pub async fn write_bool<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    v: bool,
) -> Result<(), WireError> {
    write_u64(w, v as u64).await
}

/// Write a byte string with its length and padding.
pub async fn write_bytes<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    b: &[u8],
) -> Result<(), WireError> {
    write_u64(w, b.len() as u64).await?;
    w.write_all(b).await?;
    let n = padding(b.len() as u64);
    if n > 0 {
        w.write_all(&[0u8; 8][..n]).await?;
    }
    Ok(())
}

/// Write a string.
pub async fn write_string<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    s: &str,
) -> Result<(), WireError> {
    write_bytes(w, s.as_bytes()).await
}

/// Write a list (or set) of strings.
pub async fn write_strings<W, I, S>(w: &mut W, items: I) -> Result<(), WireError>
where
    W: AsyncWrite + Unpin + ?Sized,
    I: IntoIterator<Item = S>,
    I::IntoIter: ExactSizeIterator,
    S: AsRef<str>,
{
    let it = items.into_iter();
    write_u64(w, it.len() as u64).await?;
    for s in it {
        write_string(w, s.as_ref()).await?;
    }
    Ok(())
}

/// Write a map of strings to strings.
pub async fn write_string_map<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    m: &BTreeMap<String, String>,
) -> Result<(), WireError> {
    write_u64(w, m.len() as u64).await?;
    for (k, v) in m {
        write_string(w, k).await?;
        write_string(w, v).await?;
    }
    Ok(())
}

/// Write a full store path.
pub async fn write_store_path<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    p: &StorePath,
) -> Result<(), WireError> {
    write_string(w, &p.to_string()).await
}

/// Write a store path or `""`.
pub async fn write_opt_store_path<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    p: Option<&StorePath>,
) -> Result<(), WireError> {
    match p {
        Some(p) => write_store_path(w, p).await,
        None => write_string(w, "").await,
    }
}

/// Write a set of store paths (sorted, as a `BTreeSet` iterates).
pub async fn write_store_paths<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    paths: &BTreeSet<StorePath>,
) -> Result<(), WireError> {
    write_u64(w, paths.len() as u64).await?;
    for p in paths {
        write_store_path(w, p).await?;
    }
    Ok(())
}

/// Write an optional string as `""` for none.
pub async fn write_opt_string<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    s: Option<&str>,
) -> Result<(), WireError> {
    write_string(w, s.unwrap_or("")).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use farm_testkit::host::rt;

    #[test]
    fn string_layout() {
        rt().block_on(async {
            let mut out = Vec::new();
            write_string(&mut out, "abc").await.unwrap();
            assert_eq!(out, b"\x03\0\0\0\0\0\0\0abc\0\0\0\0\0");
            let mut r = &out[..];
            assert_eq!(read_string(&mut r, 10).await.unwrap(), "abc");
            assert!(r.is_empty());
            out.clear();
            write_string(&mut out, "12345678").await.unwrap();
            assert_eq!(out.len(), 16);
            out.clear();
            write_string(&mut out, "").await.unwrap();
            assert_eq!(out, [0u8; 8]);
        });
    }

    #[test]
    fn rejects_bad_input() {
        rt().block_on(async {
            // Non-zero padding.
            let bad = b"\x01\0\0\0\0\0\0\0a\0\0\x01\0\0\0\0";
            assert!(matches!(
                read_string(&mut &bad[..], 10).await,
                Err(WireError::NonZeroPadding)
            ));
            // Length over the limit: rejected before reading (or allocating) the body.
            let huge = u64::MAX.to_le_bytes();
            assert!(matches!(
                read_bytes(&mut &huge[..], 1 << 20).await,
                Err(WireError::TooLong { len: u64::MAX, .. })
            ));
            assert!(matches!(
                read_strings(&mut &huge[..], &Limits::default()).await,
                Err(WireError::TooLong { what: "list", .. })
            ));
            // Truncated.
            let short = b"\x05\0\0\0\0\0\0\0ab";
            assert!(matches!(
                read_string(&mut &short[..], 10).await,
                Err(WireError::UnexpectedEof)
            ));
            assert!(matches!(
                read_u64(&mut &b"\x01\x02"[..]).await,
                Err(WireError::UnexpectedEof)
            ));
            // Bool out of range.
            let two = 2u64.to_le_bytes();
            assert!(matches!(
                read_bool(&mut &two[..]).await,
                Err(WireError::InvalidBool(2))
            ));
            // Invalid UTF-8.
            let mut out = Vec::new();
            write_bytes(&mut out, b"\xff\xfe").await.unwrap();
            assert!(matches!(
                read_string(&mut &out[..], 10).await,
                Err(WireError::InvalidUtf8)
            ));
            // Bad store path.
            out.clear();
            write_string(&mut out, "/tmp/x").await.unwrap();
            assert!(matches!(
                read_store_path(&mut &out[..]).await,
                Err(WireError::StorePath(_))
            ));
        });
    }

    fn tight(bytes: u64, items: u64) -> Limits {
        Limits {
            max_message_bytes: bytes,
            max_message_items: items,
            ..Limits::default()
        }
    }

    /// A message's strings and elements are bounded as a whole, not only one
    /// by one; the budget is per message and only where a server asks for it.
    #[test]
    fn message_budget_bounds_the_whole_message() {
        use crate::wire::test_support::{test_drv, test_path};
        rt().block_on(async {
            let (drv_path, mut drv) = test_drv(&test_path("in"), &test_path("out"), "t");
            // 20 values of 1000 bytes: each is far below max_string, together over 16 KiB.
            for i in 0..20 {
                drv.env
                    .insert(format!("big{i}").into(), "x".repeat(1000).into());
            }
            let mut out = Vec::new();
            write_basic_derivation(&mut out, &drv).await.unwrap();
            let read = |lim: Limits| {
                let out = out.clone();
                let drv_path = drv_path.clone();
                async move {
                    let mut r = &out[..];
                    within_message(&lim, read_basic_derivation(&mut r, &drv_path, &lim)).await
                }
            };
            let err = read(tight(16 << 10, 1000)).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    WireError::MessageTooLarge {
                        what: "string bytes",
                        max: 16384
                    }
                ),
                "{err}"
            );
            assert!(
                err.to_string().contains("protocol message too large"),
                "{err}"
            );
            // Env entries are elements too.
            let err = read(tight(1 << 20, 10)).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    WireError::MessageTooLarge {
                        what: "list elements",
                        max: 10
                    }
                ),
                "{err}"
            );
            // Within budget it reads back whole.
            assert_eq!(read(tight(1 << 20, 1000)).await.unwrap(), drv);
            // Outside `within_message` only the per-item limits apply.
            let lim = tight(16, 1);
            assert_eq!(
                read_basic_derivation(&mut &out[..], &drv_path, &lim)
                    .await
                    .unwrap(),
                drv
            );

            // A path set: each message gets a fresh budget.
            let paths: BTreeSet<StorePath> =
                (0..100).map(|i| test_path(&format!("p{i}"))).collect();
            let mut out = Vec::new();
            write_store_paths(&mut out, &paths).await.unwrap();
            let lim = tight(1 << 20, 150);
            for _ in 0..3 {
                let got = within_message(&lim, read_store_paths(&mut &out[..], &lim)).await;
                assert_eq!(got.unwrap(), paths);
            }
            let lim = tight(1 << 20, 99);
            let err = within_message(&lim, read_store_paths(&mut &out[..], &lim)).await;
            assert!(matches!(err, Err(WireError::MessageTooLarge { .. })));
            // A count over the budget fails before any element is read (or allocated).
            let huge = 1_000_000u64.to_le_bytes();
            let lim = tight(1 << 20, 1000);
            let err = within_message(&lim, read_store_paths(&mut &huge[..], &lim)).await;
            assert!(
                matches!(err, Err(WireError::MessageTooLarge { .. })),
                "{err:?}"
            );
            // So does a string length over what is left, with no bytes behind it.
            let mut claim = Vec::new();
            claim.extend_from_slice(&2u64.to_le_bytes());
            claim.extend_from_slice(&(60u64 << 20).to_le_bytes());
            let lim = tight(1 << 20, 1000);
            let err = within_message(&lim, read_strings(&mut &claim[..], &lim)).await;
            assert!(
                matches!(err, Err(WireError::MessageTooLarge { .. })),
                "{err:?}"
            );
        });
    }

    proptest! {
        #[test]
        fn bytes_roundtrip(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            rt().block_on(async {
                let mut out = Vec::new();
                write_bytes(&mut out, &b).await.unwrap();
                prop_assert_eq!(out.len() % 8, 0);
                let mut r = &out[..];
                prop_assert_eq!(read_bytes(&mut r, 1000).await.unwrap(), b);
                prop_assert!(r.is_empty());
                Ok(())
            })?;
        }

        #[test]
        fn collections_roundtrip(
            list in proptest::collection::vec(".{0,20}", 0..10),
            map in proptest::collection::btree_map(".{0,10}", ".{0,30}", 0..10),
            n in any::<u64>(),
            flag in any::<bool>(),
        ) {
            rt().block_on(async {
                let mut out = Vec::new();
                write_u64(&mut out, n).await.unwrap();
                write_bool(&mut out, flag).await.unwrap();
                write_strings(&mut out, &list).await.unwrap();
                write_string_map(&mut out, &map).await.unwrap();
                let lim = Limits::default();
                let mut r = &out[..];
                prop_assert_eq!(read_u64(&mut r).await.unwrap(), n);
                prop_assert_eq!(read_bool(&mut r).await.unwrap(), flag);
                prop_assert_eq!(read_strings(&mut r, &lim).await.unwrap(), list);
                prop_assert_eq!(read_string_map(&mut r, &lim).await.unwrap(), map);
                prop_assert!(r.is_empty());
                Ok(())
            })?;
        }
    }
}
