//! The scenarios as one worker process runs them on its share of the connections. Every
//! wait is bounded; the coordinator (`main.rs`) joins the phases of all workers with
//! barriers.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether_client::Client;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::plan::{self, Pacer};
use crate::report::Part;
use crate::worker::*;
use crate::Scenario;

/// This worker's place in the run.
pub struct Share {
    pub index: usize,
    /// Connection indices of this worker (over the whole run).
    pub range: Range<usize>,
    /// Connections of the whole run.
    pub total: usize,
}

impl Share {
    fn of(&self, total: f64, min: f64) -> f64 {
        plan::share(total, self.range.len(), self.total, min)
    }
}

/// Runs this worker's part of `scenario`; returns what it counted.
pub async fn run(scenario: &Scenario, net: Net, share: Share, ctl: &mut Ctl) -> Part {
    match scenario {
        Scenario::Hold {
            rate,
            inflight,
            hold,
            retries,
            ..
        } => hold_run(&net, &share, ctl, *rate, *inflight, *hold, *retries).await,
        Scenario::Storm { inflight, .. } => storm_run(&net, &share, ctl, *inflight).await,
        Scenario::Fanout {
            messages,
            size,
            rate,
            window,
            inflight,
            drain,
            ..
        } => {
            fanout_run(
                &net, &share, ctl, *messages, *size, *rate, *window, *inflight, *drain,
            )
            .await
        }
        Scenario::Rtt {
            rate,
            secs,
            size,
            inflight,
            late_ms,
            ..
        } => {
            let late = Duration::from_millis(*late_ms);
            rtt_run(&net, &share, ctl, *rate, *secs, *size, *inflight, late).await
        }
        Scenario::ResumeStorm {
            messages,
            send_secs,
            cut_at_ms,
            waves,
            wave_gap_ms,
            recover,
            inflight,
            ..
        } => {
            resume_run(
                &net,
                &share,
                ctl,
                ResumePlan {
                    messages: *messages,
                    send_secs: *send_secs,
                    cut_at: Duration::from_millis(*cut_at_ms),
                    waves: *waves,
                    wave_gap: Duration::from_millis(*wave_gap_ms),
                    recover: Duration::from_secs(*recover),
                    inflight: *inflight,
                },
            )
            .await
        }
    }
}

/// Opens this worker's connections as `how` says, each handed to `then` once logged in.
/// Returns when every attempt has ended.
async fn flood<F>(net: &Net, share: &Share, rec: &Arc<Rec>, how: Flood, mut then: F)
where
    F: FnMut(usize, Client, tether_client::Events) + Send,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(
        share.of(how.inflight as f64, 1.0) as usize,
    ));
    let pacer = (how.rate > 0.0).then(|| Pacer::new(share.of(how.rate, 0.001), Duration::ZERO));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = tokio::time::Instant::now();
    for (k, i) in share.range.clone().enumerate() {
        if let Some(p) = &pacer {
            tokio::time::sleep_until(start + p.due(k as u64)).await;
        }
        let permit = sem.clone().acquire_owned().await.expect("never closed");
        let (net, rec, tx) = (net.clone(), rec.clone(), tx.clone());
        tokio::spawn(async move {
            rec.first("start", now_us());
            let c = open(&net, i, &rec, &how).await;
            if c.is_some() {
                rec.last("login", now_us());
            }
            drop(permit);
            let _ = tx.send((i, c));
        });
        while let Ok((i, c)) = rx.try_recv() {
            if let Some((c, e)) = c {
                then(i, c, e);
            }
        }
    }
    drop(tx);
    while let Some((i, c)) = rx.recv().await {
        if let Some((c, e)) = c {
            then(i, c, e);
        }
    }
}

