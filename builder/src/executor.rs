//! Runs one job with the local Nix, the way Nix's own remote builds do:
//! take a `nix-store --serve --write` (one kept from an earlier job, see
//! [`crate::local::ServePool`]; a claim job's own), ask which inputs the store lacks, fetch
//! those from the cache (in parallel, verified) and add them in dependency order,
//! send the derivation as a BasicDerivation (inputSrcs = the whole input
//! closure, so no `.drv` files are needed locally), stream its stderr as the
//! log, then upload each output and report.
//!
//! Timeouts: build-timeout and max-silent-time go to Nix (which stops the build
//! and reports TimedOut); a watchdog here kills the process group if Nix has not
//! acted 30 s after either limit. Cancel kills the process group at once.
//!
//! A build that ends while the coordinator is unreachable keeps its outputs: the
//! upload waits for the next session and starts again there (the coordinator
//! keeps the job running on this builder meanwhile), rather than failing the
//! job and having the build run again.
//!
//! Each job's phases (taking the local Nix, querying and fetching inputs, the
//! build, the upload) are timed and logged with its end ("job phases").
//!
//! Scratch space is `STATE_DIR/tmp/job-*`, one directory per job, removed when
//! the job ends; what a crash left there is removed when the executor starts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use farm_nix::derivation::{BasicDerivation, Derivation, MAX_DRV_SIZE, name_from_drv_path};
use farm_nix::path_info::ValidPathInfo;
use farm_nix::serve::BuildOptions;
use farm_nix::store_path::StorePath;
use farm_nix::wire::{BuildResult, BuildStatus};
use farm_proto::v1::{Job, JobResult, JobStatus};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::claims::StoreGuard;
use crate::config::BuilderConfig;
use crate::error::BuilderError;
use crate::jobs::{Execute, JobContext, cancel_message, failure, now_unix, status_for};
use crate::link::{Link, current_link};
use crate::local::{LocalServe, ServePool};
use crate::logs::LogState;
use crate::probe::NixBin;
use crate::transfer;

/// Most input paths accepted for one job.
const MAX_INPUTS: usize = 1_000_000;
/// How long a job waits for a coordinator link before giving up.
const LINK_WAIT: Duration = Duration::from_secs(120);
/// How long after a limit Nix should have enforced the watchdog steps in.
const WATCHDOG_GRACE: Duration = Duration::from_secs(30);
/// Attempts at uploading one output, across lost sessions.
const UPLOAD_ATTEMPTS: u32 = 5;
/// After a failed upload, how long to wait for the session to be seen lost
/// (the failure may be the first sign of it) before taking it as final.
const LINK_SETTLE: Duration = Duration::from_secs(3);
/// The prefix of a job's scratch directory in `STATE_DIR/tmp`.
const SCRATCH_PREFIX: &str = "job-";

/// Builds with the local Nix.
pub(crate) struct NixExecutor {
    bin: NixBin,
    scratch: PathBuf,
    parallelism: usize,
    kill_grace: Duration,
    /// Keeps claim jobs apart from the others (see [`crate::claims`]).
    claims: StoreGuard,
    /// Local Nix processes kept between (signed) jobs.
    pool: Arc<ServePool>,
}

impl NixExecutor {
    /// An executor for this configuration (scratch space in `STATE_DIR/tmp`,
    /// cleared of what earlier runs left there).
    pub(crate) fn new(config: &BuilderConfig) -> Result<Self, BuilderError> {
        let scratch = config.state_dir.join("tmp");
        std::fs::create_dir_all(&scratch).map_err(|e| BuilderError::writing(&scratch, e))?;
        let removed = clean_scratch(&scratch)?;
        if removed > 0 {
            tracing::info!(
                removed,
                dir = %scratch.display(),
                "removed scratch directories left by an earlier run"
            );
        }
        let bin = NixBin::new(config.nix_bin_dir.clone()).with_store(config.store.clone());
        let kill_grace = crate::local::kill_grace_for(config.shutdown_grace);
        Ok(NixExecutor {
            bin: bin.clone(),
            claims: StoreGuard::new(&config.state_dir, bin.clone()),
            pool: ServePool::new(bin, kill_grace),
            scratch,
            parallelism: config.download_parallelism.max(1),
            kill_grace,
        })
    }

