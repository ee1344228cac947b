//! The cache-read case: narinfo lookups (p50 on one keep-alive connection,
//! and with 16 connections at once) and NAR download throughput from the
//! farm's binary cache, against nginx (Debian's) serving the very bytes the
//! farm served (each file fetched from the farm and written under nginx's
//! root at the same path).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use farm_tests::fixture::*;
use farm_tests::{FarmProcess, TestLogs};

use crate::report::{CaseReport, Figure, percentile};
use crate::run::{free_port, require};

/// Small paths pushed for the lookups.
const SMALL: usize = 100;
/// Lookups on the one keep-alive connection.
const SEQUENTIAL: usize = 2000;
/// Connections at once, and lookups on each.
const CONCURRENT: usize = 16;
const PER_CONNECTION: usize = 500;
/// The large path's size (random bytes: its NAR does not compress).
const LARGE: usize = 256 << 20;

/// A keep-alive HTTP/1.1 connection doing GETs.
struct Conn {
    host: String,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: &str) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Conn {
            host: addr.to_owned(),
            reader: BufReader::with_capacity(1 << 20, stream),
        })
    }

    /// GET `target`: (status, body).
    fn get(&mut self, target: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        write!(
            self.reader.get_mut(),
            "GET {target} HTTP/1.1\r\nHost: {}\r\n\r\n",
            self.host
        )?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .context("no status line")?
            .parse()
            .with_context(|| format!("status line {line:?}"))?;
        let mut length = None;
        let mut chunked = false;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    length = Some(v.parse::<usize>()?);
                } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .with_context(|| format!("chunk size {line:?}"))?;
                let start = body.len();
                body.resize(start + size, 0);
                self.reader.read_exact(&mut body[start..])?;
                line.clear();
                self.reader.read_line(&mut line)?;
                if size == 0 {
                    break;
                }
            }
        } else {
            let n = length.context("a response without Content-Length or chunks")?;
            body.resize(n, 0);
            self.reader.read_exact(&mut body)?;
        }
        Ok((status, body))
    }
}

/// The figures of one server.
struct Reads {
    sequential: Vec<f64>,
    concurrent: Vec<f64>,
    concurrent_rate: f64,
    nar: Duration,
}

fn measure(addr: &str, narinfos: &[String], nar: &str, nar_len: usize) -> anyhow::Result<Reads> {
    // Warm up (a first connection, the page cache).
    let mut c = Conn::open(addr)?;
    for t in narinfos {
        let (s, _) = c.get(t)?;
        ensure!(s == 200, "GET {t} from {addr}: {s}");
    }
    let mut sequential = Vec::with_capacity(SEQUENTIAL);
    for i in 0..SEQUENTIAL {
        let t = Instant::now();
        let (s, _) = c.get(&narinfos[i % narinfos.len()])?;
        sequential.push(t.elapsed().as_secs_f64() * 1000.0);
        ensure!(s == 200, "GET from {addr}: {s}");
    }
    let started = Instant::now();
    let threads: Vec<_> = (0..CONCURRENT)
        .map(|k| {
            let addr = addr.to_owned();
            let targets = narinfos.to_vec();
            std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                let mut c = Conn::open(&addr)?;
                let mut out = Vec::with_capacity(PER_CONNECTION);
                for i in 0..PER_CONNECTION {
                    let t = Instant::now();
                    let (s, _) = c.get(&targets[(i + k * 7) % targets.len()])?;
                    out.push(t.elapsed().as_secs_f64() * 1000.0);
                    ensure!(s == 200, "GET from {addr}: {s}");
                }
                Ok(out)
            })
        })
        .collect();
    let mut concurrent = Vec::new();
    for t in threads {
        concurrent.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??,
        );
    }
    let concurrent_rate = concurrent.len() as f64 / started.elapsed().as_secs_f64();
    // The NAR: the median of three downloads.
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let (s, body) = c.get(nar)?;
        times.push(t.elapsed());
        ensure!(s == 200, "GET {nar} from {addr}: {s}");
        ensure!(
            body.len() == nar_len,
            "{nar} from {addr}: {} bytes, not {nar_len}",
            body.len()
        );
    }
    times.sort();
    Ok(Reads {
        sequential,
        concurrent,
        concurrent_rate,
        nar: times[1],
    })
}

