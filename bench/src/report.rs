//! What a case measured: rows of figure | baseline | ratio, printed as a
//! table per case or as JSON (`--json`) for programs.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// One measured quantity: a value in a unit, and what it is.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// What was measured (a command, a path through the farm).
    pub what: String,
    pub value: f64,
    /// `s`, `ms`, `MB/s`, `MiB`.
    pub unit: &'static str,
    /// Whether a lower value is the better one (times) or a higher (throughput).
    pub lower_is_better: bool,
}

impl Figure {
    /// A wall time, in seconds.
    pub fn secs(what: impl Into<String>, d: Duration) -> Figure {
        Figure {
            what: what.into(),
            value: d.as_secs_f64(),
            unit: "s",
            lower_is_better: true,
        }
    }

    /// A latency, in milliseconds.
    pub fn millis(what: impl Into<String>, ms: f64) -> Figure {
        Figure {
            what: what.into(),
            value: ms,
            unit: "ms",
            lower_is_better: true,
        }
    }

    /// A size in MB (10^6 bytes), from bytes.
    pub fn megabytes(what: impl Into<String>, bytes: f64) -> Figure {
        Figure {
            what: what.into(),
            value: bytes / 1e6,
            unit: "MB",
            lower_is_better: true,
        }
    }

    /// A throughput of `bytes` in `d`, in MB/s (10^6 bytes).
    pub fn throughput(what: impl Into<String>, bytes: u64, d: Duration) -> Figure {
        Figure {
            what: what.into(),
            value: bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9),
            unit: "MB/s",
            lower_is_better: false,
        }
    }

    fn shown(&self) -> String {
        let v = self.value;
        let num = match self.unit {
            "s" if v < 10.0 => format!("{v:.2}"),
            "s" => format!("{v:.1}"),
            "ms" if v < 10.0 => format!("{v:.2}"),
            "ms" => format!("{v:.1}"),
            "MB" => format!("{v:.1}"),
            _ => format!("{v:.0}"),
        };
        format!("{num} {}", self.unit)
    }
}

/// A figure of the farm beside a baseline measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub figure: Figure,
    pub baseline: Figure,
    /// figure / baseline (same unit).
    pub ratio: f64,
    /// The goal for this ratio, when it sets one (`≤ 1.5×`).
    pub goal: Option<String>,
}

impl Row {
    pub fn new(figure: &Figure, baseline: &Figure, goal: Option<&str>) -> Row {
        Row {
            ratio: figure.value / baseline.value.max(1e-12),
            figure: figure.clone(),
            baseline: baseline.clone(),
            goal: goal.map(str::to_owned),
        }
    }
}

/// One case's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    pub case: String,
    /// What the case ran on (graph shape, farm, sizes).
    pub setup: String,
    pub rows: Vec<Row>,
    /// Further measured facts that are not a figure against a baseline.
    pub notes: Vec<String>,
    pub seconds: f64,
    /// Set when the case failed (its logs went to stderr).
    pub error: Option<String>,
}

impl CaseReport {
    pub fn new(case: &str, setup: impl Into<String>) -> CaseReport {
        CaseReport {
            case: case.to_owned(),
            setup: setup.into(),
            rows: Vec::new(),
            notes: Vec::new(),
            seconds: 0.0,
            error: None,
        }
    }

    pub fn row(&mut self, figure: &Figure, baseline: &Figure, goal: Option<&str>) {
        self.rows.push(Row::new(figure, baseline, goal));
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The case as a Markdown table (readable as plain text too).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "### {} ({:.0} s)\n", self.case, self.seconds);
        let _ = writeln!(out, "{}\n", self.setup);
        if let Some(e) = &self.error {
            let _ = writeln!(out, "FAILED: {e}\n");
        }
        if !self.rows.is_empty() {
            let _ = writeln!(out, "| figure | baseline | ratio | goal |");
            let _ = writeln!(out, "|---|---|---|---|");
            for r in &self.rows {
                let _ = writeln!(
                    out,
                    "| {}: {} | {}: {} | {:.2}× | {} |",
                    cell(&r.figure.what),
                    r.figure.shown(),
                    cell(&r.baseline.what),
                    r.baseline.shown(),
                    r.ratio,
                    r.goal.as_deref().unwrap_or("—")
                );
            }
            out.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        out
    }
}

/// Text for a Markdown table cell (a `|` in a command line escaped).
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// Percentile `p` (0–100) of `values` (nearest rank), `NaN` when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}
