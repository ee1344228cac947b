//! Submissions: a derivation graph in (planned and shared under the lock,
//! prepared outside it, inserted under it), cancelled, or ended; and what an
//! ended submission no longer needs in memory.

use super::*;

/// A derivation of a submitted graph that is not in the cache yet.
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub drv_path: StorePath,
    pub drv_aterm: Arc<[u8]>,
    pub system: String,
    pub required_features: BTreeSet<String>,
    pub outputs: BTreeMap<String, StorePath>,
    /// Input derivations that are not in the cache (each one is in the graph too,
    /// or already known to the scheduler).
    pub input_drvs: Vec<StorePath>,
    /// [`BuildRecord::claim`]: such a build is never shared, in either
    /// direction (it stays out of the derivation index).
    pub claim: Option<String>,
}

/// A submitted derivation graph, cached parts already removed.
#[derive(Debug, Clone, Default)]
pub struct GraphSubmission {
    pub roots: Vec<StorePath>,
    pub builds: Vec<NewBuild>,
    /// Derivations of the graph whose outputs the cache has.
    pub cached: BTreeMap<StorePath, BTreeMap<String, StorePath>>,
    pub priority: Priority,
    pub max_silent_time_secs: u64,
    pub build_timeout_secs: u64,
    /// Who asked (recorded on the submission and on each of its builds).
    pub client: Option<String>,
    /// The named job it runs under (checked by the caller: `farm_proto::job`).
    pub job: Option<String>,
}

/// The derivations of a graph the scheduler is to be asked about: the graph's
/// own, and inputs from outside it (made outside the lock: [`PlanQuery::new`]).
pub struct PlanQuery {
    members: Vec<StorePath>,
    outside: Vec<StorePath>,
}

impl PlanQuery {
    pub fn new(g: &GraphSubmission) -> PlanQuery {
        let members: HashSet<&StorePath> = g.builds.iter().map(|b| &b.drv_path).collect();
        let mut outside: HashSet<&StorePath> = HashSet::new();
        for nb in &g.builds {
            outside.extend(nb.input_drvs.iter().filter(|i| !members.contains(i)));
        }
        PlanQuery {
            // A claim build shares nothing: it is not asked about.
            members: g
                .builds
                .iter()
                .filter(|b| b.claim.is_none())
                .map(|b| b.drv_path.clone())
                .collect(),
            outside: outside.into_iter().cloned().collect(),
        }
    }
}

/// Which derivations of a graph the scheduler shares with builds it has, as
/// seen at one moment under the lock ([`Scheduler::insert_submission`] checks
/// each again).
#[derive(Debug, Clone, Default)]
pub struct SharePlan {
    /// Graph members that an existing queued, running or built build covers.
    existing: HashMap<StorePath, BuildId>,
    /// Inputs outside the graph that the scheduler has a build of.
    outside: HashMap<StorePath, BuildId>,
}

/// One derivation of a prepared submission.
enum Member {
    /// Planned to share `planned`; `spare` is its id should it need a build of its own.
    Shared {
        nb: NewBuild,
        planned: BuildId,
        spare: BuildId,
    },
    /// A new build, its record written already, linked to the other new
    /// ones; `existing` are its dependencies among builds the scheduler had;
    /// `class` indexes the submission's distinct (system, features).
    Fresh {
        build: Box<Build>,
        inputs: Vec<StorePath>,
        existing: Vec<BuildId>,
        class: usize,
    },
}

impl Member {
    fn drv(&self) -> &StorePath {
        match self {
            Member::Shared { nb, .. } => &nb.drv_path,
            Member::Fresh { build, .. } => &build.rec.drv_path,
        }
    }

    /// Whether it is a claim build (shared with nothing, not indexed).
    fn is_claim(&self) -> bool {
        match self {
            Member::Shared { nb, .. } => nb.claim.is_some(),
            Member::Fresh { build, .. } => build.rec.claim.is_some(),
        }
    }
}

