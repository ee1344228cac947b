//! The coordinator's Prometheus metrics (`GET /metrics`): one [`Metrics`] per
//! coordinator owns its [`Registry`]. Counters and histograms are updated
//! where things happen (a build ends, a job starts, a flush returns, an upload
//! is stored, a NAR is served, a connection opens); the gauges that describe
//! the scheduler's state (builders, slots, queues) are read from it at scrape
//! time by a collector the domain registers ([`Scrape`],
//! `domain::observe`), so they are never stale and cost nothing between
//! scrapes. Every name, type and label is listed in `docs/metrics.md`, which
//! also compares the set with Hydra's queue runner.
//!
//! This module knows nothing above it (the domain, the cache and the
//! listeners call into it), so it is a leaf of the module graph.
//!
//! Exposition: OpenMetrics text (`application/openmetrics-text`), which
//! Prometheus scrapes natively: counters are declared without their `_total`
//! suffix and sampled with it; names carry base units (`_seconds`, `_bytes`).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One fixed label (`[("outcome", "built")]`).
pub type Label = [(&'static str, &'static str); 1];
/// A family of histograms sharing one set of buckets.
pub type HistogramFamily = Family<Label, Histogram, fn() -> Histogram>;

/// Seconds a build takes on a builder: 1 s to 4 h.
const BUILD_BUCKETS: [f64; 14] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
    28800.0,
];
/// Seconds from runnable to started: milliseconds (a free slot) to an hour (a full farm).
const DISPATCH_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
/// Seconds of one state flush (an fsync): 0.5 ms to 10 s.
const FLUSH_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Seconds the scheduler lock is held for one decision: 50 µs to 1 s.
const LOCK_BUCKETS: [f64; 13] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Seconds of one NAR transfer: 10 ms to 10 min.
const TRANSFER_BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

fn build_histogram() -> Histogram {
    Histogram::new(BUILD_BUCKETS)
}
fn transfer_histogram() -> Histogram {
    Histogram::new(TRANSFER_BUCKETS)
}

/// What the scheduler's state adds at each scrape: called with the
/// scrape's encoder (see [`Gauges`]).
pub type Scrape = Box<dyn Fn(&mut DescriptorEncoder<'_>) -> fmt::Result + Send + Sync>;

struct ScrapeCollector(Scrape);

impl fmt::Debug for ScrapeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScrapeCollector")
    }
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        (self.0)(&mut encoder)
    }
}

/// Writing a scrape-time family: gauges with labels, or a plain counter.
pub struct Gauges<'e, 'a> {
    encoder: &'e mut DescriptorEncoder<'a>,
}

impl<'e, 'a> Gauges<'e, 'a> {
    pub fn new(encoder: &'e mut DescriptorEncoder<'a>) -> Gauges<'e, 'a> {
        Gauges { encoder }
    }

    /// A gauge family `name` with one sample per row (label pairs, value).
    pub fn family<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (L, f64)>,
    ) -> fmt::Result {
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in rows {
            encode_value(&mut metric.encode_family(&labels)?, value)?;
        }
        Ok(())
    }

    /// A gauge without labels.
    pub fn single(&mut self, name: &str, help: &str, value: f64) -> fmt::Result {
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        encode_value(&mut metric, value)
    }

    /// A counter without labels whose value lives elsewhere (`name` without
    /// `_total`: the encoder appends it).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        self.encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, u64, f64>(&value, None)
    }
}

/// A gauge's value: whole numbers (counts, bytes) as integers, the rest as floats.
fn encode_value(
    metric: &mut prometheus_client::encoding::MetricEncoder<'_>,
    value: f64,
) -> fmt::Result {
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        metric.encode_gauge(&(value as i64))
    } else {
        metric.encode_gauge(&value)
    }
}

/// A kind of connection or session: an open gauge and a total counter.
#[derive(Clone)]
pub struct ConnTracker {
    open: Gauge,
    total: Counter,
}

impl ConnTracker {
    fn new(open: &Family<Label, Gauge>, total: &Family<Label, Counter>, label: Label) -> Self {
        ConnTracker {
            open: open.get_or_create(&label).clone(),
            total: total.get_or_create(&label).clone(),
        }
    }

    /// One more open; it counts until the guard is dropped.
    pub fn open(&self) -> ConnGuard {
        self.open.inc();
        self.total.inc();
        ConnGuard(self.open.clone())
    }
}

/// An open connection or session (see [`ConnTracker::open`]).
pub struct ConnGuard(Gauge);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An I/O stream that counts as an open connection while it lives.
pub struct CountedIo<T> {
    pub io: T,
    _guard: ConnGuard,
}

