//! The follow API against a real coordinator (state, cache, outbox, all in a
//! temporary directory) and a builder that is this test: it is sent jobs over
//! a [`BuilderLink`] and answers through the coordinator's builder calls.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;

use super::*;
use crate::domain::coordinator::{BuilderCommand, BuilderLink, LinkError};
use crate::domain::model::{Assignment, Capabilities, Outcome};
use crate::domain::scheduler::{GraphSubmission, JobEnd, NewBuild};

/// Hang-guard for every wait in these tests.
const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

struct TestLink(mpsc::UnboundedSender<BuilderCommand>);

impl BuilderLink for TestLink {
    fn send(&self, command: BuilderCommand) -> Result<(), LinkError> {
        self.0.send(command).map_err(|_| LinkError::Closed)
    }
}

struct Farm {
    _dir: tempfile::TempDir,
    running: crate::RunningCoordinator,
    coord: Coordinator,
    jobs: mpsc::UnboundedReceiver<BuilderCommand>,
}

impl Farm {
    /// A coordinator with one builder, `b1`, that runs one job at a time.
    async fn start() -> Farm {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::CoordinatorConfig::for_tests(dir.path().join("state"));
        let running = crate::server::start(cfg).await.unwrap();
        let coord = running.coordinator().clone();
        let (tx, jobs) = mpsc::unbounded_channel();
        let caps = Capabilities {
            systems: vec!["x86_64-linux".into()],
            max_jobs: 1,
            speed_factor: 1.0,
            ..Default::default()
        };
        coord
            .builder_online("b1", "key-b1", None, caps, &[], Arc::new(TestLink(tx)))
            .unwrap();
        coord.kick();
        Farm {
            _dir: dir,
            running,
            coord,
            jobs,
        }
    }

    /// Submit independent one-output derivations; returns the submission and
    /// the `.drv` paths.
    async fn submit(&self, names: &[&str]) -> (SubmissionId, Vec<StorePath>) {
        let path =
            |n: &str| StorePath::parse(&format!("/nix/store/{}-{n}", "c".repeat(32))).unwrap();
        let builds: Vec<NewBuild> = names
            .iter()
            .map(|n| NewBuild {
                drv_path: path(&format!("{n}.drv")),
                drv_aterm: format!(
                    r#"Derive([("out","{}","","")],[],[],"x86_64-linux","/bin/sh",[],[])"#,
                    path(n)
                )
                .into_bytes()
                .into(),
                system: "x86_64-linux".into(),
                required_features: Default::default(),
                outputs: [("out".to_string(), path(n))].into(),
                input_drvs: Vec::new(),
                claim: None,
            })
            .collect();
        let drvs: Vec<StorePath> = builds.iter().map(|b| b.drv_path.clone()).collect();
        let g = GraphSubmission {
            roots: drvs.clone(),
            builds,
            ..Default::default()
        };
        let sid = self.coord.submit_graph(g).await.unwrap();
        self.coord.flush().await.unwrap();
        (sid, drvs)
    }

    /// The next job sent to the builder.
    async fn next_job(&mut self) -> Assignment {
        loop {
            match within("a job", self.jobs.recv()).await.expect("link open") {
                BuilderCommand::Job(a) => return a,
                _ => continue,
            }
        }
    }

    async fn fail(&self, job: &Assignment) {
        self.coord
            .job_result("b1", &job.job_id, JobEnd::Failed("no".into()))
            .await;
    }