/// A submission made ready outside the lock: ids taken, new builds' records
/// made, their chains, events and classes worked out (see
/// [`Scheduler::prepare_submission`]).
pub struct PreparedSubmission {
    sid: SubmissionId,
    created_ms: i64,
    members: Vec<Member>,
    /// Derivation → id, as planned.
    ids: HashMap<StorePath, BuildId>,
    /// The new builds' derivations, for the scheduler's index.
    keys: Vec<(StorePath, BuildId)>,
    /// Inputs outside the graph → the build they were linked to.
    outside: Vec<(StorePath, BuildId)>,
    /// `Queued` for each new build, in order.
    notices: Vec<Notice>,
    /// Distinct (system, features) of the new builds.
    classes: Vec<(String, BTreeSet<String>)>,
    /// The submission's record as planned.
    record: SubmissionRecord,
    /// Set once the caller wrote every new build's record ahead: the
    /// planned record, encoded by it (written as is when the plan holds).
    ahead: Option<Vec<u8>>,
    max_silent_time_secs: u64,
    build_timeout_secs: u64,
}

impl PreparedSubmission {
    /// The submission's id.
    pub fn id(&self) -> SubmissionId {
        self.sid
    }

    /// The records of the builds it brings (to write ahead, outside the lock).
    pub fn new_builds(&self) -> impl Iterator<Item = &BuildRecord> {
        self.members.iter().filter_map(|m| match m {
            Member::Fresh { build, .. } => Some(&*build.rec),
            Member::Shared { .. } => None,
        })
    }

    /// The submission's record as planned.
    pub fn record(&self) -> &SubmissionRecord {
        &self.record
    }

    /// The caller wrote every record of [`PreparedSubmission::new_builds`];
    /// `encoded_record` is [`PreparedSubmission::record`] as the state
    /// encodes it. The insert then writes only what changed, and the record
    /// as given when the plan held; without this it writes the new builds too.
    pub fn written_ahead(&mut self, encoded_record: Vec<u8>) {
        self.ahead = Some(encoded_record);
    }
}

/// What an insert no longer needs: dropped by the caller after the lock.
pub struct Leftovers {
    _ids: HashMap<StorePath, BuildId>,
    _inputs: Vec<Vec<StorePath>>,
}

/// What [`Scheduler::insert_submission`] did.
pub struct Inserted {
    pub sid: SubmissionId,
    /// New builds written ahead that a concurrent submission made
    /// unnecessary: for the caller to remove from the state, after the lock.
    pub discard: Vec<BuildId>,
    /// To drop after the lock.
    pub leftovers: Leftovers,
}

/// Link a submission's new builds among themselves (dependents, pending
/// dependencies, chains) and list each one's dependencies on builds the
/// scheduler had. Whatever depends on a new build is new too, so the chains
/// are whole.
fn link_fresh(members: &mut [Member]) {
    let index: HashMap<BuildId, usize> = members
        .iter()
        .enumerate()
        .filter_map(|(i, m)| match m {
            Member::Fresh { build, .. } => Some((build.rec.id, i)),
            Member::Shared { .. } => None,
        })
        .collect();
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); members.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); members.len()];
    for (i, m) in members.iter_mut().enumerate() {
        if let Member::Fresh {
            build, existing, ..
        } = m
        {
            for d in &build.rec.deps {
                match index.get(d) {
                    Some(&j) => {
                        deps[i].push(j);
                        dependents[j].push(i);
                        build.pending.insert(*d);
                    }
                    None => existing.push(*d),
                }
            }
        }
    }
    // Kahn's order: a build once every dependent has its chain.
    let mut left: Vec<usize> = dependents.iter().map(Vec::len).collect();
    let mut chain = vec![1u32; members.len()];
    let mut queue: Vec<usize> = index.values().copied().filter(|&i| left[i] == 0).collect();
    while let Some(i) = queue.pop() {
        chain[i] = 1 + dependents[i].iter().map(|&k| chain[k]).max().unwrap_or(0);
        for &j in &deps[i] {
            left[j] -= 1;
            if left[j] == 0 {
                queue.push(j);
            }
        }
    }
    let ids: Vec<Option<BuildId>> = members
        .iter()
        .map(|m| match m {
            Member::Fresh { build, .. } => Some(build.rec.id),
            Member::Shared { .. } => None,
        })
        .collect();
    for (i, m) in members.iter_mut().enumerate() {
        if let Member::Fresh { build, .. } = m {
            build.chain = chain[i];
            build
                .dependents
                .extend(dependents[i].iter().filter_map(|&k| ids[k]));
        }
    }
}

