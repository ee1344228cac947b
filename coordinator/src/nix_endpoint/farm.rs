//! [`BuildBackend`] on the coordinator's scheduler: a build hook's
//! `BasicDerivation` becomes a one-derivation submission (its `.drv` text is
//! rebuilt from it, with no input derivations and the whole input closure as
//! sources, which is what a builder needs); a derivation graph goes through
//! [`Coordinator::submit`]. Then the submission is followed: each build that
//! runs gets its live log streamed (or the stored one, if it was over before
//! we looked), and each ends with a [`BuildOutcome`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use farm_nix::derivation::BasicDerivation;
use farm_nix::store_path::StorePath;
use farm_nix::wire::{BuildStatus, HandlerError};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::build::{BuildBackend, BuildEvent, BuildOutcome, BuildSettings};
use crate::domain::coordinator::Coordinator;
use crate::domain::graph::{Root, SubmitOptions};
use crate::domain::model::{
    BuildId, BuildState, BuildView, Outcome, Priority, SubmissionId, SubmissionRecord,
};
use crate::domain::scheduler::SubmissionSnapshot;
use crate::nix_endpoint::error::handler_error;
use crate::nix_endpoint::ssh::{BoxFuture, ClientIdentity};

/// Bytes per log event.
const LOG_CHUNK: usize = 64 * 1024;

/// The farm's scheduler as the endpoint's build backend.
#[derive(Clone)]
pub struct FarmBuilds {
    coord: Coordinator,
}

impl FarmBuilds {
    pub fn new(coord: Coordinator) -> FarmBuilds {
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
            let root = Root::Basic {
                drv_path: drv_path.clone(),
                drv,
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
    /// Follow submission `sid` until it is done: `Started`, `Log` and
    /// `Finished` events for each of its builds, in order per build. Returns
    /// the final records.
    async fn follow(
        &self,
        sid: SubmissionId,
        events: &mpsc::Sender<BuildEvent>,
    ) -> Result<SubmissionSnapshot, HandlerError> {
        let mut rx = self.coord.subscribe(sid);
        let mut trackers: HashMap<BuildId, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut finished: HashSet<BuildId> = HashSet::new();
        let result = loop {
            let Some((sub, builds)) = self.coord.submission(sid).await else {
                break Err(HandlerError::new(format!(
                    "the farm lost track of submission s{sid}"
                )));
            };
            for b in &builds {
                let ran = matches!(b.state, BuildState::Running { .. })
                    || (b.state.is_terminal() && b.started_ms.is_some() && b.builder.is_some());
                if ran && !trackers.contains_key(&b.id) && !finished.contains(&b.id) {
                    let builder = match &b.state {
                        BuildState::Running { builder, .. } => Some(builder.clone()),
                        _ => b.builder.clone(),
                    };
                    let _ = events
                        .send(BuildEvent::Started {
                            drv: b.drv_path.clone(),
                            builder: builder.unwrap_or_default(),
                        })
                        .await;
                    let t = tokio::spawn(track_log(
                        self.coord.clone(),
                        b.id,
                        b.drv_path.clone(),
                        events.clone(),
                    ));
                    trackers.insert(b.id, t);
                }
                if b.state.is_terminal() && !finished.contains(&b.id) {
                    if let Some(mut t) = trackers.remove(&b.id) {
                        // The log ends just after the build; never wait long for it.
                        if tokio::time::timeout(Duration::from_secs(10), &mut t)
                            .await
                            .is_err()
                        {
                            t.abort();
                        }
                    }
                    finished.insert(b.id);
                    let outcome = outcome_of(&b.drv_path, &sub, &builds, &b.outputs);
                    let _ = events
                        .send(BuildEvent::Finished {
                            drv: b.drv_path.clone(),
                            outcome,
                        })
                        .await;
                }
            }
            if sub.done {
                break Ok((sub, builds));
            }
            match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
                Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) | Err(_) => {}
                Ok(Err(RecvError::Closed)) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        for (_, t) in trackers {
            t.abort();
        }
        drop(rx);
        self.coord.unsubscribe_idle();
        result
    }
}

/// Stream one build's log as `Log` events: its live log while it runs (from
/// the start), or the stored log if it ended before we could look.
async fn track_log(
    coord: Coordinator,
    build: BuildId,
    drv: StorePath,
    events: mpsc::Sender<BuildEvent>,
) {
    let send = |data: &[u8]| {
        let chunks: Vec<BuildEvent> = data
            .chunks(LOG_CHUNK)
            .map(|c| BuildEvent::Log {
                drv: drv.clone(),
                data: c.to_vec(),
            })
            .collect();
        let events = events.clone();
        async move {
            for c in chunks {
                if events.send(c).await.is_err() {
                    return false;
                }
            }
            true
        }
    };
    // The live log appears when the job is dispatched (just after the event).
    let mut live = None;
    for _ in 0..100 {
        if let Some(l) = coord.live_log(build) {
            live = Some(l);
            break;
        }
        let terminal = coord
            .read_sched(|s| s.state_of(build))
            .is_none_or(|s| s.is_terminal());
        if terminal {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Some(live) = live else {
        // Over already: the stored log (written just after the build ends).
        for _ in 0..50 {
            if let Ok(Some(data)) = coord.cache().get_log(&drv).await {
                send(&data).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        return;
    };
    let mut offset: u64 = 0;
    loop {
        let changed = coord.log_changed();
        let (chunk, ended) = {
            let l = live.lock().unwrap_or_else(|e| e.into_inner());
            let chunk = l.read_from(offset);
            offset = l.end();
            (chunk, l.ended)
        };
        if !chunk.is_empty() && !send(&chunk).await {
            return;
        }
        if ended {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), changed).await;
    }
}