    async fn done(&self, sid: SubmissionId) {
        within("the submission's end", async {
            loop {
                if self.coord.submission(sid).await.is_some_and(|s| s.0.done) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Every other handle on the coordinator must be gone (shutdown waits for them).
    async fn stop(self) {
        drop(self.coord);
        self.running.shutdown().await.unwrap();
    }
}

/// Everything a log stream yields until it ends, chunks joined.
async fn collect(log: LogStream) -> (Vec<u8>, Vec<LogUpdate>) {
    let items: Vec<LogUpdate> = within("the log's end", log.collect()).await;
    let mut bytes = Vec::new();
    let mut rest = Vec::new();
    for u in items {
        match u {
            LogUpdate::Chunk(b) => bytes.extend_from_slice(&b),
            other => rest.push(other),
        }
    }
    (bytes, rest)
}

fn chunk(u: Option<LogUpdate>) -> Vec<u8> {
    match u {
        Some(LogUpdate::Chunk(b)) => b.to_vec(),
        other => panic!("expected a chunk, got {other:?}"),
    }
}

/// A follower attached while the build waits, one attached mid-build (from
/// the start and from an offset), one that only reads what is there, and one
/// after the end: each gets the whole log (or its tail), then `Ended` and
/// `Stored(true)`; the one after the end gets it from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_followers_before_during_and_after_a_build() {
    let mut farm = Farm::start().await;
    let (_sid, drvs) = farm.submit(&["one", "two"]).await;
    let first = farm.next_job().await;
    let (first_drv, second_drv) = if first.drv_path == drvs[0] {
        (drvs[0].clone(), drvs[1].clone())
    } else {
        (drvs[1].clone(), drvs[0].clone())
    };
    let second = farm.coord.build_of_drv(&second_drv).unwrap();
    let coord = farm.coord.clone();

    // The second build waits for the builder's only slot.
    assert!(matches!(
        coord.follow_log(Some(second), &second_drv, 0, false).await,
        Err(DomainError::NotFound(_))
    ));
    let before = coord
        .follow_log(Some(second), &second_drv, 0, true)
        .await
        .unwrap();
    let before = tokio::spawn(collect(before));

    coord.job_log("b1", &first.job_id, b"hello ");
    let mut mid = coord
        .follow_log(Some(first.build), &first_drv, 0, true)
        .await
        .unwrap();
    assert_eq!(chunk(within("a chunk", mid.next()).await), b"hello ");
    let now = coord
        .follow_log(Some(first.build), &first_drv, 0, false)
        .await
        .unwrap();
    assert_eq!(collect(now).await, (b"hello ".to_vec(), vec![]));
    coord.job_log("b1", &first.job_id, b"world\n");
    assert_eq!(chunk(within("a chunk", mid.next()).await), b"world\n");
    let tail = coord
        .follow_log(Some(first.build), &first_drv, 3, true)
        .await
        .unwrap();
    let tail = tokio::spawn(collect(tail));
    farm.fail(&first).await;
    let ended = vec![LogUpdate::Ended, LogUpdate::Stored(true)];
    assert_eq!(collect(mid).await, (Vec::new(), ended.clone()));
    assert_eq!(tail.await.unwrap(), (b"lo world\n".to_vec(), ended.clone()));

    // After the end: from the cache (by build, and by derivation alone).
    for build in [Some(first.build), None] {
        let after = coord.follow_log(build, &first_drv, 0, true).await.unwrap();
        assert_eq!(
            collect(after).await,
            (b"hello world\n".to_vec(), ended.clone())
        );
    }
    assert_eq!(
        coord.cache().get_log(&first_drv).await.unwrap().unwrap(),
        b"hello world\n"
    );

    // The waiting follower gets the second build's log once it runs.
    let job = farm.next_job().await;
    assert_eq!(job.build, second);
    coord.job_log("b1", &job.job_id, b"second\n");
    farm.fail(&job).await;
    assert_eq!(before.await.unwrap(), (b"second\n".to_vec(), ended));
    drop(coord);
    farm.stop().await;
}

/// A follower attached before anything ran gets the snapshot, then each
/// build's `Started` and `Finished`, then `SubmissionDone`, and ends; one
/// attached after the end gets the final snapshot alone; an unknown
/// submission is `Unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_followed_from_snapshot_to_done() {
    let mut farm = Farm::start().await;
    let (sid, _) = farm.submit(&["a", "b"]).await;
    let coord = farm.coord.clone();
    let mut f = Box::pin(coord.follow_submission(sid));
    let Some(SubmissionUpdate::Snapshot((sub, builds))) = within("a snapshot", f.next()).await
    else {
        panic!("a snapshot first");
    };
    assert!(!sub.done);
    assert_eq!(builds.len(), 2);
    let follower = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(u) = f.next().await {
            seen.push(u);
        }
        seen
    });
    for _ in 0..2 {
        let job = farm.next_job().await;
        farm.fail(&job).await;
    }
    let seen = within("the follower's end", follower).await.unwrap();
    let finished = seen
        .iter()
        .filter(|u| {
            matches!(
                u,
                SubmissionUpdate::Event(Event::Finished {
                    outcome: Outcome::Failed,
                    ..
                })
            )
        })
        .count();
    assert_eq!(finished, 2, "{seen:?}");
    assert!(
        matches!(
            seen.last(),
            Some(SubmissionUpdate::Event(Event::SubmissionDone {
                failed: 2,
                ..
            }))
        ),
        "{seen:?}"
    );
    // Every build's start is in the snapshot (it was dispatched at once; its
    // event may still follow, decided before the snapshot, delivered after)
    // or came as an event, before its end.
    for b in &builds {
        let pos = |started: bool| {
            seen.iter().position(|u| match u {
                SubmissionUpdate::Event(Event::Started { build, .. }) => started && *build == b.id,
                SubmissionUpdate::Event(Event::Finished { build, .. }) => {
                    !started && *build == b.id
                }
                _ => false,
            })
        };
        let end = pos(false).expect("each build's end");
        match &b.state {
            BuildState::Running { .. } => assert!(pos(true).is_none_or(|p| p < end), "{seen:?}"),
            _ => assert!(pos(true).expect("its start") < end, "{seen:?}"),
        }
    }
    // Nobody listens any more: the channel went with the last follower.
    assert!(!coord.inner.events.lock().unwrap().contains_key(&sid));

