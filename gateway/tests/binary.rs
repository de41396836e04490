//! The `tether-gateway` binary itself: out of file descriptors, it backs off and resumes
//! accepting when descriptors free up; SIGTERM drains and exits; `--processes` runs several
//! processes on one port.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use common::*;
use tether_codec::{Frame, Header};
use tether_protocol::pb;

/// Two distinct free ports (both held while picked). The gateway's listeners use
/// SO_REUSEPORT, so two gateways given the same port would share it silently: the tests in
/// this file also run one at a time (`ONE_AT_A_TIME`).
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Gw {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary under `ulimit -n <fds>`, waits until its admin port answers.
fn spawn(fds: u32) -> Gw {
    let (port, admin) = free_ports();
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {fds} && exec {} --dev-auth --workers 1 --max-connections 100000 --listen 127.0.0.1:{port} --admin-listen 127.0.0.1:{admin} --drain-window-ms 0 --drain-linger-ms 100",
            env!("CARGO_BIN_EXE_tether-gateway")
        ))
        .env("TETHER_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let gw = Gw {
        child,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        admin: format!("127.0.0.1:{admin}").parse().unwrap(),
    };
    eventually(|| TcpStream::connect(gw.admin).is_ok());
    gw
}

fn metrics(admin: SocketAddr) -> String {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn login_result(c: &mut Raw) -> pb::LoginResult {
    match c.recv().header {
        Header::LoginResult(r) => *r,
        h => panic!("expected LOGIN_RESULT, got {h:?}"),
    }
}

#[test]
fn out_of_descriptors_it_backs_off_and_resumes_when_they_free_up() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let gw = spawn(64);
    // More connections than descriptors: the kernel queues them in the backlog, the
    // gateway's accept fails with EMFILE for the rest.
    let mut conns: Vec<Raw> = (0..70)
        .map(|i| {
            let mut c = Raw::connect(gw.addr);
            let mut f = login_frame(&format!("u{i}"), "d", None);
            if let Header::Login(l) = &mut f.header {
                l.token = "dev".into();
            }
            c.send(&f);
            c
        })
        .collect();
    // The first ones were accepted and logged in.
    let rest = conns.split_off(30);
    for c in &mut conns {
        assert_eq!(login_result(c).code, pb::ErrorCode::Ok as i32);
    }
    drop(conns);
    // 30 descriptors free: every waiting connection is accepted and logged in.
    for mut c in rest {
        assert_eq!(login_result(&mut c).code, pb::ErrorCode::Ok as i32);
        c.send(&Frame::new(Header::Ping(pb::Ping {})));
        assert!(matches!(c.recv().header, Header::Pong(_)));
    }
    let m = metrics(gw.admin);
    let line = m
        .lines()
        .find(|l| l.starts_with("tether_accept_errors_total{errno=\"EMFILE\"}"))
        .unwrap_or_else(|| panic!("EMFILE counted: {m}"));
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    // Backed off (10 ms doubling to 1 s), not spinning on accept.
    assert!((1..1_000).contains(&n), "{line}");
}

#[test]
fn sigterm_drains_with_goaway_and_exits() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut gw = spawn(1024);
    let mut c = Raw::connect(gw.addr);
    let mut f = login_frame("u", "d", None);
    if let Header::Login(l) = &mut f.header {
        l.token = "dev".into();
    }
    c.send(&f);
    assert_eq!(login_result(&mut c).code, pb::ErrorCode::Ok as i32);
    let pid = gw.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(matches!(c.recv().header, Header::GoAway(_)));
    assert!(c.until_closed().is_empty());
    let status = gw.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// A free port for the listener and a free base port `admin` with `admin + 1` free too (all
/// held while picked), for a supervisor's two children.
fn free_ports_for_two() -> (u16, u16) {
    let listen = TcpListener::bind("127.0.0.1:0").unwrap();
    for _ in 0..20 {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = a.local_addr().unwrap().port();
        if admin < u16::MAX && TcpListener::bind(("127.0.0.1", admin + 1)).is_ok() {
            return (listen.local_addr().unwrap().port(), admin);
        }
    }
    panic!("no free pair of ports");
}

fn healthy(admin: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(admin) else {
        return false;
    };
    s.set_read_timeout(Some(GUARD)).unwrap();
    let mut out = String::new();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .is_ok()
        && s.read_to_string(&mut out).is_ok()
        && out.starts_with("HTTP/1.1 200")
}

