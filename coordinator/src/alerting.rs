//! Sending alerts: the loop that looks at the farm every second and asks the
//! domain's [`Alerts`] what to say, and one sender task per target (an ntfy
//! topic, a webhook) that POSTs it.
//!
//! Nothing here can hold up the scheduler: the loop reads the scheduler
//! like a scrape does (one short look under its lock) and hands each alert to
//! every target's bounded queue without waiting ([`QUEUE`]; a full queue
//! drops the alert, logged); each send has a timeout and a few retries.
//! Target URLs may carry tokens (an ntfy topic is its own secret, a webhook
//! URL often has one): logs name a target by scheme, host and port only, and
//! the HTTP client's errors are logged without their URL.
//!
//! - ntfy (<https://docs.ntfy.sh/publish/>): `POST <topic URL>` with the
//!   message as the body and `Title`, `Priority` (`high` firing, `default`
//!   resolved) and `Tags` headers.
//! - webhook: `POST <URL>` with `Content-Type: application/json` and
//!   `{"alert": kind, "state": "firing"|"resolved", "subject", "message",
//!   "at": RFC 3339, "title"}`.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::domain::alerts::{Alert, AlertConfig, AlertState, Alerts};
use crate::domain::coordinator::{Coordinator, now_ms};

/// Alerts queued per target at most; more are dropped (and logged).
pub(crate) const QUEUE: usize = 64;
/// How long one POST may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries per alert and target (the pause doubles from one second).
const TRIES: u32 = 3;

/// Where alerts go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertTargets {
    /// An ntfy topic URL (`https://ntfy.sh/my-farm`).
    pub ntfy: Option<String>,
    /// A URL that receives each alert as JSON.
    pub webhook: Option<String>,
}

impl AlertTargets {
    pub fn is_empty(&self) -> bool {
        self.ntfy.is_none() && self.webhook.is_none()
    }
}

/// Why a target URL is refused at start.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("alert target {what}: not an http:// or https:// URL")]
    BadUrl { what: &'static str },
    #[error("the alerts' HTTP client: {0}")]
    Client(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ntfy,
    Webhook,
}

/// A target's URL as logs show it: scheme, host and port, nothing that may
/// be a secret (path, query, user info).
pub(crate) fn shown(url: &reqwest::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{}://{h}:{p}", url.scheme()),
        (Some(h), None) => format!("{}://{h}", url.scheme()),
        _ => format!("{}://?", url.scheme()),
    }
}

fn parse(what: &'static str, url: &str) -> Result<reqwest::Url, AlertError> {
    let u = reqwest::Url::parse(url.trim()).map_err(|_| AlertError::BadUrl { what })?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(AlertError::BadUrl { what });
    }
    Ok(u)
}

/// The targets' queues.
pub(crate) struct Senders {
    queues: Vec<(String, mpsc::Sender<Alert>)>,
}