async fn hold_run(
    net: &Net,
    share: &Share,
    ctl: &mut Ctl,
    rate: f64,
    inflight: usize,
    hold: u64,
    retries: u32,
) -> Part {
    let rec = Rec::new("heartbeat");
    let progress = Ctl::progress(rec.clone());
    let stop = CancellationToken::new();
    let mut clients = Vec::with_capacity(share.range.len());
    let mut tasks = Vec::with_capacity(share.range.len());
    flood(
        net,
        share,
        &rec,
        Flood {
            rate,
            inflight,
            reconnect: true,
            retries,
            latency: "login",
            observe: true,
        },
        |_, c, e| {
            clients.push(c);
            tasks.push(tokio::spawn(watch(
                e,
                rec.clone(),
                stop.clone(),
                Watch::idle(),
            )));
        },
    )
    .await;
    rec.count("up", clients.len() as u64);
    if ctl.barrier("connected", None).await.is_ok() {
        rec.rename_hist("heartbeat", "heartbeat while connecting");
        rec.first("hold", now_us());
        tokio::time::sleep(Duration::from_secs(hold)).await;
        rec.last("hold", now_us());
        rec.heartbeats.store(false, Ordering::Relaxed);
        rec.count("held_at_end", rec.up.load(Ordering::Relaxed).max(0) as u64);
        let _ = ctl.barrier("held", None).await;
    }
    stop.cancel();
    close_all(clients, tasks).await;
    progress.abort();
    rec.part(false)
}

async fn storm_run(net: &Net, share: &Share, ctl: &mut Ctl, inflight: usize) -> Part {
    let rec = Rec::new("connect");
    let progress = Ctl::progress(rec.clone());
    let mut clients = Vec::with_capacity(share.range.len());
    let r2 = rec.clone();
    flood(
        net,
        share,
        &rec,
        Flood {
            retries: 0,
            latency: "connect",
            ..Flood::logins(inflight, false)
        },
        |_, c, _e| {
            r2.ops.fetch_add(1, Ordering::Relaxed);
            clients.push(c);
        },
    )
    .await;
    rec.count("up", clients.len() as u64);
    let _ = ctl.barrier("done", None).await;
    close_all(clients, Vec::new()).await;
    progress.abort();
    rec.part(false)
}

/// The room of the fan-out scenario.
pub const FANOUT_ROOM: &str = "loadtest-fanout";

