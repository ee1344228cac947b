//! Scheduler unit tests: capability matching, preference, ordering, dedup,
//! unschedulable work, lost builders, retries, prepared submissions. No
//! database: what the scheduler would persist is read from its writes (the
//! tests never take them). Restarts through a real store are in
//! `domain::restart_tests`, which shares these helpers.

use super::*;
use farm_nix::hash::HashAlgo;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

/// Ids for submissions and builds, unique across every test (as the state's are).
pub(crate) fn next_id() -> Result<u64, Infallible> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    Ok(NEXT.fetch_add(1, Ordering::Relaxed))
}

impl Scheduler {
    /// [`Scheduler::submit`] with ids from [`next_id`].
    pub(crate) fn submit_test(
        &mut self,
        g: GraphSubmission,
        now: i64,
    ) -> Result<SubmissionId, Infallible> {
        self.submit(g, now, next_id)
    }
}

/// The last record of build `id` the scheduler handed back to write.
fn written_build(s: &Scheduler, id: BuildId) -> Option<&BuildRecord> {
    s.writes.iter().rev().find_map(|w| match w {
        Write::Build(b) if b.id == id => Some(&**b),
        _ => None,
    })
}

pub(crate) fn sp(name: &str) -> StorePath {
    let d = HashAlgo::Sha256.digest(name.as_bytes());
    let mut digest = [0u8; 20];
    digest.copy_from_slice(&d.digest()[..20]);
    StorePath::from_digest(&digest, name).unwrap()
}

pub(crate) fn drv(name: &str) -> StorePath {
    sp(&format!("{name}.drv"))
}

pub(crate) fn nb(name: &str, system: &str, features: &[&str], deps: &[&str]) -> NewBuild {
    NewBuild {
        drv_path: drv(name),
        drv_aterm: format!("Derive-{name}").into_bytes().into(),
        system: system.into(),
        required_features: features.iter().map(|s| s.to_string()).collect(),
        outputs: BTreeMap::from([("out".to_string(), sp(name))]),
        input_drvs: deps.iter().map(|d| drv(d)).collect(),
        claim: None,
    }
}

pub(crate) fn caps(
    systems: &[&str],
    supported: &[&str],
    mandatory: &[&str],
    max_jobs: u32,
    speed: f64,
) -> Capabilities {
    Capabilities {
        systems: systems.iter().map(|s| s.to_string()).collect(),
        supported_features: supported.iter().map(|s| s.to_string()).collect(),
        mandatory_features: mandatory.iter().map(|s| s.to_string()).collect(),
        max_jobs,
        speed_factor: speed,
        cores: 4,
        memory_bytes: 1 << 30,
        nix_version: "2.8".into(),
    }
}

pub(crate) fn cfg() -> SchedulerConfig {
    SchedulerConfig {
        grace_ms: 10_000,
        max_retries: 1,
        unschedulable_wait_ms: 60_000,
        recent_window_ms: 3_600_000,
    }
}

fn sched() -> Scheduler {
    Scheduler::new(cfg())
}

pub(crate) fn graph(builds: Vec<NewBuild>, roots: &[&str]) -> GraphSubmission {
    GraphSubmission {
        roots: roots.iter().map(|r| drv(r)).collect(),
        builds,
        ..Default::default()
    }
}

/// Resolve every pending Prepare with an empty closure; return the dispatches.
pub(crate) fn settle(s: &mut Scheduler, now: i64) -> Vec<Assignment> {
    let mut out = Vec::new();
    for _ in 0..100 {
        s.dispatch(now);
        let actions = s.take_actions();
        if actions.is_empty() {
            break;
        }
        for a in actions {
            match a {
                Action::Prepare { build } => s.set_ready(build, Vec::new()),
                Action::Dispatch(j) => out.push(j),
                _ => {}
            }
        }
    }
    out
}

pub(crate) fn id_of(s: &Scheduler, name: &str) -> BuildId {
    s.build_of_drv(&drv(name)).unwrap()
}

