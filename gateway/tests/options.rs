//! What `Gateway::start`'s options do beyond the clock, the authenticator and the upstream.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use tether_gateway::clock::Clock;
use tether_gateway::{Gateway, Options};

static RUNS: AtomicUsize = AtomicUsize::new(0);

fn count() {
    RUNS.fetch_add(1, Ordering::SeqCst);
}

/// Each worker runs the housekeeping hook (the binary's allocator collect) once per second
/// of its clock, from its timer step: not per loop turn, not never.
#[test]
fn every_worker_runs_the_housekeeping_hook_once_a_second() {
    let mut c = config();
    c.workers = 2;
    let g = Gateway::start(
        c,
        Options {
            clock: Some(Clock::manual()),
            housekeeping: Some(count),
            ..Options::default()
        },
    )
    .expect("gateway starts");
    // Turns without a new second run nothing.
    for _ in 0..5 {
        g.advance_clock_ms(0);
    }
    let mut c = Raw::connect(g.addrs()[0]);
    c.login("alice", "phone", None);
    assert_eq!(RUNS.load(Ordering::SeqCst), 0);
    for s in 1..=3 {
        g.advance_clock(1);
        eventually(|| RUNS.load(Ordering::SeqCst) == 2 * s);
    }
    g.advance_clock_ms(300);
    c.send(&tether_codec::Frame::new(tether_codec::Header::Ping(
        tether_protocol::pb::Ping {},
    )));
    assert!(matches!(c.recv().header, tether_codec::Header::Pong(_)));
    assert_eq!(RUNS.load(Ordering::SeqCst), 6);
}