impl Scheduler {
    /// Add a derivation graph, its ids from `next_id`. Derivations already
    /// known and not failed are shared (built once); new ones a builder can
    /// never take fail at once. Every record it makes is in the writes.
    ///
    /// All in one call, under the caller's lock: fine for small graphs and
    /// tests. The coordinator prepares big ones outside the lock instead
    /// ([`PlanQuery::new`], [`Scheduler::share_plan`],
    /// [`Scheduler::prepare_submission`], [`Scheduler::insert_submission`]),
    /// which this does in sequence.
    pub fn submit<E>(
        &mut self,
        g: GraphSubmission,
        now: i64,
        next_id: impl FnMut() -> Result<u64, E>,
    ) -> Result<SubmissionId, E> {
        let plan = self.share_plan(&PlanQuery::new(&g));
        let prepared = Scheduler::prepare_submission(g, &plan, now, next_id)?;
        Ok(self.insert_submission(prepared, now).sid)
    }

    /// A build the scheduler has of `drv` that a new submission may share
    /// (queued, running or built).
    pub(super) fn shareable(&self, drv: &StorePath) -> Option<BuildId> {
        self.by_drv.get(drv).copied().filter(|id| {
            self.builds.get(id).is_some_and(|b| match b.rec.state {
                BuildState::Done(o) => o.is_success(),
                _ => true,
            })
        })
    }

    /// Which of the graph's derivations existing builds cover: one lookup
    /// per derivation.
    pub fn share_plan(&self, q: &PlanQuery) -> SharePlan {
        let mut plan = SharePlan::default();
        for d in &q.members {
            if let Some(id) = self.shareable(d) {
                plan.existing.insert(d.clone(), id);
            }
        }
        for d in &q.outside {
            if let Some(id) = self.by_drv.get(d) {
                plan.outside.insert(d.clone(), *id);
            }
        }
        plan
    }

