//! The dashboard's admin sessions, in memory (they end with the coordinator):
//! single-use login tokens minted by the signed, admin-level gRPC
//! `DashboardLogin` (`farm dashboard`), exchanged once, before they expire,
//! for a session (an HttpOnly, SameSite=Strict cookie) that carries its own
//! CSRF token. Bounded: the oldest tokens and sessions are dropped first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;

/// The longest (and default) life of a login token.
pub(crate) const MAX_TOKEN_TTL: Duration = Duration::from_secs(120);
/// How long a session lasts after its login.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most login tokens outstanding at once.
const MAX_TOKENS: usize = 64;
/// Most sessions at once.
const MAX_SESSIONS: usize = 256;

/// An admin session of the dashboard.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// Sent back in the `X-CSRF-Token` header of every admin action.
    pub csrf: String,
    /// The admin key that minted the login (fingerprint and comment), for the log.
    pub who: String,
    expires: Instant,
}

#[derive(Debug)]
struct Pending {
    who: String,
    expires: Instant,
    minted: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    tokens: HashMap<String, Pending>,
    sessions: HashMap<String, (Session, Instant)>,
}

/// Shared between the gRPC service (mints) and the HTTP routes (exchange, check).
#[derive(Debug, Clone, Default)]
pub(crate) struct Sessions {
    inner: Arc<Mutex<Inner>>,
}

/// 32 random bytes, hex.
fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Equal, in time independent of where they differ.
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh login token for `who`, valid for `ttl` (at most [`MAX_TOKEN_TTL`]).
    pub(crate) fn mint(&self, who: String, ttl: Duration) -> String {
        let now = Instant::now();
        let ttl = ttl.min(MAX_TOKEN_TTL);
        let token = random_hex();
        let mut g = self.lock();
        g.tokens.retain(|_, p| p.expires > now);
        while g.tokens.len() >= MAX_TOKENS {
            let oldest = g
                .tokens
                .iter()
                .min_by_key(|(_, p)| p.minted)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => g.tokens.remove(&k),
                None => break,
            };
        }
        g.tokens.insert(
            token.clone(),
            Pending {
                who,
                expires: now + ttl,
                minted: now,
            },
        );
        token
    }

    /// Use up a login token: the new session's id and the session, or `None`
    /// (unknown, already used or expired; either way it is gone now).
    pub(crate) fn exchange(&self, token: &str) -> Option<(String, Session)> {
        let now = Instant::now();
        let mut g = self.lock();
        let p = g.tokens.remove(token)?;
        if p.expires <= now {
            return None;
        }
        g.sessions.retain(|_, (s, _)| s.expires > now);
        while g.sessions.len() >= MAX_SESSIONS {
            let oldest = g
                .sessions
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => g.sessions.remove(&k),
                None => break,
            };
        }
        let id = random_hex();
        let s = Session {
            csrf: random_hex(),
            who: p.who,
            expires: now + SESSION_TTL,
        };
        g.sessions.insert(id.clone(), (s.clone(), now));
        Some((id, s))
    }

    /// The live session with this id.
    pub(crate) fn get(&self, id: &str) -> Option<Session> {
        let g = self.lock();
        let (s, _) = g.sessions.get(id)?;
        (s.expires > Instant::now()).then(|| s.clone())
    }

    /// End a session (logout).
    pub(crate) fn end(&self, id: &str) {
        self.lock().sessions.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_used_once() {
        let s = Sessions::default();
        let t = s.mint("admin".into(), Duration::from_secs(60));
        let (id, sess) = s.exchange(&t).expect("first use");
        assert!(s.exchange(&t).is_none(), "second use");
        assert_eq!(s.get(&id).map(|x| x.csrf), Some(sess.csrf));
        assert!(s.get("nope").is_none());
        s.end(&id);
        assert!(s.get(&id).is_none());
    }

    #[test]
    fn an_expired_token_fails_and_ttl_is_capped() {
        let s = Sessions::default();
        let t = s.mint("admin".into(), Duration::ZERO);
        assert!(s.exchange(&t).is_none());
        let t = s.mint("admin".into(), Duration::from_secs(100_000));
        let exp = s.lock().tokens[&t].expires;
        assert!(exp <= Instant::now() + MAX_TOKEN_TTL);
    }

    #[test]
    fn bounded() {
        let s = Sessions::default();
        let first = s.mint("a".into(), Duration::from_secs(60));
        for _ in 0..MAX_TOKENS {
            s.mint("a".into(), Duration::from_secs(60));
        }
        assert_eq!(s.lock().tokens.len(), MAX_TOKENS);
        assert!(s.exchange(&first).is_none(), "the oldest went first");
    }

    #[test]
    fn comparison() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
    }
}
