//! The builder registry: a builder joins (its name bound to one key),
//! leaves, reports its load, is drained, or is forgotten after the retention.

use super::*;

/// A builder name is bound to another key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the builder name {name} belongs to another key")]
pub struct NameTaken {
    pub name: String,
}

impl Scheduler {
    /// An authenticated builder joins under `name` if the name is free, is
    /// bound to `public_key` already, or is bound to `replaces` (a key the
    /// caller found no longer enrolled): the check and the binding are one
    /// step, so of two keys racing for a new name exactly one gets it.
    pub fn builder_join(
        &mut self,
        name: &str,
        public_key: &str,
        replaces: Option<&str>,
        caps: Capabilities,
        running_jobs: &[String],
        now: i64,
    ) -> Result<(u64, bool), NameTaken> {
        if let Some(e) = self.entry(name) {
            let bound = e.rec.public_key.as_str();
            if bound != public_key && Some(bound) != replaces {
                tracing::warn!(
                    builder = name,
                    "refused builder: name belongs to another key"
                );
                return Err(NameTaken {
                    name: name.to_owned(),
                });
            }
        }
        Ok(self.builder_connected(name, public_key, caps, running_jobs, now))
    }

    /// Forget builders not seen for `older_than_ms` (offline, nothing
    /// running): their records and their names' bindings. Returns their names.
    pub fn forget_builders(&mut self, now: i64, older_than_ms: i64) -> Vec<String> {
        let cutoff = now.saturating_sub(older_than_ms);
        let mut gone: Vec<String> = self
            .entries()
            .filter(|e| !e.online && e.running.is_empty() && e.rec.last_seen_ms < cutoff)
            .map(|e| e.rec.name.clone())
            .collect();
        gone.sort();
        for name in &gone {
            if let Some(bx) = self.bx(name) {
                self.remove_builder(bx);
            }
            self.writes.push(Write::ForgetBuilder(name.clone()));
            tracing::info!(builder = %name, "builder record removed: not seen within the retention");
        }
        gone
    }

    /// An authenticated builder joined (or came back). `running_jobs` are the
    /// job ids it still holds: running, or ended with a result it kept while
    /// disconnected and sends next (`Hello.finished_jobs`). Those stay running
    /// there, without a retry, until their result comes; builds we had on it
    /// that it does not report are requeued; jobs it reports that are not ours
    /// to run there are cancelled (which also tells it to drop a kept result).
    /// Returns the connection number and whether it is drained.
    pub fn builder_connected(
        &mut self,
        name: &str,
        public_key: &str,
        caps: Capabilities,
        running_jobs: &[String],
        now: i64,
    ) -> (u64, bool) {
        let conn = self.next_conn;
        self.next_conn += 1;
        let draining = self.entry(name).is_some_and(|e| e.rec.draining);
        let rec = BuilderRecord {
            name: name.to_owned(),
            public_key: public_key.to_owned(),
            capabilities: caps,
            last_seen_ms: now,
            draining,
        };
        let bx = match self.bx(name) {
            Some(bx) => bx,
            None => self.add_builder(BuilderEntry::new(rec.clone(), true, conn, None)),
        };
        let entry = self.builders[bx as usize]
            .as_mut()
            .expect("the slot of a known name is taken");
        entry.rec = rec;
        entry.online = true;
        entry.conn = conn;
        entry.disconnected_ms = None;
        let ours: Vec<BuildId> = entry.running.iter().copied().collect();
        self.regroup(bx);
        self.persist_builder(name);
        tracing::info!(builder = name, conn, draining, "builder online");
        let reported: HashSet<&str> = running_jobs.iter().map(String::as_str).collect();
        for id in ours {
            let still = match &self.builds.get(&id).map(|b| &b.rec.state) {
                Some(BuildState::Running { job_id, .. }) => reported.contains(job_id.as_str()),
                _ => false,
            };
            if !still {
                self.requeue(id, now, "its builder reconnected without it", true);
            }
        }
        for job in running_jobs {
            let ok = parse_job_id(job).is_some_and(|(id, _)| {
                matches!(self.builds.get(&id).map(|b| &b.rec.state),
                    Some(BuildState::Running { builder, job_id, .. }) if builder == name && job_id == job)
            });
            if !ok {
                self.actions.push(Action::Cancel {
                    builder: name.to_owned(),
                    job_id: job.clone(),
                });
            }
        }
        (conn, draining)
    }

    /// A builder's stream ended. Its jobs wait `grace_ms` for it to come back.
    pub fn builder_disconnected(&mut self, name: &str, conn: u64, now: i64) {
        let Some(bx) = self.bx(name) else {
            return;
        };
        let Some(e) = self.builders[bx as usize].as_mut() else {
            return;
        };
        if e.conn != conn || !e.online {
            return;
        }
        e.online = false;
        e.disconnected_ms = Some(now);
        e.rec.last_seen_ms = now;
        tracing::info!(builder = name, running = e.running.len(), "builder offline");
        self.relist(bx);
        self.persist_builder(name);
    }

    /// A load report.
    pub fn builder_load(&mut self, name: &str, load: Load, now: i64) {
        let Some(bx) = self.bx(name) else {
            return;
        };
        if let Some(e) = self.builders[bx as usize].as_mut() {
            e.load = load;
            e.rec.last_seen_ms = now;
            self.relist(bx);
        }
    }

    /// Drain (or undrain) a builder; false when unknown.
    pub fn set_drain(&mut self, name: &str, draining: bool) -> bool {
        let Some(bx) = self.bx(name) else {
            return false;
        };
        let Some(e) = self.builders[bx as usize].as_mut() else {
            return false;
        };
        e.rec.draining = draining;
        let online = e.online;
        self.relist(bx);
        tracing::info!(builder = name, draining, "builder drain changed");
        self.persist_builder(name);
        if online {
            self.actions.push(Action::Drain {
                builder: name.to_owned(),
                draining,
            });
        }
        true
    }
}
