//! [`BuildBackend`] on the coordinator's scheduler: a build hook's
//! `BasicDerivation` becomes a one-derivation submission (its `.drv` text is
//! rebuilt from it, with no input derivations and the whole input closure as
//! sources, which is what a builder needs; from a client without push, unless
//! the farm verified it, it is that client's claim build: see `Root::Basic`;
//! its outputs come back to it through its own view of the store,
//! [`super::store::FarmStore::for_client`]); a derivation graph goes through
//! [`Coordinator::submit`]. Then the submission is followed: each build that
//! runs gets its live log streamed (or the stored one, if it was over before
//! we looked), and each ends with a [`BuildOutcome`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use farm_nix::derivation::BasicDerivation;
use farm_nix::store_path::StorePath;
use farm_nix::wire::{BuildStatus, HandlerError};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::build::{BuildBackend, BuildEvent, BuildOutcome, BuildSettings};
use crate::domain::coordinator::Coordinator;
use crate::domain::follow::{LogUpdate, SubmissionUpdate};
use crate::domain::graph::{Root, SubmitOptions};
use crate::domain::model::{
    BuildId, BuildState, BuildView, Event, Outcome, Priority, SubmissionId, SubmissionRecord,
};
use crate::domain::scheduler::SubmissionSnapshot;
use crate::nix_endpoint::error::handler_error;
use crate::nix_endpoint::ssh::{BoxFuture, ClientIdentity};

/// Bytes per log event.
const LOG_CHUNK: usize = 64 * 1024;

/// The farm's scheduler as the endpoint's build backend.
#[derive(Clone)]
pub(crate) struct FarmBuilds {
    coord: Coordinator,
}

impl FarmBuilds {
    pub(crate) fn new(coord: Coordinator) -> FarmBuilds {
        FarmBuilds { coord }
    }
}

impl BuildBackend for FarmBuilds {
    fn build_derivation(
        &self,
        client: ClientIdentity,
        drv_path: StorePath,
        drv: BasicDerivation,
        settings: BuildSettings,
        events: mpsc::Sender<BuildEvent>,
    ) -> BoxFuture<'static, Result<BuildOutcome, HandlerError>> {
        let this = self.clone();
        Box::pin(async move {
            let outputs = drv.output_paths();
            // A client without push gets its unverified derivations built
            // as its own claims (see `Root::Basic`).
            let owner =
                (client.level < crate::access::Level::Push).then(|| client.fingerprint.clone());
            let root = Root::Basic {
                drv_path: drv_path.clone(),
                drv,
                owner,
            };
            let sid = this
                .coord
                .submit(vec![root], submit_options(&client, &settings))
                .await
                .map_err(|e| handler_error("the farm could not accept the build", e))?;
            tracing::info!(
                submission = %format!("s{sid}"),
                drv = %drv_path,
                client = %client.fingerprint,
                "nix client asked to build a derivation"
            );
            let (sub, builds) = this.follow(sid, &events).await?;
            Ok(outcome_of(&drv_path, &sub, &builds, &outputs))
        })
    }

    fn build_graph(
        &self,
        client: ClientIdentity,
        drvs: Vec<StorePath>,
        settings: BuildSettings,
        events: mpsc::Sender<BuildEvent>,
    ) -> BoxFuture<'static, Result<BTreeMap<StorePath, BuildOutcome>, HandlerError>> {
        let this = self.clone();
        Box::pin(async move {
            let roots = drvs.iter().cloned().map(Root::Drv).collect();
            let sid = this
                .coord
                .submit(roots, submit_options(&client, &settings))
                .await
                .map_err(|e| handler_error("the farm could not accept the build", e))?;
            tracing::info!(
                submission = %format!("s{sid}"),
                client = %client.fingerprint,
                roots = drvs.len(),
                "nix client submitted a derivation graph"
            );
            let (sub, builds) = this.follow(sid, &events).await?;
            let mut out = BTreeMap::new();
            for d in drvs {
                let outputs = match builds.iter().find(|b| b.drv_path == d) {
                    Some(b) => b.outputs.clone(),
                    None => sub.cached.get(&d).cloned().unwrap_or_default(),
                };
                let o = outcome_of(&d, &sub, &builds, &outputs);
                out.insert(d, o);
            }
            Ok(out)
        })
    }
}

