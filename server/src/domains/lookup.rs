//! One DNS question for TXT records, asked of one resolver: UDP first, TCP
//! when the answer is truncated. Bounded everywhere: one datagram of at
//! most 4096 bytes, a TCP answer of at most 65535, a deadline on the whole
//! exchange. The message codec is pure ([`query`], [`parse_answer`]).

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest UDP answer read (and advertised with EDNS).
const MAX_UDP_ANSWER: u16 = 4096;
/// Most TXT values kept from one answer.
const MAX_VALUES: usize = 64;

/// Why a lookup said nothing about the name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The name cannot be asked (not a DNS name).
    #[error("cannot ask for {0:?}: not a DNS name")]
    BadName(String),
    /// No answer within the deadline.
    #[error("the resolver {0} did not answer in time")]
    Timeout(SocketAddr),
    /// A socket failed.
    #[error("resolver {resolver}: {message}")]
    Io {
        /// The resolver.
        resolver: SocketAddr,
        /// What failed.
        message: String,
    },
    /// The answer is not a DNS answer to the question.
    #[error("the resolver's answer is malformed: {0}")]
    Malformed(String),
    /// The resolver answered with an error code other than NXDOMAIN.
    #[error("the resolver answered {0}")]
    Failed(String),
}

/// What the resolver answered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxtAnswer {
    /// Each TXT record at the name (or at the end of its CNAME chain), its
    /// strings joined.
    pub values: Vec<String>,
    /// The name does not exist.
    pub nxdomain: bool,
}

/// The query for `name`'s TXT records, with recursion desired.
pub fn query(id: u16, name: &str) -> Result<Vec<u8>, LookupError> {
    let qname = Name::from_ascii(format!("{}.", name.trim_end_matches('.')))
        .map_err(|_| LookupError::BadName(name.to_string()))?;
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(qname, RecordType::TXT));
    let mut edns = Edns::new();
    edns.set_max_payload(MAX_UDP_ANSWER);
    message.set_edns(edns);
    message.to_vec().map_err(|e| LookupError::BadName(format!("{name}: {e}")))
}

/// Reads the answer to [`query`] (`Ok(None)`: truncated, ask over TCP).
pub fn parse_answer(bytes: &[u8], id: u16, name: &str) -> Result<Option<TxtAnswer>, LookupError> {
    let message = Message::from_vec(bytes).map_err(|e| LookupError::Malformed(e.to_string()))?;
    let meta = &message.metadata;
    if meta.id != id || meta.message_type != MessageType::Response {
        return Err(LookupError::Malformed("not the answer to this question".into()));
    }
    let want = name.trim_end_matches('.').to_ascii_lowercase();
    let asked = message.queries.first().map(|q| q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase());
    if asked.as_deref() != Some(want.as_str()) {
        return Err(LookupError::Malformed("the answer is for another question".into()));
    }
    if meta.truncation {
        return Ok(None);
    }
    match meta.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Ok(Some(TxtAnswer { values: Vec::new(), nxdomain: true })),
        other => return Err(LookupError::Failed(other.to_string())),
    }
    // Follow a CNAME chain within the answer (a resolver puts it there).
    let mut owner = want;
    for _ in 0..8 {
        let next = message.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if same_name(&r.name, &owner) => {
                Some(target.0.to_ascii().trim_end_matches('.').to_ascii_lowercase())
            }
            _ => None,
        });
        match next {
            Some(target) => owner = target,
            None => break,
        }
    }
    let values = message
        .answers
        .iter()
        .filter(|r| same_name(&r.name, &owner))
        .filter_map(|r| match &r.data {
            RData::TXT(txt) => {
                Some(txt.txt_data.iter().map(|part| String::from_utf8_lossy(part).into_owned()).collect::<String>())
            }
            _ => None,
        })
        .take(MAX_VALUES)
        .collect();
    Ok(Some(TxtAnswer { values, nxdomain: false }))
}

fn same_name(name: &Name, owner: &str) -> bool {
    name.to_ascii().trim_end_matches('.').eq_ignore_ascii_case(owner)
}

/// Asks `resolver` for `name`'s TXT records within `deadline`.
pub async fn txt(resolver: SocketAddr, name: &str, deadline: Duration) -> Result<TxtAnswer, LookupError> {
    tokio::time::timeout(deadline, ask(resolver, name)).await.map_err(|_| LookupError::Timeout(resolver))?
}

