//! Requests to the admin API with curl, keeping the answer's headers (for
//! cookies and security headers).

use std::net::SocketAddr;
use std::process::Command;

use anyhow::{Context, Result};

/// One answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// The header block, as received.
    pub headers: String,
    /// The body.
    pub body: String,
}

impl Reply {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The value of a header, case-insensitive.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// `method path` on `addr` over HTTPS (`-k`: the identity is self-signed),
/// with extra `headers` (`Name: value`) and a JSON `body`.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[String], body: Option<&str>) -> Result<Reply> {
    let url = format!("https://{addr}{path}");
    let mut cmd = Command::new("curl");
    cmd.args(["-sk", "-i", "--max-time", "30", "-X", method, "-w", "\n%{http_code}", &url]);
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", body]);
    }
    let out = cmd.output().context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    Ok(Reply { status: code.trim().parse().unwrap_or(0), headers: headers.to_string(), body: body.to_string() })
}

/// `Authorization: Bearer <token>`.
pub fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}
