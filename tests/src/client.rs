//! The fixture's side of the farm's gRPC and HTTP: a submission's event
//! stream ([`EventStream`]), the `.drv` closure a client uploads before it
//! submits (path infos from the client's store, dependencies first), and a
//! bare HTTP/1.1 GET for the binary cache.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use farm_nix::hash::Hash;
use farm_nix::path_info::ValidPathInfo;
use farm_nix::store_path::StorePath;
use farm_proto::v1;
use farm_proto::v1::build_event::Event as Ev;

use crate::actor::Actor;

/// A submission's events as they arrive.
pub struct EventStream {
    pub(crate) stream: tonic::Streaming<v1::BuildEvent>,
    pub events: Vec<Ev>,
}

impl EventStream {
    /// Reads until `pred` holds for an event (returned), the stream ends, or
    /// the timeout passes (both errors listing what came).
    pub async fn until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Ev) -> bool,
    ) -> anyhow::Result<Ev> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.message()).await;
            let msg = match next {
                Err(_) => bail!(
                    "no matching event within {timeout:?}; events so far:\n{}",
                    self.render()
                ),
                Ok(Err(status)) => bail!(
                    "event stream failed: {status}; events so far:\n{}",
                    self.render()
                ),
                Ok(Ok(None)) => bail!(
                    "event stream ended without a matching event; events so far:\n{}",
                    self.render()
                ),
                Ok(Ok(Some(m))) => m,
            };
            let Some(ev) = msg.event else { continue };
            self.events.push(ev.clone());
            if pred(&ev) {
                return Ok(ev);
            }
        }
    }

    /// Reads until `SubmissionDone`.
    pub async fn done(&mut self, timeout: Duration) -> anyhow::Result<v1::SubmissionDone> {
        match self.until(timeout, |e| matches!(e, Ev::Done(_))).await? {
            Ev::Done(d) => Ok(d),
            _ => unreachable!("until returns a matching event"),
        }
    }

    /// The submission id from `Submitted`.
    pub fn submission_id(&self) -> Option<String> {
        self.events.iter().find_map(|e| match e {
            Ev::Submitted(s) => Some(s.submission_id.clone()),
            _ => None,
        })
    }

    /// Every distinct `BuildFinished`, in order (see [`EventStream::started`]).
    pub fn finished(&self) -> Vec<&v1::BuildFinished> {
        let mut seen = Vec::new();
        for e in &self.events {
            if let Ev::Finished(f) = e
                && !seen.contains(&f)
            {
                seen.push(f);
            }
        }
        seen
    }

    /// Every distinct `BuildStarted`, in order. A watch stream (a snapshot,
    /// then live events) may repeat an event that happened while the snapshot
    /// was taken; an identical repeat says nothing new, so it is dropped here.
    pub fn started(&self) -> Vec<&v1::BuildStarted> {
        let mut seen = Vec::new();
        for e in &self.events {
            if let Ev::Started(s) = e
                && !seen.contains(&s)
            {
                seen.push(s);
            }
        }
        seen
    }

    /// The last outcome per derivation path.
    pub fn outcomes(&self) -> BTreeMap<String, &v1::BuildFinished> {
        self.finished()
            .into_iter()
            .map(|f| (f.drv_path.clone(), f))
            .collect()
    }

    /// The events, one per line.
    pub fn render(&self) -> String {
        self.events
            .iter()
            .map(|e| format!("{}\n", render_event(e)))
            .collect()
    }
}

/// One event as a short line.
pub fn render_event(e: &Ev) -> String {
    match e {
        Ev::Submitted(s) => format!(
            "submitted {} total={} cached={}",
            s.submission_id, s.total, s.cached
        ),
        Ev::Queued(q) => format!("queued {} {}", q.build_id, q.drv_path),
        Ev::Started(s) => format!("started {} {} on {}", s.build_id, s.drv_path, s.builder),
        Ev::Finished(f) => format!(
            "finished {} {} {:?} on {:?} {}",
            f.build_id,
            f.drv_path,
            v1::BuildOutcome::try_from(f.outcome).unwrap_or(v1::BuildOutcome::Unspecified),
            f.builder,
            f.error_message
        ),
        Ev::Done(d) => format!(
            "done {} success={} built={} cached={} failed={}",
            d.submission_id, d.success, d.built, d.cached, d.failed
        ),
    }
}