    /// Open the local store once (a first `nix-store --serve` initialises a
    /// fresh store; concurrent first opens race) and fail early if it is unusable.
    pub(crate) async fn check_store(&self) -> Result<(), BuilderError> {
        let (events, mut rx) = tokio::sync::mpsc::channel(16);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let serve = LocalServe::spawn(&self.bin, "store-check", events, self.kill_grace).await?;
        serve.finish().await;
        let _ = drain.await;
        // What a claim job cut short left in the store goes now.
        self.claims.recover().await;
        Ok(())
    }
}

/// Why a job did not build.
struct Fail {
    status: JobStatus,
    message: String,
    /// The local Nix must be stopped (it is still busy with the build).
    kill: bool,
}

fn fail(status: JobStatus, message: impl Into<String>) -> Fail {
    Fail {
        status,
        message: message.into(),
        kill: false,
    }
}

#[derive(Default)]
struct Stats {
    downloaded: u64,
    uploaded: u64,
}

/// Where a job's time went, logged when it ends.
#[derive(Default)]
struct Phases {
    /// Taking the local Nix (a new process or a kept one).
    setup: Duration,
    /// Asking the local store which inputs it has.
    query: Duration,
    /// Fetching and adding the missing ones.
    fetch: Duration,
    build: Duration,
    /// Dumping and uploading the outputs.
    upload: Duration,
    reused: bool,
}

impl Phases {
    fn log(&self, job_id: &str, total: Duration) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        tracing::info!(
            job = %job_id,
            total_ms = format_args!("{:.1}", ms(total)),
            setup_ms = format_args!("{:.1}", ms(self.setup)),
            query_ms = format_args!("{:.1}", ms(self.query)),
            fetch_ms = format_args!("{:.1}", ms(self.fetch)),
            build_ms = format_args!("{:.1}", ms(self.build)),
            upload_ms = format_args!("{:.1}", ms(self.upload)),
            reused = self.reused,
            "job phases"
        );
    }
}

/// Time `f` into `slot`.
async fn timed<T>(slot: &mut Duration, f: impl std::future::Future<Output = T>) -> T {
    let t = Instant::now();
    let r = f.await;
    *slot += t.elapsed();
    r
}

struct Built {
    outputs: BTreeMap<String, String>,
    start: u64,
    stop: u64,
}

/// A parsed job.
struct Plan {
    drv_path: StorePath,
    drv: BasicDerivation,
    inputs: Vec<StorePath>,
    outputs: BTreeMap<String, StorePath>,
    options: BuildOptions,
    /// A claim job (of this owner): see [`crate::claims`].
    claim: Option<String>,
}

