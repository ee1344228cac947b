//! Submitted derivation graphs and the cache-facing side of builds: read the
//! `.drv` closure from the cache (skipping every derivation whose outputs the
//! cache has, and not descending below it), check that every derivation's
//! declared output paths are the ones Nix computes for it (hashDerivationModulo,
//! bottom-up over the whole `.drv` closure, memoised per submission), hand
//! the rest to the scheduler;
//! resolve a runnable build's input closure in dependency order; check a
//! reported build's outputs; store its log.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use farm_nix::Hash;
use farm_nix::derivation::{BasicDerivation, Derivation};
use farm_nix::store_path::StorePath;

use crate::domain::coordinator::{Coordinator, Prepared};
use crate::domain::error::DomainError;
use crate::domain::model::{BuildId, Priority, SubmissionId};
use crate::domain::scheduler::{GraphSubmission, NewBuild};

/// Most derivations in one submitted graph.
pub const MAX_GRAPH: usize = 200_000;

/// What a submission asks for.
#[derive(Debug, Clone)]
pub enum Root {
    /// A derivation whose `.drv` file (and sources) are in the cache; its
    /// input derivations come along.
    Drv(StorePath),
    /// A build hook's derivation (Nix's `BuildDerivation`): no `.drv` in the
    /// cache, no input derivations; its sources are the whole input closure,
    /// which must be in the cache. Its `.drv` text is rebuilt from it.
    ///
    /// `owner`: `None` when the client has the push right (its build is
    /// signed and shared, as Nix trusts its trusted users); else the client's
    /// key fingerprint, and then, unless the farm verified the derivation
    /// (the real `.drv` is in the cache, this is it with its inputs resolved,
    /// and every input is signed), it is a claim build of that owner
    /// ([`crate::domain::model::BuildRecord::claim`]).
    Basic {
        drv_path: StorePath,
        drv: BasicDerivation,
        owner: Option<String>,
    },
}

/// `.drv` reads in flight while a submission reads what it must check.
const PREFETCH: usize = 16;

/// The `.drv` files one submission read, and the modulo hashes of those
/// whose output paths were checked.
#[derive(Default)]
struct DrvMemo {
    read: HashMap<StorePath, (Vec<u8>, Derivation)>,
    modulo: HashMap<StorePath, Hash>,
}

/// How a submission is to be built.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    pub priority: Priority,
    pub max_silent_time_secs: u64,
    pub build_timeout_secs: u64,
    /// Who asks (key fingerprint and comment, or `local`); recorded with the builds.
    pub client: Option<String>,
    /// The named job to record it under (a valid name: `farm_proto::job`).
    pub job: Option<String>,
}

/// Dependencies first: each path after every path it references (within `infos`).
pub fn dependency_order(
    infos: &BTreeMap<StorePath, (BTreeSet<StorePath>, u64)>,
) -> Vec<(StorePath, u64)> {
    let mut out = Vec::with_capacity(infos.len());
    let mut done: HashSet<&StorePath> = HashSet::new();
    for root in infos.keys() {
        if done.contains(root) {
            continue;
        }
        // Iterative post-order DFS.
        let mut stack: Vec<(&StorePath, bool)> = vec![(root, false)];
        let mut on_stack: HashSet<&StorePath> = HashSet::new();
        while let Some((p, expanded)) = stack.pop() {
            if done.contains(p) {
                continue;
            }
            if expanded {
                done.insert(p);
                on_stack.remove(p);
                out.push((p.clone(), infos[p].1));
                continue;
            }
            on_stack.insert(p);
            stack.push((p, true));
            for r in &infos[p].0 {
                if r != p && infos.contains_key(r) && !done.contains(r) && !on_stack.contains(r) {
                    stack.push((r, false));
                }
            }
        }
    }
    out
}

impl Coordinator {
    /// The text of a `.drv` file in the cache (its NAR holds one regular file).
    pub async fn read_drv(&self, drv: &StorePath) -> Result<Option<Vec<u8>>, DomainError> {
        let reader = self.cache().nar_reader(drv).await?;
        let Some(mut reader) = reader else {
            return Ok(None);
        };
        farm_nix::derivation::read_drv(&mut reader)
            .await
            .map(Some)
            .map_err(|e| DomainError::Invalid(format!("{drv} is not a derivation file: {e}")))
    }

