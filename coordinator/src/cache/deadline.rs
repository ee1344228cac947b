//! The time an upload may take: a reader that fails once its deadline passes,
//! so no uploader (a stalled or trickling client) keeps an ingest, its
//! connection and its temporary object forever. The deadline grows with the
//! claimed NAR size: `upload_grace_secs + nar_size / upload_min_rate`
//! (see [`super::CacheConfig`]).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};

/// The longest an upload of a `nar_size`-byte NAR may take: `grace` plus the
/// time it takes at `min_rate` bytes per second (a rate of 0 adds nothing).
pub(super) fn upload_time_limit(nar_size: u64, grace_secs: u64, min_rate: u64) -> Duration {
    let transfer = if min_rate == 0 {
        Duration::ZERO
    } else {
        Duration::try_from_secs_f64(nar_size as f64 / min_rate as f64).unwrap_or(Duration::MAX)
    };
    Duration::from_secs(grace_secs).saturating_add(transfer)
}

/// Reads from `inner` until `limit` has passed since it was made; after that
/// every read fails with `TimedOut` (and [`Deadline::expired`] says so).
pub(super) struct Deadline<R> {
    inner: R,
    sleep: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    expired: bool,
}

impl<R> Deadline<R> {
    pub(super) fn new(inner: R, limit: Duration) -> Deadline<R> {
        let sleep = match tokio::time::Instant::now().checked_add(limit) {
            Some(at) => tokio::time::sleep_until(at),
            // Far enough to be never (tokio's own "far future" is ~30 years).
            None => tokio::time::sleep(Duration::from_secs(86400 * 365 * 30)),
        };
        Deadline {
            inner,
            sleep: Box::pin(sleep),
            limit,
            expired: false,
        }
    }

    /// Whether a read failed because the deadline passed.
    pub(super) fn expired(&self) -> bool {
        self.expired
    }

    /// The time the upload was given.
    pub(super) fn limit(&self) -> Duration {
        self.limit
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Deadline<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.expired || this.sleep.as_mut().poll(cx).is_ready() {
            this.expired = true;
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the upload took longer than {} s", this.limit.as_secs()),
            )));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_limit_grows_with_the_size() {
        assert_eq!(upload_time_limit(0, 10, 1000), Duration::from_secs(10));
        assert_eq!(upload_time_limit(5000, 10, 1000), Duration::from_secs(15));
        assert_eq!(upload_time_limit(5000, 10, 0), Duration::from_secs(10));
        assert_eq!(upload_time_limit(u64::MAX, u64::MAX, 1), Duration::MAX);
    }

    #[tokio::test]
    async fn a_trickle_is_cut_at_the_deadline() {
        let (mut w, r) = tokio::io::duplex(64);
        let trickle = tokio::spawn(async move {
            loop {
                if w.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let mut d = Deadline::new(r, Duration::from_millis(300));
        let mut got = Vec::new();
        let e = tokio::time::timeout(Duration::from_secs(10), d.read_to_end(&mut got))
            .await
            .expect("the reader gives up by itself")
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(d.expired());
        assert!(!got.is_empty(), "bytes before the deadline were read");
        drop(d);
        trickle.await.unwrap();

        // A reader that finishes in time is untouched.
        let mut d = Deadline::new(&b"abc"[..], Duration::from_secs(10));
        let mut got = Vec::new();
        d.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"abc");
        assert!(!d.expired());
    }
}
