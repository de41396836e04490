//! A minimal chat client: each line of stdin goes to one user as a
//! `tether.chat.v1.ChatMessage` text; everything that arrives is printed.
//!
//! ```text
//! cargo run -p tether-client --example chat -- 127.0.0.1:14000 alice phone-1 <token> bob
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message;
use tether_client::{Client, Config, Event};
use tether_protocol::chat::{chat_message, ChatMessage, Text};
use tokio::io::{AsyncBufReadExt, BufReader};

/// `body_type` of a `ChatMessage` body (PROTOCOL.md §4.5).
const CHAT_MESSAGE: u32 = 0;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, user, device, token, to_user] = args.as_slice() else {
        eprintln!("usage: chat <addr> <user_id> <device_id> <token> <to_user>");
        std::process::exit(2);
    };
    let config = Config::new(
        addr.as_str(),
        user.as_str(),
        device.as_str(),
        token.as_str(),
    );
    let (client, mut events) = Client::connect(config).await?;
    eprintln!("connected as {user}/{device}; type a line to send it to {to_user}");

    let printer = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Event::Message {
                    seq,
                    body_type: CHAT_MESSAGE,
                    body,
                } => match ChatMessage::decode(body) {
                    Ok(m) => print_message(seq, &m),
                    Err(e) => eprintln!("#{seq}: not a ChatMessage ({e})"),
                },
                Event::Message {
                    seq,
                    body_type,
                    body,
                } => {
                    eprintln!("#{seq}: {} bytes of body type {body_type}", body.len());
                }
                other => eprintln!("{other:?}"),
            }
        }
    });

    // msg_ids from the clock, so that a restarted client does not reuse them.
    let mut next_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
        .max(1);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.is_empty() {
            continue;
        }
        let msg_id = next_id;
        next_id += 1;
        let body = ChatMessage {
            target: Some(chat_message::Target::ToUser(to_user.clone())),
            client_msg_id: msg_id,
            content: Some(chat_message::Content::Text(Text { text: line })),
            ..Default::default()
        }
        .encode_to_vec();
        match client
            .send_with_id(msg_id, CHAT_MESSAGE, Bytes::from(body))
            .await
        {
            Ok(id) => eprintln!("sent ({id})"),
            Err(e) => eprintln!("not sent: {e}"),
        }
    }
    client.close().await;
    let _ = printer.await;
    Ok(())
}

fn print_message(seq: u64, m: &ChatMessage) {
    let to = match &m.target {
        Some(chat_message::Target::ToRoom(room)) => format!(" in #{room}"),
        _ => String::new(),
    };
    match &m.content {
        Some(chat_message::Content::Text(t)) => println!("#{seq} {}{to}: {}", m.sender, t.text),
        Some(other) => println!("#{seq} {}{to}: {other:?}", m.sender),
        None => println!("#{seq} {}{to}: (empty)", m.sender),
    }
}