/// A Nix client's builds: interactive, with the client's limits, recorded
/// under its key.
fn submit_options(client: &ClientIdentity, settings: &BuildSettings) -> SubmitOptions {
    SubmitOptions {
        priority: Priority::Interactive,
        max_silent_time_secs: settings.max_silent_time,
        build_timeout_secs: settings.build_timeout,
        client: Some(client_name(client)),
        job: None,
    }
}

/// How a Nix client is recorded with the builds it asks for: its key's
/// fingerprint and the comment of its authorized_keys line.
fn client_name(client: &ClientIdentity) -> String {
    format!("{} {}", client.fingerprint, client.comment)
        .trim_end()
        .to_owned()
}

/// How `drv` ended within a finished submission.
fn outcome_of(
    drv: &StorePath,
    sub: &SubmissionRecord,
    builds: &[Arc<BuildView>],
    outputs: &BTreeMap<String, StorePath>,
) -> BuildOutcome {
    let mut o = BuildOutcome {
        status: BuildStatus::MiscFailure,
        error: String::new(),
        outputs: outputs.clone(),
        start_time: 0,
        stop_time: 0,
        builder: None,
        built: false,
    };
    let Some(b) = builds.iter().find(|b| &b.drv_path == drv) else {
        if sub.cached.contains_key(drv) {
            o.status = BuildStatus::AlreadyValid;
        } else {
            o.error = format!("the farm did not build {drv}");
        }
        return o;
    };
    o.builder = b.builder.clone();
    o.start_time = b.started_ms.map(|t| (t / 1000) as u64).unwrap_or(0);
    o.stop_time = b.finished_ms.map(|t| (t / 1000) as u64).unwrap_or(0);
    let err = b.error.clone().unwrap_or_default();
    let on = b
        .builder
        .as_deref()
        .map(|n| format!(" on farm builder '{n}'"))
        .unwrap_or_default();
    (o.status, o.error) = match &b.state {
        BuildState::Done(Outcome::Built) => {
            o.built = true;
            (BuildStatus::Built, String::new())
        }
        BuildState::Done(Outcome::Cached) => (BuildStatus::AlreadyValid, String::new()),
        BuildState::Done(Outcome::Failed) => (
            BuildStatus::PermanentFailure,
            format!("build of '{drv}'{on} failed: {err}"),
        ),
        BuildState::Done(Outcome::DependencyFailed) => (
            BuildStatus::DependencyFailed,
            format!("a dependency of '{drv}' failed to build: {err}"),
        ),
        BuildState::Done(Outcome::TimedOut) => (
            BuildStatus::TimedOut,
            format!("build of '{drv}'{on} timed out: {err}"),
        ),
        BuildState::Done(Outcome::Cancelled) => (
            BuildStatus::MiscFailure,
            format!("build of '{drv}' was cancelled on the farm"),
        ),
        BuildState::Done(Outcome::Unschedulable) => (
            BuildStatus::MiscFailure,
            format!("the farm cannot build '{drv}': {err}"),
        ),
        other => (
            BuildStatus::MiscFailure,
            format!("build of '{drv}' did not finish ({other:?})"),
        ),
    };
    o
}

impl FarmBuilds {
    /// Follow submission `sid` ([`Coordinator::follow_submission`]) until it
    /// is done: `Started`, `Log` and `Finished` events for each of its builds,
    /// in order per build. Returns the final records.
    async fn follow(
        &self,
        sid: SubmissionId,
        events: &mpsc::Sender<BuildEvent>,
    ) -> Result<SubmissionSnapshot, HandlerError> {
        let mut updates = std::pin::pin!(self.coord.follow_submission(sid));
        let mut p = Progress {
            coord: self.coord.clone(),
            events,
            trackers: HashMap::new(),
            finished: HashSet::new(),
            views: HashMap::new(),
            sub: None,
        };
        let lost = || HandlerError::new(format!("the farm lost track of submission s{sid}"));
        let result = loop {
            let Some(u) = updates.next().await else {
                break Err(HandlerError::new(format!(
                    "the farm stopped before submission s{sid} was done"
                )));
            };
            match u {
                SubmissionUpdate::Snapshot(snap) => {
                    p.snapshot(&snap).await;
                    if snap.0.done {
                        break Ok(snap);
                    }
                }
                SubmissionUpdate::Event(Event::Started {
                    build,
                    drv_path,
                    builder,
                }) => p.started(build, &drv_path, builder).await,
                SubmissionUpdate::Event(Event::Finished {
                    build,
                    outcome,
                    error,
                    builder,
                    started_ms,
                    finished_ms,
                    ..
                }) => {
                    let Some(view) = p.views.get(&build) else {
                        continue;
                    };
                    let mut view = BuildView::clone(view);
                    view.state = BuildState::Done(outcome);
                    view.error = error;
                    view.builder = builder;
                    view.started_ms = started_ms;
                    view.finished_ms = finished_ms;
                    p.build(&Arc::new(view)).await;
                }
                SubmissionUpdate::Event(Event::Queued { .. }) => {}
                SubmissionUpdate::Event(Event::SubmissionDone { .. }) => {
                    // Every build's event came before this; the records, as stored.
                    let Some(snap) = self.coord.submission(sid).await else {
                        break Err(lost());
                    };
                    p.snapshot(&snap).await;
                    break Ok(snap);
                }
                SubmissionUpdate::Unknown => break Err(lost()),
            }
        };
        for (_, t) in p.trackers {
            t.abort();
        }
        result
    }
}