    /// Make a submission ready without the scheduler: take its ids from
    /// `next_id`, build the records of the builds it brings, and work out
    /// their chains, events and classes: the expensive part of a big
    /// submission, outside the lock. The caller may write the new builds'
    /// records ahead ([`PreparedSubmission::written_ahead`]; unfinished builds
    /// no recorded submission lists are dropped at the next start, should the
    /// coordinator die before [`Scheduler::insert_submission`]).
    pub fn prepare_submission<E>(
        g: GraphSubmission,
        plan: &SharePlan,
        now: i64,
        mut next_id: impl FnMut() -> Result<u64, E>,
    ) -> Result<PreparedSubmission, E> {
        let sid = next_id()?;
        let mut ids: HashMap<StorePath, BuildId> = HashMap::with_capacity(g.builds.len());
        let mut planned: Vec<(NewBuild, BuildId, Option<BuildId>)> = Vec::new();
        for nb in g.builds {
            if ids.contains_key(&nb.drv_path) {
                continue;
            }
            let spare = next_id()?;
            let existing = match nb.claim {
                None => plan.existing.get(&nb.drv_path).copied(),
                Some(_) => None,
            };
            ids.insert(nb.drv_path.clone(), existing.unwrap_or(spare));
            planned.push((nb, spare, existing));
        }
        let mut outside: Vec<(StorePath, BuildId)> = Vec::new();
        let mut members = Vec::with_capacity(planned.len());
        let mut classes: Vec<(String, BTreeSet<String>)> = Vec::new();
        let mut class_of: HashMap<(String, BTreeSet<String>), usize> = HashMap::new();
        for (nb, spare, existing) in planned {
            if let Some(planned) = existing {
                members.push(Member::Shared { nb, planned, spare });
                continue;
            }
            let mut deps = BTreeSet::new();
            for i in &nb.input_drvs {
                let dep = match ids.get(i) {
                    Some(d) => *d,
                    None => match plan.outside.get(i) {
                        Some(d) => {
                            outside.push((i.clone(), *d));
                            *d
                        }
                        None => continue,
                    },
                };
                if dep != spare {
                    deps.insert(dep);
                }
            }
            let class_key = (nb.system.clone(), nb.required_features.clone());
            let class = match class_of.get(&class_key) {
                Some(c) => *c,
                None => {
                    classes.push(class_key.clone());
                    class_of.insert(class_key, classes.len() - 1);
                    classes.len() - 1
                }
            };
            let rec = BuildRecord {
                id: spare,
                drv_path: nb.drv_path,
                drv_aterm: nb.drv_aterm,
                system: nb.system,
                required_features: nb.required_features,
                outputs: nb.outputs,
                deps,
                priority: g.priority,
                created_ms: now,
                submissions: BTreeSet::from([sid]),
                state: BuildState::Waiting,
                retries: 0,
                attempt: 0,
                max_silent_time_secs: g.max_silent_time_secs,
                build_timeout_secs: g.build_timeout_secs,
                error: None,
                builder: None,
                started_ms: None,
                finished_ms: None,
                requested_by: g.client.iter().cloned().collect(),
                claim: nb.claim,
            };
            members.push(Member::Fresh {
                build: Box::new(Build::new(rec)),
                inputs: nb.input_drvs,
                existing: Vec::new(),
                class,
            });
        }
        link_fresh(&mut members);
        let keys: Vec<(StorePath, BuildId)> = members
            .iter()
            .filter_map(|m| match m {
                Member::Fresh { build, .. } if build.rec.claim.is_none() => {
                    Some((build.rec.drv_path.clone(), build.rec.id))
                }
                Member::Fresh { .. } | Member::Shared { .. } => None,
            })
            .collect();
        let notices = members
            .iter()
            .filter_map(|m| match m {
                Member::Fresh { build, .. } => Some(Notice {
                    submissions: vec![sid],
                    event: Event::Queued {
                        build: build.rec.id,
                        drv_path: build.rec.drv_path.clone(),
                    },
                }),
                Member::Shared { .. } => None,
            })
            .collect();
        let record = SubmissionRecord {
            id: sid,
            roots: g.roots,
            builds: members
                .iter()
                .map(|m| match m {
                    Member::Shared { planned, .. } => *planned,
                    Member::Fresh { build, .. } => build.rec.id,
                })
                .collect(),
            cached: g.cached,
            priority: g.priority,
            created_ms: now,
            done: false,
            cancelled: false,
            client: g.client,
            finished_ms: None,
            job: g.job,
        };
        Ok(PreparedSubmission {
            sid,
            created_ms: now,
            members,
            ids,
            keys,
            outside,
            notices,
            classes,
            record,
            ahead: None,
            max_silent_time_secs: g.max_silent_time_secs,
            build_timeout_secs: g.build_timeout_secs,
        })
    }