impl<T> CountedIo<T> {
    pub fn new(io: T, tracker: &ConnTracker) -> CountedIo<T> {
        CountedIo {
            io,
            _guard: tracker.open(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// How a NAR left the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `GET /nar/…` (compressed bytes, as stored).
    Http,
    /// `DownloadNar` over gRPC (builders, `farm`): the NAR itself.
    Grpc,
    /// A Nix client over the SSH endpoint or the relay socket: the NAR itself.
    Nix,
}

impl Via {
    fn label(self) -> Label {
        [(
            "via",
            match self {
                Via::Http => "http",
                Via::Grpc => "grpc",
                Via::Nix => "nix",
            },
        )]
    }
}

/// What became of an upload to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadResult {
    /// Verified, and stored (published, or kept as its uploader's claim)
    /// unless the path was there already.
    Accepted,
    /// Refused: bad NAR, bad claim, timeout, storage failure.
    Refused,
}

/// The binary cache's counters (cheap to clone: handles on shared values).
/// The cache updates them; the coordinator's registry exposes them.
#[derive(Clone)]
pub struct CacheMetrics {
    uploads: Family<Label, Counter>,
    upload_bytes: Counter,
    upload_duration: Histogram,
    ingested_paths: Counter,
    ingested_bytes: Counter,
    ingested_compressed_bytes: Counter,
    served_paths: Family<Label, Counter>,
    served_bytes: Family<Label, Counter>,
    download_duration: HistogramFamily,
    narinfo: Family<Label, Counter>,
}

impl Default for CacheMetrics {
    fn default() -> CacheMetrics {
        CacheMetrics {
            uploads: Family::default(),
            upload_bytes: Counter::default(),
            upload_duration: transfer_histogram(),
            ingested_paths: Counter::default(),
            ingested_bytes: Counter::default(),
            ingested_compressed_bytes: Counter::default(),
            served_paths: Family::default(),
            served_bytes: Family::default(),
            download_duration: Family::new_with_constructor(transfer_histogram),
            narinfo: Family::default(),
        }
    }
}

impl CacheMetrics {
    /// An upload of `nar_bytes` ended after `started`.
    pub fn upload_ended(&self, result: UploadResult, nar_bytes: u64, started: Instant) {
        let label = match result {
            UploadResult::Accepted => "accepted",
            UploadResult::Refused => "refused",
        };
        self.uploads.get_or_create(&[("result", label)]).inc();
        if result != UploadResult::Refused {
            self.upload_bytes.inc_by(nar_bytes);
            self.upload_duration
                .observe(started.elapsed().as_secs_f64());
        }
    }

    /// A new path is in the cache: its NAR and compressed sizes.
    pub fn ingested(&self, nar_bytes: u64, compressed_bytes: u64) {
        self.ingested_paths.inc();
        self.ingested_bytes.inc_by(nar_bytes);
        self.ingested_compressed_bytes.inc_by(compressed_bytes);
    }

    /// A narinfo request over HTTP found its path (or not).
    pub fn narinfo(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.narinfo.get_or_create(&[("result", result)]).inc();
    }

    /// narinfo requests over HTTP so far: (hits, misses).
    pub fn narinfo_counts(&self) -> (u64, u64) {
        let get = |r: &'static str| self.narinfo.get_or_create(&[("result", r)]).get();
        (get("hit"), get("miss"))
    }

    /// A NAR starts leaving the cache `via`: bytes are counted as they go,
    /// the transfer's duration when the meter is dropped.
    pub fn serving(&self, via: Via) -> ServeMeter {
        let label = via.label();
        self.served_paths.get_or_create(&label).inc();
        ServeMeter {
            bytes: self.served_bytes.get_or_create(&label).clone(),
            duration: self.download_duration.get_or_create(&label).clone(),
            started: Instant::now(),
        }
    }

    /// `reader`, metered as a NAR served `via`.
    pub fn meter_reader<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        via: Via,
        reader: R,
    ) -> MeteredRead<R> {
        MeteredRead {
            inner: reader,
            meter: self.serving(via),
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "farm_cache_uploads",
            "NAR uploads to the cache by result (accepted: verified, stored unless present already; refused)",
            self.uploads.clone(),
        );
        r.register(
            "farm_cache_upload_bytes",
            "NAR bytes of accepted uploads (new or already present)",
            self.upload_bytes.clone(),
        );
        r.register(
            "farm_cache_upload_duration_seconds",
            "Time from the start of an accepted upload to its acknowledgement",
            self.upload_duration.clone(),
        );
        r.register(
            "farm_cache_ingested_paths",
            "Store paths newly stored in the cache",
            self.ingested_paths.clone(),
        );
        r.register(
            "farm_cache_ingested_bytes",
            "NAR bytes of the store paths newly stored in the cache",
            self.ingested_bytes.clone(),
        );
        r.register(
            "farm_cache_ingested_compressed_bytes",
            "Compressed (zstd) bytes written for the store paths newly stored",
            self.ingested_compressed_bytes.clone(),
        );
        r.register(
            "farm_cache_served_paths",
            "NARs served, by route (http: GET /nar, grpc: DownloadNar, nix: the SSH endpoint)",
            self.served_paths.clone(),
        );
        r.register(
            "farm_cache_served_bytes",
            "Bytes of NARs served, by route (http counts the compressed file, grpc and nix the NAR)",
            self.served_bytes.clone(),
        );
        r.register(
            "farm_cache_download_duration_seconds",
            "Time to serve one NAR, by route",
            self.download_duration.clone(),
        );
        r.register(
            "farm_cache_narinfo_requests",
            "narinfo requests over HTTP by result (hit, miss)",
            self.narinfo.clone(),
        );
    }
}

/// A NAR being served (see [`CacheMetrics::serving`]).
pub struct ServeMeter {
    bytes: Counter,
    duration: Histogram,
    started: Instant,
}

impl ServeMeter {
    /// `n` more bytes went out.
    pub fn sent(&self, n: usize) {
        self.bytes.inc_by(n as u64);
    }
}

impl Drop for ServeMeter {
    fn drop(&mut self) {
        self.duration.observe(self.started.elapsed().as_secs_f64());
    }
}

/// A reader whose bytes count as served (see [`CacheMetrics::meter_reader`]).
pub struct MeteredRead<R> {
    inner: R,
    meter: ServeMeter,
}

impl<R: AsyncRead + Unpin> AsyncRead for MeteredRead<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.meter.sent(n);
        }
        r
    }
}

