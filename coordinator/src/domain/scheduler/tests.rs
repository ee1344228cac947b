//! Scheduler unit tests: capability matching, preference, ordering, dedup,
//! unschedulable work, lost builders, retries, and recovery from the store.

use super::*;
use farm_nix::hash::HashAlgo;

fn sp(name: &str) -> StorePath {
    let d = HashAlgo::Sha256.digest(name.as_bytes());
    let mut digest = [0u8; 20];
    digest.copy_from_slice(&d.digest()[..20]);
    StorePath::from_digest(&digest, name).unwrap()
}

fn drv(name: &str) -> StorePath {
    sp(&format!("{name}.drv"))
}

fn nb(name: &str, system: &str, features: &[&str], deps: &[&str]) -> NewBuild {
    NewBuild {
        drv_path: drv(name),
        drv_aterm: format!("Derive-{name}").into(),
        system: system.into(),
        required_features: features.iter().map(|s| s.to_string()).collect(),
        outputs: BTreeMap::from([("out".to_string(), sp(name))]),
        input_drvs: deps.iter().map(|d| drv(d)).collect(),
    }
}

fn caps(
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

fn cfg() -> SchedulerConfig {
    SchedulerConfig {
        grace_ms: 10_000,
        max_retries: 1,
        unschedulable_wait_ms: 60_000,
        recent_window_ms: 3_600_000,
    }
}

fn sched() -> Scheduler {
    Scheduler::new(cfg(), Store::temporary().unwrap())
}

fn graph(builds: Vec<NewBuild>, roots: &[&str]) -> GraphSubmission {
    GraphSubmission {
        roots: roots.iter().map(|r| drv(r)).collect(),
        builds,
        ..Default::default()
    }
}

/// Resolve every pending Prepare with an empty closure; return the dispatches.
fn settle(s: &mut Scheduler, now: i64) -> Vec<Assignment> {
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

fn id_of(s: &Scheduler, name: &str) -> BuildId {
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
    s.submit(
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
    s.submit(
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
    s.submit(
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
    s.submit(
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
    s.submit(graph(vec![nb("y", "x86_64-linux", &[], &[])], &["y"]), 10)
        .unwrap();
    settle(&mut s, 10); // drained: everything stays queued
    let order = s.queue_order("x86_64-linux");
    assert_eq!(order, vec![id_of(&s, "a"), id_of(&s, "x"), id_of(&s, "y")]);

    // an interactive submission jumps the queue
    let mut g = graph(vec![nb("z", "x86_64-linux", &[], &[])], &["z"]);
    g.priority = Priority::Interactive;
    s.submit(g, 20).unwrap();
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
        .submit(
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
        .submit(
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
        .submit(
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
        .submit(
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
    s.submit(
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
    s.submit(
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
    s.submit(graph(vec![nb("t", "x86_64-linux", &[], &[])], &["t"]), 0)
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
    s.submit(
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
    s.submit(
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
    // (the submission is done: its records are read back from the store)
    let rec = match s.build_record(late.build) {
        Some(r) => r.clone(),
        None => s.store().get_build(late.build).unwrap().unwrap(),
    };
    assert_eq!(
        (rec.state, rec.retries),
        (BuildState::Done(Outcome::Built), 0)
    );
}

#[test]
fn a_finished_job_the_coordinator_gave_up_on_is_cancelled_and_its_result_ignored() {
    let mut s = sched(); // grace 10 s
    let (c, _) = s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
    s.submit(graph(vec![nb("t", "x86_64-linux", &[], &[])], &["t"]), 0)
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
    s.submit(
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
    s.submit(
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
        .submit(
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
    s.submit(
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
    s.submit(graph(vec![nb("t", "x86_64-linux", &[], &[])], &["t"]), 0)
        .unwrap();
    assert!(settle(&mut s, 0).is_empty());
    s.set_drain("b", false);
    assert_eq!(settle(&mut s, 0).len(), 1);
    assert!(!s.set_drain("nobody", true));
}

#[test]
fn restart_recovers_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let (sid, done_id, running_job, waiting_id);
    {
        let mut s = Scheduler::new(cfg(), Store::open(&path).unwrap());
        s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
        sid = s
            .submit(
                graph(
                    vec![
                        nb("first", "x86_64-linux", &[], &[]),
                        nb("second", "x86_64-linux", &[], &["first"]),
                        nb("third", "x86_64-linux", &[], &["second"]),
                    ],
                    &["third"],
                ),
                0,
            )
            .unwrap();
        let j = settle(&mut s, 0);
        done_id = j[0].build;
        s.job_ended("b", &j[0].job_id, JobEnd::Built, 1);
        let j = settle(&mut s, 1);
        running_job = j[0].job_id.clone();
        waiting_id = id_of(&s, "third");
        s.store().flush_blocking().unwrap();
        // dropped here, as after kill -9 (sled's flushed state is what survives)
    }
    let mut s = Scheduler::load(cfg(), Store::open(&path).unwrap(), 10_000).unwrap();
    assert!(!s.submission_done(sid));
    assert_eq!(s.state_of(done_id), Some(BuildState::Done(Outcome::Built)));
    assert_eq!(s.state_of(waiting_id), Some(BuildState::Waiting));
    let (running_id, _) = parse_job_id(&running_job).unwrap();
    assert!(matches!(
        s.state_of(running_id),
        Some(BuildState::Running { .. })
    ));
    // the builder comes back without the job: it is sent again, nothing finished is rebuilt
    s.builder_connected(
        "b",
        "k",
        caps(&["x86_64-linux"], &[], &[], 1, 1.0),
        &[],
        11_000,
    );
    let j = settle(&mut s, 11_000);
    assert_eq!(j.len(), 1);
    assert_eq!(j[0].build, running_id);
    s.job_ended("b", &j[0].job_id, JobEnd::Built, 12_000);
    let j = settle(&mut s, 12_000);
    assert_eq!(j.len(), 1);
    assert_eq!(j[0].build, waiting_id);
    s.job_ended("b", &j[0].job_id, JobEnd::Built, 13_000);
    assert!(s.submission_done(sid));
    // ids keep growing across restarts
    let next = s.store().next_id().unwrap();
    assert!(next > waiting_id);
}

#[test]
fn restart_with_builder_gone_requeues_after_grace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let mut s = Scheduler::new(cfg(), Store::open(&path).unwrap());
        s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
        s.submit(graph(vec![nb("t", "x86_64-linux", &[], &[])], &["t"]), 0)
            .unwrap();
        settle(&mut s, 0);
        s.store().flush_blocking().unwrap();
    }
    let mut s = Scheduler::load(cfg(), Store::open(&path).unwrap(), 100_000).unwrap();
    s.builder_connected(
        "other",
        "k2",
        caps(&["x86_64-linux"], &[], &[], 1, 1.0),
        &[],
        100_000,
    );
    s.tick(105_000);
    assert!(settle(&mut s, 105_000).is_empty(), "still within grace");
    s.tick(110_000);
    let j = settle(&mut s, 110_000);
    assert_eq!(j.len(), 1);
    assert_eq!(j[0].builder, "other");
}

#[test]
fn builds_record_every_client_that_asked() {
    let mut s = sched();
    s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
    let mut g = graph(vec![nb("shared", "x86_64-linux", &[], &[])], &["shared"]);
    g.client = Some("SHA256:alice alice@laptop".into());
    let s1 = s.submit(g, 1).unwrap();
    let mut g = graph(
        vec![
            nb("shared", "x86_64-linux", &[], &[]),
            nb("own", "x86_64-linux", &[], &["shared"]),
        ],
        &["own"],
    );
    g.client = Some("SHA256:bob bob@ci".into());
    let s2 = s.submit(g, 2).unwrap();
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

// ───────────────────── retention, start, locks, memory ─────────────────────

use crate::domain::state::{KeepNothing, Retention};

/// Submit `names` as one graph and build all of it on "b" (one job at a time).
fn build_all(s: &mut Scheduler, names: &[&str], now: i64) -> SubmissionId {
    let builds = names
        .iter()
        .map(|n| nb(n, "x86_64-linux", &[], &[]))
        .collect();
    let sid = s.submit(graph(builds, names), now).unwrap();
    loop {
        let jobs = settle(s, now);
        if jobs.is_empty() {
            break;
        }
        for j in jobs {
            s.job_ended("b", &j.job_id, JobEnd::Built, now);
        }
    }
    assert!(s.submission_done(sid));
    sid
}

/// Prune until nothing more is due.
fn prune_all(store: &Store, retention: &Retention, now: i64) -> usize {
    let mut n = 0;
    loop {
        let p = store.prune(retention, &KeepNothing, now, 256).unwrap();
        n += p.submissions;
        if !p.more {
            return n;
        }
    }
}

/// 10 000 finished submissions, a restart, then pruning: the start loads only
/// the unfinished submission, and sled then holds at most the retention
/// (counted entry by entry in every tree) plus the unfinished work, whose
/// shared build survives although finished submissions that listed it went.
#[test]
fn ten_thousand_finished_submissions_pruned_to_the_retention_after_a_restart() {
    const N: usize = 10_000;
    const KEEP: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let (long, shared_id, newest);
    {
        let mut s = Scheduler::new(cfg(), Store::open(&path).unwrap());
        s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 4, 1.0), &[], 0);
        // An unfinished submission: "shared" builds, "blocker" never ends.
        long = s
            .submit(
                graph(
                    vec![
                        nb("shared", "x86_64-linux", &[], &[]),
                        nb("blocker", "x86_64-linux", &[], &[]),
                    ],
                    &["shared", "blocker"],
                ),
                0,
            )
            .unwrap();
        let jobs = settle(&mut s, 0);
        shared_id = id_of(&s, "shared");
        let j = jobs.iter().find(|j| j.build == shared_id).unwrap();
        s.job_ended("b", &j.job_id, JobEnd::Built, 0);
        let mut last = 0;
        for i in 0..N {
            let own = format!("own-{i}");
            // Every hundredth one shares the long submission's built build.
            let names: Vec<&str> = if i % 100 == 0 {
                vec![&own, "shared"]
            } else {
                vec![&own]
            };
            last = build_all(&mut s, &names, 1 + i as i64);
        }
        newest = last;
        s.store().flush_blocking().unwrap();
        let c = s.store().counts();
        assert_eq!((c.submissions, c.finished), (N + 1, N));
        assert_eq!(c.builds, N + 2);
    }
    // Restart: only the unfinished work is read.
    let store = Store::open(&path).unwrap();
    let s = Scheduler::load(cfg(), store.clone(), 20_000).unwrap();
    let (builds, subs, _, _) = s.memory_counts();
    assert_eq!((builds, subs), (2, 1), "the start read finished history");
    assert!(!s.submission_done(long));
    let retention = Retention {
        finished_submissions: KEEP,
        max_age_ms: None,
        builder_ms: i64::MAX,
    };
    assert_eq!(prune_all(&store, &retention, 20_000), N - KEEP);
    let c = store.counts();
    assert_eq!(c.finished, KEEP, "{c:?}");
    assert_eq!(c.submissions, KEEP + 1, "{c:?}");
    // the kept submissions' own builds, plus "shared" and "blocker"
    assert_eq!(c.builds, KEEP + 2, "{c:?}");
    assert_eq!(c.log_index, c.builds, "{c:?}");
    assert_eq!(c.active, 2, "{c:?}");
    // the newest are the ones kept; the shared build is still there
    assert!(store.get_submission(newest).unwrap().is_some());
    assert!(store.get_build(shared_id).unwrap().is_some());
    assert!(
        store
            .build_of_drv(&drv("own-0").base_name())
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .build_of_drv(&drv(&format!("own-{}", N - 1)).base_name())
            .unwrap()
            .is_some()
    );
    // nothing more is due; and an age limit prunes what is older
    assert_eq!(prune_all(&store, &retention, 20_000), 0);
    let by_age = Retention {
        // finished at 1..=N: keep those at N-9..=N
        max_age_ms: Some(20_000 - (N as i64 - 9)),
        ..retention
    };
    assert_eq!(prune_all(&store, &by_age, 20_000), KEEP - 10);
    assert_eq!(store.counts().finished, 10);
    // the unfinished submission still resumes
    drop(s);
    let s = Scheduler::load(cfg(), store, 30_000).unwrap();
    assert!(!s.submission_done(long));
    assert_eq!(
        s.state_of(shared_id),
        Some(BuildState::Done(Outcome::Built))
    );
}

/// Records written by a submission that a crash interrupted before it was
/// recorded are dropped at the next start, not built.
#[test]
fn an_interrupted_submission_leaves_nothing_to_build() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let s = Scheduler::new(cfg(), Store::open(&path).unwrap());
        let g = graph(
            vec![
                nb("a", "x86_64-linux", &[], &[]),
                nb("b", "x86_64-linux", &[], &["a"]),
            ],
            &["b"],
        );
        let plan = s.share_plan(&PlanQuery::new(&g));
        let p = Scheduler::prepare_submission(s.store(), g, &plan, 0).unwrap();
        assert_eq!(s.store().counts().builds, 2);
        drop(p);
        s.store().flush_blocking().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let s = Scheduler::load(cfg(), store.clone(), 1).unwrap();
    assert_eq!(s.memory_counts().0, 0);
    let c = store.counts();
    assert_eq!((c.builds, c.active, c.log_index), (0, 0, 0), "{c:?}");
}

/// Two submissions of the same new derivation prepared at once: the one
/// inserted second shares the first one's build, and its own record is
/// discarded (the log index points at the build that exists).
#[test]
fn submissions_prepared_at_once_share_one_build() {
    let mut s = sched();
    s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 4, 1.0), &[], 0);
    let g1 = graph(vec![nb("x", "x86_64-linux", &[], &[])], &["x"]);
    let g2 = graph(
        vec![
            nb("x", "x86_64-linux", &[], &[]),
            nb("y", "x86_64-linux", &[], &["x"]),
        ],
        &["y"],
    );
    let (p1, p2) = (
        s.share_plan(&PlanQuery::new(&g1)),
        s.share_plan(&PlanQuery::new(&g2)),
    );
    let p1 = Scheduler::prepare_submission(s.store(), g1, &p1, 0).unwrap();
    let p2 = Scheduler::prepare_submission(s.store(), g2, &p2, 0).unwrap();
    let i1 = s.insert_submission(p1, 0);
    assert!(i1.discard.is_empty());
    let i2 = s.insert_submission(p2, 0);
    i2.persisted.unwrap();
    assert_eq!(i2.discard.len(), 1);
    s.store().discard_new_builds(&i2.discard).unwrap();
    let x = id_of(&s, "x");
    assert_eq!(
        s.store().build_of_drv(&drv("x").base_name()).unwrap(),
        Some(x)
    );
    assert_eq!(s.store().counts().builds, 2);
    let y = id_of(&s, "y");
    assert_eq!(
        s.build_record(y).unwrap().deps,
        BTreeSet::from([x]),
        "linked to the shared build, not the discarded one"
    );
    assert_eq!(
        s.store().get_build(y).unwrap().unwrap().deps,
        BTreeSet::from([x])
    );
    let jobs = settle(&mut s, 0);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].build, x);
    s.job_ended("b", &jobs[0].job_id, JobEnd::Built, 1);
    assert!(s.submission_done(i1.sid));
    let jobs = settle(&mut s, 1);
    assert_eq!(jobs[0].build, y);
}

/// A build a prepared submission was to share fails before it is inserted:
/// the submission gets a build of its own instead of a failed dependency.
#[test]
fn a_shared_build_that_fails_meanwhile_is_built_again() {
    let mut s = sched();
    s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 4, 1.0), &[], 0);
    s.submit(graph(vec![nb("x", "x86_64-linux", &[], &[])], &["x"]), 0)
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
    let p = Scheduler::prepare_submission(s.store(), g, &plan, 1).unwrap();
    s.job_ended("b", &first[0].job_id, JobEnd::Failed("boom".into()), 2);
    let ins = s.insert_submission(p, 3);
    ins.persisted.unwrap();
    let x2 = id_of(&s, "x");
    assert_ne!(x2, first[0].build);
    let y = id_of(&s, "y");
    assert_eq!(s.build_record(y).unwrap().deps, BTreeSet::from([x2]));
    assert_eq!(
        s.store().get_build(x2).unwrap().unwrap().state,
        BuildState::Waiting
    );
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
    s.submit(
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

/// Builders not seen within the retention are forgotten, in memory and in
/// the store; online ones and those with work stay.
#[test]
fn builders_not_seen_within_the_retention_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let day = 86_400_000;
    {
        let mut s = Scheduler::new(cfg(), Store::open(&path).unwrap());
        let c = caps(&["x86_64-linux"], &[], &[], 1, 1.0);
        let (old, _) = s.builder_connected("old", "k1", c.clone(), &[], 0);
        s.builder_disconnected("old", old, day);
        let (busy, _) = s.builder_connected("busy", "k2", c.clone(), &[], 0);
        s.submit(graph(vec![nb("t", "x86_64-linux", &[], &[])], &["t"]), day)
            .unwrap();
        assert_eq!(settle(&mut s, day).len(), 1);
        s.builder_disconnected("busy", busy, day);
        s.builder_connected("online", "k3", c, &[], 0);
        s.store().flush_blocking().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let mut s = Scheduler::load(cfg(), store.clone(), 40 * day).unwrap();
    assert_eq!(s.builders().len(), 3);
    // "online" is back; "old" was last seen 39 days ago; "busy" 39 too, but
    // it has a job (its grace period decides about that)
    s.builder_connected(
        "online",
        "k3",
        caps(&["x86_64-linux"], &[], &[], 1, 1.0),
        &[],
        40 * day,
    );
    let gone = s.forget_builders(40 * day, 30 * day);
    assert_eq!(gone, vec!["old".to_string()]);
    assert!(s.builder_key("old").is_none());
    assert!(s.builder_key("busy").is_some());
    assert_eq!(store.counts().builders, 2);
    // the name is free again
    s.builder_join(
        "old",
        "k9",
        None,
        caps(&["x86_64-linux"], &[], &[], 1, 1.0),
        &[],
        40 * day,
    )
    .unwrap();
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
            s.store().get_build(*id).unwrap().unwrap().deps,
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
    s.submit(
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
    s.submit(g, 1).unwrap();
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
    let p = Scheduler::prepare_submission(s.store(), g, &plan, 2).unwrap();
    s.job_ended("b", &first[0].job_id, JobEnd::Failed("no".into()), 3);
    let ins = s.insert_submission(p, 4);
    ins.persisted.unwrap();
    check_links(&mut s);
    let (x2, e) = (id_of(&s, "x"), id_of(&s, "e"));
    assert_ne!(x2, first[0].build);
    assert_eq!(s.builds[&x2].chain, 4);
    assert_eq!(s.builds[&e].pending, BTreeSet::from([id_of(&s, "y")]));
    assert_eq!(settle(&mut s, 4)[0].build, x2);
}
