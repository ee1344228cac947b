//! `GET /metrics`: the farm's state in Prometheus' text format.

use crate::domain::coordinator::Coordinator;

/// Prometheus text exposition of the farm's state.
pub(crate) fn metrics_text(coord: &Coordinator) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let (builders, queue, running) =
        coord.read_sched(|s| (s.builders(), s.queue_depths(), s.running().len()));
    let _ = writeln!(
        out,
        "# HELP farm_builder_up Whether a builder is connected."
    );
    let _ = writeln!(out, "# TYPE farm_builder_up gauge");
    for b in &builders {
        let _ = writeln!(
            out,
            "farm_builder_up{{builder=\"{}\"}} {}",
            b.record.name, b.online as u8
        );
    }
    let _ = writeln!(
        out,
        "# HELP farm_builder_running_jobs Jobs the coordinator has on a builder."
    );
    let _ = writeln!(out, "# TYPE farm_builder_running_jobs gauge");
    for b in &builders {
        let _ = writeln!(
            out,
            "farm_builder_running_jobs{{builder=\"{}\"}} {}",
            b.record.name, b.running
        );
    }
    let _ = writeln!(
        out,
        "# HELP farm_builder_load1 A builder's reported 1-minute load average."
    );
    let _ = writeln!(out, "# TYPE farm_builder_load1 gauge");
    for b in builders.iter().filter(|b| b.online) {
        let _ = writeln!(
            out,
            "farm_builder_load1{{builder=\"{}\"}} {}",
            b.record.name, b.load.load_avg_1
        );
    }
    let _ = writeln!(out, "# HELP farm_queue_depth Builds waiting, per system.");
    let _ = writeln!(out, "# TYPE farm_queue_depth gauge");
    for (system, n) in &queue {
        let _ = writeln!(out, "farm_queue_depth{{system=\"{system}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP farm_running_builds Builds running now.");
    let _ = writeln!(out, "# TYPE farm_running_builds gauge");
    let _ = writeln!(out, "farm_running_builds {running}");
    let _ = writeln!(
        out,
        "# HELP farm_cache_paths Store paths in the binary cache."
    );
    let _ = writeln!(out, "# TYPE farm_cache_paths gauge");
    let _ = writeln!(out, "farm_cache_paths {}", coord.cache().len());
    out
}