    let after: Vec<SubmissionUpdate> =
        within("a snapshot", coord.follow_submission(sid).collect()).await;
    assert!(
        matches!(&after[..], [SubmissionUpdate::Snapshot((s, _))] if s.done),
        "{after:?}"
    );
    let unknown: Vec<SubmissionUpdate> =
        within("an answer", coord.follow_submission(sid + 1000).collect()).await;
    assert!(matches!(&unknown[..], [SubmissionUpdate::Unknown]));
    drop(coord);
    farm.stop().await;
}

/// A follower that fell behind the broadcast gets a fresh snapshot (here the
/// final one) instead of the events it missed, and ends there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_lags_gets_a_fresh_snapshot() {
    let mut farm = Farm::start().await;
    let (sid, _) = farm.submit(&["x", "y", "z"]).await;
    let coord = farm.coord.clone();
    // A channel far smaller than the real one, so three builds overflow it.
    coord
        .inner
        .events
        .lock()
        .unwrap()
        .insert(sid, broadcast::channel(2).0);
    let mut f = Box::pin(coord.follow_submission(sid));
    assert!(matches!(
        within("a snapshot", f.next()).await,
        Some(SubmissionUpdate::Snapshot((s, _))) if !s.done
    ));
    // Not read meanwhile: six events and the end, into two slots.
    for _ in 0..3 {
        let job = farm.next_job().await;
        farm.fail(&job).await;
    }
    farm.done(sid).await;
    let rest: Vec<SubmissionUpdate> = within("the follower's end", f.collect()).await;
    match &rest[..] {
        [SubmissionUpdate::Snapshot((s, builds))] => {
            assert!(s.done);
            assert!(
                builds
                    .iter()
                    .all(|b| b.state == BuildState::Done(Outcome::Failed))
            );
        }
        other => panic!("expected one fresh snapshot, got {other:?}"),
    }
    drop(coord);
    farm.stop().await;
}

/// Followers end when the coordinator stops, also one waiting for a build
/// that has not started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_end_when_the_coordinator_stops() {
    let mut farm = Farm::start().await;
    let (sid, drvs) = farm.submit(&["p", "q"]).await;
    let first = farm.next_job().await;
    let waiting = drvs.iter().find(|d| **d != first.drv_path).unwrap().clone();
    let coord = farm.coord.clone();
    let build = coord.build_of_drv(&waiting).unwrap();
    let log = coord
        .follow_log(Some(build), &waiting, 0, true)
        .await
        .unwrap();
    let mut subs = Box::pin(coord.follow_submission(sid));
    assert!(matches!(
        within("a snapshot", subs.next()).await,
        Some(SubmissionUpdate::Snapshot(_))
    ));
    coord.stop();
    assert_eq!(collect(log).await, (Vec::new(), vec![]));
    assert!(within("the end", subs.next()).await.is_none());
    drop((subs, coord));
    farm.stop().await;
}
