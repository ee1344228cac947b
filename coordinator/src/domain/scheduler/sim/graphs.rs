//! Synthetic graphs and farms for the simulator, from a seeded generator:
//! wide and shallow, deep chains, nixpkgs-like fan-in/fan-out, the issue's
//! layered DAG; homogeneous and heterogeneous farms (speed factors, slots,
//! systems, a slow link, a builder that dies).

use super::{BuilderSpec, Farm, Graph, Task};

pub const X86: &str = "x86_64-linux";
pub const ARM: &str = "aarch64-linux";

/// SplitMix64: small, seeded, the same sequence everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Log-normal with the given median and log-spread (Box–Muller).
    pub fn log_normal(&mut self, median: f64, sigma: f64) -> f64 {
        let u1 = self.unit().max(1e-12);
        let u2 = self.unit();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        median * (sigma * z).exp()
    }
}

fn task(name: String, system: &str, work_ms: f64, out_bytes: f64, deps: Vec<usize>) -> Task {
    Task {
        name,
        system: system.to_string(),
        work_ms: work_ms.max(1.0).round() as u64,
        out_bytes: out_bytes.max(0.0).round() as u64,
        deps,
    }
}

/// The layered DAG: `depth` layers of `width`, each node on two nodes
/// of the layer before, plus one top node on the last layer; every task
/// `work_ms` long with tiny outputs (`width` 4, `depth` 5, 300 ms is the
/// benchmark's "21 derivations sleeping 0.3 s").
pub fn layered(width: usize, depth: usize, work_ms: u64) -> Graph {
    let mut tasks = Vec::new();
    for l in 0..depth {
        for i in 0..width {
            let deps = if l == 0 {
                Vec::new()
            } else {
                let base = (l - 1) * width;
                let mut d = vec![base + i, base + (i + 1) % width];
                d.dedup();
                d
            };
            tasks.push(task(format!("l{l}-{i}"), X86, work_ms as f64, 4096.0, deps));
        }
    }
    let last = (depth - 1) * width;
    tasks.push(task(
        "top".into(),
        X86,
        work_ms as f64,
        4096.0,
        (last..last + width).collect(),
    ));
    Graph {
        name: format!("layered {width}x{depth}+1, {work_ms} ms each"),
        tasks,
    }
}

/// Wide and shallow: `width` independent leaves (log-normal durations,
/// median `median_ms`), then `tops` nodes each on a random tenth of them.
pub fn wide_shallow(seed: u64, width: usize, tops: usize, median_ms: f64) -> Graph {
    let mut r = Rng::new(seed);
    let mut tasks = Vec::new();
    for i in 0..width {
        let w = r.log_normal(median_ms, 1.0);
        let b = r.log_normal(2e6, 1.0);
        tasks.push(task(format!("leaf{i}"), X86, w, b, Vec::new()));
    }
    for j in 0..tops {
        let mut deps: Vec<usize> = (0..(width / 10).max(1)).map(|_| r.below(width)).collect();
        deps.sort_unstable();
        deps.dedup();
        let w = r.log_normal(median_ms, 0.5);
        tasks.push(task(format!("top{j}"), X86, w, 1e6, deps));
    }
    Graph {
        name: format!("wide shallow {width}+{tops}"),
        tasks,
    }
}

/// Deep chains: `chains` chains of `depth` tasks, each on the one before,
/// durations log-normal around `median_ms`, and one node on every chain's end.
pub fn deep_chains(seed: u64, chains: usize, depth: usize, median_ms: f64) -> Graph {
    let mut r = Rng::new(seed);
    let mut tasks = Vec::new();
    let mut ends = Vec::new();
    for c in 0..chains {
        for d in 0..depth {
            let deps = if d == 0 {
                Vec::new()
            } else {
                vec![tasks.len() - 1]
            };
            let w = r.log_normal(median_ms, 0.8);
            let b = r.log_normal(5e6, 1.0);
            tasks.push(task(format!("c{c}-{d}"), X86, w, b, deps));
        }
        ends.push(tasks.len() - 1);
    }
    tasks.push(task("all".into(), X86, median_ms, 1e5, ends));
    Graph {
        name: format!("deep chains {chains}x{depth}+1"),
        tasks,
    }
}

