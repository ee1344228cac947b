//! The builder registry's indexes, so that a dispatch decision looks at a
//! few builders instead of all of them: builders in slots with small ids
//! ([`Bx`]), grouped by what they can build (one group per system and set of
//! supported and mandatory features), each group's builders that could take
//! a job now (online, not drained, a free slot) ordered by the bounds of
//! their [`select::score`], and which builders hold each path. The choice is
//! the one a walk over every capable builder with a free slot would make:
//! the lowest score, ties to the lower name ([`choose`]).

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use super::*;

/// A builder's slot in [`Scheduler::builders`].
pub(super) type Bx = u32;

/// Hashes a pointer-sized key (an interned path's address) by multiplying
/// it; far cheaper than SipHash over the path's text.
#[derive(Default, Clone, Copy)]
pub(super) struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (self.0 ^ n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

pub(super) type AddrMap<V> = HashMap<usize, V, BuildHasherDefault<AddrHasher>>;

/// The identity of an interned path (every path a held set or a queued
/// closure names is the pool's one copy, so identity is equality).
pub(super) fn addr(p: &Arc<StorePath>) -> usize {
    Arc::as_ptr(p) as usize
}

/// The paths a builder holds (input locality), by identity.
pub(super) type Held = AddrMap<Arc<StorePath>>;

/// A free builder's place in a group's order: by a score, then by name (the
/// dispatch's tie-break).
#[derive(Debug, Clone)]
pub(super) struct Rank {
    score: f64,
    name: Arc<str>,
    bx: Bx,
}

impl PartialEq for Rank {
    fn eq(&self, other: &Rank) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Rank {}
impl PartialOrd for Rank {
    fn partial_cmp(&self, other: &Rank) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Rank {
    fn cmp(&self, other: &Rank) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| self.name.cmp(&other.name))
    }
}

/// Builders that can build the same work: one system, the same supported
/// and mandatory features.
pub(super) struct Group {
    /// Only the system and the features are set.
    caps: Capabilities,
    /// Members that could take a job now, by [`select::Base::warm`] (their
    /// score for a build whose inputs they hold: a lower bound of any).
    warm: BTreeSet<Rank>,
    /// The same builders by [`select::Base::cold`] (their score for a build
    /// whose inputs they hold none of).
    cold: BTreeSet<Rank>,
}

impl Group {
    pub(super) fn can_build(&self, class: &Class) -> bool {
        self.caps.can_build(&class.system, &class.features)
    }

    /// Whether some member could take a job now.
    pub(super) fn has_free(&self) -> bool {
        !self.warm.is_empty()
    }
}

/// A builder the scheduler knows, online or not.
pub(super) struct BuilderEntry {
    pub(super) rec: BuilderRecord,
    pub(super) load: Load,
    pub(super) online: bool,
    pub(super) conn: u64,
    pub(super) disconnected_ms: Option<i64>,
    pub(super) running: BTreeSet<BuildId>,
    pub(super) held: Held,
    /// `rec.name`, shared with the group orders.
    pub(super) name: Arc<str>,
    /// The groups it is in (one per system it builds for).
    groups: Vec<usize>,
    /// Its (warm, cold) scores as listed in its groups' orders, while it
    /// could take a job.
    listed: Option<(f64, f64)>,
}

impl BuilderEntry {
    pub(super) fn new(
        rec: BuilderRecord,
        online: bool,
        conn: u64,
        disconnected_ms: Option<i64>,
    ) -> BuilderEntry {
        BuilderEntry {
            name: Arc::from(rec.name.as_str()),
            rec,
            load: Load::default(),
            online,
            conn,
            disconnected_ms,
            running: BTreeSet::new(),
            held: Held::default(),
            groups: Vec::new(),
            listed: None,
        }
    }

    /// Whether it could take a job now.
    fn is_free(&self) -> bool {
        self.online
            && !self.rec.draining
            && (self.running.len() as u32) < self.rec.capabilities.max_jobs.max(1)
    }

    /// Its score for a build with these inputs.
    fn score(&self, inputs: &[(Arc<StorePath>, u64)]) -> f64 {
        let base = select::base(&self.rec.capabilities, &self.load, self.running.len());
        select::score_with(base, inputs, |p| self.held.contains_key(&addr(p)))
    }
}

/// Scratch marks for one decision: which builders were seen.
#[derive(Default)]
pub(super) struct Marks {
    epoch: u32,
    at: Vec<u32>,
}

impl Marks {
    fn next(&mut self, len: usize) {
        if self.at.len() < len {
            self.at.resize(len, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.at.iter_mut().for_each(|m| *m = 0);
            self.epoch = 1;
        }
    }
    /// Mark `bx`; whether it was not marked yet.
    fn mark(&mut self, bx: Bx) -> bool {
        let m = &mut self.at[bx as usize];
        let fresh = *m != self.epoch;
        *m = self.epoch;
        fresh
    }
    fn marked(&self, bx: Bx) -> bool {
        self.at.get(bx as usize).is_some_and(|m| *m == self.epoch)
    }
}

/// Holders of an input beyond which [`choose`] bounds its walk by score instead.
const FEW_HOLDERS: usize = 64;

/// The lowest (score, name) seen so far.
struct Best<'a> {
    score: f64,
    name: &'a str,
    bx: Bx,
}

fn consider<'a>(best: &mut Option<Best<'a>>, score: f64, name: &'a str, bx: Bx) {
    let better = best.as_ref().is_none_or(|b| {
        score
            .total_cmp(&b.score)
            .then_with(|| name.cmp(b.name))
            .is_lt()
    });
    if better {
        *best = Some(Best { score, name, bx });
    }
}

