//! The Tether gateway.
//!
//! Work in progress (issue 4): so far the sans-IO pieces of a session that the connection
//! shell will drive — downlink sequence numbers, the bounded unacked buffer with cumulative
//! acks, resume and gap reporting ([`session::downlink`]), and the uplink dedup window
//! ([`session::dedup`]), the per-connection protocol state: login phase, login deadline,
//! heartbeat liveness, frame dispatch ([`conn`]), and the timing wheel that gives every connection its login and
//! heartbeat deadlines without an OS timer each ([`timer`]). They take no clock and do no
//! I/O, so they are tested without sockets or sleeps.

pub mod conn;
pub mod session;
pub mod timer;
