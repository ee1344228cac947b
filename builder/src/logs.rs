//! Live build logs: reads the local Nix's stderr as it comes and forwards it as
//! `JobLog` events in batches (at most every 100 ms, or as soon as 16 KiB are
//! waiting). It also remembers when output last arrived (for max-silent-time)
//! and keeps the last few KiB (for error messages when Nix dies).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use crate::jobs::Event;

/// Send a batch once this many bytes wait.
pub(crate) const BATCH_BYTES: usize = 16 * 1024;
/// Send a batch at most this long after its first byte arrived.
pub(crate) const BATCH_DELAY: Duration = Duration::from_millis(100);
/// How much of the log's end is kept for error messages.
const TAIL_BYTES: usize = 4096;

/// Shared view of a running log: last activity and tail.
#[derive(Debug)]
pub(crate) struct LogState {
    base: Instant,
    last_ms: AtomicU64,
    total: AtomicU64,
    tail: Mutex<VecDeque<u8>>,
}

impl LogState {
    fn new() -> Self {
        LogState {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            total: AtomicU64::new(0),
            tail: Mutex::new(VecDeque::with_capacity(TAIL_BYTES)),
        }
    }

    /// Time since output last arrived (or since the log started).
    pub(crate) fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }

    /// Treat now as activity (e.g. when a new phase begins).
    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Bytes seen so far.
    #[cfg(test)]
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The last lines of the log (lossy UTF-8), for an error message.
    pub(crate) fn tail(&self) -> String {
        let tail = self
            .tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bytes: Vec<u8> = tail.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    fn record(&self, data: &[u8]) {
        self.touch();
        self.total.fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut tail = self
            .tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tail.extend(data.iter().copied());
        let excess = tail.len().saturating_sub(TAIL_BYTES);
        tail.drain(..excess);
    }
}

/// Start forwarding `reader` (a build's stderr) as log events of `job_id`.
/// The task ends at EOF, after sending what is left.
pub(crate) fn spawn_pump<R: AsyncRead + Unpin + Send + 'static>(
    mut reader: R,
    job_id: String,
    events: mpsc::Sender<Event>,
) -> (Arc<LogState>, tokio::task::JoinHandle<()>) {
    let state = Arc::new(LogState::new());
    let st = Arc::clone(&state);
    let handle = tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        let mut pending: Vec<u8> = Vec::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let flush_now = tokio::select! {
                n = reader.read(&mut buf) => match n {
                    Ok(0) | Err(_) => {
                        if !pending.is_empty() {
                            let _ = events.send(Event::Log(job_id.clone(), Bytes::from(std::mem::take(&mut pending)))).await;
                        }
                        return;
                    }
                    Ok(n) => {
                        st.record(&buf[..n]);
                        pending.extend_from_slice(&buf[..n]);
                        deadline.get_or_insert_with(|| tokio::time::Instant::now() + BATCH_DELAY);
                        pending.len() >= BATCH_BYTES
                    }
                },
                () = sleep_until(deadline) => true,
            };
            if flush_now && !pending.is_empty() {
                deadline = None;
                let chunk = Bytes::from(std::mem::take(&mut pending));
                let _ = events.send(Event::Log(job_id.clone(), chunk)).await;
            }
        }
    });
    (state, handle)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn batches_by_time_and_size_and_keeps_order_and_tail() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let (tx, mut rx) = mpsc::channel(100);
        let (state, handle) = spawn_pump(r, "j".into(), tx);
        w.write_all(b"line 1\n").await.unwrap();
        w.write_all(b"line 2\n").await.unwrap();
        // Both small writes arrive together, within about BATCH_DELAY.
        let Event::Log(id, data) = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(id, "j");
        assert_eq!(&data[..], b"line 1\nline 2\n");
        // A big write is sent in batches of at least BATCH_BYTES without waiting.
        let big = vec![b'x'; 3 * BATCH_BYTES];
        w.write_all(&big).await.unwrap();
        w.write_all(b"\nthe end\n").await.unwrap();
        drop(w);
        handle.await.unwrap();
        let mut rest = Vec::new();
        while let Ok(Event::Log(_, d)) = rx.try_recv() {
            rest.extend_from_slice(&d);
        }
        assert_eq!(rest.len(), big.len() + 9);
        assert!(rest.ends_with(b"\nthe end\n"));
        assert_eq!(state.total(), 14 + rest.len() as u64);
        assert!(state.tail().ends_with("the end"));
        assert!(state.silent_for() < Duration::from_secs(5));
    }
}