async fn ask(resolver: SocketAddr, name: &str) -> Result<TxtAnswer, LookupError> {
    let io = |e: std::io::Error| LookupError::Io { resolver, message: e.to_string() };
    let id: u16 = rand::random();
    let packet = query(id, name)?;
    let bind: SocketAddr = if resolver.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = tokio::net::UdpSocket::bind(bind).await.map_err(io)?;
    socket.connect(resolver).await.map_err(io)?;
    socket.send(&packet).await.map_err(io)?;
    let mut buf = vec![0u8; usize::from(MAX_UDP_ANSWER)];
    loop {
        let n = socket.recv(&mut buf).await.map_err(io)?;
        match parse_answer(&buf[..n], id, name) {
            Ok(Some(answer)) => return Ok(answer),
            Ok(None) => break,
            // A stray or forged datagram: keep waiting for the real answer
            // (the deadline bounds it).
            Err(LookupError::Malformed(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    let mut tcp = tokio::net::TcpStream::connect(resolver).await.map_err(io)?;
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&packet);
    tcp.write_all(&framed).await.map_err(io)?;
    let len = tcp.read_u16().await.map_err(io)?;
    let mut answer = vec![0u8; usize::from(len)];
    tcp.read_exact(&mut answer).await.map_err(io)?;
    parse_answer(&answer, id, name)?.ok_or_else(|| LookupError::Malformed("truncated over TCP".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{CNAME, TXT};
    use hickory_proto::rr::Record;

    fn answer(id: u16, qname: &str, code: ResponseCode, records: Vec<Record>, truncated: bool) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Response, OpCode::Query);
        m.metadata.response_code = code;
        m.metadata.truncation = truncated;
        m.add_query(Query::query(Name::from_ascii(qname).unwrap(), RecordType::TXT));
        for r in records {
            m.add_answer(r);
        }
        m.to_vec().unwrap()
    }

    fn txt_record(owner: &str, parts: &[&str]) -> Record {
        let data = RData::TXT(TXT::new(parts.iter().map(|s| s.to_string()).collect()));
        Record::from_rdata(Name::from_ascii(owner).unwrap(), 60, data)
    }

    #[test]
    fn query_round_trips() {
        let q = query(7, "_edge-verify.www.c.com").unwrap();
        let m = Message::from_vec(&q).unwrap();
        assert_eq!(m.metadata.id, 7);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.queries[0].query_type(), RecordType::TXT);
        assert!(query(1, "a b.com").is_err());
    }

    #[test]
    fn answers_are_read() {
        let name = "_edge-verify.www.c.com";
        let bytes = answer(
            9,
            "_edge-verify.WWW.c.com.",
            ResponseCode::NoError,
            vec![txt_record("_edge-verify.www.c.com.", &["edge-verify=", "ab"]), txt_record("other.c.com.", &["x"])],
            false,
        );
        let a = parse_answer(&bytes, 9, name).unwrap().unwrap();
        assert_eq!(a.values, vec!["edge-verify=ab".to_string()], "strings joined, other owners ignored");
        let nx = answer(9, "_edge-verify.www.c.com.", ResponseCode::NXDomain, vec![], false);
        assert!(parse_answer(&nx, 9, name).unwrap().unwrap().nxdomain);
        let fail = answer(9, "_edge-verify.www.c.com.", ResponseCode::ServFail, vec![], false);
        assert!(matches!(parse_answer(&fail, 9, name), Err(LookupError::Failed(_))));
        let tc = answer(9, "_edge-verify.www.c.com.", ResponseCode::NoError, vec![], true);
        assert_eq!(parse_answer(&tc, 9, name).unwrap(), None);
        assert!(matches!(parse_answer(&bytes, 10, name), Err(LookupError::Malformed(_))), "wrong id");
        assert!(matches!(parse_answer(&bytes, 9, "other.c.com"), Err(LookupError::Malformed(_))), "other question");
        for cut in 0..bytes.len() {
            assert!(parse_answer(&bytes[..cut], 9, name).is_err(), "prefix of {cut} bytes");
        }
    }

    #[test]
    fn cname_chains_are_followed() {
        let name = "_edge-verify.www.c.com";
        let cname = RData::CNAME(CNAME(Name::from_ascii("v.dns.provider.net.").unwrap()));
        let records = vec![
            Record::from_rdata(Name::from_ascii("_edge-verify.www.c.com.").unwrap(), 60, cname),
            txt_record("v.dns.provider.net.", &["edge-verify=cd"]),
        ];
        let bytes = answer(3, "_edge-verify.www.c.com.", ResponseCode::NoError, records, false);
        assert_eq!(parse_answer(&bytes, 3, name).unwrap().unwrap().values, vec!["edge-verify=cd".to_string()]);
    }
}
