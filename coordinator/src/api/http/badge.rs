//! Build status badges of named jobs, public like the cache (no key): they
//! show a job's name and its state, nothing else.
//!
//! - `GET /badge/<job>.svg`: a shields.io-style flat badge, the job's name on
//!   the left, `passing` / `failing` / `building` / `unknown` on the right
//!   (`Cache-Control: no-cache`, so a README shows the state of now).
//! - `GET /badge/<job>.json`: the same for a shields.io endpoint badge
//!   (`{"schemaVersion":1,"label","message","color"}`).
//!
//! The job name is the rest of the path, percent-decoded (`ci/app` may come as
//! `/badge/ci/app.svg` or `/badge/ci%2Fapp.svg`), and must be a job name by
//! the shared rule (`farm_proto::job`: no `.` or `..` segments, no empty
//! ones), else 400. A name no job has yet is `unknown` with 200, so a README
//! renders before the first run. What the state means: [`Badge`].

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::error::text;
use crate::domain::coordinator::Coordinator;
use crate::domain::jobs::Badge;

/// The badge routes.
pub(crate) fn badge_router(coord: Coordinator) -> Router {
    Router::new()
        .route("/badge/{*file}", get(badge))
        .with_state(coord)
}

/// The badge format a path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Svg,
    Json,
}

/// The job name and format of a badge path (already percent-decoded).
fn parse(file: &str) -> Option<(&str, Format)> {
    let (name, format) = if let Some(n) = file.strip_suffix(".svg") {
        (n, Format::Svg)
    } else {
        (file.strip_suffix(".json")?, Format::Json)
    };
    farm_proto::job::check_job_name(name).ok()?;
    Some((name, format))
}

async fn badge(State(coord): State<Coordinator>, Path(file): Path<String>) -> Response {
    let Some((name, format)) = parse(&file) else {
        return text(
            StatusCode::BAD_REQUEST,
            "text/plain; charset=utf-8",
            "not a badge: /badge/<job name>.svg or .json\n".into(),
        );
    };
    let state = match coord.job(name).await {
        Ok(Some(job)) => job.badge(),
        Ok(None) => Badge::Unknown,
        Err(e) => {
            tracing::error!(error = %e, "reading a job for its badge");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                "internal server error\n".into(),
            );
        }
    };
    let (content_type, body) = match format {
        Format::Svg => ("image/svg+xml; charset=utf-8", svg(name, state)),
        Format::Json => ("application/json", endpoint_json(name, state)),
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Opened on its own, the SVG may not run or fetch anything.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'",
            ),
        ],
        body,
    )
        .into_response()
}

/// The right half's colour: shields.io's brightgreen, red, yellow, lightgrey.
fn colour(state: Badge) -> (&'static str, &'static str) {
    match state {
        Badge::Passing => ("#4c1", "brightgreen"),
        Badge::Failing => ("#e05d44", "red"),
        Badge::Building => ("#dfb317", "yellow"),
        Badge::Unknown => ("#9f9f9f", "lightgrey"),
    }
}

/// The shields.io endpoint document.
fn endpoint_json(name: &str, state: Badge) -> String {
    serde_json::json!({
        "schemaVersion": 1,
        "label": name,
        "message": state.as_str(),
        "color": colour(state).1,
    })
    .to_string()
}

/// Advance width of a character in Verdana, in 1/2048 em (what shields.io
/// measures badge text in); others count as a digit.
fn advance(c: char) -> u32 {
    const UPPER: [u32; 26] = [
        1401, 1405, 1430, 1577, 1294, 1178, 1587, 1540, 862, 1008, 1409, 1146, 1743, 1534, 1612,
        1235, 1612, 1423, 1401, 1233, 1499, 1401, 2026, 1403, 1231, 1403,
    ];
    const LOWER: [u32; 26] = [
        1229, 1264, 1064, 1264, 1208, 701, 1264, 1296, 562, 688, 1186, 562, 1992, 1296, 1233, 1264,
        1264, 871, 1042, 807, 1296, 1186, 1675, 1186, 1186, 1051,
    ];
    match c {
        'A'..='Z' => UPPER[c as usize - 'A' as usize],
        'a'..='z' => LOWER[c as usize - 'a' as usize],
        ' ' => 720,
        '.' => 745,
        '-' => 882,
        '/' => 1071,
        ':' => 889,
        '+' => 1716,
        '@' => 2048,
        _ => 1302,
    }
}