fn plan(job: &Job) -> Result<Plan, Fail> {
    let invalid = |m: String| fail(JobStatus::Failed, format!("invalid job: {m}"));
    let drv_path = StorePath::parse(&job.drv_path)
        .map_err(|e| invalid(format!("drv path {:?}: {e}", job.drv_path)))?;
    let name = name_from_drv_path(&drv_path).map_err(|e| invalid(e.to_string()))?;
    if job.drv_aterm.len() > MAX_DRV_SIZE {
        return Err(invalid("derivation too large".into()));
    }
    let full = Derivation::parse_aterm(&job.drv_aterm)
        .map_err(|e| invalid(format!("derivation {drv_path}: {e}")))?;
    if job.input_paths.len() > MAX_INPUTS {
        return Err(invalid("too many input paths".into()));
    }
    let mut seen = BTreeSet::new();
    let mut inputs = Vec::with_capacity(job.input_paths.len());
    for p in &job.input_paths {
        let p = StorePath::parse(p).map_err(|e| invalid(format!("input {p:?}: {e}")))?;
        if seen.insert(p.clone()) {
            inputs.push(p);
        }
    }
    let mut drv = full.to_basic(&name);
    // The inputs the coordinator closed over include the input derivations'
    // outputs; the derivation's own sources are there too (added if missing).
    for src in &full.input_srcs {
        if seen.insert(src.clone()) {
            inputs.push(src.clone());
        }
    }
    drv.input_srcs = seen;
    let outputs = drv.output_paths();
    if outputs.len() != drv.outputs.len() {
        return Err(fail(
            JobStatus::Failed,
            format!(
                "{drv_path} has outputs without a known path (floating content-addressed derivations are not supported)"
            ),
        ));
    }
    Ok(Plan {
        drv_path,
        drv,
        inputs,
        outputs,
        options: BuildOptions {
            max_silent_time: job.max_silent_time_secs,
            build_timeout: job.build_timeout_secs,
            ..BuildOptions::default()
        },
        claim: (!job.claim_owner.is_empty()).then(|| job.claim_owner.clone()),
    })
}

impl Execute for NixExecutor {
    fn store_problem(&self) -> Option<String> {
        self.claims.problem()
    }

    async fn execute(&self, job: Job, ctx: JobContext) -> JobResult {
        let mut stats = Stats::default();
        let outcome = self.run(&job, &ctx, &mut stats).await;
        let mut result = match outcome {
            Ok(built) => JobResult {
                job_id: job.job_id.clone(),
                status: JobStatus::Built as i32,
                outputs: built.outputs.into_iter().collect(),
                start_time_unix: i64::try_from(built.start).unwrap_or(0),
                stop_time_unix: i64::try_from(built.stop).unwrap_or(0),
                ..Default::default()
            },
            Err(f) => failure(&job.job_id, f.status, f.message),
        };
        result.bytes_downloaded = stats.downloaded;
        result.bytes_uploaded = stats.uploaded;
        result
    }
}

impl NixExecutor {
    /// Run a job in its section of the store: a claim job alone, and what it
    /// brought into the store deleted before the section ends.
    async fn run(&self, job: &Job, ctx: &JobContext, stats: &mut Stats) -> Result<Built, Fail> {
        let plan = plan(job)?;
        let section = tokio::select! {
            s = self.claims.enter(plan.claim.is_some()) => {
                s.map_err(|why| fail(JobStatus::MiscFailure, why))?
            }
            () = ctx.cancel.cancelled() => {
                return Err(fail(status_for(ctx.cancel.reason()), cancel_message(ctx.cancel.reason())));
            }
        };
        if let Some(owner) = &plan.claim {
            tracing::info!(job = %job.job_id, %owner, "claim job: the store is its alone");
            // No kept process may hold temporary roots on what it will delete.
            self.pool.drain().await;
        }
        // Made after `section`, so dropped before it: a claim job that ends
        // without its cleanup marks the store before releasing it.
        let cleanup = plan.claim.as_ref().map(|_| self.claims.cleanup());
        let outcome = self.run_in(job, &plan, ctx, stats).await;
        if let Some(cleanup) = cleanup {
            cleanup.purge().await;
        }
        drop(section);
        outcome
    }