/// What a submission's follower has told the Nix client so far.
struct Progress<'a> {
    coord: Coordinator,
    events: &'a mpsc::Sender<BuildEvent>,
    /// A log follower per build that started.
    trackers: HashMap<BuildId, tokio::task::JoinHandle<()>>,
    /// Builds whose `Finished` was sent.
    finished: HashSet<BuildId>,
    /// The latest view of each build.
    views: HashMap<BuildId, Arc<BuildView>>,
    sub: Option<Arc<SubmissionRecord>>,
}

impl Progress<'_> {
    /// Catch up with a snapshot: each build that ran and each that ended.
    async fn snapshot(&mut self, (sub, builds): &SubmissionSnapshot) {
        self.sub = Some(sub.clone());
        for b in builds {
            self.views.insert(b.id, b.clone());
            self.build(b).await;
        }
    }

    /// `Started` and a log follower, once per build.
    async fn started(&mut self, build: BuildId, drv: &StorePath, builder: String) {
        if self.trackers.contains_key(&build) || self.finished.contains(&build) {
            return;
        }
        let _ = self
            .events
            .send(BuildEvent::Started {
                drv: drv.clone(),
                builder,
            })
            .await;
        let t = tokio::spawn(track_log(
            self.coord.clone(),
            build,
            drv.clone(),
            self.events.clone(),
        ));
        self.trackers.insert(build, t);
    }

    /// A build as it stands: `Started` if it ran, and once it ended, the end
    /// of its log and `Finished`.
    async fn build(&mut self, b: &Arc<BuildView>) {
        self.views.insert(b.id, b.clone());
        let ran = matches!(b.state, BuildState::Running { .. })
            || (b.state.is_terminal() && b.started_ms.is_some() && b.builder.is_some());
        if ran {
            let builder = match &b.state {
                BuildState::Running { builder, .. } => Some(builder.clone()),
                _ => b.builder.clone(),
            };
            self.started(b.id, &b.drv_path, builder.unwrap_or_default())
                .await;
        }
        if b.state.is_terminal() && !self.finished.contains(&b.id) {
            if let Some(mut t) = self.trackers.remove(&b.id) {
                // The log ends just after the build; never wait long for it.
                if tokio::time::timeout(Duration::from_secs(10), &mut t)
                    .await
                    .is_err()
                {
                    t.abort();
                }
            }
            self.finished.insert(b.id);
            let Some(sub) = &self.sub else {
                return;
            };
            let outcome = outcome_of(&b.drv_path, sub, std::slice::from_ref(b), &b.outputs);
            let _ = self
                .events
                .send(BuildEvent::Finished {
                    drv: b.drv_path.clone(),
                    outcome,
                })
                .await;
        }
    }
}

/// Stream one build's log as `Log` events ([`Coordinator::follow_log`]):
/// its live log while it runs (from the start), or the stored log if it ended
/// before we could look; done once the build ended.
async fn track_log(
    coord: Coordinator,
    build: BuildId,
    drv: StorePath,
    events: mpsc::Sender<BuildEvent>,
) {
    let Ok(mut log) = coord.follow_log(Some(build), &drv, 0, true).await else {
        return;
    };
    while let Some(LogUpdate::Chunk(data)) = log.next().await {
        for c in data.chunks(LOG_CHUNK) {
            let e = BuildEvent::Log {
                drv: drv.clone(),
                data: c.to_vec(),
            };
            if events.send(e).await.is_err() {
                return;
            }
        }
    }
}