/// The coordinator's metrics and the registry that exposes them.
pub struct Metrics {
    registry: Registry,
    builds_finished: Family<Label, Counter>,
    build_duration: HistogramFamily,
    dispatch_latency: Histogram,
    jobs_dispatched: Counter,
    submissions: Counter,
    lock_held: Histogram,
    flush_duration: Histogram,
    pub grpc_connections: ConnTracker,
    pub ssh_connections: ConnTracker,
    pub serve_sessions: ConnTracker,
    pub daemon_sessions: ConnTracker,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// The metrics of a coordinator whose cache counts into `cache` and whose
    /// state gauges `scrape` writes at each scrape.
    pub fn new(cache: &CacheMetrics, scrape: Scrape) -> Metrics {
        let mut r = Registry::default();
        let builds_finished = Family::<Label, Counter>::default();
        r.register(
            "farm_builds_finished",
            "Builds that ended, by outcome (built, cached, failed, dependency_failed, cancelled, timed_out, unschedulable)",
            builds_finished.clone(),
        );
        let build_duration: HistogramFamily = Family::new_with_constructor(build_histogram);
        r.register(
            "farm_build_duration_seconds",
            "Time from dispatch to result of builds that ran to a result on a builder, by outcome (built, failed, timed_out)",
            build_duration.clone(),
        );
        let dispatch_latency = Histogram::new(DISPATCH_BUCKETS);
        r.register(
            "farm_dispatch_latency_seconds",
            "Time from a build becoming runnable (inputs resolved, dependencies built) to its builder reporting the job started",
            dispatch_latency.clone(),
        );
        let jobs_dispatched = Counter::default();
        r.register(
            "farm_jobs_dispatched",
            "Jobs sent to builders (each attempt of a build is one job)",
            jobs_dispatched.clone(),
        );
        let submissions = Counter::default();
        r.register(
            "farm_submissions",
            "Submissions received (gRPC Submit, the SSH endpoint's builds)",
            submissions.clone(),
        );
        let lock_held = Histogram::new(LOCK_BUCKETS);
        r.register(
            "farm_scheduler_lock_held_seconds",
            "Time the scheduler lock is held for one decision (the call and the dispatch after it)",
            lock_held.clone(),
        );
        let flush_duration = Histogram::new(FLUSH_BUCKETS);
        r.register(
            "farm_state_flush_duration_seconds",
            "Time of one group-commit flush of the state database (each answers every request queued before it began)",
            flush_duration.clone(),
        );
        let conns = Family::<Label, Gauge>::default();
        let conns_total = Family::<Label, Counter>::default();
        r.register(
            "farm_connections",
            "Open TCP connections by listener kind (grpc, ssh)",
            conns.clone(),
        );
        r.register(
            "farm_connections_opened",
            "TCP connections accepted by listener kind (grpc, ssh)",
            conns_total.clone(),
        );
        let sessions = Family::<Label, Gauge>::default();
        let sessions_total = Family::<Label, Counter>::default();
        r.register(
            "farm_nix_sessions",
            "Nix protocol sessions running, by protocol (serve: ssh://, daemon: ssh-ng://; over SSH or the relay socket)",
            sessions.clone(),
        );
        r.register(
            "farm_nix_sessions_started",
            "Nix protocol sessions started, by protocol",
            sessions_total.clone(),
        );
        let start_time = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        r.register(
            "farm_coordinator_start_time_seconds",
            "When this coordinator started, in seconds since the epoch",
            start_time,
        );
        let info = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        info.get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        r.register(
            "farm_coordinator_build_info",
            "The coordinator's version (always 1)",
            info,
        );
        cache.register(&mut r);
        r.register_collector(Box::new(ScrapeCollector(scrape)));
        Metrics {
            registry: r,
            builds_finished,
            build_duration,
            dispatch_latency,
            jobs_dispatched,
            submissions,
            lock_held,
            grpc_connections: ConnTracker::new(&conns, &conns_total, [("kind", "grpc")]),
            ssh_connections: ConnTracker::new(&conns, &conns_total, [("kind", "ssh")]),
            serve_sessions: ConnTracker::new(&sessions, &sessions_total, [("protocol", "serve")]),
            daemon_sessions: ConnTracker::new(&sessions, &sessions_total, [("protocol", "daemon")]),
            flush_duration,
        }
    }