fn finished(notices: &[Notice]) -> Vec<(StorePath, Outcome, Option<String>)> {
    notices
        .iter()
        .filter_map(|n| match &n.event {
            Event::Finished {
                drv_path,
                outcome,
                error,
                ..
            } => Some((drv_path.clone(), *outcome, error.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn capability_rules() {
    let plain = caps(
        &["x86_64-linux", "i686-linux"],
        &["kvm", "big-parallel"],
        &[],
        4,
        1.0,
    );
    let none = BTreeSet::new();
    let kvm: BTreeSet<String> = ["kvm".to_string()].into();
    let bench: BTreeSet<String> = ["benchmark".to_string()].into();
    assert!(plain.can_build("x86_64-linux", &none));
    assert!(plain.can_build("i686-linux", &kvm));
    assert!(!plain.can_build("aarch64-linux", &none));
    assert!(!plain.can_build("x86_64-linux", &bench));
    let mandatory = caps(&["x86_64-linux"], &["kvm"], &["benchmark"], 4, 1.0);
    // a builder with a mandatory feature takes only work that asks for it
    assert!(!mandatory.can_build("x86_64-linux", &none));
    assert!(!mandatory.can_build("x86_64-linux", &kvm));
    assert!(mandatory.can_build("x86_64-linux", &bench));
    let both: BTreeSet<String> = ["benchmark".to_string(), "kvm".to_string()].into();
    assert!(mandatory.can_build("x86_64-linux", &both));
}

#[test]
fn dispatch_matches_capabilities() {
    let mut s = sched();
    s.builder_connected(
        "plain",
        "k1",
        caps(&["x86_64-linux"], &[], &[], 4, 1.0),
        &[],
        0,
    );
    s.builder_connected(
        "kvm",
        "k2",
        caps(&["x86_64-linux"], &["kvm"], &["benchmark"], 4, 1.0),
        &[],
        0,
    );
    s.builder_connected(
        "arm",
        "k3",
        caps(&["aarch64-linux"], &[], &[], 4, 1.0),
        &[],
        0,
    );
    s.submit_test(
        graph(
            vec![
                nb("p", "x86_64-linux", &[], &[]),
                nb("bench", "x86_64-linux", &["benchmark", "kvm"], &[]),
                nb("a", "aarch64-linux", &[], &[]),
            ],
            &["p", "bench", "a"],
        ),
        0,
    )
    .unwrap();
    let jobs = settle(&mut s, 0);
    let by: HashMap<StorePath, String> =
        jobs.into_iter().map(|j| (j.drv_path, j.builder)).collect();
    assert_eq!(by[&drv("p")], "plain");
    assert_eq!(by[&drv("bench")], "kvm");
    assert_eq!(by[&drv("a")], "arm");
}

#[test]
fn preference_ordering() {
    const NONE: &[(StorePath, u64)] = &[];
    let held: HashSet<StorePath> = HashSet::new();
    let c = caps(&["x"], &[], &[], 4, 1.0);
    let idle = Load::default();
    // free slots
    assert!(select::score(&c, &idle, 0, &held, NONE) < select::score(&c, &idle, 2, &held, NONE));
    // speed factor
    let fast = caps(&["x"], &[], &[], 4, 2.0);
    assert!(select::score(&fast, &idle, 0, &held, NONE) < select::score(&c, &idle, 0, &held, NONE));
    // live load
    let loaded = Load {
        load_avg_1: 8.0,
        ..Load::default()
    };
    assert!(select::score(&c, &idle, 0, &held, NONE) < select::score(&c, &loaded, 0, &held, NONE));
    // pressure
    let pressed = Load {
        memory_pressure: 60.0,
        ..Load::default()
    };
    assert!(select::score(&c, &idle, 0, &held, NONE) < select::score(&c, &pressed, 0, &held, NONE));
    // locality: holding the big input wins
    let inputs = vec![(sp("big"), 1_000_000u64), (sp("small"), 10)];
    let holds_big: HashSet<StorePath> = [sp("big")].into();
    let holds_small: HashSet<StorePath> = [sp("small")].into();
    assert!(
        select::score(&c, &idle, 0, &holds_big, &inputs)
            < select::score(&c, &idle, 0, &holds_small, &inputs)
    );

    // and through dispatch: the fast idle builder gets the job
    let mut s = sched();
    s.builder_connected(
        "slow",
        "k1",
        caps(&["x86_64-linux"], &[], &[], 4, 1.0),
        &[],
        0,
    );
    s.builder_connected(
        "fast",
        "k2",
        caps(&["x86_64-linux"], &[], &[], 4, 3.0),
        &[],
        0,
    );
    s.builder_load(
        "fast",
        Load {
            load_avg_1: 1.0,
            ..Load::default()
        },
        0,
    );
    s.submit_test(
        graph(vec![nb("one", "x86_64-linux", &[], &[])], &["one"]),
        0,
    )
    .unwrap();
    let jobs = settle(&mut s, 0);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].builder, "fast");
    // a loaded fast builder loses to an idle slow one
    let mut s = sched();
    s.builder_connected(
        "slow",
        "k1",
        caps(&["x86_64-linux"], &[], &[], 4, 1.0),
        &[],
        0,
    );
    s.builder_connected(
        "fast",
        "k2",
        caps(&["x86_64-linux"], &[], &[], 4, 1.5),
        &[],
        0,
    );
    s.builder_load(
        "fast",
        Load {
            load_avg_1: 16.0,
            cpu_pressure: 90.0,
            ..Load::default()
        },
        0,
    );
    s.submit_test(
        graph(vec![nb("one", "x86_64-linux", &[], &[])], &["one"]),
        0,
    )
    .unwrap();
    assert_eq!(settle(&mut s, 0)[0].builder, "slow");
}

#[test]
fn longest_chain_then_priority_then_age() {
    let mut s = sched();
    // One builder, drained for now, so the work queues up.
    s.builder_connected(
        "only",
        "k",
        caps(&["x86_64-linux"], &[], &[], 1, 1.0),
        &[],
        0,
    );
    s.set_drain("only", true);
    // c depends on b depends on a; x and y stand alone (y submitted later).
    s.submit_test(
        graph(
            vec![
                nb("x", "x86_64-linux", &[], &[]),
                nb("a", "x86_64-linux", &[], &[]),
                nb("b", "x86_64-linux", &[], &["a"]),
                nb("c", "x86_64-linux", &[], &["b"]),
            ],
            &["x", "c"],
        ),
        0,
    )
    .unwrap();
    s.submit_test(graph(vec![nb("y", "x86_64-linux", &[], &[])], &["y"]), 10)
        .unwrap();
    settle(&mut s, 10); // drained: everything stays queued
    let order = s.queue_order("x86_64-linux");
    assert_eq!(order, vec![id_of(&s, "a"), id_of(&s, "x"), id_of(&s, "y")]);

    // an interactive submission jumps the queue
    let mut g = graph(vec![nb("z", "x86_64-linux", &[], &[])], &["z"]);
    g.priority = Priority::Interactive;
    s.submit_test(g, 20).unwrap();
    settle(&mut s, 20);
    assert_eq!(s.queue_order("x86_64-linux")[0], id_of(&s, "z"));

    // one slot: the builder takes them in that order
    s.set_drain("only", false);
    let jobs = settle(&mut s, 30);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].drv_path, drv("z"));
    s.job_ended("only", &jobs[0].job_id, JobEnd::Built, 31);
    let jobs = settle(&mut s, 31);
    assert_eq!(jobs[0].drv_path, drv("a"));
}

#[test]
fn identical_derivations_built_once() {
    let mut s = sched();
    s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 8, 1.0), &[], 0);
    s.set_drain("b", true);
    let s1 = s
        .submit_test(
            graph(
                vec![
                    nb("lib", "x86_64-linux", &[], &[]),
                    nb("app1", "x86_64-linux", &[], &["lib"]),
                ],
                &["app1"],
            ),
            0,
        )
        .unwrap();
    let s2 = s
        .submit_test(
            graph(
                vec![
                    nb("lib", "x86_64-linux", &[], &[]),
                    nb("app2", "x86_64-linux", &[], &["lib"]),
                ],
                &["app2"],
            ),
            1,
        )
        .unwrap();
    // the same derivation twice in one submission, too
    let s3 = s
        .submit_test(
            graph(vec![nb("lib", "x86_64-linux", &[], &[])], &["lib", "lib"]),
            2,
        )
        .unwrap();
    s.set_drain("b", false);
    let jobs = settle(&mut s, 3);
    let lib_jobs: Vec<_> = jobs.iter().filter(|j| j.drv_path == drv("lib")).collect();
    assert_eq!(lib_jobs.len(), 1, "lib is built once: {jobs:?}");
    assert_eq!(jobs.len(), 1, "apps wait for lib");
    s.take_notices();
    s.job_ended("b", &lib_jobs[0].job_id, JobEnd::Built, 4);
    let notices = s.take_notices();
    let lib_done = notices
        .iter()
        .find(|n| matches!(&n.event, Event::Finished { drv_path, .. } if *drv_path == drv("lib")))
        .unwrap();
    let mut subs = lib_done.submissions.clone();
    subs.sort();
    assert_eq!(subs, vec![s1, s2, s3]);
    assert!(notices.iter().any(|n| matches!(n.event, Event::SubmissionDone { submission, success: true, .. } if submission == s3)));
    let jobs = settle(&mut s, 5);
    assert_eq!(jobs.len(), 2);
    for j in &jobs {
        s.job_ended("b", &j.job_id, JobEnd::Built, 6);
    }
    assert!(s.submission_done(s1) && s.submission_done(s2));
}