    /// Add a prepared submission: share what is shareable now (the plan is
    /// checked again: a build that failed meanwhile gets a new one, a
    /// derivation another submission added meanwhile is shared), link the new
    /// builds, and start what can start. When nothing changed since the plan
    /// (the usual case) only what was prepared is inserted; otherwise the
    /// links, chains and events are worked out again here.
    pub fn insert_submission(&mut self, p: PreparedSubmission, now: i64) -> Inserted {
        let sid = p.sid;
        let ahead = p.ahead.is_some();
        let SubmissionRecord {
            roots,
            cached,
            priority,
            client,
            job,
            ..
        } = p.record;
        // What each member shares now, and whether that is still the plan.
        let now_shared: Vec<Option<BuildId>> = p
            .members
            .iter()
            .map(|m| {
                if m.is_claim() {
                    None
                } else {
                    self.shareable(m.drv())
                }
            })
            .collect();
        let mut drift = p.members.iter().zip(&now_shared).any(|(m, s)| match m {
            Member::Shared { planned, .. } => *s != Some(*planned),
            Member::Fresh { .. } => s.is_some(),
        });
        drift |= p
            .outside
            .iter()
            .any(|(d, id)| self.by_drv.get(d) != Some(id));
        let mut ids = p.ids;
        let n_fresh = p.keys.len();
        let mut discard: Vec<BuildId> = Vec::new();
        let mut fresh: Vec<BuildId> = Vec::with_capacity(n_fresh);
        let mut fresh_inputs: Vec<Vec<StorePath>> = Vec::with_capacity(n_fresh);
        let mut fresh_class: Vec<Option<usize>> = Vec::with_capacity(n_fresh);
        let mut shared: Vec<BuildId> = Vec::new();
        let mut sub_builds: Vec<BuildId> = Vec::with_capacity(p.members.len());
        let mut rewrite: BTreeSet<BuildId> = BTreeSet::new();
        let mut fresh_existing: Vec<(BuildId, Vec<BuildId>)> = Vec::new();
        self.builds.reserve(n_fresh);
        self.by_drv.reserve(n_fresh);
        for (m, share) in p.members.into_iter().zip(now_shared) {
            let id = match (m, share) {
                (Member::Shared { nb, .. }, Some(id)) => {
                    ids.insert(nb.drv_path, id);
                    shared.push(id);
                    id
                }
                (Member::Shared { nb, spare, .. }, None) => {
                    // What it was to share failed or went meanwhile: a build of its own.
                    let rec = BuildRecord {
                        id: spare,
                        drv_path: nb.drv_path.clone(),
                        drv_aterm: nb.drv_aterm,
                        system: nb.system,
                        required_features: nb.required_features,
                        outputs: nb.outputs,
                        deps: BTreeSet::new(),
                        priority,
                        created_ms: p.created_ms,
                        submissions: BTreeSet::from([sid]),
                        state: BuildState::Waiting,
                        retries: 0,
                        attempt: 0,
                        max_silent_time_secs: p.max_silent_time_secs,
                        build_timeout_secs: p.build_timeout_secs,
                        error: None,
                        builder: None,
                        started_ms: None,
                        finished_ms: None,
                        requested_by: client.iter().cloned().collect(),
                        claim: nb.claim.clone(),
                    };
                    if nb.claim.is_none() {
                        self.by_drv.insert(nb.drv_path.clone(), spare);
                    }
                    self.builds.insert(spare, Build::new(rec));
                    ids.insert(nb.drv_path, spare);
                    fresh.push(spare);
                    fresh_inputs.push(nb.input_drvs);
                    fresh_class.push(None);
                    rewrite.insert(spare);
                    spare
                }
                (Member::Fresh { build, .. }, Some(id)) => {
                    // Another submission added it meanwhile.
                    if ahead {
                        discard.push(build.rec.id);
                    }
                    ids.insert(build.rec.drv_path.clone(), id);
                    shared.push(id);
                    id
                }
                (
                    Member::Fresh {
                        build,
                        inputs,
                        existing,
                        class,
                    },
                    None,
                ) => {
                    let own = build.rec.id;
                    if drift && build.rec.claim.is_none() {
                        self.by_drv.insert(build.rec.drv_path.clone(), own);
                    }
                    self.builds.insert(own, *build);
                    if !ahead {
                        rewrite.insert(own);
                    }
                    fresh.push(own);
                    fresh_inputs.push(inputs);
                    if !existing.is_empty() {
                        fresh_existing.push((own, existing));
                    }
                    fresh_class.push(Some(class));
                    own
                }
            };
            sub_builds.push(id);
        }
        if !drift {
            self.by_drv.extend(p.keys);
        }
        for &id in &shared {
            let Some(b) = self.builds.get_mut(&id) else {
                continue;
            };
            b.rec_mut().submissions.insert(sid);
            b.rec_mut().requested_by.extend(client.iter().cloned());
            if priority > b.rec.priority {
                let queued = b.rec.state == BuildState::Queued;
                if queued {
                    let (class, key) = (b.class(), b.key());
                    if let Some(q) = self.ready.get_mut(&class) {
                        q.remove(&key);
                    }
                    b.rec_mut().priority = priority;
                    let key = b.key();
                    self.ready.entry(class).or_default().insert(key);
                } else {
                    b.rec_mut().priority = priority;
                }
            }
            self.persist_build(id);
        }
        // Link the new builds to what they depend on. As prepared, they are
        // linked among themselves: only links to builds the scheduler had are
        // made here. After a change, every link is made again from the inputs.
        let mut existing_deps: BTreeSet<BuildId> = BTreeSet::new();
        if drift {
            for &id in &fresh {
                let b = self.builds.get_mut(&id).expect("fresh build exists");
                b.dependents.clear();
                b.pending.clear();
            }
            fresh_existing = fresh
                .iter()
                .zip(&fresh_inputs)
                .map(|(&id, inputs)| {
                    let deps: Vec<BuildId> = inputs
                        .iter()
                        .filter_map(|i| ids.get(i).or_else(|| self.by_drv.get(i)).copied())
                        .filter(|d| *d != id)
                        .collect();
                    (id, deps)
                })
                .collect();
        }
        for (id, deps) in &fresh_existing {
            let mut linked = BTreeSet::new();
            let mut pending = Vec::new();
            for &dep in deps {
                let Some(d) = self.builds.get_mut(&dep) else {
                    continue;
                };
                d.dependents.insert(*id);
                if !d.rec.state.is_terminal() {
                    pending.push(dep);
                }
                existing_deps.insert(dep);
                linked.insert(dep);
            }
            let b = self.builds.get_mut(id).expect("fresh build exists");
            b.pending.extend(pending);
            if drift {
                if b.rec.deps != linked {
                    b.rec_mut().deps = linked;
                    rewrite.insert(*id);
                }
            } else if linked.len() != deps.len() {
                // A dependency went meanwhile (it counts as done).
                for d in deps {
                    if !linked.contains(d) {
                        b.rec_mut().deps.remove(d);
                    }
                }
                rewrite.insert(*id);
            }
        }
        for id in rewrite {
            self.persist_build(id);
        }
        sub_builds.sort_unstable();
        let sub = SubmissionRecord {
            id: sid,
            roots,
            builds: sub_builds.into_iter().collect(),
            cached,
            priority,
            created_ms: p.created_ms,
            done: false,
            cancelled: false,
            client,
            finished_ms: None,
            job,
        };
        let n_builds = sub.builds.len();
        let n_cached = sub.cached.len();
        self.submissions.insert(sid, Arc::new(sub));
        match p.ahead {
            Some(encoded) if !drift => self.writes.push(Write::NewSubmission { id: sid, encoded }),
            _ => self.persist_submission(sid),
        }
        self.record_job_run(sid, None);
        tracing::info!(
            submission = %format!("s{sid}"),
            builds = n_builds,
            new = fresh.len(),
            cached = n_cached,
            "submission accepted"
        );
        if drift {
            self.recompute_chains(fresh.clone());
            for &id in &fresh {
                self.notify(
                    id,
                    Event::Queued {
                        build: id,
                        drv_path: self.builds[&id].rec.drv_path.clone(),
                    },
                );
            }
        } else {
            // The new builds' chains were worked out ahead; what they depend
            // on outside this submission grows by them.
            if !existing_deps.is_empty() {
                self.recompute_chains(existing_deps.into_iter().collect());
            }
            self.notices.extend(p.notices);
        }
        // Builds no builder can take fail now (their dependents with them);
        // the verdict is the same for every build of a class.
        let verdicts: Vec<bool> = p
            .classes
            .iter()
            .map(|(system, features)| self.capable_builder_recently(system, features, now))
            .collect();
        for (&id, class) in fresh.iter().zip(&fresh_class) {
            if class.is_some_and(|c| verdicts[c]) {
                continue;
            }
            let Some(b) = self.builds.get(&id) else {
                continue;
            };
            if b.rec.state.is_terminal() {
                continue;
            }
            if let Err(msg) = self.schedulable(
                &b.rec.system,
                &b.rec.required_features,
                &b.rec.drv_path,
                now,
            ) {
                self.finish(id, Outcome::Unschedulable, Some(msg), now);
            }
        }
        for &id in &fresh {
            let Some(b) = self.builds.get(&id) else {
                continue;
            };
            if b.rec.state == BuildState::Waiting && b.pending.is_empty() {
                self.actions.push(Action::Prepare { build: id });
            }
        }
        self.check_submission(sid, now);
        Inserted {
            sid,
            discard,
            leftovers: Leftovers {
                _ids: ids,
                _inputs: fresh_inputs,
            },
        }
    }