#[allow(clippy::too_many_arguments)]
async fn fanout_run(
    net: &Net,
    share: &Share,
    ctl: &mut Ctl,
    messages: u64,
    size: usize,
    rate: f64,
    window: usize,
    inflight: usize,
    drain: u64,
) -> Part {
    let rec = Rec::new("delivery");
    let progress = Ctl::progress(rec.clone());
    let stop = CancellationToken::new();
    let unique = Arc::new(AtomicU64::new(0));
    let mut members = Vec::new();
    let mut tasks = Vec::new();
    flood(
        net,
        share,
        &rec,
        Flood::logins(inflight, false),
        |_, c, e| {
            members.push(c);
            tasks.push(e);
        },
    )
    .await;
    // Join the room, all members at once but bounded by `inflight`.
    let sem = Arc::new(tokio::sync::Semaphore::new(inflight.max(1)));
    let mut joins = Vec::new();
    for c in &members {
        let (c, rec, sem) = (c.clone(), rec.clone(), sem.clone());
        joins.push(tokio::spawn(async move {
            let _p = sem.acquire().await;
            match tokio::time::timeout(plan::JOIN_TIMEOUT, c.join_room(FANOUT_ROOM)).await {
                Ok(Ok(())) => rec.count("joined", 1),
                Ok(Err(e)) => rec.fail(format!("join:{}", e.code.as_str_name())),
                Err(_) => rec.fail("join:timeout".into()),
            }
        }));
    }
    for j in joins {
        let _ = j.await;
    }
    let joined = rec.counter("joined");
    let watchers: Vec<JoinHandle<()>> = tasks
        .into_iter()
        .map(|events| {
            let w = Watch {
                unique: unique.clone(),
                ..Watch::idle()
            };
            tokio::spawn(watch(events, rec.clone(), stop.clone(), w))
        })
        .collect();
    // Worker 0 also runs the publisher, a member of the room like the others but not
    // counted among them (the gateway does not deliver a member's own room messages back).
    let publisher = if share.index == 0 {
        match open(net, share.total, &rec, &Flood::logins(1, false)).await {
            Some((c, e)) => {
                rec.up.fetch_sub(1, Ordering::Relaxed);
                match c.join_room(FANOUT_ROOM).await {
                    Ok(()) => Some((c, e)),
                    Err(e) => {
                        rec.fail(format!("publisher-join:{}", e.code.as_str_name()));
                        None
                    }
                }
            }
            None => None,
        }
    } else {
        None
    };
    if ctl.barrier("joined", None).await.is_ok() {
        if let Some((p, _events)) = &publisher {
            publish(p, &rec, messages, size, rate, window).await;
        }
        if ctl.barrier("published", None).await.is_ok() {
            let want = joined * messages;
            wait_for(Duration::from_secs(drain), || {
                unique.load(Ordering::Relaxed) >= want
            })
            .await;
            let _ = ctl.barrier("drained", None).await;
        }
    }
    stop.cancel();
    for w in watchers {
        let _ = w.await;
    }
    let delivered = unique.load(Ordering::Relaxed);
    rec.count("delivered", delivered);
    rec.count("expected", joined * messages);
    rec.count("lost", (joined * messages).saturating_sub(delivered));
    rec.count("members", members.len() as u64);
    if let Some((p, _)) = publisher {
        members.push(p);
    }
    close_all(members, Vec::new()).await;
    progress.abort();
    rec.part(false)
}

