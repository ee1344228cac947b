//! Simulator tests: each policy's decision on a case whose answer its source
//! gives, exact makespans on trivial graphs, the lower bound under every
//! policy on random graphs, and a dying builder's jobs built elsewhere.

use super::graphs::{self, X86, builder};
use super::hydra::{self, HydraMachine, HydraPolicy, HydraStep};
use super::nix::{self, NixMachine, NixPolicy};
use super::*;
use crate::domain::scheduler::sim::farm::FarmPolicy;

fn chain(n: usize, work_ms: u64) -> Graph {
    Graph {
        name: "chain".into(),
        tasks: (0..n)
            .map(|i| Task {
                name: format!("c{i}"),
                system: X86.into(),
                work_ms,
                out_bytes: 0,
                deps: if i == 0 { vec![] } else { vec![i - 1] },
            })
            .collect(),
    }
}

fn independent(n: usize, work_ms: u64) -> Graph {
    Graph {
        name: "independent".into(),
        tasks: (0..n)
            .map(|i| Task {
                name: format!("j{i}"),
                system: X86.into(),
                work_ms,
                out_bytes: 0,
                deps: vec![],
            })
            .collect(),
    }
}

fn farm_of(builders: Vec<BuilderSpec>) -> Farm {
    Farm {
        name: "test".into(),
        builders,
    }
}

fn all_policies() -> Vec<Box<dyn Policy>> {
    vec![
        Box::new(FarmPolicy::new()),
        Box::new(NixPolicy::new()),
        Box::new(HydraPolicy::new()),
    ]
}

fn m(speed_factor: u32, max_jobs: u32, load: u32) -> NixMachine {
    NixMachine {
        speed_factor,
        max_jobs,
        load,
        right_type: true,
    }
}

#[test]
fn nix_picks_the_lowest_load_over_speed_factor_among_free_machines() {
    // 1/1 = 1 against 1/4 = 0: the faster one, though busier.
    assert_eq!(nix::choose(&[m(1, 4, 1), m(4, 4, 1)]), Some(1));
    // A full machine is skipped, however fast.
    assert_eq!(nix::choose(&[m(1, 4, 3), m(8, 2, 2)]), Some(0));
    // The division truncates (integers in 2.8): 0/1 = 0 = 2/4, so the higher
    // speed factor wins although it already runs two builds.
    assert_eq!(nix::choose(&[m(1, 4, 0), m(4, 4, 2)]), Some(1));
    // Equal quotient and speed: the lower load; all equal: the first.
    assert_eq!(nix::choose(&[m(2, 4, 1), m(2, 4, 0)]), Some(1));
    assert_eq!(nix::choose(&[m(2, 4, 0), m(2, 4, 0)]), Some(0));
    // Wrong system, or every slot taken: postpone.
    let mut wrong = m(1, 4, 0);
    wrong.right_type = false;
    assert_eq!(nix::choose(&[wrong, m(1, 1, 1)]), None);
}

#[test]
fn nix_postponed_builds_wait_for_the_poll_interval() {
    // 4 builds of 1 s, one machine of 2 slots: two start, two are postponed
    // and only retried 5 s later (a finished build does not wake them).
    let f = farm_of(vec![builder("a", 2, 1.0, 2)]);
    let r = simulate(&mut NixPolicy::new(), &independent(4, 1000), &f);
    assert!(r.completed);
    assert_eq!(r.makespan_ms, nix::POLL_INTERVAL_MS + 1000);
    // The farm and Hydra start the second pair when the first ends.
    for mut p in [
        Box::new(FarmPolicy::new()) as Box<dyn Policy>,
        Box::new(HydraPolicy::new()),
    ] {
        assert_eq!(
            simulate(p.as_mut(), &independent(4, 1000), &f).makespan_ms,
            2000
        );
    }
}

fn hm(speed_factor: f64, bogomips: f64, cpu_count: u32, current_jobs: u32) -> HydraMachine {
    HydraMachine {
        speed_factor,
        bogomips,
        cpu_count,
        current_jobs,
    }
}

#[test]
fn hydra_orders_machines_by_score_ties_to_fewer_jobs() {
    // Scores: 1×4800×16 = 76 800; 4×4800×2 = 38 400; 2×4800×4 = 38 400 (2 jobs
    // against 1); bogomips below 1 counts as 1: 8×1×1 = 8.
    let ms = [
        hm(4.0, 4800.0, 2, 2),
        hm(1.0, 4800.0, 16, 5),
        hm(8.0, 0.0, 1, 0),
        hm(2.0, 4800.0, 4, 1),
    ];
    assert_eq!(hydra::machine_order(&ms), vec![1, 3, 0, 2]);
}

fn step(global_priority: i32, share: f64, rdeps: u64) -> HydraStep {
    HydraStep {
        global_priority,
        lowest_share_used: share,
        rdeps,
        local_priority: 0,
        lowest_build_id: 1,
    }
}

#[test]
fn hydra_orders_steps_by_priority_then_share_then_reverse_dependencies() {
    let mut steps = [
        step(0, 0.5, 9), // 0
        step(0, 0.1, 1), // 1: less share used beats more rdeps
        step(1, 0.9, 0), // 2: priority beats everything
        step(0, 0.5, 3), // 3
        step(0, 0.1, 4), // 4
    ];
    let mut idx: Vec<usize> = (0..steps.len()).collect();
    idx.sort_by(|&a, &b| hydra::step_cmp(&steps[a], &steps[b]));
    assert_eq!(idx, vec![2, 4, 1, 0, 3]);
    // Then the local priority, then the lowest build id.
    steps[0].local_priority = 1;
    steps[3].rdeps = 9;
    assert_eq!(
        hydra::step_cmp(&steps[0], &steps[3]),
        std::cmp::Ordering::Less
    );
    let (mut a, mut b) = (step(0, 0.5, 9), step(0, 0.5, 9));
    a.lowest_build_id = 7;
    b.lowest_build_id = 3;
    assert_eq!(hydra::step_cmp(&a, &b), std::cmp::Ordering::Greater);
}