    async fn parsed_drv(&self, drv: &StorePath) -> Result<(Vec<u8>, Derivation), DomainError> {
        let text = self.read_drv(drv).await?.ok_or_else(|| {
            DomainError::Invalid(format!("{drv} is not in the farm's cache; upload it first"))
        })?;
        let parsed = Derivation::parse_aterm(&text)
            .map_err(|e| DomainError::Invalid(format!("{drv}: {e}")))?;
        Ok((text, parsed))
    }

    /// `drv` parsed, after checking the output paths of every derivation in
    /// its `.drv` closure (inputs first, each once per submission): a
    /// derivation whose declared outputs are not the ones Nix computes is
    /// refused. What the cache's memo knows was checked already (at its
    /// upload, or by an earlier submission: [`crate::cache::DrvHashes`]) and
    /// is neither read nor checked again, nor are its inputs.
    async fn checked_drv(
        &self,
        drv: &StorePath,
        memo: &mut DrvMemo,
    ) -> Result<(Vec<u8>, Derivation), DomainError> {
        let hashes = self.cache().drv_hashes();
        self.prefetch_unchecked(drv, memo).await?;
        let mut stack: Vec<(StorePath, bool)> = vec![(drv.clone(), false)];
        let mut on_stack: HashSet<StorePath> = HashSet::new();
        while let Some((p, expanded)) = stack.pop() {
            if memo.modulo.contains_key(&p) {
                continue;
            }
            if !expanded && let Some(h) = hashes.get(&p) {
                memo.modulo.insert(p, h);
                continue;
            }
            if !memo.read.contains_key(&p) {
                let got = self.parsed_drv(&p).await?;
                memo.read.insert(p.clone(), got);
            }
            let d = &memo.read[&p].1;
            if !expanded {
                if !on_stack.insert(p.clone()) {
                    continue;
                }
                if on_stack.len() > MAX_GRAPH {
                    return Err(DomainError::Invalid(format!(
                        "the graph has more than {MAX_GRAPH} derivations"
                    )));
                }
                let inputs: Vec<StorePath> = d
                    .input_drvs
                    .keys()
                    .filter(|i| !memo.modulo.contains_key(*i))
                    .cloned()
                    .collect();
                stack.push((p, true));
                for i in inputs {
                    if on_stack.contains(&i) {
                        return Err(DomainError::Invalid(format!(
                            "{i}: the derivation graph has a cycle"
                        )));
                    }
                    stack.push((i, false));
                }
                continue;
            }
            on_stack.remove(&p);
            let h = crate::cache::checked_modulo(&p, d, &|i| memo.modulo.get(i).cloned())
                .map_err(DomainError::Invalid)?;
            hashes.insert(&p, &h);
            memo.modulo.insert(p, h);
        }
        match memo.read.remove(drv) {
            Some(got) => Ok(got),
            None => self.parsed_drv(drv).await,
        }
    }

    /// Read, [`PREFETCH`] at a time, every `.drv` of `drv`'s closure that the
    /// check will need (not remembered: after a restart, all of them), a
    /// layer at a time, into `memo.read`; one after another, each read's
    /// hand-off to the blocking pool is the walk's whole time.
    async fn prefetch_unchecked(
        &self,
        drv: &StorePath,
        memo: &mut DrvMemo,
    ) -> Result<(), DomainError> {
        use futures::StreamExt;
        let hashes = self.cache().drv_hashes();
        let unknown = |p: &StorePath, memo: &DrvMemo| {
            !memo.modulo.contains_key(p) && !memo.read.contains_key(p) && hashes.get(p).is_none()
        };
        if !unknown(drv, memo) {
            return Ok(());
        }
        let mut seen: HashSet<StorePath> = HashSet::from([drv.clone()]);
        let mut frontier = vec![drv.clone()];
        while !frontier.is_empty() {
            let mut reads = futures::stream::iter(std::mem::take(&mut frontier))
                .map(|p| async move { self.parsed_drv(&p).await.map(|got| (p, got)) })
                .buffer_unordered(PREFETCH);
            let mut next = Vec::new();
            while let Some(got) = reads.next().await {
                let (p, got) = got?;
                for i in got.1.input_drvs.keys() {
                    if unknown(i, memo) && seen.insert(i.clone()) {
                        next.push(i.clone());
                    }
                }
                if seen.len() > MAX_GRAPH {
                    return Err(DomainError::Invalid(format!(
                        "the graph has more than {MAX_GRAPH} derivations"
                    )));
                }
                memo.read.insert(p, got);
            }
            frontier = next;
        }
        Ok(())
    }