    async fn run_in(
        &self,
        job: &Job,
        plan: &Plan,
        ctx: &JobContext,
        stats: &mut Stats,
    ) -> Result<Built, Fail> {
        let mut link_rx = ctx.link.clone();
        let link = current_link(&mut link_rx, LINK_WAIT)
            .await
            .ok_or_else(|| fail(JobStatus::MiscFailure, "no connection to the coordinator"))?
            .for_job(&job.job_id);
        let scratch = tempfile::Builder::new()
            .prefix(SCRATCH_PREFIX)
            .tempdir_in(&self.scratch)
            .map_err(|e| fail(JobStatus::MiscFailure, format!("scratch directory: {e}")))?;
        let began = Instant::now();
        let mut phases = Phases::default();
        let taken = if plan.claim.is_some() {
            // Its own process, stopped before its cleanup.
            LocalServe::spawn(&self.bin, &job.job_id, ctx.events.clone(), self.kill_grace)
                .await
                .map(|s| (s, false))
        } else {
            self.pool.acquire(&job.job_id, ctx.events.clone()).await
        };
        let (mut serve, reused) = taken.map_err(|e| fail(JobStatus::MiscFailure, e.to_string()))?;
        phases.setup = began.elapsed();
        phases.reused = reused;

        let outcome = tokio::select! {
            r = self.steps(&job.job_id, plan, &link, &mut serve, scratch.path(), ctx, stats, &mut phases) => r,
            () = ctx.cancel.cancelled() => Err(Fail {
                status: status_for(ctx.cancel.reason()),
                message: cancel_message(ctx.cancel.reason()).to_owned(),
                kill: true,
            }),
        };
        if let Err(f) = &outcome
            && f.kill
        {
            tracing::info!(job = %job.job_id, "stopping the local nix");
            serve.stop().await;
        }
        if plan.claim.is_some() {
            // Nothing of the job may hold its paths when they are deleted:
            // its Nix and every build it started go now, and are waited for.
            if let Err(e) = serve.kill_tree().await {
                tracing::warn!(job = %job.job_id, error = %e, "a claim job's processes outlived the kill");
            }
            serve.finish().await;
        } else if outcome.is_ok() {
            self.pool.release(serve).await;
        } else {
            serve.finish().await;
        }
        phases.log(&job.job_id, began.elapsed());
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn steps(
        &self,
        job_id: &str,
        plan: &Plan,
        link: &Link,
        serve: &mut LocalServe,
        scratch: &std::path::Path,
        ctx: &JobContext,
        stats: &mut Stats,
        phases: &mut Phases,
    ) -> Result<Built, Fail> {
        if plan.claim.is_some() {
            // Its outputs not valid yet will be unverified bytes: noted first.
            let outs: BTreeSet<StorePath> = plan.outputs.values().cloned().collect();
            let valid = serve
                .client
                .query_valid_paths(&outs, false, false)
                .await
                .map_err(|e| {
                    fail(
                        JobStatus::MiscFailure,
                        format!("querying the local store: {e}"),
                    )
                })?;
            self.claims
                .record(outs.into_iter().filter(|p| !valid.contains(p)))
                .await
                .map_err(|e| fail(JobStatus::MiscFailure, e))?;
        }
        stats.downloaded = self
            .fetch_inputs(plan, link, serve, scratch, phases)
            .await?;

        serve.log.touch();
        let build_began = Instant::now();
        let started = now_unix_u64();
        let build = serve
            .client
            .build_derivation(&plan.drv_path, &plan.drv, &plan.options);
        let result: BuildResult = tokio::select! {
            r = build => r.map_err(|e| fail(
                JobStatus::MiscFailure,
                format!("local nix failed: {e}: {}", serve.log.tail()),
            ))?,
            why = watchdog(Arc::clone(&serve.log), &plan.options) => {
                return Err(Fail { status: JobStatus::TimedOut, message: why, kill: true });
            }
        };
        let stopped = now_unix_u64();
        phases.build = build_began.elapsed();
        let upload_began = Instant::now();
        let status = match result.status {
            BuildStatus::Built | BuildStatus::Substituted | BuildStatus::AlreadyValid => None,
            BuildStatus::TimedOut => Some(JobStatus::TimedOut),
            // Worth another try, here or elsewhere.
            BuildStatus::TransientFailure | BuildStatus::MiscFailure => {
                Some(JobStatus::MiscFailure)
            }
            _ => Some(JobStatus::Failed),
        };
        if let Some(status) = status {
            return Err(fail(status, plain_text(&result.error_msg)));
        }
        // Upload the outputs, referenced ones first.
        let wanted: BTreeSet<StorePath> = plan.outputs.values().cloned().collect();
        let infos = serve
            .client
            .query_path_infos(&wanted)
            .await
            .map_err(|e| fail(JobStatus::MiscFailure, format!("querying outputs: {e}")))?;
        let have: BTreeSet<&StorePath> = infos.iter().map(|i| &i.path).collect();
        if let Some(missing) = wanted.iter().find(|p| !have.contains(p)) {
            return Err(fail(
                JobStatus::MiscFailure,
                format!("output {missing} is not valid after the build"),
            ));
        }
        for info in transfer::references_first(infos) {
            stats.uploaded += upload_output(job_id, &info, serve, ctx).await?;
        }
        phases.upload = upload_began.elapsed();
        Ok(Built {
            outputs: plan
                .outputs
                .iter()
                .map(|(name, p)| (name.clone(), p.to_string()))
                .collect(),
            start: if result.start_time > 0 {
                result.start_time
            } else {
                started
            },
            stop: if result.stop_time > 0 {
                result.stop_time
            } else {
                stopped
            },
        })
    }

    /// Fetch what the store lacks, in parallel; add it in dependency order.
    async fn fetch_inputs(
        &self,
        plan: &Plan,
        link: &Link,
        serve: &mut LocalServe,
        scratch: &std::path::Path,
        phases: &mut Phases,
    ) -> Result<u64, Fail> {
        let input_err = |m: String| fail(JobStatus::InputError, m);
        let all: BTreeSet<StorePath> = plan.inputs.iter().cloned().collect();
        let valid = timed(
            &mut phases.query,
            serve.client.query_valid_paths(&all, false, false),
        )
        .await
        .map_err(|e| {
            input_err(format!(
                "querying the local store: {e}: {}",
                serve.log.tail()
            ))
        })?;
        let missing: Vec<StorePath> = plan
            .inputs
            .iter()
            .filter(|p| !valid.contains(*p))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let fetch_began = Instant::now();
        tracing::info!(drv = %plan.drv_path, missing = missing.len(), of = plan.inputs.len(), "fetching inputs");
        let (infos, unsigned) = transfer::query_infos(link, &missing, plan.claim.is_some())
            .await
            .map_err(|e| input_err(e.to_string()))?;
        if !unsigned.is_empty() {
            // The owner's claims: imported as they are (the job says whose
            // they are), noted first so they leave the store with the job.
            self.claims
                .record(unsigned)
                .await
                .map_err(|e| fail(JobStatus::MiscFailure, e))?;
        }
        let jobs: Vec<(ValidPathInfo, PathBuf)> = missing
            .iter()
            .map(|p| (infos[p].clone(), scratch.join(p.base_name())))
            .collect();
        let link = link.clone();
        let downloads = jobs.into_iter().map(move |(info, dest)| {
            let link = link.clone();
            AbortOnDrop(tokio::spawn(async move {
                transfer::fetch(&link, &info, dest)
                    .await
                    .map(|(fetched, n)| (info, fetched, n))
            }))
        });
        let mut stream = futures::stream::iter(downloads).buffered(self.parallelism);
        let mut total = 0u64;
        while let Some(joined) = stream.next().await {
            let (info, fetched, n) = joined
                .map_err(|e| input_err(format!("download task: {e}")))?
                .map_err(|e| input_err(e.to_string()))?;
            total += n;
            let added = match &fetched {
                transfer::Fetched::Memory(nar) => {
                    serve
                        .client
                        .add_to_store_nar(&info, &mut nar.as_slice())
                        .await
                }
                transfer::Fetched::File(dest) => {
                    let mut file = tokio::fs::File::open(dest)
                        .await
                        .map_err(|e| input_err(format!("{}: {e}", dest.display())))?;
                    let added = serve.client.add_to_store_nar(&info, &mut file).await;
                    drop(file);
                    let _ = tokio::fs::remove_file(dest).await;
                    added
                }
            };
            added.map_err(|e| {
                input_err(format!(
                    "adding {} to the local store: {e}: {}",
                    info.path,
                    serve.log.tail()
                ))
            })?;
        }
        phases.fetch = fetch_began.elapsed();
        Ok(total)
    }
}

/// Upload one output as the local Nix dumps it; returns its NAR size. When
/// the session is lost meanwhile (or was already), wait for the next one
/// (at most [`LINK_WAIT`]) and upload again there.
async fn upload_output(
    job_id: &str,
    info: &ValidPathInfo,
    serve: &mut LocalServe,
    ctx: &JobContext,
) -> Result<u64, Fail> {
    let mut link_rx = ctx.link.clone();
    let mut lost: Option<Link> = None;
    let mut attempt = 0;
    loop {
        attempt += 1;
        if link_rx.borrow().is_none() {
            tracing::info!(job = %job_id, path = %info.path, "built; waiting for the coordinator to upload the output");
        }
        let link = next_link(&mut link_rx, lost.as_ref(), LINK_WAIT)
            .await
            .ok_or_else(|| {
                fail(
                    JobStatus::UploadError,
                    format!(
                        "uploading {}: no connection to the coordinator within {} s",
                        info.path,
                        LINK_WAIT.as_secs()
                    ),
                )
            })?;
        let (mut w, r) = tokio::io::duplex(256 * 1024);
        let dump = async {
            let summary = serve.client.dump_store_path(&info.path, &mut w).await;
            let _ = w.shutdown().await;
            drop(w);
            summary
        };
        let job_link = link.for_job(job_id);
        let (sent, dumped) = tokio::join!(transfer::upload(&job_link, info, r), dump);
        if let Err(e) = sent {
            // A lost session also breaks the dump (its reader is gone): look
            // at the upload first.
            if attempt < UPLOAD_ATTEMPTS && session_lost(&mut link_rx, &link, LINK_SETTLE).await {
                tracing::warn!(job = %job_id, path = %info.path, error = %e, "upload cut off with the session; retrying on the next one");
                lost = Some(link);
                continue;
            }
            return Err(fail(JobStatus::UploadError, e.to_string()));
        }
        let summary = dumped.map_err(|e| {
            fail(
                JobStatus::UploadError,
                format!("dumping {}: {e}", info.path),
            )
        })?;
        transfer::check_summary(info, &summary)
            .map_err(|e| fail(JobStatus::UploadError, e.to_string()))?;
        return Ok(summary.nar_size);
    }
}

/// The current link once there is one that is not `not` (a session already
/// seen lost), waiting at most `wait`.
async fn next_link(
    rx: &mut tokio::sync::watch::Receiver<Option<Link>>,
    not: Option<&Link>,
    wait: Duration,
) -> Option<Link> {
    let usable = |l: &Option<Link>| {
        l.as_ref()
            .is_some_and(|l| not.is_none_or(|lost| !l.same_session(lost)))
    };
    match tokio::time::timeout(wait, rx.wait_for(usable)).await {
        Ok(Ok(link)) => link.clone(),
        _ => None,
    }
}

/// Whether `link`'s session is gone (or goes within `settle`).
async fn session_lost(
    rx: &mut tokio::sync::watch::Receiver<Option<Link>>,
    link: &Link,
    settle: Duration,
) -> bool {
    let gone = |l: &Option<Link>| l.as_ref().is_none_or(|l| !l.same_session(link));
    matches!(
        tokio::time::timeout(settle, rx.wait_for(gone)).await,
        Ok(Ok(_))
    )
}

/// Remove the job scratch directories (`job-*`) in `dir` that an earlier run
/// left (a crash does not clean up); returns how many went. Nothing else in
/// `dir` is touched, and links are removed, not followed.
pub(crate) fn clean_scratch(dir: &std::path::Path) -> Result<usize, BuilderError> {
    let entries = std::fs::read_dir(dir).map_err(|e| BuilderError::reading(dir, e))?;
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| BuilderError::reading(dir, e))?;
        if !entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(SCRATCH_PREFIX))
        {
            continue;
        }
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let gone = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match gone {
            Ok(()) => removed += 1,
            // Space is lost, not correctness: say so and build on.
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove old scratch")
            }
        }
    }
    Ok(removed)
}

