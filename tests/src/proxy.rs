//! A TCP proxy between two farm processes whose link a test can cut and
//! restore: [`LinkProxy::cut`] drops every connection through it and refuses
//! new ones (they are accepted and closed at once, as a dead link looks to a
//! client that reconnects), [`LinkProxy::restore`] lets them through again.
//! Loopback only.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

struct Shared {
    target: SocketAddr,
    cut: AtomicBool,
    stopping: AtomicBool,
    /// Both sockets of every live connection, to shut them down on a cut.
    live: Mutex<Vec<(TcpStream, TcpStream)>>,
    /// Connections accepted and passed through, in all.
    passed: AtomicU64,
    /// Connections refused while the link was cut.
    refused: AtomicU64,
}

/// A cuttable TCP link on `127.0.0.1:<port>` to a target address.
pub struct LinkProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl LinkProxy {
    /// Listen on an ephemeral loopback port, forwarding to `target`.
    pub fn start(target: SocketAddr) -> anyhow::Result<LinkProxy> {
        anyhow::ensure!(
            target.ip().is_loopback(),
            "LinkProxy forwards to loopback only, not {target}"
        );
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            cut: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
            passed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let s = shared.clone();
        thread::Builder::new()
            .name(format!("link-proxy-{}", addr.port()))
            .spawn(move || accept_loop(listener, s))?;
        Ok(LinkProxy { addr, shared })
    }

    /// The address to dial instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drop every connection now and refuse new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        let live = std::mem::take(&mut *self.shared.live.lock().unwrap_or_else(|e| e.into_inner()));
        for (a, b) in live {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    /// Let connections through again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Connections passed through so far.
    pub fn passed(&self) -> u64 {
        self.shared.passed.load(Ordering::SeqCst)
    }

    /// Connections refused while cut.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if shared.cut.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(upstream) = TcpStream::connect(shared.target) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (Ok(c2), Ok(u2), Ok(c3), Ok(u3)) = (
            client.try_clone(),
            upstream.try_clone(),
            client.try_clone(),
            upstream.try_clone(),
        ) else {
            continue;
        };
        shared
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((c3, u3));
        shared.passed.fetch_add(1, Ordering::SeqCst);
        thread::spawn(move || pump(client, u2));
        thread::spawn(move || pump(upstream, c2));
    }
}

/// Copy `from` to `to` until either side closes, then close both.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for c in l.incoming().flatten() {
                thread::spawn(move || {
                    let mut r = c.try_clone().unwrap();
                    let mut w = c;
                    let _ = std::io::copy(&mut r, &mut w);
                });
            }
        });
        addr
    }

    fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)?;
        Ok(back)
    }

    #[test]
    fn cut_drops_connections_and_refuses_until_restored() {
        let proxy = LinkProxy::start(echo_server()).unwrap();
        let mut a = TcpStream::connect(proxy.addr()).unwrap();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(roundtrip(&mut a, b"hello").unwrap(), b"hello");
        proxy.cut();
        // The live connection is gone.
        assert!(roundtrip(&mut a, b"again").is_err());
        // A new one is closed at once.
        let mut b = TcpStream::connect(proxy.addr()).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(roundtrip(&mut b, b"x").is_err());
        assert!(proxy.refused() >= 1);
        proxy.restore();
        let mut c = TcpStream::connect(proxy.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(roundtrip(&mut c, b"back").unwrap(), b"back");
        assert_eq!(proxy.passed(), 2);
    }
}