    /// The one way work enters the farm (gRPC `Submit`, the SSH endpoint's
    /// `BuildDerivation` and `BuildPaths`): walk the roots' graph, skip what
    /// the cache has, schedule the rest, and make the submission durable
    /// before returning its id.
    pub async fn submit(
        &self,
        roots: Vec<Root>,
        opts: SubmitOptions,
    ) -> Result<SubmissionId, DomainError> {
        let mut seen: HashSet<StorePath> = HashSet::new();
        let mut queue: Vec<StorePath> = Vec::new();
        let mut root_paths: Vec<StorePath> = Vec::with_capacity(roots.len());
        let mut builds: Vec<NewBuild> = Vec::new();
        let mut cached: BTreeMap<StorePath, BTreeMap<String, StorePath>> = BTreeMap::new();
        let mut memo = DrvMemo::default();
        let started = std::time::Instant::now();
        for root in roots {
            match root {
                Root::Drv(d) => {
                    root_paths.push(d.clone());
                    queue.push(d);
                }
                Root::Basic {
                    drv_path,
                    drv,
                    owner,
                } => {
                    root_paths.push(drv_path.clone());
                    seen.insert(drv_path.clone());
                    match self.basic_build(&drv_path, drv, owner).await? {
                        Ok(b) => builds.push(b),
                        Err(outputs) => {
                            cached.insert(drv_path, outputs);
                        }
                    }
                }
            }
        }
        while let Some(d) = queue.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            if seen.len() > MAX_GRAPH {
                return Err(DomainError::Invalid(format!(
                    "the graph has more than {MAX_GRAPH} derivations"
                )));
            }
            // A derivation the scheduler already has (queued, running or built)
            // is shared as it is; its own dependencies are linked already. Its
            // inputs still come along: should it fail before this graph reaches
            // the scheduler, it is added again as a new build and must wait for them.
            if let Some(rec) = self.read_sched(|s| s.known_build(&d)) {
                let input_drvs = Derivation::parse_aterm(&rec.drv_aterm)
                    .map(|drv| drv.input_drvs.keys().cloned().collect())
                    .map_err(|e| DomainError::Corrupt(format!("{d}: stored derivation: {e}")))?;
                builds.push(NewBuild {
                    drv_path: rec.drv_path.clone(),
                    drv_aterm: rec.drv_aterm.clone(),
                    system: rec.system.clone(),
                    required_features: rec.required_features.clone(),
                    outputs: rec.outputs.clone(),
                    input_drvs,
                    claim: None,
                });
                continue;
            }
            let (text, drv) = self.checked_drv(&d, &mut memo).await?;
            let outputs = drv.output_paths();
            if outputs.len() != drv.outputs.len() || outputs.is_empty() {
                return Err(DomainError::Invalid(format!(
                    "{d}: outputs without a known path (floating content-addressed derivations) are not supported"
                )));
            }
            let out_paths: Vec<StorePath> = outputs.values().cloned().collect();
            let present = self
                .cache()
                .valid_paths(&out_paths)
                .await
                .map_err(DomainError::from)?;
            if present.len() == out_paths.len() {
                cached.insert(d, outputs);
                continue;
            }
            let srcs: Vec<StorePath> = drv.input_srcs.iter().cloned().collect();
            let have = self
                .cache()
                .valid_paths(&srcs)
                .await
                .map_err(DomainError::from)?;
            if let Some(missing) = srcs.iter().find(|s| !have.contains(*s)) {
                return Err(DomainError::Invalid(format!(
                    "{missing} (an input source of {d}) is not in the farm's cache; upload it first"
                )));
            }
            let input_drvs: Vec<StorePath> = drv.input_drvs.keys().cloned().collect();
            queue.extend(input_drvs.iter().cloned());
            let name = farm_nix::derivation::name_from_drv_path(&d)
                .map_err(|e| DomainError::Invalid(format!("{d}: {e}")))?;
            tracing::debug!(drv = %d, %name, "derivation to build");
            builds.push(NewBuild {
                drv_path: d,
                drv_aterm: text.into(),
                system: drv.platform.clone(),
                required_features: drv.required_system_features(),
                outputs,
                input_drvs,
                claim: None,
            });
        }
        for b in &mut builds {
            b.input_drvs.retain(|d| !cached.contains_key(d));
        }
        let g = GraphSubmission {
            roots: root_paths,
            builds,
            cached,
            priority: opts.priority,
            max_silent_time_secs: opts.max_silent_time_secs,
            build_timeout_secs: opts.build_timeout_secs,
            client: opts.client,
            job: opts.job,
        };
        let walked = started.elapsed();
        let (n_builds, n_cached, n_checked) = (g.builds.len(), g.cached.len(), memo.modulo.len());
        let sid = self.submit_graph(g).await.map_err(DomainError::from)?;
        let planned = started.elapsed();
        let store = self.store();
        store.flush().await.map_err(DomainError::from)?;
        tracing::debug!(
            submission = sid,
            builds = n_builds,
            cached = n_cached,
            checked = n_checked,
            walk_ms = walked.as_millis() as u64,
            insert_ms = (planned - walked).as_millis() as u64,
            flush_ms = (started.elapsed() - planned).as_millis() as u64,
            "submission accepted"
        );
        Ok(sid)
    }

    /// The build of a [`Root::Basic`], or its outputs when the cache has them
    /// all (as its owner sees it, for a claim build).
    async fn basic_build(
        &self,
        drv_path: &StorePath,
        basic: BasicDerivation,
        owner: Option<String>,
    ) -> Result<Result<NewBuild, BTreeMap<String, StorePath>>, DomainError> {
        let outputs = basic.output_paths();
        if outputs.len() != basic.outputs.len() || outputs.is_empty() {
            return Err(DomainError::Invalid(format!(
                "{drv_path}: outputs without a known path (floating content-addressed derivations) are not supported"
            )));
        }
        let verified = self.check_basic_against_drv(drv_path, &basic).await?;
        let srcs: Vec<StorePath> = basic.input_srcs.iter().cloned().collect();
        let signed_srcs = self.cache().valid_paths(&srcs).await?;
        // Verified, with a signed input closure: the real `.drv`'s build,
        // signed and shared whoever asks. Else a client without push gets a
        // build of its own, whose outputs are its claims.
        let claim = owner.filter(|_| !(verified && signed_srcs.len() == srcs.len()));
        let out_paths: Vec<StorePath> = outputs.values().cloned().collect();
        let (present, have) = match &claim {
            None => (self.cache().valid_paths(&out_paths).await?, signed_srcs),
            Some(o) => (
                self.cache().valid_paths_for(o, &out_paths).await?,
                self.cache().valid_paths_for(o, &srcs).await?,
            ),
        };
        if present.len() == out_paths.len() {
            return Ok(Err(outputs));
        }
        if let Some(missing) = srcs.iter().find(|s| !have.contains(*s)) {
            return Err(DomainError::Invalid(format!(
                "input '{missing}' of '{drv_path}' is not in the farm's store; copy it first"
            )));
        }
        let drv = Derivation {
            outputs: basic.outputs.clone(),
            input_drvs: BTreeMap::new(),
            input_srcs: basic.input_srcs.clone(),
            platform: basic.platform.clone(),
            builder: basic.builder.clone(),
            args: basic.args.clone(),
            env: basic.env.clone(),
        };
        Ok(Ok(NewBuild {
            drv_path: drv_path.clone(),
            drv_aterm: drv.to_aterm().into(),
            system: basic.platform.clone(),
            required_features: basic.required_system_features(),
            outputs,
            input_drvs: Vec::new(),
            claim,
        }))
    }

    /// When the cache holds the real `drv_path` (a `.drv` is a text path, so
    /// its content is verified), a build-hook derivation sent under that path
    /// must be exactly it with its input derivations resolved to their
    /// outputs, as Nix's hook sends it (with the inputs' closure as its input
    /// sources): otherwise a client could have the
    /// farm build (and share, and sign) other content under a real `.drv`'s
    /// name and output paths. Whether it was checked so (`false`: the cache
    /// lacks the `.drv`, the derivation is unverified).
    async fn check_basic_against_drv(
        &self,
        drv_path: &StorePath,
        basic: &BasicDerivation,
    ) -> Result<bool, DomainError> {
        let have = self
            .cache()
            .valid_paths(std::slice::from_ref(drv_path))
            .await?;
        if have.is_empty() {
            return Ok(false);
        }
        let (_, drv) = self.parsed_drv(drv_path).await?;
        let mut outputs: BTreeMap<StorePath, BTreeMap<String, StorePath>> = BTreeMap::new();
        for input in drv.input_drvs.keys() {
            outputs.insert(input.clone(), self.outputs_of(input).await?);
        }
        let name = farm_nix::derivation::name_from_drv_path(drv_path)
            .map_err(|e| DomainError::Invalid(format!("{drv_path}: {e}")))?;
        let mut resolved = drv
            .resolve(&name, &|d, o| {
                outputs.get(d).and_then(|m| m.get(o)).cloned()
            })
            .map_err(|e| DomainError::Invalid(format!("{drv_path}: {e}")))?;
        // The wire form carries no name; the path gives the same one.
        resolved.name.clone_from(&basic.name);
        // Nix's hook sends the whole input closure as `inputSrcs`, not just
        // the direct inputs: every resolved input must be there, and anything
        // more must be in their closure (it changes what is available, not
        // what is built).
        let direct: Vec<StorePath> = resolved.input_srcs.iter().cloned().collect();
        let srcs_ok = resolved.input_srcs.is_subset(&basic.input_srcs) && {
            let closure = self.cache().closure(&direct).await?;
            basic
                .input_srcs
                .iter()
                .all(|p| resolved.input_srcs.contains(p) || closure.contains(p))
        };
        resolved.input_srcs.clone_from(&basic.input_srcs);
        if !srcs_ok || resolved != *basic {
            tracing::warn!(drv = %drv_path, "a build-hook derivation differs from the .drv of its path");
            return Err(DomainError::Invalid(format!(
                "the derivation sent for {drv_path} is not {drv_path} as the farm's cache holds it (with its inputs resolved); refusing to build it under that name"
            )));
        }
        Ok(true)
    }

    /// The output paths of an input derivation: from the scheduler, else from its `.drv`.
    async fn outputs_of(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, StorePath>, DomainError> {
        if let Some(rec) = self.build_of_drv(drv).and_then(|id| self.build_view(id)) {
            return Ok(rec.outputs.clone());
        }
        let (_, d) = self.parsed_drv(drv).await?;
        Ok(d.output_paths())
    }

    /// Resolve a build's input closure from the cache, dependencies first, or
    /// find its outputs there already.
    pub(crate) async fn prepare(&self, build: BuildId) -> Result<Prepared, DomainError> {
        let rec = self
            .build_view(build)
            .ok_or_else(|| DomainError::NotFound(format!("unknown build b{build}")))?;
        // A claim build sees its owner's claims too (inputs and outputs alike).
        let owner = rec.claim.as_deref();
        let outs: Vec<StorePath> = rec.outputs.values().cloned().collect();
        let present = self.valid_paths_as(owner, &outs).await?;
        if !outs.is_empty() && present.len() == outs.len() {
            return Ok(Prepared::Cached);
        }
        let drv = Derivation::parse_aterm(&rec.drv_aterm)
            .map_err(|e| DomainError::Corrupt(format!("{}: {e}", rec.drv_path)))?;
        let mut wanted: Vec<StorePath> = drv.input_srcs.iter().cloned().collect();
        for (dep, names) in &drv.input_drvs {
            let outputs = self.outputs_of(dep).await?;
            for n in names {
                let p = outputs
                    .get(n)
                    .ok_or_else(|| DomainError::Invalid(format!("{dep} has no output {n:?}")))?;
                wanted.push(p.clone());
            }
        }
        let closure = match owner {
            None => self.cache().closure(&wanted).await?,
            Some(o) => self.cache().closure_for(o, &wanted).await?,
        };
        if let Some(missing) = wanted.iter().find(|p| !closure.contains(*p)) {
            return Err(DomainError::Invalid(format!(
                "input {missing} of {} is not in the farm's cache",
                rec.drv_path
            )));
        }
        let mut infos = BTreeMap::new();
        for p in &closure {
            let info = match owner {
                None => self.cache().path_info(p).await?,
                Some(o) => self.cache().path_info_for(o, p).await?,
            }
            .ok_or_else(|| DomainError::Corrupt(format!("{p} vanished from the cache")))?;
            infos.insert(p.clone(), (info.references, info.nar_size));
        }
        Ok(Prepared::Ready(dependency_order(&infos)))
    }

    /// Which of `paths` the cache holds as `owner` sees it (`None`: signed only).
    async fn valid_paths_as(
        &self,
        owner: Option<&str>,
        paths: &[StorePath],
    ) -> Result<BTreeSet<StorePath>, DomainError> {
        Ok(match owner {
            None => self.cache().valid_paths(paths).await?,
            Some(o) => self.cache().valid_paths_for(o, paths).await?,
        })
    }

    /// Whether every output is in the cache now: signed, or for a claim
    /// build (`owner`), as its owner sees it.
    pub(crate) async fn verify_outputs(
        &self,
        owner: Option<&str>,
        outputs: &[StorePath],
    ) -> Result<(), DomainError> {
        let present = self.valid_paths_as(owner, outputs).await?;
        match outputs.iter().find(|o| !present.contains(*o)) {
            None => Ok(()),
            Some(missing) => Err(DomainError::Invalid(format!(
                "the builder reported success but output {missing} is not in the cache"
            ))),
        }
    }

    /// Store a finished build's log (the tail, if it is over the cache's
    /// limit); whether it is in the cache now.
    pub(crate) async fn store_log(&self, build: BuildId, data: Vec<u8>) -> bool {
        let Some(rec) = self.build_view(build) else {
            return false;
        };
        if rec.claim.is_some() {
            // The cache's logs are everyone's (served over HTTP by derivation
            // path): a claim build's log must not replace the real `.drv`'s.
            // Its owner followed it live.
            return false;
        }
        let limit = self.cache().config().max_log_size as usize;
        let data = if data.len() > limit {
            data[data.len() - limit..].to_vec()
        } else {
            data
        };
        match self.cache().put_log(&rec.drv_path, &data).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(build = %format!("b{build}"), drv = %rec.drv_path, error = %e, "cannot store the build log");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(name: &str) -> StorePath {
        let d = farm_nix::hash::HashAlgo::Sha256.digest(name.as_bytes());
        let mut digest = [0u8; 20];
        digest.copy_from_slice(&d.digest()[..20]);
        StorePath::from_digest(&digest, name).unwrap()
    }

    #[test]
    fn dependencies_first() {
        let (a, b, c, d) = (sp("a"), sp("b"), sp("c"), sp("d"));
        // d -> c -> b -> a, d -> a, and self-references
        let mut infos = BTreeMap::new();
        infos.insert(a.clone(), (BTreeSet::from([a.clone()]), 1));
        infos.insert(b.clone(), (BTreeSet::from([a.clone()]), 2));
        infos.insert(c.clone(), (BTreeSet::from([b.clone(), c.clone()]), 3));
        infos.insert(d.clone(), (BTreeSet::from([c.clone(), a.clone()]), 4));
        let order: Vec<StorePath> = dependency_order(&infos)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        let pos = |p: &StorePath| order.iter().position(|x| x == p).unwrap();
        assert_eq!(order.len(), 4);
        assert!(pos(&a) < pos(&b) && pos(&b) < pos(&c) && pos(&c) < pos(&d));
    }
}
