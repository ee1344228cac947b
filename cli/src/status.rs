//! `farm status`: the builders, the queue, running builds and recent failures,
//! as a table (coloured on a terminal) or JSON (the stable format in
//! `farm status --help`), once or refreshed with `--watch`.

use std::io::Write;
use std::time::Duration;

use farm_proto::v1::{BuilderState, StatusResponse};
use serde::Serialize;

use crate::args::StatusArgs;
use crate::client::{Farm, now_unix};
use crate::error::CliError;
use crate::style::{self, Colour, Painter, Table, cell, painted};

/// One builder in `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuilderJson {
    pub name: String,
    pub state: &'static str,
    pub systems: Vec<String>,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    pub running_jobs: u32,
    pub max_jobs: u32,
    pub speed_factor: f64,
    pub cores: u32,
    pub load: f64,
    pub load_5: f64,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_free_bytes: u64,
    pub cpu_pressure: Option<f64>,
    pub memory_pressure: Option<f64>,
    pub io_pressure: Option<f64>,
    /// Why the builder refuses every job (its store is tainted), if it does.
    pub store_problem: Option<String>,
    pub last_seen: Option<i64>,
    pub nix_version: String,
    pub public_key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueJson {
    pub system: String,
    pub queued: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunningJson {
    pub build_id: String,
    pub drv_path: String,
    pub builder: String,
    pub started: i64,
    pub elapsed_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailureJson {
    pub build_id: String,
    pub drv_path: String,
    pub builder: String,
    pub error: String,
    pub finished: i64,
}

/// The whole `--json` document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusJson {
    pub builders: Vec<BuilderJson>,
    pub queue: Vec<QueueJson>,
    pub queued_total: u64,
    pub running: Vec<RunningJson>,
    pub recent_failures: Vec<FailureJson>,
}

/// A builder state's name in the JSON and the table.
pub fn state_name(state: i32) -> &'static str {
    match BuilderState::try_from(state) {
        Ok(BuilderState::Idle) => "idle",
        Ok(BuilderState::Busy) => "busy",
        Ok(BuilderState::Draining) => "draining",
        Ok(BuilderState::Offline) | Ok(BuilderState::Unspecified) | Err(_) => "offline",
    }
}

fn pressure(v: f64) -> Option<f64> {
    (v >= 0.0).then_some(v)
}

/// Convert the coordinator's answer into the JSON model, `now` being now.
pub fn to_json(s: &StatusResponse, now: i64) -> StatusJson {
    let builders = s
        .builders
        .iter()
        .map(|b| {
            let caps = b.capabilities.clone().unwrap_or_default();
            let load = b.load.clone().unwrap_or_default();
            BuilderJson {
                name: b.name.clone(),
                state: state_name(b.state),
                systems: caps.systems,
                supported_features: caps.supported_features,
                mandatory_features: caps.mandatory_features,
                running_jobs: load.running_jobs,
                max_jobs: caps.max_jobs,
                speed_factor: caps.speed_factor,
                cores: caps.cores,
                load: load.load_avg_1,
                load_5: load.load_avg_5,
                memory_bytes: caps.memory_bytes,
                memory_available_bytes: load.memory_available_bytes,
                disk_free_bytes: load.disk_free_bytes,
                cpu_pressure: b.load.as_ref().and_then(|l| pressure(l.cpu_pressure)),
                memory_pressure: b.load.as_ref().and_then(|l| pressure(l.memory_pressure)),
                io_pressure: b.load.as_ref().and_then(|l| pressure(l.io_pressure)),
                store_problem: (!load.store_problem.is_empty())
                    .then(|| style::sanitize(&load.store_problem)),
                last_seen: (b.last_seen_unix > 0).then_some(b.last_seen_unix),
                nix_version: caps.nix_version,
                public_key: b.public_key.clone(),
            }
        })
        .collect();
    StatusJson {
        builders,
        queue: s
            .queue
            .iter()
            .map(|q| QueueJson {
                system: q.system.clone(),
                queued: q.queued,
            })
            .collect(),
        queued_total: s.queue.iter().map(|q| u64::from(q.queued)).sum(),
        running: s
            .running
            .iter()
            .map(|r| RunningJson {
                build_id: r.build_id.clone(),
                drv_path: r.drv_path.clone(),
                builder: r.builder.clone(),
                started: r.started_unix,
                elapsed_secs: now.saturating_sub(r.started_unix).max(0) as u64,
            })
            .collect(),
        recent_failures: s
            .recent_failures
            .iter()
            .map(|f| FailureJson {
                build_id: f.build_id.clone(),
                drv_path: f.drv_path.clone(),
                builder: f.builder.clone(),
                error: style::sanitize(&f.error_message),
                finished: f.finished_unix,
            })
            .collect(),
    }
}