/// The builder a walk over every free member of the `capable` groups would
/// pick for a build with `inputs`: the lowest [`select::score`], ties to the
/// lower name. Scores are exact where they are computed and equal to the
/// listed bound where they are not:
/// - no input bytes: every score is the member's warm score, so the head of
///   each warm order;
/// - few builders hold any input: those are scored; every other member
///   holds none, so its score is its cold score: the first unmarked one of
///   each cold order;
/// - else members are scored in warm order (a lower bound of the score)
///   until the bound exceeds the best score found.
pub(super) fn choose(
    builders: &[Option<BuilderEntry>],
    groups: &[Group],
    capable: &[usize],
    holders: &AddrMap<Vec<Bx>>,
    marks: &mut Marks,
    inputs: &[(Arc<StorePath>, u64)],
) -> Option<Bx> {
    let mut best: Option<Best<'_>> = None;
    let total: u64 = inputs.iter().map(|(_, s)| *s).sum();
    if total == 0 {
        for &g in capable {
            if let Some(r) = groups[g].warm.first() {
                consider(&mut best, r.score, &r.name, r.bx);
            }
        }
        return best.map(|b| b.bx);
    }
    marks.next(builders.len());
    let mut seen: Vec<Bx> = Vec::new();
    let mut few = true;
    'inputs: for (p, size) in inputs {
        if *size == 0 {
            continue;
        }
        for &bx in holders.get(&addr(p)).map_or(&[][..], Vec::as_slice) {
            if marks.mark(bx) {
                seen.push(bx);
                if seen.len() > FEW_HOLDERS {
                    few = false;
                    break 'inputs;
                }
            }
        }
    }
    if few {
        for &bx in &seen {
            let Some(e) = builders[bx as usize].as_ref() else {
                continue;
            };
            if e.listed.is_none() || !e.groups.iter().any(|g| capable.contains(g)) {
                continue;
            }
            consider(&mut best, e.score(inputs), &e.name, bx);
        }
        for &g in capable {
            if let Some(r) = groups[g].cold.iter().find(|r| !marks.marked(r.bx)) {
                consider(&mut best, r.score, &r.name, r.bx);
            }
        }
    } else {
        for &g in capable {
            for r in &groups[g].warm {
                if best
                    .as_ref()
                    .is_some_and(|b| r.score.total_cmp(&b.score).is_gt())
                {
                    break;
                }
                if let Some(e) = builders[r.bx as usize].as_ref() {
                    consider(&mut best, e.score(inputs), &e.name, r.bx);
                }
            }
        }
    }
    best.map(|b| b.bx)
}

impl Scheduler {
    /// The builder named `name`.
    pub(super) fn entry(&self, name: &str) -> Option<&BuilderEntry> {
        let bx = *self.by_name.get(name)?;
        self.builders[bx as usize].as_ref()
    }

    pub(super) fn entry_mut(&mut self, name: &str) -> Option<&mut BuilderEntry> {
        let bx = *self.by_name.get(name)?;
        self.builders[bx as usize].as_mut()
    }

    /// The slot of the builder named `name`.
    pub(super) fn bx(&self, name: &str) -> Option<Bx> {
        self.by_name.get(name).copied()
    }

    /// Every known builder.
    pub(super) fn entries(&self) -> impl Iterator<Item = &BuilderEntry> {
        self.builders.iter().flatten()
    }

    /// Take in a new builder (its name not known yet): a slot, its groups, its place.
    pub(super) fn add_builder(&mut self, e: BuilderEntry) -> Bx {
        let name = e.rec.name.clone();
        let bx = match self.spare_slots.pop() {
            Some(bx) => {
                self.builders[bx as usize] = Some(e);
                bx
            }
            None => {
                self.builders.push(Some(e));
                (self.builders.len() - 1) as Bx
            }
        };
        self.by_name.insert(name, bx);
        self.regroup(bx);
        bx
    }