#[test]
fn unschedulable_fails_at_once_with_what_is_missing() {
    let mut s = sched();
    s.builder_connected(
        "x1",
        "k",
        caps(&["x86_64-linux"], &["kvm"], &[], 4, 1.0),
        &[],
        0,
    );
    s.builder_connected(
        "bench",
        "k2",
        caps(&["x86_64-linux"], &[], &["benchmark"], 4, 1.0),
        &[],
        0,
    );
    let sid = s
        .submit_test(
            graph(
                vec![
                    nb("mac", "aarch64-darwin", &[], &[]),
                    nb("uses-mac", "x86_64-linux", &[], &["mac"]),
                    nb("gpu", "x86_64-linux", &["cuda"], &[]),
                    nb("ok", "x86_64-linux", &[], &[]),
                ],
                &["uses-mac", "gpu", "ok"],
            ),
            0,
        )
        .unwrap();
    let f = finished(&s.take_notices());
    let mac = f.iter().find(|(d, ..)| *d == drv("mac")).unwrap();
    assert_eq!(mac.1, Outcome::Unschedulable);
    let msg = mac.2.as_deref().unwrap();
    assert!(
        msg.contains("no builder has system aarch64-darwin"),
        "{msg}"
    );
    assert!(
        msg.contains("x1 (systems x86_64-linux; features kvm; mandatory -)"),
        "{msg}"
    );
    assert!(
        msg.contains("bench (systems x86_64-linux; features -; mandatory benchmark)"),
        "{msg}"
    );
    let dep = f.iter().find(|(d, ..)| *d == drv("uses-mac")).unwrap();
    assert_eq!(dep.1, Outcome::DependencyFailed);
    let gpu = f.iter().find(|(d, ..)| *d == drv("gpu")).unwrap();
    assert_eq!(gpu.1, Outcome::Unschedulable);
    assert!(
        gpu.2
            .as_deref()
            .unwrap()
            .contains("supports feature(s) cuda"),
        "{:?}",
        gpu.2
    );
    // the rest goes on
    let jobs = settle(&mut s, 0);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].drv_path, drv("ok"));
    s.job_ended(&jobs[0].builder, &jobs[0].job_id, JobEnd::Built, 1);
    let done = s
        .take_notices()
        .into_iter()
        .find_map(|n| match n.event {
            Event::SubmissionDone {
                submission,
                success,
                built,
                failed,
                ..
            } if submission == sid => Some((success, built, failed)),
            _ => None,
        })
        .unwrap();
    assert_eq!(done, (false, 1, 3));

    // a mandatory-feature mismatch is named as such
    let msg = select::unschedulable_message(
        &drv("m"),
        "x86_64-linux",
        &BTreeSet::new(),
        &[select::Known {
            name: "bench",
            caps: &caps(&["x86_64-linux"], &[], &["benchmark"], 1, 1.0),
        }],
    );
    assert!(msg.contains("mandatory feature(s) benchmark"), "{msg}");
}

#[test]
fn recently_seen_builder_means_wait_bounded() {
    let mut s = sched();
    let (conn, _) = s.builder_connected(
        "arm",
        "k",
        caps(&["aarch64-linux"], &[], &[], 1, 1.0),
        &[],
        0,
    );
    s.builder_disconnected("arm", conn, 1_000);
    s.submit_test(
        graph(vec![nb("a", "aarch64-linux", &[], &[])], &["a"]),
        2_000,
    )
    .unwrap();
    settle(&mut s, 2_000);
    assert_eq!(s.state_of(id_of(&s, "a")), Some(BuildState::Queued));
    s.tick(2_000);
    s.tick(30_000);
    assert_eq!(s.state_of(id_of(&s, "a")), Some(BuildState::Queued));
    s.tick(62_001);
    let f = finished(&s.take_notices());
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].1, Outcome::Unschedulable);
    assert!(
        f[0].2.as_deref().unwrap().contains("waited 60s"),
        "{:?}",
        f[0].2
    );

    // if it comes back in time, the work runs
    let mut s = sched();
    let (conn, _) = s.builder_connected(
        "arm",
        "k",
        caps(&["aarch64-linux"], &[], &[], 1, 1.0),
        &[],
        0,
    );
    s.builder_disconnected("arm", conn, 1_000);
    s.submit_test(
        graph(vec![nb("a", "aarch64-linux", &[], &[])], &["a"]),
        2_000,
    )
    .unwrap();
    settle(&mut s, 2_000);
    s.tick(2_000);
    s.builder_connected(
        "arm",
        "k",
        caps(&["aarch64-linux"], &[], &[], 1, 1.0),
        &[],
        50_000,
    );
    s.tick(70_000);
    let jobs = settle(&mut s, 70_000);
    assert_eq!(jobs.len(), 1);
}

