//! The gateway's clock: whole-second [`Tick`]s since start for deadlines, Unix milliseconds
//! for LOGIN_RESULT and token expiry. Tests use [`Clock::manual`] and move time by hand, so
//! login deadlines, heartbeat timeouts and grace periods are tested without sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::timer::Tick;

/// A cheap, cloneable clock.
#[derive(Debug, Clone)]
pub struct Clock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    start: Instant,
    start_unix_ms: u64,
    /// `Some`: a manual clock, this many milliseconds past the start.
    manual_ms: Option<AtomicU64>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock {
            inner: Arc::new(Inner {
                start: Instant::now(),
                start_unix_ms: unix_ms(),
                manual_ms: None,
            }),
        }
    }

    /// A clock that stands still until [`advance`](Self::advance)d. Its Unix time starts at
    /// the real time of its creation.
    pub fn manual() -> Clock {
        Clock {
            inner: Arc::new(Inner {
                start: Instant::now(),
                start_unix_ms: unix_ms(),
                manual_ms: Some(AtomicU64::new(0)),
            }),
        }
    }

    pub fn is_manual(&self) -> bool {
        self.inner.manual_ms.is_some()
    }

    /// Milliseconds since the clock's start.
    pub fn elapsed_ms(&self) -> u64 {
        match &self.inner.manual_ms {
            Some(ms) => ms.load(Ordering::SeqCst),
            None => self.inner.start.elapsed().as_millis() as u64,
        }
    }

    /// Whole seconds since the start.
    pub fn now(&self) -> Tick {
        (self.elapsed_ms() / 1000).min(Tick::MAX as u64) as Tick
    }

    /// Whole seconds since the start, rounded up: the stamp of an event that starts a
    /// deadline, so that the deadline (checked against [`now`](Self::now)) never comes early.
    pub fn now_ceil(&self) -> Tick {
        self.elapsed_ms().div_ceil(1000).min(Tick::MAX as u64) as Tick
    }

    /// Unix time in milliseconds.
    pub fn unix_ms(&self) -> u64 {
        self.inner.start_unix_ms + self.elapsed_ms()
    }

    /// Moves a manual clock forward (the gateway must be woken to notice: use
    /// `Gateway::advance_clock`). No effect on the system clock.
    pub fn advance_ms(&self, ms: u64) {
        if let Some(m) = &self.inner.manual_ms {
            m.fetch_add(ms, Ordering::SeqCst);
        }
    }
}
