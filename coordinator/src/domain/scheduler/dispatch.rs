//! A build from runnable to running to ended: input closures resolved,
//! matching to builders, job results, cancels, requeues and retries, and the
//! periodic tick (grace periods, the bounded wait for a matching builder).

use super::*;

/// How a job ended, as the builder reported it (and, for `Built`, as verified
/// against the cache by the caller).
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    Built,
    /// The build itself failed: permanent.
    Failed(String),
    TimedOut(String),
    /// Inputs, uploads, the builder itself, or outputs missing from the cache: worth a retry.
    Transient(String),
}

impl Scheduler {
    /// Whether some builder can take this kind of work now or soon; else why not.
    pub(super) fn schedulable(
        &self,
        system: &str,
        required: &BTreeSet<String>,
        drv: &StorePath,
        now: i64,
    ) -> Result<(), String> {
        if self.capable_builder_recently(system, required, now) {
            return Ok(());
        }
        Err(self.unschedulable_message(drv, system, required, now))
    }

    /// Whether a builder that can take this kind of work is online or was seen recently.
    pub(super) fn capable_builder_recently(
        &self,
        system: &str,
        required: &BTreeSet<String>,
        now: i64,
    ) -> bool {
        self.by_system.get(system).is_some_and(|slots| {
            slots.iter().any(|&bx| {
                self.builders[bx as usize].as_ref().is_some_and(|e| {
                    e.rec.capabilities.can_build(system, required)
                        && (e.online || e.rec.last_seen_ms >= now - self.cfg.recent_window_ms)
                })
            })
        })
    }

    fn unschedulable_message(
        &self,
        drv: &StorePath,
        system: &str,
        required: &BTreeSet<String>,
        now: i64,
    ) -> String {
        let mut known: Vec<select::Known<'_>> = self
            .entries()
            .filter(|e| e.online || e.rec.last_seen_ms >= now - self.cfg.recent_window_ms)
            .map(|e| select::Known {
                name: &e.rec.name,
                caps: &e.rec.capabilities,
            })
            .collect();
        known.sort_by(|a, b| a.name.cmp(b.name));
        select::unschedulable_message(drv, system, required, &known)
    }

    /// A build's input closure is resolved: it is runnable.
    pub fn set_ready(&mut self, id: BuildId, inputs: Vec<(StorePath, u64)>) {
        if !self
            .builds
            .get(&id)
            .is_some_and(|b| b.rec.state == BuildState::Waiting && b.pending.is_empty())
        {
            return;
        }
        let inputs: Closure = inputs
            .into_iter()
            .map(|(p, size)| (self.intern(p), size))
            .collect();
        if let Some(b) = self.builds.get_mut(&id) {
            b.inputs = Some(inputs);
        }
        self.set_state(id, BuildState::Queued);
    }

    /// Its outputs are already in the cache: done without building.
    pub fn set_cached(&mut self, id: BuildId, now: i64) {
        if self
            .builds
            .get(&id)
            .is_some_and(|b| !b.rec.state.is_terminal())
        {
            self.finish(id, Outcome::Cached, None, now);
        }
    }

    /// Its inputs cannot be resolved (missing from the cache): it fails.
    pub fn prepare_failed(&mut self, id: BuildId, error: String, now: i64) {
        if self
            .builds
            .get(&id)
            .is_some_and(|b| !b.rec.state.is_terminal())
        {
            self.finish(id, Outcome::Failed, Some(error), now);
        }
    }