#[test]
fn vanished_builder_requeued_after_grace_with_retry_limit() {
    let mut s = sched(); // grace 10 s, max_retries 1
    let (c1, _) = s.builder_connected(
        "b1",
        "k1",
        caps(&["x86_64-linux"], &[], &[], 1, 1.0),
        &[],
        0,
    );
    s.submit_test(graph(vec![nb("t", "x86_64-linux", &[], &[])], &["t"]), 0)
        .unwrap();
    let jobs = settle(&mut s, 0);
    assert_eq!(jobs[0].builder, "b1");
    let first_job = jobs[0].job_id.clone();
    s.builder_disconnected("b1", c1, 1_000);
    s.tick(5_000);
    assert!(matches!(
        s.state_of(id_of(&s, "t")),
        Some(BuildState::Running { .. })
    ));
    // a second builder appears; after the grace period the job moves there
    s.builder_connected(
        "b2",
        "k2",
        caps(&["x86_64-linux"], &[], &[], 1, 1.0),
        &[],
        6_000,
    );
    s.tick(11_000);
    let jobs = settle(&mut s, 11_000);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].builder, "b2");
    assert_ne!(jobs[0].job_id, first_job);
    // a late result from the first attempt is ignored
    s.job_ended("b1", &first_job, JobEnd::Built, 11_500);
    assert!(matches!(
        s.state_of(id_of(&s, "t")),
        Some(BuildState::Running { .. })
    ));
    // b2 vanishes too: past the retry limit the build fails
    let conn_b2 = 2; // second connection number
    s.builder_disconnected("b2", conn_b2, 12_000);
    s.tick(23_000);
    let f = finished(&s.take_notices());
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].1, Outcome::Failed);
    assert!(
        f[0].2
            .as_deref()
            .unwrap()
            .contains("gave up after 2 attempts"),
        "{:?}",
        f[0].2
    );
}

#[test]
fn reconnect_keeps_reported_jobs_and_requeues_the_rest() {
    let mut s = sched();
    let (c, _) = s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 2, 1.0), &[], 0);
    s.submit_test(
        graph(
            vec![
                nb("one", "x86_64-linux", &[], &[]),
                nb("two", "x86_64-linux", &[], &[]),
            ],
            &["one", "two"],
        ),
        0,
    )
    .unwrap();
    let jobs = settle(&mut s, 0);
    assert_eq!(jobs.len(), 2);
    s.builder_disconnected("b", c, 100);
    let keep = jobs[0].job_id.clone();
    s.builder_connected(
        "b",
        "k",
        caps(&["x86_64-linux"], &[], &[], 2, 1.0),
        &[keep.clone(), "b999.1".to_string()],
        200,
    );
    let actions = s.take_actions();
    assert!(actions.contains(&Action::Cancel {
        builder: "b".into(),
        job_id: "b999.1".into()
    }));
    // the unreported one is requeued and sent again
    for a in actions {
        if let Action::Prepare { build } = a {
            s.set_ready(build, Vec::new());
        }
    }
    let again = settle(&mut s, 200);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].drv_path, jobs[1].drv_path);
    assert_eq!(s.running_job("b", &keep), Some(jobs[0].build));
}

#[test]
fn a_job_that_finished_while_its_builder_was_away_is_kept_and_its_result_accepted() {
    let mut s = sched(); // grace 10 s
    let (c, _) = s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 2, 1.0), &[], 0);
    s.submit_test(
        graph(
            vec![
                nb("done", "x86_64-linux", &[], &[]),
                nb("late", "x86_64-linux", &[], &[]),
            ],
            &["done", "late"],
        ),
        0,
    )
    .unwrap();
    let jobs = settle(&mut s, 0);
    assert_eq!(jobs.len(), 2);
    let (done, late) = if jobs[0].drv_path == drv("done") {
        (&jobs[0], &jobs[1])
    } else {
        (&jobs[1], &jobs[0])
    };
    s.builder_disconnected("b", c, 100);
    // Back within the grace period: "done" ended meanwhile (the builder holds its
    // result: Hello.finished_jobs, held like a running job), "late" still runs.
    s.builder_connected(
        "b",
        "k",
        caps(&["x86_64-linux"], &[], &[], 2, 1.0),
        &[late.job_id.clone(), done.job_id.clone()],
        5_000,
    );
    let actions = s.take_actions();
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Cancel { .. } | Action::Prepare { .. })),
        "nothing cancelled or requeued: {actions:?}"
    );
    assert!(settle(&mut s, 5_000).is_empty(), "nothing dispatched again");
    assert_eq!(s.running_job("b", &done.job_id), Some(done.build));
    // Its result arrives after Welcome and is taken as is.
    s.job_ended("b", &done.job_id, JobEnd::Built, 5_100);
    assert_eq!(
        s.state_of(done.build),
        Some(BuildState::Done(Outcome::Built))
    );
    assert_eq!(s.build_record(done.build).unwrap().retries, 0);
    let f = finished(&s.take_notices());
    assert_eq!(f, [(drv("done"), Outcome::Built, None)]);
    // Past the grace period nothing is requeued either: the builder is back.
    s.tick(60_000);
    assert_eq!(s.running_job("b", &late.job_id), Some(late.build));
    s.job_ended("b", &late.job_id, JobEnd::Built, 60_100);
    // (as last written: the submission is done, its builds may be evicted)
    let rec = written_build(&s, late.build).unwrap().clone();
    assert_eq!(
        (rec.state, rec.retries),
        (BuildState::Done(Outcome::Built), 0)
    );
}

#[test]
fn a_finished_job_the_coordinator_gave_up_on_is_cancelled_and_its_result_ignored() {
    let mut s = sched(); // grace 10 s
    let (c, _) = s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
    s.submit_test(graph(vec![nb("t", "x86_64-linux", &[], &[])], &["t"]), 0)
        .unwrap();
    let first = settle(&mut s, 0).remove(0);
    s.builder_disconnected("b", c, 100);
    // Too late: the grace ran out and the build was requeued (a retry).
    s.tick(20_000);
    assert_eq!(s.build_record(first.build).unwrap().retries, 1);
    s.builder_connected(
        "b",
        "k",
        caps(&["x86_64-linux"], &[], &[], 1, 1.0),
        std::slice::from_ref(&first.job_id),
        21_000,
    );
    // Cancelling the old attempt also tells the builder to drop its result.
    let actions = s.take_actions();
    assert!(actions.contains(&Action::Cancel {
        builder: "b".into(),
        job_id: first.job_id.clone()
    }));
    s.job_ended("b", &first.job_id, JobEnd::Built, 21_100);
    assert_ne!(
        s.state_of(first.build),
        Some(BuildState::Done(Outcome::Built)),
        "a stale attempt's result does not count"
    );
}