/// Sends `messages` room messages at `rate` (0: as fast as `window` unacked allow).
async fn publish(p: &Client, rec: &Arc<Rec>, messages: u64, size: usize, rate: f64, window: usize) {
    let sem = Arc::new(tokio::sync::Semaphore::new(window.max(1)));
    let pacer = (rate > 0.0).then(|| Pacer::new(rate, Duration::ZERO));
    let start = tokio::time::Instant::now();
    let mut sends = Vec::with_capacity(messages as usize);
    for n in 0..messages {
        if let Some(pc) = &pacer {
            tokio::time::sleep_until(start + pc.due(n)).await;
        }
        let permit = sem.clone().acquire_owned().await.expect("never closed");
        let now = now_us();
        rec.first("publish", now);
        let stamp = Stamp {
            sender: 0,
            n,
            due_us: now,
            sent_us: now,
        };
        let body = chat_body(Some(Target::Room(FANOUT_ROOM.into())), stamp, size);
        let (p, rec) = (p.clone(), rec.clone());
        sends.push(tokio::spawn(async move {
            match p.send(0, body).await {
                Ok(_) => rec.count("published", 1),
                Err(e) => rec.fail(send_reason("publish", &e)),
            }
            drop(permit);
        }));
    }
    for s in sends {
        let _ = s.await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn rtt_run(
    net: &Net,
    share: &Share,
    ctl: &mut Ctl,
    rate: f64,
    secs: u64,
    size: usize,
    inflight: usize,
    late: Duration,
) -> Part {
    let rec = Rec::new("echo");
    let progress = Ctl::progress(rec.clone());
    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    let mut events = Vec::new();
    flood(
        net,
        share,
        &rec,
        Flood::logins(inflight, false),
        |i, c, e| {
            clients.push((i, c));
            events.push(e);
        },
    )
    .await;
    let echoed = Arc::new(AtomicU64::new(0));
    let watchers: Vec<JoinHandle<()>> = events
        .into_iter()
        .map(|ev| {
            let w = Watch {
                unique: echoed.clone(),
                latency: "echo",
                from_send: Some("echo from send"),
                cutting: None,
            };
            tokio::spawn(watch(ev, rec.clone(), stop.clone(), w))
        })
        .collect();
    let mut cumulative = Part::default();
    let mut next_rate = Some(rate);
    let mut base_n = 0u64;
    if ctl.barrier("connected", None).await.is_err() {
        next_rate = None;
    }
    let sent_total = Arc::new(AtomicU64::new(0));
    let _ = rec.part(true);
    while let Some(total_rate) = next_rate {
        let my_rate = share.of(total_rate, 0.0);
        let per_client = my_rate / clients.len().max(1) as f64;
        let step = Duration::from_secs(secs);
        let start = tokio::time::Instant::now();
        let start_us = now_us();
        let mut senders = Vec::new();
        for (k, (_, c)) in clients.iter().enumerate() {
            if per_client <= 0.0 {
                break;
            }
            let offset = plan::spread(k, clients.len(), Duration::from_secs_f64(1.0 / per_client));
            let pacer = Pacer::new(per_client, offset);
            let (c, rec, sent_total) = (c.clone(), rec.clone(), sent_total.clone());
            senders.push(tokio::spawn(async move {
                let due_n = pacer.due_by(step.saturating_sub(Duration::from_nanos(1)));
                let mut acks = Vec::new();
                for j in 0..due_n {
                    let due = start + pacer.due(j);
                    tokio::time::sleep_until(due).await;
                    let due_us = start_us + pacer.due(j).as_micros() as u64;
                    let now = now_us();
                    if now > due_us + late.as_micros() as u64 {
                        rec.count("late_sends", 1);
                    }
                    let stamp = Stamp {
                        sender: k as u64,
                        n: base_n + j,
                        due_us,
                        sent_us: now,
                    };
                    let body = chat_body(None, stamp, size);
                    rec.count("sent", 1);
                    rec.latency("send lag", now.saturating_sub(due_us));
                    sent_total.fetch_add(1, Ordering::Relaxed);
                    let (c, rec) = (c.clone(), rec.clone());
                    acks.push(tokio::spawn(async move {
                        match c.send(0, body).await {
                            Ok(_) => {
                                rec.count("acked", 1);
                                let at = now_us();
                                rec.latency("ack", at.saturating_sub(due_us));
                                rec.latency("ack from send", at.saturating_sub(now));
                            }
                            Err(e) => rec.fail(send_reason("send", &e)),
                        }
                    }));
                }
                for a in acks {
                    let _ = a.await;
                }
            }));
        }
        for s in senders {
            let _ = s.await;
        }
        // Messages not echoed soon after the step's end count as lost.
        let sent = sent_total.load(Ordering::Relaxed);
        wait_for(plan::LOSS_AFTER, || echoed.load(Ordering::Relaxed) >= sent).await;
        let mut part = rec.part(true);
        part.count("echoed", echoed.load(Ordering::Relaxed));
        part.count("lost", sent.saturating_sub(echoed.load(Ordering::Relaxed)));
        part.count("due", (my_rate * secs as f64).round() as u64);
        sent_total.store(0, Ordering::Relaxed);
        echoed.store(0, Ordering::Relaxed);
        base_n += (per_client * secs as f64).ceil() as u64 + 1;
        let _ = cumulative.merge(&part);
        next_rate = match ctl.barrier("step", Some(part)).await {
            Ok(Some(r)) => r.parse().ok(),
            _ => None,
        };
    }
    stop.cancel();
    for w in watchers {
        let _ = w.await;
    }
    let _ = cumulative.merge(&rec.part(false));
    close_all(clients.into_iter().map(|(_, c)| c).collect(), Vec::new()).await;
    progress.abort();
    cumulative
}

struct ResumePlan {
    messages: u64,
    send_secs: f64,
    cut_at: Duration,
    waves: usize,
    wave_gap: Duration,
    recover: Duration,
    inflight: usize,
}

/// Every client `i` sends `messages` direct messages to client `i + 1` (mod the run's
/// total) while all connections are cut under them; each client must end up with exactly
/// the `messages` of its predecessor.
async fn resume_run(net: &Net, share: &Share, ctl: &mut Ctl, rp: ResumePlan) -> Part {
    let rec = Rec::new("delivery");
    let progress = Ctl::progress(rec.clone());
    let stop = CancellationToken::new();
    let received = Arc::new(AtomicU64::new(0));
    let cutting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    let mut watchers = Vec::new();
    flood(
        net,
        share,
        &rec,
        Flood::logins(rp.inflight, true),
        |i, c, events| {
            clients.push((i, c));
            let w = Watch {
                unique: received.clone(),
                cutting: Some(cutting.clone()),
                ..Watch::idle()
            };
            watchers.push(tokio::spawn(watch(events, rec.clone(), stop.clone(), w)));
        },
    )
    .await;
    rec.count("up", clients.len() as u64);
    if ctl.barrier("connected", None).await.is_ok() {
        let start = tokio::time::Instant::now();
        let start_us = now_us();
        let acked = Arc::new(AtomicU64::new(0));
        let per_client = rp.messages as f64 / rp.send_secs.max(0.001);
        let n_clients = clients.len();
        let mut senders = Vec::new();
        for (k, (i, c)) in clients.iter().enumerate() {
            let to = net.user((i + 1) % share.total);
            let offset = plan::spread(k, n_clients, Duration::from_secs_f64(1.0 / per_client));
            let pacer = Pacer::new(per_client, offset);
            let (c, rec, acked, i, msgs) = (c.clone(), rec.clone(), acked.clone(), *i, rp.messages);
            senders.push(tokio::spawn(async move {
                let mut acks = Vec::new();
                for j in 0..msgs {
                    tokio::time::sleep_until(start + pacer.due(j)).await;
                    let due_us = start_us + pacer.due(j).as_micros() as u64;
                    let stamp = Stamp {
                        sender: i as u64,
                        n: j,
                        due_us,
                        sent_us: now_us(),
                    };
                    let body = chat_body(Some(Target::User(to.clone())), stamp, 64);
                    rec.count("sent", 1);
                    let (c, rec, acked) = (c.clone(), rec.clone(), acked.clone());
                    acks.push(tokio::spawn(async move {
                        match c.send(0, body).await {
                            Ok(_) => {
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => rec.fail(send_reason("send", &e)),
                        }
                    }));
                }
                for a in acks {
                    let _ = a.await;
                }
            }));
        }
        // The cut: wave w takes the clients with index % waves == w.
        let waves = rp.waves.max(1);
        for w in 0..waves {
            tokio::time::sleep_until(start + rp.cut_at + rp.wave_gap * w as u32).await;
            if w == 0 {
                rec.first("cut", now_us());
                cutting.store(true, Ordering::Relaxed);
            }
            for (i, c) in &clients {
                if i % waves == w {
                    c.drop_connection();
                    rec.count("cut", 1);
                }
            }
        }
        let want = n_clients as u64 * rp.messages;
        let all_done = wait_for(rp.recover, || {
            received.load(Ordering::Relaxed) >= want && acked.load(Ordering::Relaxed) >= want
        })
        .await;
        if !all_done {
            rec.count("recovery_timeouts", 1);
        }
        for s in senders {
            s.abort();
        }
        rec.last("all_received", now_us());
        let got = received.load(Ordering::Relaxed);
        rec.count("expected", want);
        rec.count("received", got);
        rec.count("lost", want.saturating_sub(got));
        rec.count("acked", acked.load(Ordering::Relaxed));
        let _ = ctl.barrier("recovered", None).await;
    }
    stop.cancel();
    for w in watchers {
        let _ = w.await;
    }
    close_all(clients.into_iter().map(|(_, c)| c).collect(), Vec::new()).await;
    progress.abort();
    rec.part(false)
}