fn state_colour(state: &str) -> Colour {
    match state {
        "idle" => Colour::Green,
        "busy" => Colour::Yellow,
        "draining" => Colour::Blue,
        _ => Colour::Red,
    }
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// The human-readable report.
pub fn render_table(s: &StatusJson, now: i64, p: &Painter) -> String {
    let mut out = String::new();
    if s.builders.is_empty() {
        out.push_str(&p.paint(Colour::Yellow, "no builders have joined this farm yet"));
        out.push('\n');
    } else {
        let mut t = Table::new(&[
            "BUILDER",
            "STATE",
            "SYSTEMS",
            "FEATURES",
            "JOBS",
            "LOAD",
            "MEM FREE",
            "DISK FREE",
            "LAST SEEN",
        ]);
        for b in &s.builders {
            let mut features = list(&b.supported_features);
            if !b.mandatory_features.is_empty() {
                features.push_str(&format!(" (mandatory: {})", b.mandatory_features.join(",")));
            }
            t.row(vec![
                cell(&b.name),
                painted(p, state_colour(b.state), b.state),
                cell(list(&b.systems)),
                cell(features),
                cell(format!("{}/{}", b.running_jobs, b.max_jobs)),
                cell(format!("{:.2}", b.load)),
                cell(if b.memory_bytes > 0 {
                    format!(
                        "{} / {}",
                        style::bytes(b.memory_available_bytes),
                        style::bytes(b.memory_bytes)
                    )
                } else {
                    style::bytes(b.memory_available_bytes)
                }),
                cell(style::bytes(b.disk_free_bytes)),
                cell(style::ago(b.last_seen.unwrap_or(0), now)),
            ]);
        }
        out.push_str(&t.render(p));
        for b in s.builders.iter() {
            if let Some(why) = &b.store_problem {
                out.push_str(&format!(
                    "{} {}: {why}\n",
                    p.paint(Colour::Red, "TAINTED STORE, TAKES NO JOBS:"),
                    b.name
                ));
            }
        }
    }

    out.push('\n');
    if s.queue.iter().all(|q| q.queued == 0) {
        out.push_str(&format!("{} empty\n", p.paint(Colour::Bold, "QUEUE")));
    } else {
        let parts: Vec<String> = s
            .queue
            .iter()
            .filter(|q| q.queued > 0)
            .map(|q| format!("{}: {}", q.system, q.queued))
            .collect();
        out.push_str(&format!(
            "{} {} waiting ({})\n",
            p.paint(Colour::Bold, "QUEUE"),
            s.queued_total,
            parts.join(", ")
        ));
    }

    out.push('\n');
    if s.running.is_empty() {
        out.push_str(&format!("{} none\n", p.paint(Colour::Bold, "RUNNING")));
    } else {
        let mut t = Table::new(&["RUNNING", "BUILDER", "ELAPSED", "BUILD"]);
        for r in &s.running {
            t.row(vec![
                cell(style::short_path(&r.drv_path)),
                cell(&r.builder),
                cell(style::duration(r.elapsed_secs)),
                painted(p, Colour::Dim, &r.build_id),
            ]);
        }
        out.push_str(&t.render(p));
    }

    if !s.recent_failures.is_empty() {
        out.push('\n');
        let mut t = Table::new(&["RECENT FAILURES", "BUILDER", "WHEN", "ERROR"]);
        for f in &s.recent_failures {
            let err = f.error.lines().next().unwrap_or("").to_owned();
            t.row(vec![
                painted(p, Colour::Red, style::short_path(&f.drv_path)),
                cell(&f.builder),
                cell(style::ago(f.finished, now)),
                cell(err),
            ]);
        }
        out.push_str(&t.render(p));
    }
    out
}

/// Run `farm status`.
pub async fn run(farm: &Farm, args: &StatusArgs) -> Result<(), CliError> {
    let painter = Painter {
        enabled: style::stdout_colour(),
    };
    let interval = match args.watch {
        Some(s) if !(s.is_finite() && s >= 0.1) => {
            return Err(CliError::Usage(
                "--watch takes a number of seconds, at least 0.1".into(),
            ));
        }
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => None,
    };
    loop {
        let resp = farm.status().await?;
        let now = now_unix();
        let model = to_json(&resp, now);
        let text = if args.json {
            let mut t = serde_json::to_string(&model)
                .map_err(|e| CliError::Usage(format!("encoding JSON: {e}")))?;
            t.push('\n');
            t
        } else {
            render_table(&model, now, &painter)
        };
        let mut stdout = std::io::stdout().lock();
        if interval.is_some() && !args.json && painter.enabled {
            // Clear the screen and go home before each refresh.
            let _ = write!(stdout, "\x1b[2J\x1b[H");
        }
        stdout
            .write_all(text.as_bytes())
            .and_then(|_| stdout.flush())
            .map_err(|e| CliError::io("writing to stdout", e))?;
        drop(stdout);
        let Some(every) = interval else {
            return Ok(());
        };
        if !args.json && !painter.enabled {
            println!("---");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_proto::v1::*;

    fn sample() -> StatusResponse {
        StatusResponse {
            builders: vec![
                BuilderStatus {
                    name: "b1".into(),
                    state: BuilderState::Busy as i32,
                    capabilities: Some(Capabilities {
                        systems: vec!["x86_64-linux".into(), "i686-linux".into()],
                        supported_features: vec!["kvm".into(), "big-parallel".into()],
                        mandatory_features: vec![],
                        max_jobs: 4,
                        speed_factor: 1.0,
                        cores: 8,
                        memory_bytes: 16 << 30,
                        nix_version: "2.8.0".into(),
                    }),
                    load: Some(LoadReport {
                        running_jobs: 2,
                        load_avg_1: 1.5,
                        load_avg_5: 1.0,
                        memory_available_bytes: 8 << 30,
                        disk_free_bytes: 100 << 30,
                        cpu_pressure: -1.0,
                        memory_pressure: 0.5,
                        io_pressure: -1.0,
                        store_problem: "the store may still hold unverified paths".into(),
                    }),
                    last_seen_unix: 995,
                    public_key: "ssh-ed25519 AAAA b1".into(),
                },
                BuilderStatus {
                    name: "mac".into(),
                    state: BuilderState::Draining as i32,
                    capabilities: None,
                    load: None,
                    last_seen_unix: 0,
                    public_key: String::new(),
                },
            ],
            queue: vec![
                QueueDepth {
                    system: "x86_64-linux".into(),
                    queued: 3,
                },
                QueueDepth {
                    system: "aarch64-linux".into(),
                    queued: 1,
                },
            ],
            running: vec![RunningBuild {
                build_id: "bld-1".into(),
                drv_path: "/nix/store/fpfzx999brqs5x1w0n2dpyya4v8d43lh-hello.drv".into(),
                builder: "b1".into(),
                started_unix: 900,
            }],
            recent_failures: vec![RecentFailure {
                build_id: "bld-0".into(),
                drv_path: "/nix/store/nlbcvvibdaxfc09nafh29bvw5xb6q6qv-bad.drv".into(),
                builder: "b1".into(),
                error_message: "builder failed with exit code 1\nmore".into(),
                finished_unix: 990,
            }],
        }
    }

    #[test]
    fn json_has_the_documented_fields() {
        let j = serde_json::to_value(to_json(&sample(), 1000)).unwrap();
        let b = &j["builders"][0];
        for field in [
            "name",
            "state",
            "systems",
            "supported_features",
            "mandatory_features",
            "running_jobs",
            "max_jobs",
            "load",
            "last_seen",
        ] {
            assert!(b.get(field).is_some(), "missing {field}");
        }
        assert_eq!(b["state"], "busy");
        assert_eq!(b["systems"][1], "i686-linux");
        assert_eq!(b["running_jobs"], 2);
        assert_eq!(b["max_jobs"], 4);
        assert_eq!(b["load"], 1.5);
        assert_eq!(b["last_seen"], 995);
        assert!(b["cpu_pressure"].is_null());
        assert_eq!(b["memory_pressure"], 0.5);
        assert_eq!(
            b["store_problem"],
            "the store may still hold unverified paths"
        );
        assert_eq!(j["builders"][1]["state"], "draining");
        assert!(j["builders"][1]["last_seen"].is_null());
        assert!(j["builders"][1]["store_problem"].is_null());
        let table = render_table(&to_json(&sample(), 1000), 1000, &Painter { enabled: false });
        assert!(
            table.contains("TAINTED STORE, TAKES NO JOBS: b1: the store may still hold"),
            "{table}"
        );
        assert_eq!(j["queued_total"], 4);
        assert_eq!(j["queue"][0]["system"], "x86_64-linux");
        assert_eq!(j["running"][0]["elapsed_secs"], 100);
        assert_eq!(
            j["recent_failures"][0]["error"],
            "builder failed with exit code 1\nmore"
        );
    }

    #[test]
    fn states_are_named() {
        assert_eq!(state_name(BuilderState::Idle as i32), "idle");
        assert_eq!(state_name(BuilderState::Offline as i32), "offline");
        assert_eq!(state_name(42), "offline");
    }

    #[test]
    fn table_plain_and_coloured() {
        let model = to_json(&sample(), 1000);
        let plain = render_table(&model, 1000, &Painter { enabled: false });
        assert!(!plain.contains('\x1b'));
        let lines: Vec<&str> = plain.lines().collect();
        assert!(lines[0].starts_with("BUILDER  STATE"), "{plain}");
        assert!(
            lines[1].starts_with("b1       busy      x86_64-linux,i686-linux"),
            "{plain}"
        );
        assert!(plain.contains("2/4"));
        assert!(plain.contains("8.0 GiB / 16 GiB"));
        assert!(plain.contains("5s ago"));
        assert!(plain.contains("QUEUE 4 waiting (x86_64-linux: 3, aarch64-linux: 1)"));
        assert!(plain.contains("hello.drv"));
        assert!(plain.contains("1m40s"));
        assert!(plain.contains("builder failed with exit code 1"));
        assert!(!plain.contains("more"));
        let coloured = render_table(&model, 1000, &Painter { enabled: true });
        assert!(coloured.contains("\x1b[33mbusy\x1b[0m"));
    }

    #[test]
    fn empty_farm() {
        let t = render_table(
            &to_json(&StatusResponse::default(), 0),
            0,
            &Painter { enabled: false },
        );
        assert!(t.contains("no builders"));
        assert!(t.contains("QUEUE empty"));
        assert!(t.contains("RUNNING none"));
    }
}
