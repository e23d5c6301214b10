//! The `/metrics` endpoint, made cheap to ask.
//!
//! Rendering walks every node (a few lines each, megabytes at ten thousand
//! nodes) and looks at each node's tunnels, next to placement on the data
//! path. So the body is rendered at most once per `limits.metrics_cache_ms`
//! and shared by every scrape in that window, each source gets
//! `limits.metrics_rate` scrapes per second, and a scraper that stops
//! reading runs into the API's write deadline.
//!
//! Where: on the signal API listener behind the admin token, and, when
//! `listen.metrics` is set, on a separate plain-HTTP listener without a
//! token (meant for loopback or a private network).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::config::LimitsConfig;
use crate::limits::{Listener, Refusal, SourceRates};
use crate::Shared;

/// The rendered body and who may ask for it how often.
#[derive(Debug)]
pub struct Scrape {
    ttl: Duration,
    cache: Mutex<Option<(Instant, Bytes)>>,
    rendering: tokio::sync::Mutex<()>,
    rates: Mutex<SourceRates>,
}

impl Scrape {
    /// From the `[limits]` settings.
    pub fn new(limits: &LimitsConfig) -> Self {
        Self {
            ttl: Duration::from_millis(limits.metrics_cache_ms),
            cache: Mutex::new(None),
            rendering: tokio::sync::Mutex::new(()),
            // A Prometheus server scrapes every few seconds; a burst of a few
            // leaves room for a person with curl.
            rates: Mutex::new(SourceRates::new(limits.metrics_rate, limits.metrics_rate.max(1) * 5, 10_000)),
        }
    }

    /// The cached body, if younger than the TTL.
    fn fresh(&self) -> Option<Bytes> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.as_ref().filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, body)| body.clone())
    }

    /// The current body, rendered again only when the cached one is older
    /// than the TTL. One rendering runs at a time, on a blocking thread (it
    /// may take a while on a large cluster and must not hold a runtime
    /// worker); scrapes that arrive meanwhile wait for it and share it.
    pub async fn body(&self, shared: &Arc<Shared>) -> Bytes {
        if let Some(body) = self.fresh() {
            return body;
        }
        let _one_rendering = self.rendering.lock().await;
        if let Some(body) = self.fresh() {
            return body;
        }
        let owned = shared.clone();
        let body = match tokio::task::spawn_blocking(move || render(&owned)).await {
            Ok(text) => Bytes::from(text),
            Err(e) => {
                tracing::error!(error = %e, "rendering /metrics failed");
                return Bytes::new();
            }
        };
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), body.clone()));
        body
    }

    /// Spends one scrape of `source`'s budget.
    fn admit(&self, source: IpAddr) -> bool {
        self.rates.lock().unwrap_or_else(|p| p.into_inner()).take(source, Instant::now())
    }

    /// The answer to one scrape from `peer` arriving on `listener`.
    pub async fn respond(&self, shared: &Arc<Shared>, listener: Listener, peer: IpAddr) -> Response {
        if !self.admit(peer) {
            shared.refusals.refuse(listener, Refusal::MetricsRate, peer);
            let mut refused = (StatusCode::TOO_MANY_REQUESTS, "too many scrapes from this address\n").into_response();
            refused.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return refused;
        }
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], self.body(shared).await).into_response()
    }
}

/// Every series of the server, in Prometheus text format.
pub fn render(shared: &Shared) -> String {
    let mut body = shared.metrics.render(&shared.registry);
    shared.refusals.render(&mut body);
    if let Some(quic_clients) = &shared.quic_clients {
        quic_clients.render(&mut body);
    }
    edge_net::render_process_metrics(&mut body);
    body
}
