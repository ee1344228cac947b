//! The scheduler's writes through a real state database and back: restarts
//! (what a start resumes), retention after a restart, an interrupted
//! submission, concurrent prepared submissions, and forgotten builders. The
//! writes are applied as the coordinator does ([`Store::apply_all`]), each
//! test at the points where the coordinator would have applied them by then.

use std::collections::BTreeSet;

use crate::domain::model::*;
use crate::domain::persist;
use crate::domain::scheduler::tests::{caps, cfg, drv, graph, id_of, nb, settle};
use crate::domain::scheduler::{GraphSubmission, JobEnd, PlanQuery, Scheduler};
use crate::domain::state::{KeepNothing, Retention, Store};

/// Apply every write the scheduler holds, in order.
fn save(s: &mut Scheduler, store: &Store) {
    store.apply_all(&s.take_writes()).unwrap();
}

/// A start: load what the state has, and write what the load changed.
fn start(store: &Store, now: i64) -> Scheduler {
    let mut s = Scheduler::load(cfg(), store.load().unwrap(), now);
    save(&mut s, store);
    s
}

#[test]
fn restart_recovers_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let (sid, done_id, running_job, waiting_id);
    {
        let store = Store::open(&path).unwrap();
        let mut s = Scheduler::new(cfg());
        s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
        sid = persist::submit(
            &mut s,
            &store,
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
        save(&mut s, &store);
        store.flush_blocking().unwrap();
        // dropped here, as after kill -9 (sled's flushed state is what survives)
    }
    let store = Store::open(&path).unwrap();
    let mut s = start(&store, 10_000);
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
    let next = store.next_id().unwrap();
    assert!(next > waiting_id);
}

#[test]
fn restart_with_builder_gone_requeues_after_grace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let store = Store::open(&path).unwrap();
        let mut s = Scheduler::new(cfg());
        s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
        persist::submit(
            &mut s,
            &store,
            graph(vec![nb("t", "x86_64-linux", &[], &[])], &["t"]),
            0,
        )
        .unwrap();
        settle(&mut s, 0);
        save(&mut s, &store);
        store.flush_blocking().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let mut s = start(&store, 100_000);
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

/// Submit `names` as one graph and build all of it on "b" (one job at a time).
fn build_all(s: &mut Scheduler, store: &Store, names: &[&str], now: i64) -> SubmissionId {
    let builds = names
        .iter()
        .map(|n| nb(n, "x86_64-linux", &[], &[]))
        .collect();
    let sid = persist::submit(s, store, graph(builds, names), now).unwrap();
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
        let store = Store::open(&path).unwrap();
        let mut s = Scheduler::new(cfg());
        s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 4, 1.0), &[], 0);
        // An unfinished submission: "shared" builds, "blocker" never ends.
        long = persist::submit(
            &mut s,
            &store,
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
            last = build_all(&mut s, &store, &names, 1 + i as i64);
        }
        newest = last;
        save(&mut s, &store);
        store.flush_blocking().unwrap();
        let c = store.counts();
        assert_eq!((c.submissions, c.finished), (N + 1, N));
        assert_eq!(c.builds, N + 2);
    }
    // Restart: only the unfinished work is read.
    let store = Store::open(&path).unwrap();
    let s = start(&store, 20_000);
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
    let s = start(&store, 30_000);
    assert!(!s.submission_done(long));
    assert_eq!(
        s.state_of(shared_id),
        Some(BuildState::Done(Outcome::Built))
    );
}

/// A chain of `n` new derivations `{prefix}0` ← `{prefix}1` ← …, rooted at the last.
fn chain(prefix: &str, n: usize) -> GraphSubmission {
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let builds = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let deps: Vec<&str> = names[..i].last().map(|d| d.as_str()).into_iter().collect();
            nb(name, "x86_64-linux", &[], &deps)
        })
        .collect();
    graph(builds, &[names[n - 1].as_str()])
}

/// Records written by a submission that a crash interrupted before it was
/// recorded are dropped at the next start, not built: also when it wrote
/// them in several batches (`persist::NEW_BUILDS_BATCH`), and without
/// touching a recorded submission's builds.
#[test]
fn an_interrupted_submission_leaves_nothing_to_build() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let n = 2 * persist::NEW_BUILDS_BATCH + 1;
    let kept;
    {
        let store = Store::open(&path).unwrap();
        let mut s = Scheduler::new(cfg());
        s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
        kept = persist::submit(&mut s, &store, chain("kept", 2), 0).unwrap();
        let g = chain("lost", n);
        let plan = s.share_plan(&PlanQuery::new(&g));
        let p = persist::prepare_submission(&store, g, &plan, 0).unwrap();
        assert_eq!(store.counts().builds, 2 + n);
        drop(p);
        save(&mut s, &store);
        store.flush_blocking().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let s = start(&store, 1);
    assert_eq!(s.memory_counts().0, 2);
    assert!(!s.submission_done(kept));
    let c = store.counts();
    // the kept submission: 2 builds, their 2 log entries, 3 active entries
    assert_eq!((c.builds, c.active, c.log_index), (2, 3, 2), "{c:?}");
}