#[test]
fn failures_transient_retry_permanent_propagate() {
    let mut s = sched();
    s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 4, 1.0), &[], 0);
    s.submit_test(
        graph(
            vec![
                nb("base", "x86_64-linux", &[], &[]),
                nb("top", "x86_64-linux", &[], &["base"]),
            ],
            &["top"],
        ),
        0,
    )
    .unwrap();
    let j = settle(&mut s, 0);
    s.job_ended(
        "b",
        &j[0].job_id,
        JobEnd::Transient("input fetch failed".into()),
        1,
    );
    let j = settle(&mut s, 1);
    assert_eq!(j.len(), 1, "retried");
    s.job_ended(
        "b",
        &j[0].job_id,
        JobEnd::Failed("builder exited 1".into()),
        2,
    );
    let f = finished(&s.take_notices());
    assert_eq!(f.len(), 2);
    assert!(f.contains(&(
        drv("base"),
        Outcome::Failed,
        Some("builder exited 1".into())
    )));
    assert!(
        f.iter()
            .any(|(d, o, _)| *d == drv("top") && *o == Outcome::DependencyFailed)
    );
    // a failed derivation submitted again is built again
    s.submit_test(
        graph(vec![nb("base", "x86_64-linux", &[], &[])], &["base"]),
        3,
    )
    .unwrap();
    assert_eq!(settle(&mut s, 3).len(), 1);
}

#[test]
fn cancel_submission_spares_shared_builds() {
    let mut s = sched();
    s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 4, 1.0), &[], 0);
    let s1 = s
        .submit_test(
            graph(
                vec![
                    nb("shared", "x86_64-linux", &[], &[]),
                    nb("mine", "x86_64-linux", &[], &[]),
                ],
                &["shared", "mine"],
            ),
            0,
        )
        .unwrap();
    s.submit_test(
        graph(vec![nb("shared", "x86_64-linux", &[], &[])], &["shared"]),
        0,
    )
    .unwrap();
    settle(&mut s, 0);
    assert_eq!(s.cancel_submission(s1, 1), 1);
    assert!(
        s.take_actions()
            .iter()
            .any(|a| matches!(a, Action::Cancel { .. }))
    );
    assert!(s.submission_done(s1));
    assert!(matches!(
        s.state_of(id_of(&s, "shared")),
        Some(BuildState::Running { .. })
    ));
}

#[test]
fn drained_builder_gets_no_work() {
    let mut s = sched();
    s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 4, 1.0), &[], 0);
    assert!(s.set_drain("b", true));
    assert!(s.take_actions().contains(&Action::Drain {
        builder: "b".into(),
        draining: true
    }));
    s.submit_test(graph(vec![nb("t", "x86_64-linux", &[], &[])], &["t"]), 0)
        .unwrap();
    assert!(settle(&mut s, 0).is_empty());
    s.set_drain("b", false);
    assert_eq!(settle(&mut s, 0).len(), 1);
    assert!(!s.set_drain("nobody", true));
}

#[test]
fn builds_record_every_client_that_asked() {
    let mut s = sched();
    s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
    let mut g = graph(vec![nb("shared", "x86_64-linux", &[], &[])], &["shared"]);
    g.client = Some("SHA256:alice alice@laptop".into());
    let s1 = s.submit_test(g, 1).unwrap();
    let mut g = graph(
        vec![
            nb("shared", "x86_64-linux", &[], &[]),
            nb("own", "x86_64-linux", &[], &["shared"]),
        ],
        &["own"],
    );
    g.client = Some("SHA256:bob bob@ci".into());
    let s2 = s.submit_test(g, 2).unwrap();
    let shared = s.build_record(id_of(&s, "shared")).unwrap();
    assert_eq!(
        shared.requested_by,
        BTreeSet::from([
            "SHA256:alice alice@laptop".to_string(),
            "SHA256:bob bob@ci".to_string()
        ])
    );
    let own = s.build_record(id_of(&s, "own")).unwrap();
    assert_eq!(
        own.requested_by,
        BTreeSet::from(["SHA256:bob bob@ci".to_string()])
    );
    assert_eq!(
        s.submission_view(s1).unwrap().0.0.client.as_deref(),
        Some("SHA256:alice alice@laptop")
    );
    assert_eq!(
        s.submission_view(s2).unwrap().0.0.client.as_deref(),
        Some("SHA256:bob bob@ci")
    );
}

/// A build a prepared submission was to share fails before it is inserted:
/// the submission gets a build of its own instead of a failed dependency.
#[test]
fn a_shared_build_that_fails_meanwhile_is_built_again() {
    let mut s = sched();
    s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 4, 1.0), &[], 0);
    s.submit_test(graph(vec![nb("x", "x86_64-linux", &[], &[])], &["x"]), 0)
        .unwrap();
    let first = settle(&mut s, 0);
    let g = graph(
        vec![
            nb("x", "x86_64-linux", &[], &[]),
            nb("y", "x86_64-linux", &[], &["x"]),
        ],
        &["y"],
    );
    let plan = s.share_plan(&PlanQuery::new(&g));
    let p = Scheduler::prepare_submission(g, &plan, 1, next_id).unwrap();
    s.job_ended("b", &first[0].job_id, JobEnd::Failed("boom".into()), 2);
    let ins = s.insert_submission(p, 3);
    assert!(ins.discard.is_empty());
    let x2 = id_of(&s, "x");
    assert_ne!(x2, first[0].build);
    let y = id_of(&s, "y");
    assert_eq!(s.build_record(y).unwrap().deps, BTreeSet::from([x2]));
    assert_eq!(written_build(&s, x2).unwrap().state, BuildState::Waiting);
    let jobs = settle(&mut s, 3);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].build, x2);
}

