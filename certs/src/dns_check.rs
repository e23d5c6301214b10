//! Asks an authoritative DNS server whether it serves a TXT value yet, so a
//! DNS-01 challenge is set ready only once the CA can see the record.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::net::UdpSocket;

/// The TXT strings served at `name` by `server` (one UDP query, answered
/// within `timeout`).
pub async fn query_txt(server: SocketAddr, name: &str, timeout: Duration) -> Result<Vec<String>, String> {
    let fqdn = Name::from_str(&format!("{}.", name.trim_end_matches('.'))).map_err(|e| format!("{name}: {e}"))?;
    let mut message = Message::query();
    message.metadata.id = rand::random();
    message.add_query(Query::query(fqdn, RecordType::TXT));
    let bytes = message.to_vec().map_err(|e| e.to_string())?;
    let bind: SocketAddr =
        if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { "[::]:0".parse().map_err(|_| "bind")? };
    let socket = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    socket.connect(server).await.map_err(|e| e.to_string())?;
    socket.send(&bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .map_err(|_| format!("no answer from {server} within {timeout:?}"))?
            .map_err(|e| e.to_string())?;
        let Ok(reply) = Message::from_vec(&buf[..n]) else { continue };
        if reply.metadata.id != message.metadata.id {
            continue;
        }
        return Ok(reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(txt) => Some(txt.txt_data.iter().map(|s| String::from_utf8_lossy(s)).collect::<String>()),
                _ => None,
            })
            .collect());
    }
}

/// Polls `server` until it serves `value` at `name`, or fails after `deadline`.
pub async fn wait_for_txt(server: SocketAddr, name: &str, value: &str, deadline: Duration) -> Result<(), String> {
    let until = tokio::time::Instant::now() + deadline;
    let mut last = String::from("not asked yet");
    while tokio::time::Instant::now() < until {
        match query_txt(server, name, Duration::from_secs(1)).await {
            Ok(values) if values.iter().any(|v| v == value) => return Ok(()),
            Ok(values) => last = format!("{} other value(s)", values.len()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{server} did not serve the TXT value at {name} within {deadline:?} (last: {last})"))
}