    /// Mark a submission done once every build of it ended (or it was
    /// cancelled and nothing of it runs), then forget what it alone held.
    pub(super) fn check_submission(&mut self, sid: SubmissionId, now: i64) {
        let Some(sub) = self.submissions.get(&sid) else {
            return;
        };
        if sub.done {
            return;
        }
        // Builds end for good, so the first unfinished one only moves
        // forward: each check starts where the last one stopped (linear in
        // the submission's size over its whole life, not per check).
        if !sub.cancelled {
            let from = self.open_from.get(&sid).copied().unwrap_or(0);
            let open = sub.builds.range(from..).find(|id| {
                self.builds
                    .get(id)
                    .is_some_and(|b| !b.rec.state.is_terminal())
            });
            if let Some(&open) = open {
                self.open_from.insert(sid, open);
                return;
            }
        }
        let mut built = 0u32;
        let mut cached = sub.cached.len() as u32;
        let mut failed = 0u32;
        for id in &sub.builds {
            match self.builds.get(id).map(|b| &b.rec.state) {
                Some(BuildState::Done(Outcome::Built)) => built += 1,
                Some(BuildState::Done(Outcome::Cached)) => cached += 1,
                Some(BuildState::Done(_)) => failed += 1,
                Some(_) if !sub.cancelled => return,
                Some(_) => failed += 1,
                None => built += 1,
            }
        }
        let success = failed == 0 && !sub.cancelled;
        let sub = Arc::make_mut(self.submissions.get_mut(&sid).expect("checked above"));
        sub.done = true;
        sub.finished_ms = Some(now);
        tracing::info!(submission = %format!("s{sid}"), success, built, cached, failed, "submission done");
        // Before the submission's own record: see `domain::jobs`.
        self.record_job_run(sid, Some((success, built, cached, failed)));
        self.persist_submission(sid);
        self.notices.push(Notice {
            submissions: vec![sid],
            event: Event::SubmissionDone {
                submission: sid,
                success,
                built,
                cached,
                failed,
            },
        });
        self.evict(sid);
    }