/// A closure is held while the build is queued, goes with the job, and is
/// resolved again after a requeue; paths are held once however many builds
/// and builders name them; nothing is held once builds end.
#[test]
fn input_closures_are_held_only_while_queued_and_shared() {
    let mut s = sched();
    s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
    s.submit_test(
        graph(
            vec![
                nb("p", "x86_64-linux", &[], &[]),
                nb("q", "x86_64-linux", &[], &[]),
            ],
            &["p", "q"],
        ),
        0,
    )
    .unwrap();
    let common: Vec<(StorePath, u64)> = (0..50).map(|i| (sp(&format!("lib{i}")), 10)).collect();
    let mut jobs = Vec::new();
    for a in s.take_actions() {
        if let Action::Prepare { build } = a {
            s.set_ready(build, common.clone());
        }
    }
    // both queued, one closure each, the paths once
    let (_, _, inputs, paths) = s.memory_counts();
    assert_eq!((inputs, paths), (100, 50));
    s.dispatch(0);
    for a in s.take_actions() {
        if let Action::Dispatch(j) = a {
            jobs.push(j);
        }
    }
    assert_eq!(jobs.len(), 1, "max_jobs 1");
    assert_eq!(jobs[0].input_paths.len(), 50);
    assert_eq!(s.inputs_of(jobs[0].build), None, "the job took it");
    assert_eq!(s.memory_counts().2, 50);
    // a transient failure: resolved again, then sent again with it
    s.job_ended("b", &jobs[0].job_id, JobEnd::Transient("lost".into()), 1);
    let again: Vec<BuildId> = s
        .take_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Prepare { build } => Some(build),
            _ => None,
        })
        .collect();
    assert_eq!(again, vec![jobs[0].build]);
    s.set_ready(jobs[0].build, common.clone());
    loop {
        let jobs = settle(&mut s, 2);
        if jobs.is_empty() {
            break;
        }
        for j in jobs {
            assert_eq!(j.input_paths.len(), 50);
            s.job_ended("b", &j.job_id, JobEnd::Built, 3);
        }
    }
    let (builds, subs, inputs, _) = s.memory_counts();
    assert_eq!((builds, subs, inputs), (0, 0, 0));
}

/// Of two keys for one new name, the first to join holds it; the other is
/// refused, unless the caller found the holder's key no longer enrolled.
#[test]
fn a_builder_name_is_bound_to_one_key() {
    let mut s = sched();
    let c = caps(&["x86_64-linux"], &[], &[], 1, 1.0);
    let (conn, _) = s.builder_join("n", "k1", None, c.clone(), &[], 0).unwrap();
    assert_eq!(
        s.builder_join("n", "k2", None, c.clone(), &[], 1),
        Err(NameTaken { name: "n".into() })
    );
    assert_eq!(s.builder_key("n"), Some(("k1".to_string(), true)));
    // the same key comes back
    s.builder_disconnected("n", conn, 2);
    s.builder_join("n", "k1", None, c.clone(), &[], 3).unwrap();
    // a takeover names the key it replaces
    assert!(
        s.builder_join("n", "k2", Some("k3"), c.clone(), &[], 4)
            .is_err()
    );
    s.builder_join("n", "k2", Some("k1"), c, &[], 5).unwrap();
    assert_eq!(s.builder_key("n"), Some(("k2".to_string(), true)));
}

/// Links and chains as a full recomputation would have them.
fn check_links(s: &mut Scheduler) {
    let ids: Vec<BuildId> = s.builds.keys().copied().collect();
    for id in &ids {
        let b = &s.builds[id];
        let mut pending = BTreeSet::new();
        for d in &b.rec.deps {
            if let Some(db) = s.builds.get(d) {
                assert!(db.dependents.contains(id), "b{d} lacks dependent b{id}");
                if !db.rec.state.is_terminal() {
                    pending.insert(*d);
                }
            }
        }
        assert_eq!(b.pending, pending, "pending of b{id}");
        for x in &b.dependents {
            assert!(s.builds[x].rec.deps.contains(id), "b{x} lacks dep b{id}");
        }
        assert_eq!(
            written_build(s, *id).unwrap().deps,
            b.rec.deps,
            "stored deps of b{id}"
        );
    }
    let before: BTreeMap<BuildId, u32> = ids.iter().map(|i| (*i, s.builds[i].chain)).collect();
    s.recompute_chains(ids.clone());
    let after: BTreeMap<BuildId, u32> = ids.iter().map(|i| (*i, s.builds[i].chain)).collect();
    assert_eq!(before, after, "chains");
}

/// A submission inserted as prepared, one whose plan changed meanwhile, and
/// the all-in-one path link and chain builds as a full recomputation does.
#[test]
fn prepared_inserts_link_like_a_full_recomputation() {
    let mut s = sched();
    s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
    // an existing chain x <- y, x running
    s.submit_test(
        graph(
            vec![
                nb("x", "x86_64-linux", &[], &[]),
                nb("y", "x86_64-linux", &[], &["x"]),
            ],
            &["y"],
        ),
        0,
    )
    .unwrap();
    let first = settle(&mut s, 0);
    check_links(&mut s);
    // as prepared: shares x and y, adds a diamond on top of them
    let g = graph(
        vec![
            nb("x", "x86_64-linux", &[], &[]),
            nb("y", "x86_64-linux", &[], &["x"]),
            nb("a", "x86_64-linux", &[], &["y"]),
            nb("b2", "x86_64-linux", &[], &["y", "x"]),
            nb("c", "x86_64-linux", &[], &["a", "b2"]),
            nb("d", "x86_64-linux", &[], &["c"]),
        ],
        &["d"],
    );
    s.submit_test(g, 1).unwrap();
    check_links(&mut s);
    assert_eq!(s.builds[&id_of(&s, "x")].chain, 5);
    // changed meanwhile: x fails before the insert, so x, y and what this
    // graph adds are new, and e (prepared with the others) links to them
    let g = graph(
        vec![
            nb("x", "x86_64-linux", &[], &[]),
            nb("y", "x86_64-linux", &[], &["x"]),
            nb("e", "x86_64-linux", &[], &["y"]),
            nb("f", "x86_64-linux", &[], &["e", "x"]),
        ],
        &["f"],
    );
    let plan = s.share_plan(&PlanQuery::new(&g));
    let p = Scheduler::prepare_submission(g, &plan, 2, next_id).unwrap();
    s.job_ended("b", &first[0].job_id, JobEnd::Failed("no".into()), 3);
    s.insert_submission(p, 4);
    check_links(&mut s);
    let (x2, e) = (id_of(&s, "x"), id_of(&s, "e"));
    assert_ne!(x2, first[0].build);
    assert_eq!(s.builds[&x2].chain, 4);
    assert_eq!(s.builds[&e].pending, BTreeSet::from([id_of(&s, "y")]));
    assert_eq!(settle(&mut s, 4)[0].build, x2);
}