/// The outcome of a `BuildFinished`.
pub fn outcome(f: &v1::BuildFinished) -> v1::BuildOutcome {
    v1::BuildOutcome::try_from(f.outcome).unwrap_or(v1::BuildOutcome::Unspecified)
}

/// The derivation name of a `.drv` path (`/nix/store/…-NAME.drv` → `NAME`).
pub fn drv_name(drv_path: &str) -> String {
    let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
    let name = base.split_once('-').map(|(_, n)| n).unwrap_or(base);
    name.trim_end_matches(".drv").to_owned()
}

/// The path infos of `.drv` paths' closure in `actor`'s store
/// (`nix path-info --json -r --derivation`).
pub fn drv_path_infos(actor: &Actor, paths: &[StorePath]) -> anyhow::Result<Vec<ValidPathInfo>> {
    closure_infos(actor, paths, &["--derivation"])
}

/// The path infos of `paths`' closure in `actor`'s store (`nix path-info --json -r`).
pub fn path_infos(actor: &Actor, paths: &[StorePath]) -> anyhow::Result<Vec<ValidPathInfo>> {
    closure_infos(actor, paths, &[])
}

fn closure_infos(
    actor: &Actor,
    paths: &[StorePath],
    extra: &[&str],
) -> anyhow::Result<Vec<ValidPathInfo>> {
    let mut args = vec!["path-info".to_string(), "--json".into(), "-r".into()];
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(paths.iter().map(|p| p.to_string()));
    let json: serde_json::Value = serde_json::from_str(&actor.run("nix", &args)?)?;
    let mut out = Vec::new();
    for item in json
        .as_array()
        .context("path-info output is not an array")?
    {
        let s = |k: &str| item.get(k).and_then(|v| v.as_str());
        let path = StorePath::parse(s("path").context("path")?)?;
        let nar_hash = Hash::parse_any(s("narHash").context("narHash")?)?;
        let nar_size = item["narSize"].as_u64().context("narSize")?;
        let mut info = ValidPathInfo::new(path, nar_hash, nar_size);
        for r in item["references"].as_array().context("references")? {
            info.references
                .insert(StorePath::parse(r.as_str().context("reference")?)?);
        }
        if let Some(d) = s("deriver") {
            info.deriver = Some(StorePath::parse(d)?);
        }
        info.ca = s("ca").map(str::to_owned);
        out.push(info);
    }
    Ok(out)
}

/// `infos` with every path after its references.
pub(crate) fn topo_order(infos: Vec<ValidPathInfo>) -> anyhow::Result<Vec<ValidPathInfo>> {
    let mut by_path: HashMap<StorePath, ValidPathInfo> =
        infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut done: BTreeSet<StorePath> = BTreeSet::new();
    let mut out = Vec::new();
    while !by_path.is_empty() {
        let ready: Vec<StorePath> = by_path
            .values()
            .filter(|i| {
                i.references
                    .iter()
                    .all(|r| r == &i.path || done.contains(r) || !by_path.contains_key(r))
            })
            .map(|i| i.path.clone())
            .collect();
        ensure!(
            !ready.is_empty(),
            "reference cycle among {:?}",
            by_path.keys()
        );
        for p in ready {
            let info = by_path.remove(&p).context("present")?;
            done.insert(p);
            out.push(info);
        }
    }
    Ok(out)
}

/// `nix-store --dump PATH` inside the actor.
pub fn dump(actor: &Actor, path: &StorePath) -> anyhow::Result<Vec<u8>> {
    let out = actor
        .command("nix-store")
        .arg("--dump")
        .arg(path.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()?;
    ensure!(
        out.status.success(),
        "nix-store --dump {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// `GET target` over a fresh HTTP/1.1 connection to `addr` (`host:port`):
/// (status, body). Only `Content-Length` bodies (what the cache sends).
pub async fn http_get(addr: &str, target: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split])?.to_ascii_lowercase();
    ensure!(
        !head.contains("transfer-encoding: chunked"),
        "unexpected chunked response to {target}"
    );
    let status: u16 = head.split(' ').nth(1).context("status line")?.parse()?;
    Ok((status, raw[split + 4..].to_vec()))
}

/// `GET target` over a fresh HTTP/1.1 connection to `addr`, blocking: (status, body).
pub fn http_get_blocking(addr: &str, target: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split])?;
    let status: u16 = head.split(' ').nth(1).context("status line")?.parse()?;
    Ok((status, raw[split + 4..].to_vec()))
}