    /// End a build: record, notify, release or fail dependents, close submissions.
    pub(super) fn finish(
        &mut self,
        id: BuildId,
        outcome: Outcome,
        error: Option<String>,
        now: i64,
    ) -> u32 {
        let mut ended = 0;
        let mut work = vec![(id, outcome, error)];
        let mut touched_subs: BTreeSet<SubmissionId> = BTreeSet::new();
        while let Some((id, outcome, error)) = work.pop() {
            let Some(b) = self.builds.get_mut(&id) else {
                continue;
            };
            if b.rec.state.is_terminal() {
                continue;
            }
            if let BuildState::Running { builder, .. } = &b.rec.state
                && let Some(bx) = self.by_name.get(builder.as_str()).copied()
            {
                if let Some(e) = self.builders[bx as usize].as_mut() {
                    e.running.remove(&id);
                }
                self.relist(bx);
            }
            let b = self.builds.get_mut(&id).expect("checked above");
            ended += 1;
            b.rec_mut().error = error.clone();
            b.rec_mut().finished_ms = Some(now);
            b.inputs = None;
            touched_subs.extend(b.rec.submissions.iter().copied());
            self.set_state(id, BuildState::Done(outcome));
            self.actions.push(Action::BuildEnded { build: id });
            let b = &self.builds[&id];
            let event = Event::Finished {
                build: id,
                drv_path: b.rec.drv_path.clone(),
                outcome,
                error: error.clone(),
                outputs: if outcome.is_success() {
                    b.rec.outputs.clone()
                } else {
                    BTreeMap::new()
                },
                builder: b.rec.builder.clone(),
                started_ms: b.rec.started_ms,
                finished_ms: b.rec.finished_ms,
            };
            if !outcome.is_success() {
                self.recent_failures.push_front(FailureView {
                    build: id,
                    drv_path: b.rec.drv_path.clone(),
                    builder: b.rec.builder.clone(),
                    error: error.clone().unwrap_or_else(|| format!("{outcome:?}")),
                    finished_ms: now,
                });
                self.recent_failures.truncate(RECENT_FAILURES);
            }
            self.notify(id, event);
            let dependents: Vec<BuildId> = self.builds[&id].dependents.iter().copied().collect();
            let drv = self.builds[&id].rec.drv_path.clone();
            for d in dependents {
                let Some(db) = self.builds.get_mut(&d) else {
                    continue;
                };
                db.pending.remove(&id);
                if db.rec.state.is_terminal() {
                    continue;
                }
                if outcome.is_success() {
                    if db.pending.is_empty() && db.rec.state == BuildState::Waiting {
                        self.actions.push(Action::Prepare { build: d });
                    }
                } else {
                    work.push((
                        d,
                        Outcome::DependencyFailed,
                        Some(format!("dependency {drv} did not build")),
                    ));
                }
            }
        }
        for sid in touched_subs {
            self.check_submission(sid, now);
        }
        ended
    }

    /// Put a build back in the queue after losing its run; past the retry limit it fails.
    pub(super) fn requeue(&mut self, id: BuildId, now: i64, why: &str, counts: bool) {
        let Some(b) = self.builds.get_mut(&id) else {
            return;
        };
        if b.rec.state.is_terminal() {
            return;
        }
        if let BuildState::Running { builder, .. } = &b.rec.state
            && let Some(bx) = self.by_name.get(builder.as_str()).copied()
        {
            if let Some(e) = self.builders[bx as usize].as_mut() {
                e.running.remove(&id);
            }
            self.relist(bx);
        }
        let b = self.builds.get_mut(&id).expect("checked above");
        if counts {
            b.rec_mut().retries += 1;
        }
        if b.rec.retries > self.cfg.max_retries {
            let msg = format!("gave up after {} attempts; last: {why}", b.rec.retries);
            self.finish(id, Outcome::Failed, Some(msg), now);
            return;
        }
        tracing::info!(build = %format!("b{id}"), retries = b.rec.retries, why, "build requeued");
        self.requeues += 1;
        if b.inputs.is_some() {
            self.set_state(id, BuildState::Queued);
        } else {
            self.set_state(id, BuildState::Waiting);
            self.actions.push(Action::Prepare { build: id });
        }
        self.notify(
            id,
            Event::Queued {
                build: id,
                drv_path: self.builds[&id].rec.drv_path.clone(),
            },
        );
    }