/// What must persist comes back as writes, in order: a submission whose new
/// builds the caller wrote ahead is inserted with its record as the caller
/// encoded it and nothing else; without that, each new build's record, then
/// the submission's; a forgotten builder's record goes.
#[test]
fn what_must_persist_comes_back_as_writes() {
    let mut s = sched();
    let (conn, _) =
        s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
    assert!(matches!(&s.take_writes()[..], [Write::Builder(b)] if b.name == "b"));
    let g = graph(
        vec![
            nb("a", "x86_64-linux", &[], &[]),
            nb("b", "x86_64-linux", &[], &["a"]),
        ],
        &["b"],
    );
    let plan = s.share_plan(&PlanQuery::new(&g));
    let mut p = Scheduler::prepare_submission(g, &plan, 0, next_id).unwrap();
    assert_eq!(p.new_builds().count(), 2);
    p.written_ahead(b"as encoded".to_vec());
    let sid = p.id();
    s.insert_submission(p, 0);
    assert_eq!(
        s.take_writes(),
        [Write::NewSubmission {
            id: sid,
            encoded: b"as encoded".to_vec()
        }]
    );
    let sid2 = s
        .submit_test(graph(vec![nb("c", "x86_64-linux", &[], &[])], &["c"]), 1)
        .unwrap();
    let c = id_of(&s, "c");
    match &s.take_writes()[..] {
        [Write::Build(b), Write::Submission(sub)] => {
            assert_eq!((b.id, b.state.clone()), (c, BuildState::Waiting));
            assert_eq!((sub.id, sub.done), (sid2, false));
        }
        other => panic!("{other:?}"),
    }
    s.builder_disconnected("b", conn, 2);
    s.take_writes();
    assert_eq!(s.forget_builders(100, 10), ["b".to_string()]);
    assert_eq!(s.take_writes(), [Write::ForgetBuilder("b".into())]);
}

/// A claim build (a client's unverified hook derivation) shares nothing:
/// not with an honest build of the same `.drv` path submitted after it, nor
/// with another claim, nor the other way round; its job says whose it is, and
/// its outputs are uploaded as that owner's claims, the honest job's signed.
#[test]
fn claim_builds_are_never_shared_and_their_outputs_are_claims() {
    let mut s = sched();
    s.builder_connected(
        "b1",
        "k1",
        caps(&["x86_64-linux"], &[], &[], 4, 1.0),
        &[],
        0,
    );
    let claim = |owner: &str| NewBuild {
        claim: Some(owner.to_owned()),
        ..nb("x", "x86_64-linux", &[], &[])
    };
    // The attacker goes first, under the honest `.drv`'s path and outputs.
    s.submit_test(graph(vec![claim("mallory")], &["x"]), 0)
        .unwrap();
    assert_eq!(s.build_of_drv(&drv("x")), None, "a claim build is indexed");
    let jobs = settle(&mut s, 0);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].claim.as_deref(), Some("mallory"));
    let rec = s.build_record(jobs[0].build).unwrap().clone();
    assert_eq!(rec.claim.as_deref(), Some("mallory"));
    // The honest client, then a second claimant: a build each.
    s.submit_test(graph(vec![nb("x", "x86_64-linux", &[], &[])], &["x"]), 1)
        .unwrap();
    s.submit_test(graph(vec![claim("trudy")], &["x"]), 2)
        .unwrap();
    let more = settle(&mut s, 2);
    assert_eq!(more.len(), 2, "{more:?}");
    let honest = more.iter().find(|j| j.claim.is_none()).expect("honest job");
    let trudy = more
        .iter()
        .find(|j| j.claim.is_some())
        .expect("trudy's job");
    assert_eq!(s.build_of_drv(&drv("x")), Some(honest.build));
    let out = sp("x");
    // Named by job: exactly that job's trust.
    assert_eq!(
        s.output_upload("b1", Some(&jobs[0].job_id), &out),
        Some(Some("mallory".into()))
    );
    assert_eq!(
        s.output_upload("b1", Some(&honest.job_id), &out),
        Some(None)
    );
    assert_eq!(
        s.output_upload("b1", Some(&trudy.job_id), &out),
        Some(Some("trudy".into()))
    );
    assert_eq!(s.output_upload("b2", Some(&honest.job_id), &out), None);
    assert_eq!(s.output_upload("b1", Some(&honest.job_id), &sp("y")), None);
    // Unnamed: never signed while a claim job has it; two owners: refused.
    assert_eq!(s.output_upload("b1", None, &out), None);
    s.job_ended("b1", &trudy.job_id, JobEnd::Built, 3);
    assert_eq!(
        s.output_upload("b1", None, &out),
        Some(Some("mallory".into()))
    );
    s.job_ended("b1", &jobs[0].job_id, JobEnd::Built, 4);
    assert_eq!(s.output_upload("b1", None, &out), Some(None));
    assert!(s.is_expected_output("b1", &out));
    // Its record keeps whose it is through the state's encoding.
    let json = serde_json::to_string(&rec).unwrap();
    let back: BuildRecord = serde_json::from_str(&json).unwrap();
    assert_eq!(back, rec);
}

