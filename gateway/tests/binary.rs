//! The `tether-gateway` binary itself: out of file descriptors, it backs off and resumes
//! accepting when descriptors free up; SIGTERM drains and exits.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};

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
            "ulimit -n {fds} && exec {} --dev-auth --workers 1 --listen 127.0.0.1:{port} --admin-listen 127.0.0.1:{admin} --drain-window-ms 0 --drain-linger-ms 100",
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
