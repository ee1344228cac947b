//! `farm jobs [NAME]`: the named jobs `farm build --job` records, each with
//! its last run, or one job's history; a table or JSON (the stable format in
//! `farm jobs --help`).

use farm_proto::v1::{JobRun, JobState};
use serde::Serialize;

use crate::args::JobsArgs;
use crate::client::{Farm, now_unix};
use crate::error::CliError;
use crate::style::{self, Colour, Painter, Table, cell, painted};

/// One job in the list's `--json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobJson {
    pub name: String,
    pub state: &'static str,
    pub submission_id: String,
    pub started: Option<i64>,
    pub finished: Option<i64>,
    pub duration_secs: Option<u64>,
    pub outputs: usize,
    pub runs: u32,
}

/// One run in a history's `--json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunJson {
    pub submission_id: String,
    pub state: &'static str,
    pub started: Option<i64>,
    pub finished: Option<i64>,
    pub duration_secs: Option<u64>,
    pub drv_paths: Vec<String>,
    pub outputs: Vec<String>,
    pub built: u32,
    pub cached: u32,
    pub failed: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct ListJson {
    jobs: Vec<JobJson>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct HistoryJson {
    name: String,
    runs: Vec<RunJson>,
}

fn state_name(s: i32) -> &'static str {
    match JobState::try_from(s) {
        Ok(JobState::Building) => "building",
        Ok(JobState::Succeeded) => "succeeded",
        Ok(JobState::Failed) => "failed",
        Ok(JobState::Cancelled) => "cancelled",
        Ok(JobState::Unspecified) | Err(_) => "unknown",
    }
}

fn state_colour(s: &str) -> Colour {
    match s {
        "succeeded" => Colour::Green,
        "failed" => Colour::Red,
        "building" => Colour::Yellow,
        _ => Colour::Dim,
    }
}

fn secs(ms: i64) -> Option<i64> {
    (ms > 0).then_some(ms / 1000)
}

fn duration_secs(r: &JobRun) -> Option<u64> {
    (r.finished_unix_ms > 0)
        .then(|| (r.finished_unix_ms.saturating_sub(r.started_unix_ms).max(0) / 1000) as u64)
}

fn run_json(r: &JobRun) -> RunJson {
    RunJson {
        submission_id: r.submission_id.clone(),
        state: state_name(r.state),
        started: secs(r.started_unix_ms),
        finished: secs(r.finished_unix_ms),
        duration_secs: duration_secs(r),
        drv_paths: r.drv_paths.iter().map(|s| style::sanitize(s)).collect(),
        outputs: r.outputs.iter().map(|s| style::sanitize(s)).collect(),
        built: r.built,
        cached: r.cached,
        failed: r.failed,
    }
}

/// The duration column: how long it took, or has been running.
fn took(started: Option<i64>, duration: Option<u64>, now: i64) -> String {
    match (duration, started) {
        (Some(d), _) => style::duration(d),
        (None, Some(s)) => format!(
            "{} so far",
            style::duration(now.saturating_sub(s).max(0) as u64)
        ),
        (None, None) => "-".into(),
    }
}

fn render_list(jobs: &[JobJson], now: i64, p: &Painter) -> String {
    if jobs.is_empty() {
        return "no named jobs yet (farm build --job NAME … records one)\n".into();
    }
    let mut t = Table::new(&["JOB", "LAST", "WHEN", "TOOK", "OUTPUTS", "RUNS"]);
    for j in jobs {
        t.row(vec![
            cell(&j.name),
            painted(p, state_colour(j.state), j.state),
            cell(style::ago(j.started.unwrap_or(0), now)),
            cell(took(j.started, j.duration_secs, now)),
            cell(j.outputs.to_string()),
            cell(j.runs.to_string()),
        ]);
    }
    t.render(p)
}