    /// Forget, in memory, finished builds no unfinished submission needs (the
    /// store keeps them for logs).
    fn evict(&mut self, sid: SubmissionId) {
        let Some(sub) = self.submissions.get(&sid) else {
            return;
        };
        let ids: Vec<BuildId> = sub.builds.iter().copied().collect();
        for id in ids {
            let keep = self.builds.get(&id).is_none_or(|b| {
                !b.rec.state.is_terminal()
                    || b.rec
                        .submissions
                        .iter()
                        .any(|s| self.submissions.get(s).is_some_and(|s| !s.done))
                    || b.dependents.iter().any(|d| {
                        self.builds
                            .get(d)
                            .is_some_and(|d| !d.rec.state.is_terminal())
                    })
            });
            if !keep && let Some(b) = self.builds.remove(&id) {
                if self.by_drv.get(&b.rec.drv_path) == Some(&id) {
                    self.by_drv.remove(&b.rec.drv_path);
                }
                for d in &b.rec.deps {
                    if let Some(db) = self.builds.get_mut(d) {
                        db.dependents.remove(&id);
                    }
                }
            }
        }
        self.submissions.remove(&sid);
        self.open_from.remove(&sid);
    }

    /// Cancel a submission: builds only it needs are cancelled; shared builds go
    /// on for the others. Returns how many builds were cancelled.
    pub fn cancel_submission(&mut self, sid: SubmissionId, now: i64) -> u32 {
        let Some(sub) = self.submissions.get_mut(&sid) else {
            return 0;
        };
        if sub.done {
            return 0;
        }
        let sub = Arc::make_mut(sub);
        sub.cancelled = true;
        let ids: Vec<BuildId> = sub.builds.iter().copied().collect();
        self.persist_submission(sid);
        let mut n = 0;
        for id in ids {
            let Some(b) = self.builds.get_mut(&id) else {
                continue;
            };
            if b.rec.state.is_terminal() {
                continue;
            }
            let others = b
                .rec
                .submissions
                .iter()
                .any(|s| *s != sid && self.submissions.get(s).is_some_and(|s| !s.done));
            if !others {
                n += self.cancel_build(id, now);
            }
        }
        self.check_submission(sid, now);
        n
    }
}
