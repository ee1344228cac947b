//! Presentation helpers: colour (only on a terminal with `NO_COLOR` unset),
//! human-readable sizes, durations and ages, and plain-text tables.

use std::io::IsTerminal;

/// Whether to colour what goes to stdout.
pub fn stdout_colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Whether to colour what goes to stderr.
pub fn stderr_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// ANSI colours used by the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    Red,
    Green,
    Yellow,
    Blue,
    Dim,
    Bold,
}

impl Colour {
    fn code(self) -> &'static str {
        match self {
            Colour::Red => "31",
            Colour::Green => "32",
            Colour::Yellow => "33",
            Colour::Blue => "34",
            Colour::Dim => "2",
            Colour::Bold => "1",
        }
    }
}

/// Paints text when enabled.
#[derive(Debug, Clone, Copy)]
pub struct Painter {
    pub enabled: bool,
}

impl Painter {
    pub fn paint(&self, colour: Colour, text: &str) -> String {
        if self.enabled && !text.is_empty() {
            format!("\x1b[{}m{text}\x1b[0m", colour.code())
        } else {
            text.to_owned()
        }
    }
}

/// Text from the farm (error messages Nix coloured, names) made safe to print
/// and to put in JSON: ANSI escape sequences removed, other control characters
/// but newline and tab dropped.
pub fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte @..~
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\x07' {
                            break;
                        }
                        if c == '\x1b' {
                            chars.next_if_eq(&'\\');
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// `1.5 GiB`-style sizes (binary units).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if v < 10.0 {
        format!("{v:.1} {}", UNITS[unit])
    } else {
        format!("{v:.0} {}", UNITS[unit])
    }
}

/// `45s`, `3m05s`, `2h07m`, `3d04h`.
pub fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// How long ago `then` (unix seconds) was, `now` being now; `never` for 0.
pub fn ago(then: i64, now: i64) -> String {
    if then <= 0 {
        return "never".into();
    }
    let d = now.saturating_sub(then).max(0) as u64;
    if d < 2 {
        "just now".into()
    } else {
        format!("{} ago", duration(d))
    }
}

/// The name part of a store path (`/nix/store/abc…-hello-1.0.drv` → `hello-1.0.drv`).
pub fn short_path(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name,
        _ => base,
    }
}

/// A table rendered with columns padded to their widest cell. Cells may carry
/// colour codes; widths are measured without them.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<(String, usize)>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// A row of `(display text, visible width)` cells.
    pub fn row(&mut self, cells: Vec<(String, usize)>) {
        self.rows.push(cells);
    }

    /// Render, the header painted with `p`.
    pub fn render(&self, p: &Painter) -> String {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, (_, w)) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(*w);
            }
        }
        let mut out = String::new();
        let line = |cells: Vec<(String, usize)>, out: &mut String| {
            let last = cells.len().min(n).saturating_sub(1);
            for (i, (text, w)) in cells.into_iter().enumerate().take(n) {
                out.push_str(&text);
                if i < last {
                    out.push_str(&" ".repeat(widths[i] - w + 2));
                }
            }
            out.push('\n');
        };
        line(
            self.header
                .iter()
                .map(|h| (p.paint(Colour::Bold, h), h.chars().count()))
                .collect(),
            &mut out,
        );
        for r in &self.rows {
            line(r.clone(), &mut out);
        }
        out
    }
}

/// A plain cell.
pub fn cell(text: impl Into<String>) -> (String, usize) {
    let t = text.into();
    let w = t.chars().count();
    (t, w)
}

/// A coloured cell.
pub fn painted(p: &Painter, c: Colour, text: &str) -> (String, usize) {
    (p.paint(c, text), text.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(200 * 1024 * 1024), "200 MiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(185), "3m05s");
        assert_eq!(duration(7260), "2h01m");
        assert_eq!(duration(90_000), "1d01h");
        assert_eq!(ago(0, 100), "never");
        assert_eq!(ago(95, 100), "5s ago");
        assert_eq!(ago(100, 100), "just now");
    }

    #[test]
    fn sanitizes_remote_text() {
        assert_eq!(
            sanitize("\x1b[0mbuilder for '\x1b[35;1m/nix/store/x-bad.drv\x1b[0m' failed"),
            "builder for '/nix/store/x-bad.drv' failed"
        );
        assert_eq!(sanitize("a\x1b]0;title\x07b\rc\nd\te"), "abc\nd\te");
        assert_eq!(sanitize("plain ünïcode"), "plain ünïcode");
        assert_eq!(sanitize("cut\x1b["), "cut");
    }

    #[test]
    fn short_paths() {
        assert_eq!(
            short_path("/nix/store/fpfzx999brqs5x1w0n2dpyya4v8d43lh-b.drv"),
            "b.drv"
        );
        assert_eq!(short_path("weird"), "weird");
    }

    #[test]
    fn table_pads_by_visible_width() {
        let on = Painter { enabled: true };
        let mut t = Table::new(&["A", "BB"]);
        t.row(vec![painted(&on, Colour::Red, "long"), cell("x")]);
        t.row(vec![cell("s"), cell("y")]);
        let plain = Table {
            header: t.header.clone(),
            rows: t.rows.clone(),
        }
        .render(&Painter { enabled: false });
        assert_eq!(plain, "A     BB\n\x1b[31mlong\x1b[0m  x\ns     y\n");
        let coloured = t.render(&on);
        assert!(coloured.starts_with("\x1b[1mA\x1b[0m     \x1b[1mBB\x1b[0m\n"));
    }
}
