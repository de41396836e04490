//! The Tether gateway: an IM access layer holding long-lived client connections.
//!
//! - [`server::Gateway`] starts one: SO_REUSEPORT listeners and an epoll loop per worker
//!   thread ([`worker`]), the admin HTTP server ([`admin`]).
//! - [`node::Node`] is what the workers share: sessions by id, user and room; pushes; kicks.
//! - The protocol logic is sans-IO and takes the time as an argument: per connection
//!   ([`conn`]), per session ([`session`]), deadlines ([`timer`]).
//! - [`upstream::Upstream`] is the back end's interface; [`embedded::ChatUpstream`] the
//!   reference chat back end used when nothing else is configured. [`auth`] decides who
//!   logs in.
//! - [`supervisor`] runs several gateway processes on the same ports (`--processes`).

pub mod admin;
pub mod auth;
pub mod clock;
pub mod config;
pub mod conn;
pub mod embedded;
pub mod handoff;
pub mod metrics;
pub mod node;
pub mod server;
pub mod session;
pub mod supervisor;
pub mod timer;
mod transport;
pub mod upstream;
mod worker;

pub use server::{Gateway, Options};