    /// Periodic work: requeue the jobs of builders gone past their grace period,
    /// and fail runnable work whose wait for a matching builder ran out.
    pub fn tick(&mut self, now: i64) {
        let mut expired: Vec<(String, Vec<BuildId>)> = self
            .entries()
            .filter(|e| {
                !e.online
                    && !e.running.is_empty()
                    && e.disconnected_ms
                        .is_some_and(|t| now - t >= self.cfg.grace_ms)
            })
            .map(|e| (e.rec.name.clone(), e.running.iter().copied().collect()))
            .collect();
        expired.sort();
        for (name, ids) in expired {
            for id in ids {
                self.requeue(id, now, &format!("builder {name} vanished"), true);
            }
        }
        let classes: Vec<Class> = self.ready.keys().cloned().collect();
        self.unmatched_since.retain(|c, _| classes.contains(c));
        for class in classes {
            let online_capable = self.by_system.get(&class.system).is_some_and(|slots| {
                slots.iter().any(|&bx| {
                    self.builders[bx as usize].as_ref().is_some_and(|e| {
                        e.online && e.rec.capabilities.can_build(&class.system, &class.features)
                    })
                })
            });
            if online_capable {
                self.unmatched_since.remove(&class);
                continue;
            }
            let since = *self.unmatched_since.entry(class.clone()).or_insert(now);
            let ids: Vec<BuildId> = self.ready[&class].iter().map(|k| k.id).collect();
            let Some(first) = ids.first() else { continue };
            let drv = self.builds[first].rec.drv_path.clone();
            let verdict = self.schedulable(&class.system, &class.features, &drv, now);
            let expired = now - since >= self.cfg.unschedulable_wait_ms;
            let msg = match verdict {
                Err(msg) => msg,
                Ok(()) if expired => format!(
                    "{}; waited {}s for a matching builder to come back",
                    self.unschedulable_message(&drv, &class.system, &class.features, now),
                    (now - since) / 1000
                ),
                Ok(()) => continue,
            };
            for id in ids {
                self.finish(id, Outcome::Unschedulable, Some(msg.clone()), now);
            }
            self.unmatched_since.remove(&class);
        }
    }

    /// Match runnable builds to builders with free slots, best first: the
    /// best head among the classes some free, capable builder can take, on
    /// the builder with the lowest score (ties to the lower name; see
    /// [`free::choose`], which finds it without walking every builder).
    pub fn dispatch(&mut self, now: i64) {
        let mut capable: Vec<usize> = Vec::new();
        loop {
            let mut best: Option<(ReadyKey, &Class)> = None;
            for (class, queue) in &self.ready {
                let Some(head) = queue.first() else { continue };
                if best.as_ref().is_some_and(|(k, _)| k <= head) {
                    continue;
                }
                if self
                    .groups
                    .iter()
                    .any(|g| g.has_free() && g.can_build(class))
                {
                    best = Some((*head, class));
                }
            }
            let Some((key, class)) = best else {
                break;
            };
            self.free_groups(class, &mut capable);
            let id = key.id;
            let inputs = self.builds[&id].inputs.as_deref().unwrap_or(&[]);
            let chosen = free::choose(
                &self.builders,
                &self.groups,
                &capable,
                &self.holders,
                &mut self.marks,
                inputs,
            )
            .expect("a capable group has a free builder");
            self.start(id, chosen, now);
        }
    }

    fn start(&mut self, id: BuildId, bx: free::Bx, now: i64) {
        let name: Arc<str> = self.builders[bx as usize]
            .as_ref()
            .expect("a chosen builder exists")
            .name
            .clone();
        let builder: &str = &name;
        let b = self.builds.get_mut(&id).expect("queued build exists");
        let rec = b.rec_mut();
        rec.attempt += 1;
        rec.builder = Some(builder.to_owned());
        rec.started_ms = Some(now);
        let job = job_id(id, b.rec.attempt);
        // The closure goes with the job; a requeue resolves it again.
        let inputs: Vec<Arc<StorePath>> = b
            .inputs
            .take()
            .map(|v| v.iter().map(|(p, _)| p.clone()).collect())
            .unwrap_or_default();
        let assignment = Assignment {
            builder: builder.to_owned(),
            build: id,
            job_id: job.clone(),
            drv_path: b.rec.drv_path.clone(),
            drv_aterm: b.rec.drv_aterm.clone(),
            input_paths: inputs.clone(),
            max_silent_time_secs: b.rec.max_silent_time_secs,
            build_timeout_secs: b.rec.build_timeout_secs,
            claim: b.rec.claim.clone(),
        };
        let drv = b.rec.drv_path.clone();
        self.set_state(
            id,
            BuildState::Running {
                builder: builder.to_owned(),
                job_id: job,
                started_ms: now,
            },
        );
        let e = self.builders[bx as usize]
            .as_mut()
            .expect("a chosen builder exists");
        e.running.insert(id);
        if e.held.len() + inputs.len() > MAX_HELD_PATHS {
            self.forget_held(bx);
        }
        self.hold(bx, inputs);
        self.relist(bx);
        self.actions.push(Action::Dispatch(assignment));
        self.notify(
            id,
            Event::Started {
                build: id,
                drv_path: drv,
                builder: builder.to_owned(),
            },
        );
    }