fn render_history(h: &HistoryJson, now: i64, p: &Painter) -> String {
    let mut t = Table::new(&[
        "RUN", "STATE", "WHEN", "TOOK", "BUILT", "CACHED", "FAILED", "OUTPUTS",
    ]);
    for r in &h.runs {
        let outputs = match r.outputs.as_slice() {
            [] => "-".to_owned(),
            [one] => one.clone(),
            [first, rest @ ..] => format!("{first} (+{})", rest.len()),
        };
        t.row(vec![
            painted(p, Colour::Dim, &r.submission_id),
            painted(p, state_colour(r.state), r.state),
            cell(style::ago(r.started.unwrap_or(0), now)),
            cell(took(r.started, r.duration_secs, now)),
            cell(r.built.to_string()),
            cell(r.cached.to_string()),
            cell(r.failed.to_string()),
            cell(outputs),
        ]);
    }
    format!("{}\n{}", p.paint(Colour::Bold, &h.name), t.render(p))
}

/// Run `farm jobs`.
pub async fn run(farm: &Farm, args: &JobsArgs) -> Result<(), CliError> {
    let p = Painter {
        enabled: !args.json && style::stdout_colour(),
    };
    let now = now_unix();
    match &args.name {
        None => {
            let resp = farm.jobs("").await?;
            let jobs: Vec<JobJson> = resp
                .jobs
                .iter()
                .map(|j| {
                    let last = j.last.as_ref().map(run_json);
                    JobJson {
                        name: style::sanitize(&j.name),
                        state: last.as_ref().map_or("unknown", |r| r.state),
                        submission_id: last
                            .as_ref()
                            .map(|r| r.submission_id.clone())
                            .unwrap_or_default(),
                        started: last.as_ref().and_then(|r| r.started),
                        finished: last.as_ref().and_then(|r| r.finished),
                        duration_secs: last.as_ref().and_then(|r| r.duration_secs),
                        outputs: last.as_ref().map_or(0, |r| r.outputs.len()),
                        runs: j.runs,
                    }
                })
                .collect();
            if args.json {
                println!("{}", json(&ListJson { jobs })?);
            } else {
                print!("{}", render_list(&jobs, now, &p));
            }
        }
        Some(name) => {
            let resp = farm.jobs(name).await?;
            if !resp.found {
                return Err(CliError::NotFound(format!(
                    "no job named {name:?} (farm jobs lists them; farm build --job {name} … records one)"
                )));
            }
            let h = HistoryJson {
                name: name.clone(),
                runs: resp.history.iter().map(run_json).collect(),
            };
            if args.json {
                println!("{}", json(&h)?);
            } else {
                print!("{}", render_history(&h, now, &p));
            }
        }
    }
    Ok(())
}

fn json<T: Serialize>(v: &T) -> Result<String, CliError> {
    serde_json::to_string(v).map_err(|e| CliError::Usage(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(state: JobState, started: i64, finished: i64) -> JobRun {
        JobRun {
            submission_id: "s7".into(),
            state: state as i32,
            started_unix_ms: started,
            finished_unix_ms: finished,
            drv_paths: vec!["/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a.drv".into()],
            outputs: vec!["/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-a".into()],
            built: 1,
            cached: 0,
            failed: 0,
        }
    }

    #[test]
    fn json_shape_and_table() {
        let r = run_json(&run(JobState::Succeeded, 10_000, 75_500));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["state"], "succeeded");
        assert_eq!(
            (v["started"].clone(), v["finished"].clone()),
            (10.into(), 75.into())
        );
        assert_eq!(v["duration_secs"], 65);
        let building = run_json(&run(JobState::Building, 10_000, 0));
        assert_eq!(building.finished, None);
        assert_eq!(
            took(building.started, building.duration_secs, 70),
            "1m00s so far"
        );
        let jobs = vec![JobJson {
            name: "ci/app".into(),
            state: "succeeded",
            submission_id: "s7".into(),
            started: Some(10),
            finished: Some(75),
            duration_secs: Some(65),
            outputs: 1,
            runs: 3,
        }];
        let t = render_list(&jobs, 100, &Painter { enabled: false });
        assert!(t.starts_with("JOB "), "{t}");
        assert!(t.contains("ci/app  succeeded  1m30s ago  1m05s"), "{t}");
    }
}
