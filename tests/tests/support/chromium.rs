//! Headless Chromium over WebDriver for the browser tests: chromedriver on
//! a free port, killed on drop, and a session with the flags every test
//! needs plus its own.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edge_tests::pebble::free_port;
use fantoccini::{Client, ClientBuilder};

/// chromedriver, killed on drop.
pub struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts chromedriver, logging to `log`; returns it and its port.
pub fn start_driver(log: &Path) -> (Driver, u16) {
    let port = free_port().unwrap();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .arg(format!("--log-path={}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian chromium-driver) is installed by scripts/test.sh");
    let driver = Driver(child);
    edge_tests::wait_for("chromedriver", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    })
    .unwrap();
    (driver, port)
}

/// A headless session with its own profile in `profile`, plus `extra`
/// command-line flags.
pub async fn browser(port: u16, profile: &Path, extra: &[String]) -> Client {
    let mut args = vec![
        "--headless=new".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        "--disable-dev-shm-usage".into(),
        "--window-size=1280,1000".into(),
        format!("--user-data-dir={}", profile.display()),
    ];
    args.extend_from_slice(extra);
    let mut caps = serde_json::Map::new();
    caps.insert("acceptInsecureCerts".into(), serde_json::Value::Bool(true));
    caps.insert("goog:chromeOptions".into(), serde_json::json!({ "binary": "/usr/bin/chromium", "args": args }));
    ClientBuilder::rustls()
        .expect("rustls connector")
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("WebDriver session")
}