impl Senders {
    /// One sender task per target (they end when this is dropped).
    pub(crate) fn start(targets: &AlertTargets) -> Result<Senders, AlertError> {
        let client = reqwest::Client::builder()
            .timeout(SEND_TIMEOUT)
            .connect_timeout(SEND_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("nix-farm/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AlertError::Client(e.without_url().to_string()))?;
        let mut queues = Vec::new();
        for (kind, what, url) in [
            (Kind::Ntfy, "--alert-ntfy", &targets.ntfy),
            (Kind::Webhook, "--alert-webhook", &targets.webhook),
        ] {
            let Some(url) = url else { continue };
            let url = parse(what, url)?;
            let name = format!(
                "{} {}",
                if kind == Kind::Ntfy {
                    "ntfy"
                } else {
                    "webhook"
                },
                shown(&url)
            );
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(send_loop(client.clone(), kind, url, name.clone(), rx));
            queues.push((name, tx));
        }
        Ok(Senders { queues })
    }

    /// Queue `alert` to every target, never waiting.
    pub(crate) fn send(&self, alert: &Alert) {
        for (name, tx) in &self.queues {
            if tx.try_send(alert.clone()).is_err() {
                tracing::warn!(target_url = %name, alert = alert.kind.as_str(), subject = %alert.subject, "alert queue full or closed: alert dropped");
            }
        }
    }
}

async fn send_loop(
    client: reqwest::Client,
    kind: Kind,
    url: reqwest::Url,
    name: String,
    mut rx: mpsc::Receiver<Alert>,
) {
    while let Some(alert) = rx.recv().await {
        let mut pause = Duration::from_secs(1);
        for attempt in 1..=TRIES {
            let req = match kind {
                Kind::Ntfy => client
                    .post(url.clone())
                    .header("Title", header_text(&alert.title()))
                    .header(
                        "Priority",
                        match alert.state {
                            AlertState::Firing => "high",
                            AlertState::Resolved => "default",
                        },
                    )
                    .header(
                        "Tags",
                        match alert.state {
                            AlertState::Firing => "warning,nix-farm",
                            AlertState::Resolved => "white_check_mark,nix-farm",
                        },
                    )
                    .body(alert.message.clone()),
                Kind::Webhook => client
                    .post(url.clone())
                    .header("Content-Type", "application/json")
                    .body(webhook_body(&alert)),
            };
            let why = match req.send().await {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(target_url = %name, alert = alert.kind.as_str(), state = alert.state.as_str(), subject = %alert.subject, "alert sent");
                    break;
                }
                Ok(r) => format!("answered {}", r.status()),
                Err(e) => e.without_url().to_string(),
            };
            if attempt == TRIES {
                tracing::error!(target_url = %name, alert = alert.kind.as_str(), subject = %alert.subject, error = %why, "cannot send an alert; giving up on it");
            } else {
                tracing::warn!(target_url = %name, alert = alert.kind.as_str(), error = %why, "cannot send an alert; trying again");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
}

/// A header value: printable ASCII (ntfy reads the rest as RFC 2047), on one line.
fn header_text(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// The webhook's JSON.
pub(crate) fn webhook_body(a: &Alert) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "alert": a.kind.as_str(),
        "state": a.state.as_str(),
        "subject": a.subject,
        "message": a.message,
        "title": a.title(),
        "at": a.at_rfc3339(),
    }))
    .unwrap_or_default()
}

/// Look at the farm every `period` and send what the alerts decide; runs
/// until the coordinator stops.
pub(crate) async fn run(
    coord: Coordinator,
    config: AlertConfig,
    senders: Senders,
    period: Duration,
) {
    let watched = config.watched_jobs.clone();
    let mut alerts = Alerts::new(config, now_ms());
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let obs = coord.alert_observation(&watched).await;
        for alert in alerts.evaluate(&obs, now_ms()) {
            tracing::warn!(alert = alert.kind.as_str(), state = alert.state.as_str(), subject = %alert.subject, "{}", alert.message);
            senders.send(&alert);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::alerts::AlertKind;

    #[test]
    fn logs_show_no_path_query_or_user() {
        let u = parse(
            "x",
            "https://user:secret@ntfy.example.org/tok3n-topic?auth=abc",
        )
        .unwrap();
        assert_eq!(shown(&u), "https://ntfy.example.org");
        let u = parse("x", "http://127.0.0.1:8080/hook/s3cret").unwrap();
        assert_eq!(shown(&u), "http://127.0.0.1:8080");
        assert!(parse("x", "ftp://h/x").is_err());
        assert!(parse("x", "not a url").is_err());
        // The error names the flag, never the URL.
        let e = parse("--alert-webhook", "file:///etc/s3cret").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn webhook_json_and_ntfy_title() {
        let a = Alert {
            kind: AlertKind::BuilderOffline,
            state: AlertState::Firing,
            subject: "b1".into(),
            message: "builder b1 is gone: check it".into(),
            at_ms: 1_796_159_100_000,
        };
        let v: serde_json::Value = serde_json::from_slice(&webhook_body(&a)).unwrap();
        assert_eq!(v["alert"], "builder_offline");
        assert_eq!(v["state"], "firing");
        assert_eq!(v["subject"], "b1");
        assert_eq!(v["at"], "2026-12-01T21:05:00Z");
        assert_eq!(
            header_text("[farm] builder b1 offline\n"),
            "[farm] builder b1 offline?"
        );
    }
}