    /// Forget a builder: its slot, groups, place and held paths.
    pub(super) fn remove_builder(&mut self, bx: Bx) {
        self.unlist(bx);
        self.forget_held(bx);
        let Some(e) = self.builders[bx as usize].take() else {
            return;
        };
        for s in &e.rec.capabilities.systems {
            if let Some(set) = self.by_system.get_mut(s) {
                set.remove(&bx);
                if set.is_empty() {
                    self.by_system.remove(s);
                }
            }
        }
        self.by_name.remove(&e.rec.name);
        self.spare_slots.push(bx);
    }

    /// Put a builder in the groups and the system index its capabilities
    /// say (after they changed), and list it if it could take a job.
    pub(super) fn regroup(&mut self, bx: Bx) {
        self.unlist(bx);
        let Some(e) = self.builders[bx as usize].as_mut() else {
            return;
        };
        for set in self.by_system.values_mut() {
            set.remove(&bx);
        }
        self.by_system.retain(|_, set| !set.is_empty());
        let caps = &e.rec.capabilities;
        let mut groups = Vec::new();
        for s in &caps.systems {
            self.by_system.entry(s.clone()).or_default().insert(bx);
            let found = self.groups.iter().position(|g| {
                g.caps.systems[0] == *s
                    && g.caps.supported_features == caps.supported_features
                    && g.caps.mandatory_features == caps.mandatory_features
            });
            let g = match found {
                Some(g) => g,
                None => {
                    self.groups.push(Group {
                        caps: Capabilities {
                            systems: vec![s.clone()],
                            supported_features: caps.supported_features.clone(),
                            mandatory_features: caps.mandatory_features.clone(),
                            ..Capabilities::default()
                        },
                        warm: BTreeSet::new(),
                        cold: BTreeSet::new(),
                    });
                    self.groups.len() - 1
                }
            };
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        e.groups = groups;
        self.relist(bx);
    }

    fn unlist(&mut self, bx: Bx) {
        let Some(e) = self.builders[bx as usize].as_mut() else {
            return;
        };
        let Some((warm, cold)) = e.listed.take() else {
            return;
        };
        for &g in &e.groups {
            let group = &mut self.groups[g];
            group.warm.remove(&Rank {
                score: warm,
                name: e.name.clone(),
                bx,
            });
            group.cold.remove(&Rank {
                score: cold,
                name: e.name.clone(),
                bx,
            });
        }
    }

    /// Its state, load or running jobs changed: its place in the orders.
    pub(super) fn relist(&mut self, bx: Bx) {
        self.unlist(bx);
        let Some(e) = self.builders[bx as usize].as_mut() else {
            return;
        };
        if !e.is_free() {
            return;
        }
        let base = select::base(&e.rec.capabilities, &e.load, e.running.len());
        let (warm, cold) = (base.warm(), base.cold());
        e.listed = Some((warm, cold));
        for &g in &e.groups {
            let group = &mut self.groups[g];
            group.warm.insert(Rank {
                score: warm,
                name: e.name.clone(),
                bx,
            });
            group.cold.insert(Rank {
                score: cold,
                name: e.name.clone(),
                bx,
            });
        }
    }

    /// A builder holds these paths from now on (input locality).
    pub(super) fn hold(&mut self, bx: Bx, paths: impl IntoIterator<Item = Arc<StorePath>>) {
        let Some(e) = self.builders[bx as usize].as_mut() else {
            return;
        };
        for p in paths {
            let a = addr(&p);
            if e.held.insert(a, p).is_none() {
                self.holders.entry(a).or_default().push(bx);
            }
        }
    }

    /// A builder holds nothing any more (as far as locality goes).
    pub(super) fn forget_held(&mut self, bx: Bx) {
        let Some(e) = self.builders[bx as usize].as_mut() else {
            return;
        };
        for a in e.held.drain().map(|(a, _)| a) {
            if let Some(list) = self.holders.get_mut(&a) {
                if let Some(i) = list.iter().position(|b| *b == bx) {
                    list.swap_remove(i);
                }
                if list.is_empty() {
                    self.holders.remove(&a);
                }
            }
        }
    }

    /// The groups that can build `class` and have a builder free now.
    pub(super) fn free_groups(&self, class: &Class, out: &mut Vec<usize>) {
        out.clear();
        out.extend(
            self.groups
                .iter()
                .enumerate()
                .filter(|(_, g)| g.has_free() && g.can_build(class))
                .map(|(i, _)| i),
        );
    }
}