/// Width of `s` in Verdana 11px, in pixels (rounded up).
fn text_width(s: &str) -> u32 {
    let units: u32 = s.chars().map(advance).sum();
    (units * 11).div_ceil(2048)
}

/// `s` as XML character data or attribute value.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A flat badge: `label` on grey, the state on its colour. Text is drawn at
/// ten times the size and scaled down (as shields.io does) so the widths
/// fit in whole pixels; `textLength` makes any font fill exactly the
/// measured width.
fn svg(label: &str, state: Badge) -> String {
    let message = state.as_str();
    let (lw, mw) = (text_width(label), text_width(message));
    let (left, right) = (lw + 10, mw + 10);
    let total = left + right;
    let fill = colour(state).0;
    let l = xml_escape(label);
    let title = format!("{l}: {message}");
    let lx = left * 5;
    let mx = left * 10 + right * 5;
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="20" role="img" aria-label="{title}"><title>{title}</title><linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/><stop offset="1" stop-opacity=".1"/></linearGradient><clipPath id="r"><rect width="{total}" height="20" rx="3" fill="#fff"/></clipPath><g clip-path="url(#r)"><rect width="{left}" height="20" fill="#555"/><rect x="{left}" width="{right}" height="20" fill="{fill}"/><rect width="{total}" height="20" fill="url(#s)"/></g><g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" text-rendering="geometricPrecision" font-size="110"><text aria-hidden="true" x="{lx}" y="150" fill="#010101" fill-opacity=".3" transform="scale(.1)" textLength="{lw0}">{l}</text><text x="{lx}" y="140" transform="scale(.1)" fill="#fff" textLength="{lw0}">{l}</text><text aria-hidden="true" x="{mx}" y="150" fill="#010101" fill-opacity=".3" transform="scale(.1)" textLength="{mw0}">{message}</text><text x="{mx}" y="140" transform="scale(.1)" fill="#fff" textLength="{mw0}">{message}</text></g></svg>"##,
        lw0 = lw * 10,
        mw0 = mw * 10,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(parse("ci/app.svg"), Some(("ci/app", Format::Svg)));
        assert_eq!(parse("a.svg.json"), Some(("a.svg", Format::Json)));
        for bad in [
            "ci/app",
            ".svg",
            "../x.svg",
            "a/../b.svg",
            "a//b.svg",
            "a b.svg",
            "/a.svg",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn svg_shape() {
        let s = svg("ci/app", Badge::Passing);
        assert!(
            s.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{s}"
        );
        assert!(
            s.contains(">ci/app</text>") && s.contains(">passing</text>"),
            "{s}"
        );
        assert!(s.contains("fill=\"#4c1\""), "{s}");
        // Wider names make wider badges; the halves add up.
        let w = |s: &str| -> u32 {
            let at = s.find("width=\"").unwrap() + 7;
            s[at..].split('"').next().unwrap().parse().unwrap()
        };
        assert!(w(&svg("a-much-longer-job-name", Badge::Passing)) > w(&s));
        assert_eq!(
            w(&s),
            text_width("ci/app") + 10 + text_width("passing") + 10
        );
        // "passing" in Verdana 11px: shields.io's build|passing badge gives it
        // 41 px (a 51 px half less 10 of padding), "build" 27 px.
        assert!(
            (40..=43).contains(&text_width("passing")),
            "{}",
            text_width("passing")
        );
        assert!(
            (26..=29).contains(&text_width("build")),
            "{}",
            text_width("build")
        );
        assert_eq!(xml_escape("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&apos;");
    }

    #[test]
    fn endpoint_document() {
        let v: serde_json::Value =
            serde_json::from_str(&endpoint_json("ci/app", Badge::Failing)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"schemaVersion": 1, "label": "ci/app", "message": "failing", "color": "red"})
        );
    }
}