/// A submission bigger than one batch of new builds is written whole: after
/// a restart every build is back, linked as submitted.
#[test]
fn a_submission_written_in_batches_resumes_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let n = 2 * persist::NEW_BUILDS_BATCH + 1;
    let sid;
    {
        let store = Store::open(&path).unwrap();
        let mut s = Scheduler::new(cfg());
        s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
        sid = persist::submit(&mut s, &store, chain("big", n), 0).unwrap();
        save(&mut s, &store);
        store.flush_blocking().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let mut s = start(&store, 1);
    assert_eq!(s.memory_counts().0, n);
    assert!(!s.submission_done(sid));
    let c = store.counts();
    assert_eq!((c.builds, c.active, c.log_index), (n, n + 1, n), "{c:?}");
    let last = id_of(&s, &format!("big{}", n - 1));
    let before = id_of(&s, &format!("big{}", n - 2));
    assert_eq!(s.build_record(last).unwrap().deps, BTreeSet::from([before]));
    // only the first of the chain can start
    s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 4, 1.0), &[], 2);
    let jobs = settle(&mut s, 2);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].build, id_of(&s, "big0"));
}

/// Two submissions of the same new derivation prepared at once: the one
/// inserted second shares the first one's build, and its own record is
/// discarded (the log index points at the build that exists).
#[test]
fn submissions_prepared_at_once_share_one_build() {
    let store = Store::temporary().unwrap();
    let mut s = Scheduler::new(cfg());
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
    let (p1, _) = persist::prepare_submission(&store, g1, &p1, 0).unwrap();
    let (p2, ahead2) = persist::prepare_submission(&store, g2, &p2, 0).unwrap();
    let i1 = s.insert_submission(p1, 0);
    assert!(i1.discard.is_empty());
    let i2 = s.insert_submission(p2, 0);
    save(&mut s, &store);
    assert_eq!(i2.discard.len(), 1);
    ahead2.discard(&store, &i2.discard).unwrap();
    let x = id_of(&s, "x");
    assert_eq!(store.build_of_drv(&drv("x").base_name()).unwrap(), Some(x));
    assert_eq!(store.counts().builds, 2);
    let y = id_of(&s, "y");
    assert_eq!(
        s.build_record(y).unwrap().deps,
        BTreeSet::from([x]),
        "linked to the shared build, not the discarded one"
    );
    assert_eq!(
        store.get_build(y).unwrap().unwrap().deps,
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

/// Builders not seen within the retention are forgotten, in memory and in
/// the store; online ones and those with work stay.
#[test]
fn builders_not_seen_within_the_retention_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let day = 86_400_000;
    {
        let store = Store::open(&path).unwrap();
        let mut s = Scheduler::new(cfg());
        let c = caps(&["x86_64-linux"], &[], &[], 1, 1.0);
        let (old, _) = s.builder_connected("old", "k1", c.clone(), &[], 0);
        s.builder_disconnected("old", old, day);
        let (busy, _) = s.builder_connected("busy", "k2", c.clone(), &[], 0);
        persist::submit(
            &mut s,
            &store,
            graph(vec![nb("t", "x86_64-linux", &[], &[])], &["t"]),
            day,
        )
        .unwrap();
        assert_eq!(settle(&mut s, day).len(), 1);
        s.builder_disconnected("busy", busy, day);
        s.builder_connected("online", "k3", c, &[], 0);
        save(&mut s, &store);
        store.flush_blocking().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let mut s = start(&store, 40 * day);
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
    save(&mut s, &store);
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

/// A named job's run is `building` from the insert, stays so across a
/// restart (the submission resumes), and ends with the resumed submission:
/// its outputs, and nothing left `building`.
#[test]
fn a_jobs_run_ends_after_a_restart() {
    use crate::domain::jobs::{Badge, JobState};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let sid;
    {
        let store = Store::open(&path).unwrap();
        let mut s = Scheduler::new(cfg());
        s.builder_connected("b", "k", caps(&["x86_64-linux"], &[], &[], 1, 1.0), &[], 0);
        let mut g = graph(vec![nb("only", "x86_64-linux", &[], &[])], &["only"]);
        g.job = Some("ci/app".into());
        sid = persist::submit(&mut s, &store, g, 0).unwrap();
        settle(&mut s, 0);
        save(&mut s, &store);
        let job = store.get_job("ci/app").unwrap().expect("recorded at once");
        assert_eq!(job.runs.len(), 1);
        assert_eq!(
            (job.runs[0].submission, job.runs[0].state),
            (sid, JobState::Building)
        );
        assert_eq!(job.badge(), Badge::Building);
        store.flush_blocking().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let mut s = start(&store, 10_000);
    assert_eq!(
        store.get_job("ci/app").unwrap().unwrap().badge(),
        Badge::Building
    );
    s.builder_connected(
        "b",
        "k",
        caps(&["x86_64-linux"], &[], &[], 1, 1.0),
        &[],
        11_000,
    );
    let j = settle(&mut s, 11_000);
    s.job_ended("b", &j[0].job_id, JobEnd::Built, 12_000);
    settle(&mut s, 12_000);
    save(&mut s, &store);
    assert!(s.submission_done(sid));
    let job = store.get_job("ci/app").unwrap().unwrap();
    assert_eq!(job.runs.len(), 1, "the same run, ended: {job:?}");
    let run = &job.runs[0];
    assert_eq!(
        (run.state, run.built, run.failed),
        (JobState::Succeeded, 1, 0)
    );
    assert_eq!(run.finished_ms, Some(12_000));
    assert_eq!(run.outputs.len(), 1, "{run:?}");
    assert_eq!(job.badge(), Badge::Passing);
}
