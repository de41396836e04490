//! The protocol logic of one session, with no sockets and no clock of its own.

pub mod dedup;
pub mod downlink;