#[test]
fn hydra_sends_work_to_the_big_machine_first() {
    // One step of 4 s: Hydra takes the highest score (16 cores at speed 1)
    // over the fastest (2 cores at speed 4); the farm takes the fastest.
    let f = farm_of(vec![
        builder("fast", 2, 4.0, 2),
        builder("big", 16, 1.0, 16),
    ]);
    let g = independent(1, 4000);
    assert_eq!(simulate(&mut HydraPolicy::new(), &g, &f).makespan_ms, 4000);
    assert_eq!(simulate(&mut FarmPolicy::new(), &g, &f).makespan_ms, 1000);
    // Nix: 0/1 = 0/4, the higher speed factor.
    assert_eq!(simulate(&mut NixPolicy::new(), &g, &f).makespan_ms, 1000);
}

#[test]
fn one_chain_on_one_builder_takes_the_sum_of_its_durations_over_speed() {
    let f = farm_of(vec![builder("a", 3, 2.0, 3)]);
    let g = chain(10, 3000);
    for mut p in all_policies() {
        let r = simulate(p.as_mut(), &g, &f);
        assert!(r.completed, "{}", p.name());
        assert_eq!(r.makespan_ms, 10 * 1500, "{}", p.name());
        assert_eq!(r.starts, 10);
    }
    assert_eq!(lower_bound(&g, &f).ms(), 15_000.0);
}

#[test]
fn independent_equal_jobs_on_n_slots_take_their_waves() {
    // 12 jobs of 2 s on 2 builders of 2 slots: 3 waves.
    let f = farm_of(vec![builder("a", 2, 1.0, 2), builder("b", 2, 1.0, 2)]);
    let g = independent(12, 2000);
    for mut p in [
        Box::new(FarmPolicy::new()) as Box<dyn Policy>,
        Box::new(HydraPolicy::new()),
    ] {
        let r = simulate(p.as_mut(), &g, &f);
        assert_eq!(r.makespan_ms, 6000, "{}", p.name());
    }
    assert_eq!(lower_bound(&g, &f).ms(), 6000.0);
    // Nix, with as many jobs as slots: one wave.
    let r = simulate(&mut NixPolicy::new(), &independent(4, 2000), &f);
    assert_eq!(r.makespan_ms, 2000);
}

#[test]
fn transfers_count_on_the_builder_link() {
    // A 1 MB output to a builder of 1 000 bytes/ms: 1 s up, then the
    // dependent on the same builder holds it (no fetch) and uploads its own.
    let mut b = builder("a", 1, 1.0, 1);
    b.bytes_per_ms = 1000.0;
    let mut g = chain(2, 1000);
    g.tasks[0].out_bytes = 1_000_000;
    let r = simulate(&mut FarmPolicy::new(), &g, &farm_of(vec![b]));
    assert_eq!(r.makespan_ms, 1000 + 1000 + 1000);
}

#[test]
fn the_lower_bound_is_never_above_a_makespan() {
    for seed in 0..12u64 {
        let g = graphs::random_dag(seed, 60, 3);
        let farms = [
            graphs::homogeneous(2, 3),
            farm_of(vec![
                builder("a", 4, 1.0, 4),
                builder("b", 1, 3.0, 1),
                builder("c", 2, 2.0, 2),
            ]),
        ];
        for f in &farms {
            let lb = lower_bound(&g, f).ms();
            for mut p in all_policies() {
                let r = simulate(p.as_mut(), &g, f);
                assert!(r.completed, "seed {seed} {}", p.name());
                assert!(
                    r.makespan_ms as f64 >= lb - 1e-6,
                    "seed {seed} {}: {} < {lb}",
                    p.name(),
                    r.makespan_ms
                );
            }
        }
    }
}

#[test]
fn a_dying_builders_jobs_are_rerun_and_the_graph_completes() {
    let g = graphs::wide_shallow(3, 40, 2, 20_000.0);
    let mut f = farm_of(vec![
        builder("dies", 8, 1.0, 8),
        builder("stays", 2, 1.0, 2),
    ]);
    f.builders[0].dies_at_ms = Some(5_000);
    for mut p in all_policies() {
        let r = simulate(p.as_mut(), &g, &f);
        assert!(r.completed, "{}", p.name());
        assert!(r.reruns > 0, "{}: nothing was lost", p.name());
        assert_eq!(r.starts, g.tasks.len() as u64 + u64::from(r.reruns));
    }
    // The farm requeues after its grace period: nothing of the dead builder's
    // restarts before 60 s.
    let mut farm = FarmPolicy::new();
    let r = simulate(&mut farm, &g, &f);
    assert!(r.makespan_ms > 5_000 + 60_000);
}

#[test]
fn the_report_runs_small() {
    // The decision-rate measure works on a small farm (its figures are the example's).
    let d = report::decision_rate(2000, 10, 2, 10);
    assert_eq!(d.burst_decisions, 20);
    assert_eq!(d.steady_decisions, 10);
}
