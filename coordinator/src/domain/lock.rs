//! Taking the coordinator's std mutexes (see the lock order on
//! `coordinator::Inner`).

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Lock `m`, ignoring poisoning. A mutex is poisoned when a thread panicked
/// while holding it: a bug, already logged by the panic. Every critical
/// section here is short and synchronous, and what they guard (maps of
/// sessions, channels, logs; the scheduler, whose every persisted change is
/// written as it is made) stays usable; refusing the lock instead would turn
/// that one panic into every later builder session, follower and request
/// failing too, i.e. a coordinator that is up but dead. A restart recovers
/// from the state either way.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
