//! Asking another server's DNS whether it serves a TXT value: a DNS-01
//! value counts as published only once every live server answers it, or a
//! CA could ask one that has not caught up.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::net::UdpSocket;

/// How long one query waits for its answer.
const ANSWER_WAIT: Duration = Duration::from_millis(800);
/// Pause between queries while the value is not there yet.
const RETRY: Duration = Duration::from_millis(200);

/// Whether `server` answers TXT `value` at `name` (without trailing dot).
pub async fn serves_txt(server: SocketAddr, name: &str, value: &str) -> Result<bool, String> {
    let qname = Name::from_str(&format!("{name}.")).map_err(|e| e.to_string())?;
    let id: u16 = rand::random();
    let mut query = Message::new(id, MessageType::Query, OpCode::Query);
    query.add_query(Query::query(qname, RecordType::TXT));
    let bytes = query.to_vec().map_err(|e| e.to_string())?;
    let bind: SocketAddr =
        if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    socket.send_to(&bytes, server).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let answer = async {
        loop {
            let (n, from) = socket.recv_from(&mut buf).await.map_err(|e| e.to_string())?;
            if from != server {
                continue;
            }
            let Ok(message) = Message::from_vec(&buf[..n]) else { continue };
            if message.metadata.id != id {
                continue;
            }
            return Ok::<_, String>(message);
        }
    };
    let message = tokio::time::timeout(ANSWER_WAIT, answer).await.map_err(|_| "no answer".to_string())??;
    Ok(message.answers.iter().any(|r| match &r.data {
        RData::TXT(txt) => txt.txt_data.iter().map(|s| String::from_utf8_lossy(s)).collect::<String>() == value,
        _ => false,
    }))
}

/// Waits until every server in `servers` answers the value, or `limit`
/// passes; returns the servers that still do not, with why.
pub async fn wait_all_serve(servers: &[(String, SocketAddr)], name: &str, value: &str, limit: Duration) -> Vec<String> {
    let give_up = tokio::time::Instant::now() + limit;
    let mut pending: Vec<(String, SocketAddr, String)> =
        servers.iter().map(|(n, a)| (n.clone(), *a, "not asked".to_string())).collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for (server, addr, _) in pending {
            match serves_txt(addr, name, value).await {
                Ok(true) => {}
                Ok(false) => still.push((server, addr, "does not serve it yet".to_string())),
                Err(e) => still.push((server, addr, e)),
            }
        }
        pending = still;
        if pending.is_empty() || tokio::time::Instant::now() + RETRY >= give_up {
            break;
        }
        tokio::time::sleep(RETRY).await;
    }
    pending.into_iter().map(|(server, addr, why)| format!("{server} ({addr}): {why}")).collect()
}