/// The free-slot index (`free::choose`) picks the builder a walk over every
/// capable builder with a free slot picks (lowest `select::score`, ties to
/// the lower name), on a farm with equal speed factors (ties), loads,
/// features, busy builders and paths held by few and by many builders (both
/// of `choose`'s ways).
#[test]
fn free_slot_index_picks_what_a_walk_over_every_builder_picks() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut s = sched();
    for i in 0..150 {
        let systems: &[&str] = if i % 7 == 0 {
            &["x86_64-linux", "aarch64-linux"]
        } else {
            &["x86_64-linux"]
        };
        let supported: &[&str] = if i % 3 == 0 { &["kvm"] } else { &[] };
        let mandatory: &[&str] = if i % 11 == 0 { &["big"] } else { &[] };
        let c = caps(
            systems,
            supported,
            mandatory,
            1 + (i % 3) as u32,
            [1.0, 2.0, 4.0][i % 3],
        );
        let name = format!("b{:03}", rnd(1000));
        s.builder_connected(&name, &format!("ssh-ed25519 k{i}"), c, &[], 1);
        if i % 5 == 0 {
            let load = Load {
                load_avg_1: rnd(8) as f64,
                ..Load::default()
            };
            s.builder_load(&name, load, 1);
        }
    }
    let pool: Vec<Arc<StorePath>> = (0..40).map(|i| s.intern(sp(&format!("in{i}")))).collect();
    let n_slots = s.builders.len() as u32;
    for bx in 0..n_slots {
        // Path 0 and 1 are held by most builders (more than choose's "few").
        let mut held: Vec<Arc<StorePath>> = pool[..2].to_vec();
        for _ in 0..rnd(6) {
            held.push(pool[rnd(40) as usize].clone());
        }
        if rnd(4) != 0 {
            s.hold(bx, held);
        }
    }
    let features: [&[&str]; 3] = [&[], &["kvm"], &["big"]];
    let builds: Vec<NewBuild> = (0..400)
        .map(|i| {
            let system = if i % 9 == 0 {
                "aarch64-linux"
            } else {
                "x86_64-linux"
            };
            nb(&format!("fsi{i}"), system, features[i % 3], &[])
        })
        .collect();
    s.submit_test(graph(builds, &[]), 1).unwrap();
    let mut checked = (0, 0);
    for round in 0..4 {
        for a in s.take_actions() {
            if let Action::Prepare { build } = a {
                let k = 1 + rnd(4);
                let inputs = (0..k)
                    .map(|_| {
                        let p = rnd(40) as usize;
                        ((*pool[p]).clone(), [0, 1, 1 << 20, 3 << 10][p % 4])
                    })
                    .collect();
                s.set_ready(build, inputs);
            }
        }
        let queued: Vec<(Class, BuildId)> = s
            .ready
            .iter()
            .flat_map(|(c, q)| q.iter().map(move |k| (c.clone(), k.id)))
            .collect();
        for (class, id) in queued {
            let inputs = s.builds[&id].inputs.as_deref().unwrap_or(&[]);
            let walk = s
                .entries()
                .filter(|e| {
                    e.online
                        && !e.rec.draining
                        && (e.running.len() as u32) < e.rec.capabilities.max_jobs.max(1)
                        && e.rec.capabilities.can_build(&class.system, &class.features)
                })
                .map(|e| {
                    let held: HashSet<Arc<StorePath>> = e.held.values().cloned().collect();
                    let score =
                        select::score(&e.rec.capabilities, &e.load, e.running.len(), &held, inputs);
                    (score, e.rec.name.clone())
                })
                .min_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)))
                .map(|(_, n)| n);
            let mut capable = Vec::new();
            s.free_groups(&class, &mut capable);
            let mut marks = free::Marks::default();
            let chosen = free::choose(
                &s.builders,
                &s.groups,
                &capable,
                &s.holders,
                &mut marks,
                inputs,
            )
            .map(|bx| s.builders[bx as usize].as_ref().unwrap().rec.name.clone());
            assert_eq!(chosen, walk, "round {round}, build b{id} of {class:?}");
            if chosen.is_some() {
                checked.0 += 1;
            } else {
                checked.1 += 1;
            }
        }
        // Fill some slots, so later rounds see busy builders.
        s.dispatch(2 + round);
        let started: Vec<Assignment> = s
            .take_actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::Dispatch(j) => Some(j),
                _ => None,
            })
            .collect();
        for j in started.iter().step_by(2) {
            s.job_ended(&j.builder, &j.job_id, JobEnd::Built, 3 + round);
        }
    }
    assert!(checked.0 > 300, "too few decisions checked: {checked:?}");
}

#[test]
fn the_speed_factor_counts_squared_against_busy_slots_and_locality() {
    // Known answer: a speed-2 builder with half its slots busy that holds
    // none of the input scores 1.5 * 1.5 / 2² = 0.5625; an idle speed-1
    // builder that holds all of it scores 1.0. With the speed factor counted
    // once (1.125 against 1.0) the slow one won.
    let inputs = vec![(sp("big-input"), 1_000_000u64)];
    let idle = Load::default();
    let none: HashSet<StorePath> = HashSet::new();
    let all: HashSet<StorePath> = [sp("big-input")].into();
    let fast = caps(&["x86_64-linux"], &[], &[], 4, 2.0);
    let slow = caps(&["x86_64-linux"], &[], &[], 4, 1.0);
    let f = select::score(&fast, &idle, 2, &none, &inputs);
    let s1 = select::score(&slow, &idle, 0, &all, &inputs);
    assert_eq!(f, 0.5625);
    assert_eq!(s1, 1.0);
    // Through dispatch: the slow builder holds the input, the fast one has
    // two of its four slots busy; the fast one gets the build.
    let mut s = sched();
    s.builder_connected("fast", "k1", fast, &[], 0);
    s.builder_connected("slow", "k2", slow, &[], 0);
    s.submit_test(
        graph(
            vec![
                nb("busy1", "x86_64-linux", &[], &[]),
                nb("busy2", "x86_64-linux", &[], &[]),
            ],
            &["busy1", "busy2"],
        ),
        0,
    )
    .unwrap();
    let jobs = settle(&mut s, 0);
    assert!(jobs.iter().all(|j| j.builder == "fast"), "{jobs:?}");
    assert_eq!(jobs.len(), 2);
    let big = s.intern(sp("big-input"));
    let slow_bx = s.bx("slow").unwrap();
    s.hold(slow_bx, [big]);
    s.submit_test(
        graph(
            vec![nb("wants-big", "x86_64-linux", &[], &[])],
            &["wants-big"],
        ),
        1,
    )
    .unwrap();
    s.dispatch(1);
    let mut started = Vec::new();
    for a in s.take_actions() {
        if let Action::Prepare { build } = a {
            s.set_ready(build, vec![(sp("big-input"), 1_000_000)]);
        }
    }
    s.dispatch(1);
    for a in s.take_actions() {
        if let Action::Dispatch(j) = a {
            started.push((j.drv_path, j.builder));
        }
    }
    assert_eq!(started, vec![(drv("wants-big"), "fast".to_string())]);
}