/// Nixpkgs-like: a bootstrap chain of long stages (the stdenv), a core of
/// libraries on it and on a few earlier libraries chosen with a bias to the
/// popular ones (fan-in to a few, fan-out from them), then leaf packages on
/// several libraries. Durations log-normal (median `median_ms`, wide spread:
/// a few very long builds), outputs log-normal around 20 MB. `arm_share` of
/// the libraries and packages are for aarch64-linux (their own bootstrap
/// chain too).
pub fn nixpkgs_like(seed: u64, libs: usize, pkgs: usize, median_ms: f64, arm_share: f64) -> Graph {
    let mut r = Rng::new(seed);
    let mut tasks = Vec::new();
    let mut stdenv = Vec::new();
    for sys in [X86, ARM] {
        if sys == ARM && arm_share <= 0.0 {
            continue;
        }
        let mut prev: Option<usize> = None;
        for s in 0..6 {
            let w = r.log_normal(median_ms * 8.0, 0.3);
            tasks.push(task(
                format!("stdenv-{sys}-{s}"),
                sys,
                w,
                r.log_normal(5e7, 0.5),
                prev.into_iter().collect(),
            ));
            prev = Some(tasks.len() - 1);
        }
        stdenv.push((sys, prev.expect("six stages")));
    }
    let mut lib_ids: Vec<(usize, &str)> = Vec::new();
    for i in 0..libs {
        let (sys, base) = if r.unit() < arm_share && stdenv.len() > 1 {
            stdenv[1]
        } else {
            stdenv[0]
        };
        let mut deps = vec![base];
        let same: Vec<usize> = lib_ids
            .iter()
            .filter(|(_, s)| *s == sys)
            .map(|(i, _)| *i)
            .collect();
        if !same.is_empty() {
            let k = 1 + r.below(4);
            for _ in 0..k {
                // Bias to early (popular) libraries: the square of a uniform.
                let u = r.unit();
                deps.push(same[((u * u) * same.len() as f64) as usize]);
            }
        }
        deps.sort_unstable();
        deps.dedup();
        let w = r.log_normal(median_ms, 1.2);
        tasks.push(task(
            format!("lib{i}"),
            sys,
            w,
            r.log_normal(2e7, 1.0),
            deps,
        ));
        lib_ids.push((tasks.len() - 1, sys));
    }
    for i in 0..pkgs {
        let sys = if r.unit() < arm_share && stdenv.len() > 1 {
            ARM
        } else {
            X86
        };
        let same: Vec<usize> = lib_ids
            .iter()
            .filter(|(_, s)| *s == sys)
            .map(|(i, _)| *i)
            .collect();
        let mut deps = vec![stdenv.iter().find(|(s, _)| *s == sys).expect("stdenv").1];
        for _ in 0..(2 + r.below(6)) {
            if !same.is_empty() {
                let u = r.unit();
                deps.push(same[((u * u) * same.len() as f64) as usize]);
            }
        }
        deps.sort_unstable();
        deps.dedup();
        let w = r.log_normal(median_ms * 0.5, 1.2);
        tasks.push(task(
            format!("pkg{i}"),
            sys,
            w,
            r.log_normal(1e7, 1.0),
            deps,
        ));
    }
    Graph {
        name: format!("nixpkgs-like {}", tasks.len()),
        tasks,
    }
}

/// A random DAG for property tests: each task on up to `max_deps` earlier ones.
pub fn random_dag(seed: u64, n: usize, max_deps: usize) -> Graph {
    let mut r = Rng::new(seed);
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut deps: Vec<usize> = if i == 0 {
            Vec::new()
        } else {
            (0..r.below(max_deps + 1)).map(|_| r.below(i)).collect()
        };
        deps.sort_unstable();
        deps.dedup();
        let w = r.log_normal(2000.0, 1.0);
        tasks.push(task(format!("t{i}"), X86, w, r.log_normal(1e6, 1.0), deps));
    }
    Graph {
        name: format!("random {n}"),
        tasks,
    }
}

/// A builder with the usual defaults: x86_64-linux, 100 MB/s, bogomips 4800.
pub fn builder(name: &str, slots: u32, speed: f64, cores: u32) -> BuilderSpec {
    BuilderSpec {
        name: name.to_string(),
        systems: vec![X86.to_string()],
        slots,
        speed,
        cores,
        bogomips: 4800.0,
        bytes_per_ms: 100_000.0,
        dies_at_ms: None,
    }
}

/// `n` equal builders.
pub fn homogeneous(n: usize, slots: u32) -> Farm {
    Farm {
        name: format!("{n} equal x {slots} slots"),
        builders: (0..n)
            .map(|i| builder(&format!("b{i}"), slots, 1.0, slots))
            .collect(),
    }
}

/// Mixed speed factors, slots and CPUs (each slot a core, as `max-jobs` =
/// cores is usual), one aarch64 builder. What Hydra's score sees: a big slow
/// machine (many cores, speed 1) outranks a small fast one (speed 4).
pub fn heterogeneous() -> Farm {
    let mut arm = builder("arm", 4, 2.0, 4);
    arm.systems = vec![ARM.to_string()];
    arm.bogomips = 100.0;
    Farm {
        name: "mixed: 16x1, 8x1, 4x2, 2x4 slots x speed, +arm 4x2".into(),
        builders: vec![
            builder("big-slow", 16, 1.0, 16),
            builder("mid-slow", 8, 1.0, 8),
            builder("fast", 4, 2.0, 4),
            builder("fastest", 2, 4.0, 2),
            arm,
        ],
    }
}

/// [`heterogeneous`] with the biggest builder on a slow link (2 MB/s).
pub fn slow_link() -> Farm {
    let mut f = heterogeneous();
    f.name = "mixed, big-slow on a 2 MB/s link".into();
    f.builders[0].bytes_per_ms = 2_000.0;
    f
}

/// [`heterogeneous`] with the biggest builder dying at `at_ms`.
pub fn dying(at_ms: i64) -> Farm {
    let mut f = heterogeneous();
    f.name = format!("mixed, big-slow dies at {} s", at_ms / 1000);
    f.builders[0].dies_at_ms = Some(at_ms);
    f
}