    /// The whole exposition, ending in `# EOF`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String fails only if a collector does.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding the metrics failed");
        }
        out
    }

    /// A build ended with `outcome` (snake case); `ran_secs` when it ran to
    /// a result on a builder.
    pub fn build_finished(&self, outcome: &'static str, ran_secs: Option<f64>) {
        self.builds_finished
            .get_or_create(&[("outcome", outcome)])
            .inc();
        if let Some(s) = ran_secs {
            self.build_duration
                .get_or_create(&[("outcome", outcome)])
                .observe(s);
        }
    }

    /// A builder reported a job started, `waited` seconds after its build was runnable.
    pub fn job_started(&self, waited: f64) {
        self.dispatch_latency.observe(waited);
    }

    /// `n` jobs were sent to builders.
    pub fn jobs_dispatched(&self, n: u64) {
        self.jobs_dispatched.inc_by(n);
    }

    /// A submission arrived.
    pub fn submitted(&self) {
        self.submissions.inc();
    }

    /// The scheduler lock was held this long for one decision.
    pub fn lock_held(&self, secs: f64) {
        self.lock_held.observe(secs);
    }

    /// The histogram the state flusher observes.
    pub fn flush_histogram(&self) -> Histogram {
        self.flush_duration.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_histograms_and_scraped_gauges_render_in_openmetrics_text() {
        let cache = CacheMetrics::default();
        let m = Metrics::new(
            &cache,
            Box::new(|enc| {
                let mut g = Gauges::new(enc);
                g.family(
                    "farm_test_gauge",
                    "a test gauge",
                    [([("system", "x86_64-linux".to_string())], 2.0)],
                )?;
                g.counter("farm_test_requests", "a test counter", 7)
            }),
        );
        m.build_finished("failed", Some(3.0));
        m.build_finished("dependency_failed", None);
        cache.narinfo(true);
        cache.narinfo(false);
        cache.narinfo(false);
        {
            let _conn = m.ssh_connections.open();
            let text = m.render();
            assert!(text.contains("farm_connections{kind=\"ssh\"} 1"), "{text}");
        }
        let text = m.render();
        for line in [
            "# TYPE farm_builds_finished counter",
            "farm_builds_finished_total{outcome=\"failed\"} 1",
            "farm_builds_finished_total{outcome=\"dependency_failed\"} 1",
            "farm_build_duration_seconds_count{outcome=\"failed\"} 1",
            "farm_build_duration_seconds_bucket{le=\"5.0\",outcome=\"failed\"} 1",
            "farm_cache_narinfo_requests_total{result=\"miss\"} 2",
            "farm_connections{kind=\"ssh\"} 0",
            "farm_connections_opened_total{kind=\"ssh\"} 1",
            "farm_test_gauge{system=\"x86_64-linux\"} 2",
            "farm_test_requests_total 7",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
        }
    }
}
