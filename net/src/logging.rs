//! Tracing subscriber setup for both binaries.

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?} is not \"text\" or \"json\"")),
        }
    }
}

/// Crates whose INFO lines are per packet or per query (hickory logs every
/// DNS request at INFO): capped at WARN unless `RUST_LOG` names them, so no
/// level an operator picks turns each packet into disk I/O.
const NOISY: [&str; 4] = ["hickory_server", "hickory_proto", "quinn", "rustls"];

/// The filter directives: `RUST_LOG` (default `info`), plus a WARN cap for
/// each [`NOISY`] crate it does not mention.
pub fn filter_directives(rust_log: Option<&str>) -> String {
    let base = rust_log.map(str::trim).filter(|s| !s.is_empty()).unwrap_or("info");
    let mut directives = base.to_string();
    for target in NOISY {
        if !base.contains(target) {
            directives.push_str(&format!(",{target}=warn"));
        }
    }
    directives
}

/// Installs the global subscriber with [`filter_directives`] of `RUST_LOG`.
/// Logs go to stderr so stdout stays free for command output.
pub fn init(format: LogFormat) {
    init_with(format, None);
}

type FilterSetter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Replaces the filter of the installed subscriber (see [`set_filter`]).
static FILTER: std::sync::OnceLock<FilterSetter> = std::sync::OnceLock::new();

/// Like [`init`]; `configured` is the filter from a config file, used when
/// `RUST_LOG` is unset. The filter can be replaced later by [`set_filter`].
pub fn init_with(format: LogFormat, configured: Option<&str>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let rust_log = std::env::var("RUST_LOG").ok().filter(|s| !s.trim().is_empty());
    let directives = filter_directives(rust_log.as_deref().or(configured));
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("log filter {directives:?} is not valid ({e}); logging at info");
        EnvFilter::new(filter_directives(None))
    });
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // Colours only on a terminal: a log file or journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi)).try_init()
        }
        LogFormat::Json => {
            registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).try_init()
        }
    };
    if installed.is_ok() {
        let _ = FILTER.set(Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())));
    }
}

/// Why a new log filter was not applied.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The directives do not parse.
    #[error("not a valid filter: {0}")]
    Invalid(String),
    /// No subscriber of ours is installed.
    #[error("logging was not set up by edge_net::logging")]
    NotInstalled,
    /// The subscriber refused it.
    #[error("{0}")]
    Refused(String),
}

/// Checks filter directives ([`filter_directives`] is applied first).
pub fn check_filter(directives: &str) -> Result<(), FilterError> {
    EnvFilter::try_new(filter_directives(Some(directives))).map(|_| ()).map_err(|e| FilterError::Invalid(e.to_string()))
}

/// Replaces the log filter (a reload), with the WARN caps of
/// [`filter_directives`]. `RUST_LOG`, when set, keeps precedence: this is
/// then a no-op that returns `Ok(false)`.
pub fn set_filter(directives: &str) -> Result<bool, FilterError> {
    if std::env::var("RUST_LOG").is_ok_and(|s| !s.trim().is_empty()) {
        return Ok(false);
    }
    let filter =
        EnvFilter::try_new(filter_directives(Some(directives))).map_err(|e| FilterError::Invalid(e.to_string()))?;
    let set = FILTER.get().ok_or(FilterError::NotInstalled)?;
    set(filter).map_err(FilterError::Refused)?;
    Ok(true)
}

/// A string from the network, for a log field: written escaped (Rust
/// `Debug` quoting, so CR, LF and control bytes cannot start a forged line in
/// text logs) and cut to [`Untrusted::MAX_CHARS`] characters. Log it with
/// `%`: the escaping is in its `Display`.
#[derive(Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl Untrusted<'_> {
    /// Characters shown; the rest is summarised by its length.
    pub const MAX_CHARS: usize = 96;
}

impl std::fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut: String = self.0.chars().take(Self::MAX_CHARS).collect();
        write!(f, "{:?}", cut)?;
        if cut.len() < self.0.len() {
            write!(f, "…({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// At most one log line per period for one kind of event that peers can
/// trigger at will; the next line says how many were left out.
#[derive(Debug)]
pub struct Throttle {
    period_ms: u64,
    last_ms: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
    origin: std::time::Instant,
}

impl Throttle {
    /// One line per `period`.
    pub fn new(period: std::time::Duration) -> Self {
        Self {
            period_ms: period.as_millis() as u64,
            last_ms: Default::default(),
            suppressed: Default::default(),
            origin: std::time::Instant::now(),
        }
    }

    /// `Some(left_out)` when a line is due now (the count of events since
    /// the last line that were not logged), else `None` (counted).
    pub fn due(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        // Offset by one period so the very first event is logged.
        let now = self.origin.elapsed().as_millis() as u64 + self.period_ms;
        let last = self.last_ms.load(Relaxed);
        if now.saturating_sub(last) >= self.period_ms
            && self.last_ms.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noisy_crates_are_capped_unless_named() {
        assert_eq!(filter_directives(None), "info,hickory_server=warn,hickory_proto=warn,quinn=warn,rustls=warn");
        let debug = filter_directives(Some("debug"));
        assert!(debug.starts_with("debug,") && debug.contains("hickory_server=warn"), "{debug}");
        let named = filter_directives(Some("info,hickory_server=debug"));
        assert!(!named.contains("hickory_server=warn") && named.contains("hickory_proto=warn"), "{named}");
        for d in [filter_directives(None), debug, named] {
            EnvFilter::try_new(&d).unwrap();
        }
    }

    #[test]
    fn untrusted_strings_cannot_break_lines() {
        let shown = Untrusted("evil\nFAKE line\r\u{1b}[31m").to_string();
        assert!(!shown.contains('\n') && !shown.contains('\r') && !shown.contains('\u{1b}'), "{shown}");
        assert_eq!(shown, r#""evil\nFAKE line\r\u{1b}[31m""#);
        let long = "a".repeat(1000);
        let shown = Untrusted(&long).to_string();
        assert!(shown.len() < 120 && shown.ends_with("…(1000 bytes)"), "{shown}");
    }

    #[test]
    fn throttle_lets_one_line_through_per_period() {
        let t = Throttle::new(std::time::Duration::from_secs(3600));
        assert_eq!(t.due(), Some(0), "the first event is logged");
        for _ in 0..5 {
            assert_eq!(t.due(), None);
        }
        let fast = Throttle::new(std::time::Duration::ZERO);
        assert_eq!(fast.due(), Some(0));
        assert_eq!(fast.due(), Some(0));
    }
}
