//! Starting and stopping a gateway: listeners, workers, the admin server.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;

use mio::Poll;
use socket2::{Domain, Protocol, Socket, Type};

use crate::admin::AdminServer;
use crate::auth::{Authenticator, DevAuthenticator, HmacAuthenticator};
use crate::clock::Clock;
use crate::config::Config;
use crate::embedded::ChatUpstream;
use crate::node::{Cmd, Node};
use crate::upstream::Upstream;
use crate::worker::{Listener, Worker, WAKER};

/// What a gateway runs with besides its [`Config`].
#[derive(Default)]
pub struct Options {
    /// `None`: the system clock.
    pub clock: Option<Clock>,
    /// `None`: [`HmacAuthenticator`] with `auth_secret`, or [`DevAuthenticator`] with
    /// `dev_auth`.
    pub auth: Option<Box<dyn Authenticator>>,
    /// `None`: the embedded reference upstream ([`ChatUpstream`]).
    pub upstream: Option<Arc<dyn Upstream>>,
    /// This process's siblings under a `--processes` supervisor: sessions are handed between
    /// them on resume ([`crate::handoff`]). `None`: a process on its own.
    pub siblings: Option<crate::handoff::Siblings>,
    /// Called by each worker on its own thread once a second, from its timer step. The binary
    /// passes its allocator's collect here, so that memory freed after a burst (a login or
    /// reconnect storm) goes back to the system while the worker only serves heartbeats;
    /// without it, mimalloc returns a thread's freed pages on that thread's later
    /// allocations. `None`: nothing.
    pub housekeeping: Option<fn()>,
}

/// A running gateway.
pub struct Gateway {
    node: Arc<Node>,
    threads: Vec<JoinHandle<()>>,
    addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    admin: Option<AdminServer>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addrs", &self.addrs)
            .field("tls_addrs", &self.tls_addrs)
            .finish_non_exhaustive()
    }
}

fn resolve(addr: &str) -> io::Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no address: {addr}")))
}

/// One SO_REUSEPORT listener on `addr` (the kernel spreads connections over the workers'
/// listeners of one address).
fn listen(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    Ok(s.into())
}

/// The TLS server configuration from PEM files (TLS 1.3 preferred, 1.2 accepted).
pub fn tls_config(cert_path: &str, key_path: &str) -> io::Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
    };
    let certs = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| bad(cert_path, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert_path, &e))?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| bad(key_path, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS versions", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("TLS certificate", &e))?;
    Ok(Arc::new(config))
}

impl Gateway {
    /// Binds every listener (on each worker), starts the workers and the admin server.
    pub fn start(config: Config, options: Options) -> io::Result<Gateway> {
        config
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let auth: Box<dyn Authenticator> = match options.auth {
            Some(a) => a,
            None if config.dev_auth => {
                tracing::warn!("--dev-auth: ANY token is accepted; never use this in production");
                Box::new(DevAuthenticator)
            }
            None => Box::new(HmacAuthenticator::new(config.auth_secret.as_bytes())),
        };
        let upstream = options
            .upstream
            .unwrap_or_else(|| Arc::new(ChatUpstream::new(&config)));
        let clock = options.clock.unwrap_or_else(Clock::system);
        let workers = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
        .min(1024);
        let tls = if config.tls_listen.iter().all(|a| a.is_empty()) {
            None
        } else {
            Some(tls_config(&config.tls_cert, &config.tls_key)?)
        };
        // Bind the first listener of each address, then the other workers' listeners on the
        // port it got (so that port 0 works).
        let mut per_worker: Vec<Vec<Listener>> = (0..workers).map(|_| Vec::new()).collect();
        let mut addrs = Vec::new();
        let mut tls_addrs = Vec::new();
        let all = config
            .listen
            .iter()
            .map(|a| (a, None))
            .chain(config.tls_listen.iter().map(|a| (a, tls.clone())))
            .filter(|(a, _)| !a.is_empty());
        for (addr, tls) in all {
            let mut addr = resolve(addr)?;
            for (w, listeners) in per_worker.iter_mut().enumerate() {
                let l = listen(addr, config.backlog)
                    .map_err(|e| io::Error::new(e.kind(), format!("listen on {addr}: {e}")))?;
                if w == 0 {
                    addr = l.local_addr()?;
                    if tls.is_some() {
                        tls_addrs.push(addr);
                    } else {
                        addrs.push(addr);
                    }
                }
                listeners.push(Listener {
                    sock: mio::net::TcpListener::from_std(l),
                    tls: tls.clone(),
                });
            }
        }
        let mut config = config;
        config.max_connections = crate::config::effective_max_connections(config.max_connections);
        if config.max_prelogin_connections == 0 {
            config.max_prelogin_connections = (config.max_connections / 4).max(1);
        }
        let node = Node::new(config, clock, auth, upstream);
        if let Some(siblings) = options.siblings {
            let h = crate::handoff::Handoff::start(&node, siblings)?;
            let _ = node.handoff.set(h);
        }
        let mut links = Vec::new();
        let mut ready = Vec::new();
        for (w, listeners) in per_worker.into_iter().enumerate() {
            let poll = Poll::new()?;
            let waker = mio::Waker::new(poll.registry(), WAKER)?;
            let (tx, rx) = crossbeam_channel::unbounded::<Cmd>();
            links.push((tx, waker));
            let slots = node.config.max_connections.div_ceil(workers);
            ready.push(Worker::new(
                w as u16,
                node.clone(),
                poll,
                listeners,
                rx,
                slots,
                options.housekeeping,
            )?);
        }
        node.set_workers(links);
        let mut threads = Vec::new();
        for (w, worker) in ready.into_iter().enumerate() {
            threads.push(
                std::thread::Builder::new()
                    .name(format!("tether-worker-{w}"))
                    .spawn(move || worker.run())?,
            );
        }
        let admin = if node.config.admin_listen.is_empty() {
            None
        } else {
            Some(AdminServer::start(node.clone(), &node.config.admin_listen)?)
        };
        tracing::info!(
            ?addrs,
            ?tls_addrs,
            admin = ?admin.as_ref().map(|a| a.addr()),
            workers,
            "tether gateway started"
        );
        Ok(Gateway {
            node,
            threads,
            addrs,
            tls_addrs,
            admin,
        })
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The plain listeners' addresses (ports resolved).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr())
    }

    /// Moves a manual clock forward and has every worker look at it.
    pub fn advance_clock(&self, secs: u64) {
        self.node.clock.advance_ms(secs * 1000);
        self.node.tick();
    }

    /// Moves a manual clock forward by `ms` milliseconds and has every worker look at it.
    pub fn advance_clock_ms(&self, ms: u64) {
        self.node.clock.advance_ms(ms);
        self.node.tick();
    }

    /// Starts a drain; [`wait`](Self::wait) returns when it is done.
    pub fn drain(&self) {
        self.node.drain();
    }

    /// Waits for the workers to stop (after a drain), then stops the admin server.
    pub fn wait(mut self) {
        self.join();
    }

    fn join(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        if let Some(h) = self.node.handoff.get() {
            h.stop();
        }
    }

    /// Closes every connection at once (no GOAWAY) and stops.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        for w in 0..self.node.worker_count() {
            self.node.send(w as u16, Cmd::Stop);
        }
        self.join();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop_now();
        }
    }
}