/// Resolves (with a reason) when the build is overdue by the watchdog's measure.
async fn watchdog(log: Arc<LogState>, options: &BuildOptions) -> String {
    let start = Instant::now();
    let timeout = (options.build_timeout > 0).then(|| Duration::from_secs(options.build_timeout));
    let silent =
        (options.max_silent_time > 0).then(|| Duration::from_secs(options.max_silent_time));
    if timeout.is_none() && silent.is_none() {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(t) = timeout
            && start.elapsed() > t + WATCHDOG_GRACE
        {
            return format!(
                "build timed out after {} seconds (killed by the builder)",
                t.as_secs()
            );
        }
        if let Some(s) = silent
            && log.silent_for() > s + WATCHDOG_GRACE
        {
            return format!(
                "build produced no output for {} seconds (killed by the builder)",
                s.as_secs()
            );
        }
    }
}

/// Nix's error message without its terminal colours (ANSI escape sequences)
/// and other control characters: it is shown by `farm` and stored, not
/// printed to a terminal as is.
fn plain_text(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut chars = msg.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    // CSI: parameters and intermediates, then one final byte.
                    chars.next();
                    for c in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&c) {
                            break;
                        }
                    }
                } else {
                    // Other escapes: intermediates, then one final character.
                    while chars
                        .next_if(|c| ('\u{20}'..='\u{2f}').contains(c))
                        .is_some()
                    {}
                    chars.next();
                }
            }
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