/// The `tether_connections` gauge of one process.
fn connections(admin: SocketAddr) -> u64 {
    let m = metrics(admin);
    let line = m
        .lines()
        .find(|l| l.starts_with("tether_connections "))
        .unwrap_or_else(|| panic!("tether_connections in {m}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The direct children of `pid` (what a script reads too).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let list = std::fs::read_to_string(task.unwrap().path().join("children")).unwrap();
        out.extend(list.split_whitespace().map(|p| p.parse::<u32>().unwrap()));
    }
    out
}

#[test]
fn processes_share_the_port_and_stop_together() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (port, admin) = free_ports_for_two();
    let child = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
        .args(["--processes", "2", "--workers", "1", "--dev-auth"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--drain-window-ms", "0", "--drain-linger-ms", "100"])
        .args(["--login-burst-per-device", "64"])
        .env("TETHER_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed if the test fails; its children then drain (they get SIGTERM when it dies).
    let mut sup = Gw {
        child,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        admin: format!("127.0.0.1:{admin}").parse().unwrap(),
    };
    let admins: Vec<SocketAddr> = (0..2)
        .map(|i| format!("127.0.0.1:{}", admin + i).parse().unwrap())
        .collect();
    for &a in &admins {
        eventually(|| healthy(a));
    }
    let kids = children_of(sup.child.id());
    assert_eq!(kids.len(), 2, "{kids:?}");

    // Logins through the one port land in either process (the kernel spreads them).
    let n = 32;
    let mut servers = std::collections::BTreeSet::new();
    let mut conns: Vec<Raw> = (0..n)
        .map(|i| {
            let mut c = Raw::connect(sup.addr);
            let mut f = login_frame(&format!("u{i}"), "d", None);
            if let Header::Login(l) = &mut f.header {
                l.token = "dev".into();
            }
            c.send(&f);
            let r = login_result(&mut c);
            assert_eq!(r.code, pb::ErrorCode::Ok as i32);
            servers.insert(r.server_id);
            c
        })
        .collect();
    // Both took some (a 2^-31 chance that the hash sent all 32 to one).
    assert_eq!(
        servers.into_iter().collect::<Vec<_>>(),
        ["tether-1-0", "tether-1-1"]
    );
    eventually(|| admins.iter().map(|&a| connections(a)).sum::<u64>() == n);

    // A client of one process that reconnects and lands on the other keeps its session: the
    // second claims it from the first over their handoff socket.
    let dir = std::env::temp_dir().join(format!("tether-handoff-{}", sup.child.id()));
    assert!(dir.join("0.sock").exists() && dir.join("1.sock").exists());
    let login = |resume: Option<(Bytes, u64)>| {
        let mut c = Raw::connect(sup.addr);
        let mut f = login_frame("roamer", "d", resume);
        if let Header::Login(l) = &mut f.header {
            l.token = "dev".into();
        }
        c.send(&f);
        let r = login_result(&mut c);
        assert_eq!(r.code, pb::ErrorCode::Ok as i32);
        (c, r)
    };
    let (c, first) = login(None);
    drop(c);
    let mut moved = false;
    for _ in 0..60 {
        let (c, r) = login(Some((first.session_id.clone(), 0)));
        assert!(r.resumed, "resumed wherever it lands");
        assert_eq!(r.session_id, first.session_id);
        drop(c);
        if r.server_id != first.server_id {
            moved = true;
            break;
        }
    }
    assert!(moved, "never landed on the other process in 60 tries");

    // SIGTERM to the supervisor drains every process; it exits 0 once they all did.
    let pid = sup.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    for c in &mut conns {
        assert!(matches!(c.recv().header, Header::GoAway(_)));
        assert!(c.until_closed().is_empty());
    }
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = sup.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < GUARD, "supervisor still running");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    // It waited for its children (reaped: gone), and nothing answers any more.
    for k in kids {
        assert!(!std::path::Path::new(&format!("/proc/{k}")).exists(), "{k}");
    }
    for &a in &admins {
        assert!(TcpStream::connect(a).is_err());
    }
    assert!(TcpStream::connect(sup.addr).is_err());
    assert!(!dir.exists(), "the handoff directory is removed");
}