    /// The build of a job, if `builder` is running that exact job now.
    pub fn running_job(&self, builder: &str, job: &str) -> Option<BuildId> {
        let (id, _) = parse_job_id(job)?;
        match &self.builds.get(&id)?.rec.state {
            BuildState::Running {
                builder: b, job_id, ..
            } if b == builder && job_id == job => Some(id),
            _ => None,
        }
    }

    /// `builder` reports it started `job`: how long ago its build became
    /// runnable (once per attempt; `None` for a job not running there).
    pub fn job_started(&mut self, builder: &str, job: &str) -> Option<std::time::Duration> {
        let id = self.running_job(builder, job)?;
        let at = self.builds.get_mut(&id)?.runnable_at.take()?;
        Some(at.elapsed())
    }

    /// Whether `path` is an output of a build `builder` is running now: the only
    /// paths a builder may upload (anything else it could publish, signed by the
    /// farm, would later be taken as a cached build result).
    pub fn is_expected_output(&self, builder: &str, path: &StorePath) -> bool {
        self.output_upload(builder, None, path).is_some()
    }

    /// Whose an upload of `path` by `builder` is, when it is an output of a
    /// job running there (of job `job` when the builder names it):
    /// `Some(None)` published signed, `Some(Some(owner))` that owner's claim
    /// (an output of a claim job), `None` refused. Without a job named, any
    /// claim job's output is a claim (an upload is never signed on the
    /// strength of a guess), and one claimed by two owners is refused.
    pub fn output_upload(
        &self,
        builder: &str,
        job: Option<&str>,
        path: &StorePath,
    ) -> Option<Option<String>> {
        let e = self.entry(builder)?;
        let mut signed = false;
        let mut owners: BTreeSet<&String> = BTreeSet::new();
        for id in &e.running {
            let Some(b) = self.builds.get(id) else {
                continue;
            };
            let BuildState::Running {
                builder: on,
                job_id,
                ..
            } = &b.rec.state
            else {
                continue;
            };
            if on != builder
                || job.is_some_and(|j| j != job_id)
                || !b.rec.outputs.values().any(|o| o == path)
            {
                continue;
            }
            match &b.rec.claim {
                None => signed = true,
                Some(o) => {
                    owners.insert(o);
                }
            }
        }
        match owners.len() {
            0 if signed => Some(None),
            1 => owners.pop_first().map(|o| Some(o.clone())),
            _ => None,
        }
    }

    /// A builder reported how a job ended (a `Built` already checked against the cache).
    pub fn job_ended(&mut self, builder: &str, job: &str, end: JobEnd, now: i64) {
        let Some(id) = self.running_job(builder, job) else {
            tracing::info!(
                builder,
                job,
                "result for a job that is not running there; ignored"
            );
            return;
        };
        match end {
            JobEnd::Built => {
                let outputs: Vec<Arc<StorePath>> = self.builds[&id]
                    .rec
                    .outputs
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
                    .into_iter()
                    .map(|p| self.intern(p))
                    .collect();
                if let Some(bx) = self.bx(builder) {
                    self.hold(bx, outputs);
                }
                self.sweep_paths();
                self.finish(id, Outcome::Built, None, now);
            }
            JobEnd::Failed(msg) => {
                self.finish(id, Outcome::Failed, Some(msg), now);
            }
            JobEnd::TimedOut(msg) => {
                self.finish(id, Outcome::TimedOut, Some(msg), now);
            }
            JobEnd::Transient(msg) => {
                if let Some(b) = self.builds.get_mut(&id) {
                    b.rec_mut().error = Some(msg.clone());
                }
                self.requeue(id, now, &msg, true);
            }
        }
    }

    /// Cancel a build (and, with it, what depends on it). Returns how many builds ended.
    pub fn cancel_build(&mut self, id: BuildId, now: i64) -> u32 {
        let Some(b) = self.builds.get(&id) else {
            return 0;
        };
        if b.rec.state.is_terminal() {
            return 0;
        }
        if let BuildState::Running {
            builder, job_id, ..
        } = &b.rec.state
        {
            self.actions.push(Action::Cancel {
                builder: builder.clone(),
                job_id: job_id.clone(),
            });
        }
        self.finish(id, Outcome::Cancelled, Some("cancelled".into()), now)
    }
}
