//! The protocol logic of one session, with no sockets and no clock of its own: `core` owns a
//! session's state and rules and is driven by the workers; the other modules are its parts.

pub mod bucket;
pub mod core;
pub mod dedup;
pub mod downlink;