/// `nginx` in the foreground on `port`, serving `root`.
fn start_nginx(logs: &TestLogs, dir: &Path, root: &Path, port: u16) -> anyhow::Result<FarmProcess> {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nuser root;\nworker_processes 2;\npid {pid};\nerror_log stderr;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n  keepalive_requests 1000000;\n\
               client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               types {{ text/x-nix-narinfo narinfo; }}\n  default_type application/octet-stream;\n\
               server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
            pid = dir.join("nginx.pid").display(),
            d = dir.display(),
            root = root.display(),
        ),
    )?;
    let mut cmd = std::process::Command::new("nginx");
    cmd.arg("-c").arg(&conf).arg("-p").arg(dir);
    let mut p = FarmProcess::spawn(logs, "nginx", cmd)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        p.ensure_running()?;
        if Instant::now() > deadline {
            bail!("nginx did not listen:\n{}", p.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(p)
}

pub fn run(logs: &TestLogs) -> anyhow::Result<CaseReport> {
    require(&[("nginx", "nginx")])?;
    let farm = Farm::setup(logs).clients(1).pushers(1).start()?;
    let client = &farm.client;

    // The paths: SMALL text files and one LARGE random file, pushed.
    let files = client.root().join("cache-files");
    std::fs::create_dir_all(&files)?;
    let mut args: Vec<String> = vec!["--add".into()];
    for i in 0..SMALL {
        let f = files.join(format!("small-{i}"));
        std::fs::write(&f, format!("small path {i}\n").repeat(20))?;
        args.push(f.display().to_string());
    }
    let big = files.join("large");
    let mut bytes = vec![0u8; LARGE];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    std::fs::write(&big, &bytes)?;
    drop(bytes);
    args.push(big.display().to_string());
    let paths: Vec<String> = client
        .run("nix-store", &args)?
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    ensure!(
        paths.len() == SMALL + 1,
        "nix-store --add printed {paths:?}"
    );
    std::fs::remove_dir_all(&files)?;
    let push_key = farm
        .own_ssh()?
        .admin_keys
        .first()
        .context("no push key")?
        .clone();
    let mut cmd = client.command("nix");
    cmd.args(["copy", "--to", &farm.store_uri("ssh-ng")])
        .args(&paths)
        .env("NIX_SSHOPTS", farm.ssh_opts_with_key(&push_key)?);
    client.run_command(cmd)?;

    // What the farm serves, copied byte for byte under nginx's root.
    let addr = farm.coordinator.endpoints.http.clone();
    let www = tempfile::Builder::new()
        .prefix("farm-bench-nginx-")
        .tempdir()?;
    let root = www.path().join("root");
    std::fs::create_dir_all(&root)?;
    let mut conn = Conn::open(&addr)?;
    let mut narinfos = Vec::new();
    let mut large_nar = None;
    for p in &paths {
        let hash = p
            .strip_prefix("/nix/store/")
            .and_then(|b| b.split_once('-'))
            .map(|(h, _)| h)
            .with_context(|| format!("{p} is not a store path"))?;
        let target = format!("/{hash}.narinfo");
        let (s, body) = conn.get(&target)?;
        ensure!(s == 200, "the farm answered {s} to {target}");
        std::fs::write(root.join(&target[1..]), &body)?;
        let text = String::from_utf8(body)?;
        let url = text
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .context("narinfo without URL")?
            .to_owned();
        if p.ends_with("-large") {
            large_nar = Some(format!("/{url}"));
        }
        narinfos.push(target);
    }
    let nar = large_nar.context("no narinfo for the large path")?;
    let (s, body) = conn.get(&nar)?;
    ensure!(s == 200, "the farm answered {s} to {nar}");
    let nar_path = root.join(&nar[1..]);
    std::fs::create_dir_all(nar_path.parent().context("nar dir")?)?;
    std::fs::write(&nar_path, &body)?;
    let nar_len = body.len();
    drop(body);
    narinfos.truncate(SMALL);

    let port = free_port()?;
    let _nginx = start_nginx(logs, www.path(), &root, port)?;
    let nginx_addr = format!("127.0.0.1:{port}");

    let f = measure(&addr, &narinfos, &nar, nar_len)?;
    let n = measure(&nginx_addr, &narinfos, &nar, nar_len)?;

    let mut report = CaseReport::new(
        "cache-reads",
        format!(
            "{SMALL} narinfos and one {:.0} MB NAR (random bytes) in the farm's cache; nginx serves the same bytes from disk (page cache warm); \
             {SEQUENTIAL} lookups on one keep-alive connection, then {CONCURRENT} connections × {PER_CONNECTION} at once",
            nar_len as f64 / 1e6
        ),
    );
    report.row(
        &Figure::millis(
            "farm narinfo p50, keep-alive",
            percentile(&f.sequential, 50.0),
        ),
        &Figure::millis("nginx", percentile(&n.sequential, 50.0)),
        Some("≤ 1.2×"),
    );
    report.row(
        &Figure::millis(
            format!("farm narinfo p50, {CONCURRENT} concurrent"),
            percentile(&f.concurrent, 50.0),
        ),
        &Figure::millis("nginx", percentile(&n.concurrent, 50.0)),
        Some("≤ 1.2×"),
    );
    report.row(
        &Figure::millis(
            format!("farm narinfo p99, {CONCURRENT} concurrent"),
            percentile(&f.concurrent, 99.0),
        ),
        &Figure::millis("nginx", percentile(&n.concurrent, 99.0)),
        None,
    );
    report.row(
        &Figure::throughput("farm NAR download", nar_len as u64, f.nar),
        &Figure::throughput("nginx", nar_len as u64, n.nar),
        Some("≥ 0.9×"),
    );
    report.note(format!(
        "{CONCURRENT} concurrent: farm {:.0} lookups/s, nginx {:.0} lookups/s",
        f.concurrent_rate, n.concurrent_rate
    ));
    Ok(report)
}