fn now_unix_u64() -> u64 {
    u64::try_from(now_unix()).unwrap_or(0)
}

/// A task handle that aborts the task when dropped (a failed job stops its
/// remaining downloads).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::{clean_scratch, plain_text};
    use crate::BuilderConfig;

    #[test]
    fn starting_removes_the_scratch_a_crash_left_and_nothing_else() {
        let state = tempfile::tempdir().unwrap();
        let tmp = state.path().join("tmp");
        // What a killed builder leaves: a job's directory with a half-downloaded NAR.
        let left = tmp.join("job-AbC123");
        std::fs::create_dir_all(left.join("sub")).unwrap();
        std::fs::write(left.join("0123-x.nar"), b"partial").unwrap();
        std::fs::write(tmp.join("job-stray-file"), b"x").unwrap();
        // Not ours to remove: other entries, and what a link points at.
        std::fs::write(tmp.join("keep.txt"), b"keep").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), b"p").unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.join("job-link")).unwrap();

        let config = BuilderConfig::new("http://127.0.0.1:1", state.path());
        super::NixExecutor::new(&config).unwrap();
        assert!(!left.exists());
        assert!(!tmp.join("job-stray-file").exists());
        assert!(!tmp.join("job-link").exists());
        assert!(tmp.join("keep.txt").exists());
        assert!(outside.path().join("precious").exists());
        // And a fresh start has nothing to do.
        assert_eq!(clean_scratch(&tmp).unwrap(), 0);
    }

    #[test]
    fn nix_error_colours_are_removed() {
        // As Nix 2.8 sends it over the serve protocol.
        let msg = "\u{1b}[0mbuilder for '\u{1b}[35;1m/nix/store/x-f.drv\u{1b}[0m' failed with exit code 3";
        assert_eq!(
            plain_text(msg),
            "builder for '/nix/store/x-f.drv' failed with exit code 3"
        );
        assert_eq!(plain_text("a\nb\tc\u{7}d\u{1b}(B"), "a\nb\tcd");
        assert_eq!(plain_text("cut \u{1b}[1"), "cut ");
    }
}
