//! Where an idle TLS connection's memory goes: runs rustls handshakes in memory (the
//! gateway's server configuration, a client trusting its self-signed certificate), lets
//! one application record through each way, and counts the heap bytes the server side
//! still holds afterwards, as the gateway would while the connection sits idle.
//!
//! `cargo run --release -p tether-gateway --example tls_memory`

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - layout.size() as isize, Ordering::SeqCst);
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::SeqCst)
}

/// Moves TLS records between the two ends until neither has anything to send.
fn pump(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) {
    loop {
        let mut moved = false;
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            let mut r = &buf[..];
            while !r.is_empty() {
                server.read_tls(&mut r).unwrap();
                server.process_new_packets().unwrap();
            }
        }
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            let mut r = &buf[..];
            while !r.is_empty() {
                client.read_tls(&mut r).unwrap();
                client.process_new_packets().unwrap();
            }
        }
        if !moved {
            return;
        }
    }
}

fn main() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("tether-tls-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let server_config = tether_gateway::server::tls_config(
        &dir.join("cert.pem").to_string_lossy(),
        &dir.join("key.pem").to_string_lossy(),
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let client_config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    const N: usize = 1000;
    let mut servers = Vec::with_capacity(N);
    let mut server_bytes = 0isize;
    let mut struct_bytes = 0isize;
    let mut after_new = 0isize;
    let mut version = None;
    for _ in 0..N {
        let b = live();
        let mut client =
            rustls::ClientConnection::new(client_config.clone(), "localhost".try_into().unwrap())
                .unwrap();
        let client_new = live() - b;
        let before = live();
        let mut server = Box::new(rustls::ServerConnection::new(server_config.clone()).unwrap());
        after_new += live() - before;
        struct_bytes += std::mem::size_of::<rustls::ServerConnection>() as isize;
        // Both ends grow during the handshake; the client's share is known when it is dropped.
        let c0 = live();
        pump(&mut client, &mut server);
        // One LOGIN-sized record each way, as a logged-in connection has seen.
        client.writer().write_all(&[0u8; 120]).unwrap();
        pump(&mut client, &mut server);
        let mut sink = [0u8; 256];
        let _ = server.reader().read(&mut sink).unwrap();
        server.writer().write_all(&[0u8; 90]).unwrap();
        pump(&mut client, &mut server);
        let _ = client.reader().read(&mut sink).unwrap();
        let grown = live() - c0;
        version = server.protocol_version();
        let c1 = live();
        drop(client);
        let client_held = c1 - live();
        // grown = server growth + client growth, client growth = client_held - client_new.
        server_bytes += grown - (client_held - client_new);
        servers.push(server);
    }
    let per = |x: isize| x / N as isize;
    println!("protocol version: {version:?}");
    println!(
        "size_of::<ServerConnection>() (boxed): {} B",
        per(struct_bytes)
    );
    println!(
        "heap held by ServerConnection::new (incl. the box): {} B",
        per(after_new)
    );
    println!(
        "heap held by a server connection after handshake + one record each way: {} B",
        per(after_new + server_bytes)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
