//! Live build logs: reads the local Nix's stderr as it comes and forwards it as
//! `JobLog` events in batches (at most every 100 ms, or as soon as 16 KiB are
//! waiting). It also remembers when output last arrived (for max-silent-time)
//! and keeps the last few KiB (for error messages when Nix dies). A reused
//! local Nix's stream moves from job to job ([`LogPump::retarget`]): what it
//! wrote before the move stays with the job it was working for.

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

/// How many bytes a reader has waiting, readable at once (for a pipe,
/// `FIONREAD`): what [`LogPump::retarget`] drains to the job it leaves.
pub(crate) trait Pending {
    fn pending(&self) -> usize;
}

impl Pending for tokio::process::ChildStderr {
    fn pending(&self) -> usize {
        rustix::io::ioctl_fionread(self)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0)
    }
}

/// The job a pump's bytes belong to.
struct Target {
    job_id: String,
    events: mpsc::Sender<Event>,
    state: Arc<LogState>,
}

/// A request to a pump: give what is already written to the current job,
/// then send the bytes after it to `next` (none: an idle process, its output
/// only noted in the builder's log).
struct Retarget {
    next: Option<Target>,
    done: tokio::sync::oneshot::Sender<()>,
}

/// A running pump (see [`spawn_pump`]).
pub(crate) struct LogPump {
    ctl: mpsc::UnboundedSender<Retarget>,
    /// Ends at EOF, after sending what is left.
    pub(crate) task: tokio::task::JoinHandle<()>,
}

impl LogPump {
    /// Hand the stream to another job (a reused local Nix): every byte the
    /// process wrote before this call goes to the job it worked for (a Nix
    /// that has answered a request has written that request's log already),
    /// what it writes afterwards to `job_id`. Returns the new job's log state.
    pub(crate) async fn retarget(
        &self,
        next: Option<(String, mpsc::Sender<Event>)>,
    ) -> Arc<LogState> {
        let state = Arc::new(LogState::new());
        let (done, wait) = tokio::sync::oneshot::channel();
        let next = next.map(|(job_id, events)| Target {
            job_id,
            events,
            state: Arc::clone(&state),
        });
        if self.ctl.send(Retarget { next, done }).is_ok() {
            let _ = wait.await;
        }
        state
    }
}

/// Start forwarding `reader` (a build's stderr) as log events of `job_id`.
/// The task ends at EOF, after sending what is left.
pub(crate) fn spawn_pump<R: AsyncRead + Pending + Unpin + Send + 'static>(
    mut reader: R,
    job_id: String,
    events: mpsc::Sender<Event>,
) -> (Arc<LogState>, LogPump) {
    let state = Arc::new(LogState::new());
    let mut target = Some(Target {
        job_id,
        events,
        state: Arc::clone(&state),
    });
    let (ctl, mut ctl_rx) = mpsc::unbounded_channel::<Retarget>();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        let mut pending: Vec<u8> = Vec::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut ctl_open = true;
        loop {
            let flush_now = tokio::select! {
                n = reader.read(&mut buf) => match n {
                    Ok(0) | Err(_) => {
                        flush(&target, &mut pending).await;
                        return;
                    }
                    Ok(n) => {
                        record(&target, &buf[..n]);
                        pending.extend_from_slice(&buf[..n]);
                        deadline.get_or_insert_with(|| tokio::time::Instant::now() + BATCH_DELAY);
                        pending.len() >= BATCH_BYTES
                    }
                },
                () = sleep_until(deadline) => true,
                msg = ctl_rx.recv(), if ctl_open => {
                    let Some(Retarget { next, done }) = msg else {
                        ctl_open = false;
                        continue;
                    };
                    // What is in the pipe now was written before the call.
                    let mut left = reader.pending();
                    while left > 0 {
                        let want = left.min(buf.len());
                        match reader.read(&mut buf[..want]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                record(&target, &buf[..n]);
                                pending.extend_from_slice(&buf[..n]);
                                left -= n;
                            }
                        }
                    }
                    flush(&target, &mut pending).await;
                    deadline = None;
                    target = next;
                    let _ = done.send(());
                    false
                }
            };
            if flush_now && !pending.is_empty() {
                deadline = None;
                flush(&target, &mut pending).await;
            }
        }
    });
    (state, LogPump { ctl, task })
}

fn record(target: &Option<Target>, data: &[u8]) {
    if let Some(t) = target {
        t.state.record(data);
    }
}

/// Send what is pending to the current job (an idle process's output is
/// only noted in the builder's log).
async fn flush(target: &Option<Target>, pending: &mut Vec<u8>) {
    if pending.is_empty() {
        return;
    }
    let chunk = Bytes::from(std::mem::take(pending));
    match target {
        Some(t) => {
            let _ = t.events.send(Event::Log(t.job_id.clone(), chunk)).await;
        }
        None => {
            tracing::debug!(output = %String::from_utf8_lossy(&chunk).trim(), "an idle local nix wrote to stderr");
        }
    }
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

    impl Pending for tokio::io::DuplexStream {
        fn pending(&self) -> usize {
            0
        }
    }

    #[tokio::test]
    async fn batches_by_time_and_size_and_keeps_order_and_tail() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let (tx, mut rx) = mpsc::channel(100);
        let (state, pump) = spawn_pump(r, "j".into(), tx);
        let handle = pump.task;
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

    /// A reused process's stream: what it wrote before answering stays with
    /// the job it answered, even when the pump had not read it yet.
    #[tokio::test]
    async fn a_moved_stream_keeps_each_jobs_bytes_with_that_job() {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new("sh")
            .args([
                "-c",
                // A burst larger than one read, then the "answer" on stdout.
                "head -c 20000 /dev/zero | tr '\\0' a >&2; echo done-a; read x; printf b >&2; echo done-b; read y",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, mut rx) = mpsc::channel(1000);
        let (first, pump) = spawn_pump(child.stderr.take().unwrap(), "a".into(), tx.clone());
        let run = async {
            assert_eq!(stdout.next_line().await.unwrap().unwrap(), "done-a");
            let second = pump.retarget(Some(("b".into(), tx.clone()))).await;
            stdin.write_all(b"go\n").await.unwrap();
            assert_eq!(stdout.next_line().await.unwrap().unwrap(), "done-b");
            let idle = pump.retarget(None).await;
            drop(stdin);
            pump.task.await.unwrap();
            (second, idle)
        };
        let (second, idle) = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("the pump hung");
        let _ = child.wait().await;
        drop(tx);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Log(id, d) if id == "a" => a.extend_from_slice(&d),
                Event::Log(id, d) if id == "b" => b.extend_from_slice(&d),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(a, vec![b'a'; 20000]);
        assert_eq!(b, b"b");
        assert_eq!(first.total(), 20000);
        assert_eq!(second.total(), 1);
        assert_eq!(idle.total(), 0);
    }
}
