//! Operations: `/metrics` (Prometheus text format) and `/health` (for load balancers).
//!
//! [`Metrics`] is per node (a test process runs many), built in `Server::new` and reached as
//! `server.metrics`. The core counts where things happen (router, sessions table, c2s); values
//! that are cheaper to read than to track (sessions, storage size, push queue) are sampled when
//! `/metrics` is scraped.

use std::net::IpAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use halyard_xep::Kind;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::{HttpState, Peer};

/// One counter per stanza kind, resolved once so the hot path does no label lookup.
#[derive(Clone)]
pub struct ByKind {
    message: IntCounter,
    presence: IntCounter,
    iq: IntCounter,
}

impl ByKind {
    fn new(v: &IntCounterVec) -> ByKind {
        ByKind {
            message: v.with_label_values(&["message"]),
            presence: v.with_label_values(&["presence"]),
            iq: v.with_label_values(&["iq"]),
        }
    }

    pub fn inc(&self, kind: Kind) {
        match kind {
            Kind::Message => self.message.inc(),
            Kind::Presence => self.presence.inc(),
            Kind::Iq => self.iq.inc(),
        }
    }

    /// Counts serialised stanza bytes by their start tag (nonzas and stream errors are not
    /// stanzas and are not counted).
    pub fn inc_serialised(&self, bytes: &[u8]) {
        if bytes.starts_with(b"<message") {
            self.message.inc()
        } else if bytes.starts_with(b"<presence") {
            self.presence.inc()
        } else if bytes.starts_with(b"<iq") {
            self.iq.inc()
        }
    }
}

/// The node's metrics.
pub struct Metrics {
    registry: Registry,
    pub connections: IntGaugeVec,
    pub connections_total: IntCounterVec,
    pub logins: IntCounterVec,
    pub auth_failures: IntCounterVec,
    /// Connections refused by an abuse limit, by limit.
    pub connections_refused: IntCounterVec,
    pub stanzas_in: ByKind,
    pub stanzas_out: ByKind,
    pub routing_seconds: Histogram,
    pub archive_query_seconds: HistogramVec,
    /// Archive pages the HTTP API's history stream has read (a slow reader must hold it still).
    pub api_history_pages: IntCounter,
    sessions: IntGauge,
    uptime: IntGauge,
    storage_bytes: IntGauge,
    push_queue: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(
            r: &Registry,
            m: T,
        ) -> Result<T, prometheus::Error> {
            r.register(Box::new(m.clone()))?;
            Ok(m)
        }
        let opts = |name: &str, help: &str| Opts::new(name, help);
        // Seconds: 50 µs up to about 3 s.
        let buckets = prometheus::exponential_buckets(0.00005, 3.0, 11)?;
        let stanzas_in = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "halyard_stanzas_in_total",
                    "Stanzas received from bound clients, by kind.",
                ),
                &["kind"],
            )?,
        )?;
        let stanzas_out = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "halyard_stanzas_out_total",
                    "Stanzas queued to sessions, by kind.",
                ),
                &["kind"],
            )?,
        )?;
        Ok(Metrics {
            connections: reg(
                &registry,
                IntGaugeVec::new(
                    opts(
                        "halyard_connections",
                        "Open client connections, by transport.",
                    ),
                    &["transport"],
                )?,
            )?,
            connections_total: reg(
                &registry,
                IntCounterVec::new(
                    opts(
                        "halyard_connections_total",
                        "Client connections accepted, by transport.",
                    ),
                    &["transport"],
                )?,
            )?,
            logins: reg(
                &registry,
                IntCounterVec::new(
                    opts(
                        "halyard_logins_total",
                        "Successful authentications, by where (c2s, api).",
                    ),
                    &["via"],
                )?,
            )?,
            auth_failures: reg(
                &registry,
                IntCounterVec::new(
                    opts(
                        "halyard_auth_failures_total",
                        "Failed authentications, by where (c2s, api).",
                    ),
                    &["via"],
                )?,
            )?,
            connections_refused: reg(
                &registry,
                IntCounterVec::new(
                    opts(
                        "halyard_connections_refused_total",
                        "Connections refused by an abuse limit ([limits]), by limit.",
                    ),
                    &["limit"],
                )?,
            )?,
            stanzas_in: ByKind::new(&stanzas_in),
            stanzas_out: ByKind::new(&stanzas_out),
            routing_seconds: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "halyard_routing_seconds",
                        "Time to route one stanza from a client (dispatch and module handlers).",
                    )
                    .buckets(buckets.clone()),
                )?,
            )?,
            archive_query_seconds: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "halyard_archive_query_seconds",
                        "Archive queries: a MAM iq, or one page of the API's history stream.",
                    )
                    .buckets(buckets),
                    &["via"],
                )?,
            )?,
            api_history_pages: reg(
                &registry,
                IntCounter::new(
                    "halyard_api_history_pages_total",
                    "Archive pages read by the API's history stream.",
                )?,
            )?,
            sessions: reg(
                &registry,
                IntGauge::new("halyard_sessions", "Bound resources on this node.")?,
            )?,
            uptime: reg(
                &registry,
                IntGauge::new("halyard_uptime_seconds", "Seconds since the node started.")?,
            )?,
            storage_bytes: reg(
                &registry,
                IntGauge::new("halyard_storage_bytes", "Size of the store on disk.")?,
            )?,
            push_queue: reg(
                &registry,
                IntGauge::new(
                    "halyard_push_queue_depth",
                    "XEP-0357 queue rows: registrations with a notification owed or counted.",
                )?,
            )?,
            registry,
        })
    }
}

/// The routes for `/metrics` and `/health`.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
}

fn allowed(allow: &[IpAddr], ip: IpAddr) -> bool {
    // An IPv4 peer on a dual-stack socket shows up as ::ffff:a.b.c.d.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    allow.is_empty() || allow.contains(&ip)
}

async fn metrics(State(st): State<HttpState>, ConnectInfo(peer): ConnectInfo<Peer>) -> Response {
    let cfg = &st.server.config.metrics;
    if !cfg.enabled {
        return StatusCode::NOT_FOUND.into_response();
    }
    if !allowed(&cfg.allow, peer.0.ip()) {
        tracing::debug!(ip = %peer.0.ip(), "metrics scrape refused by metrics.allow");
        return StatusCode::FORBIDDEN.into_response();
    }
    let server = &st.server;
    let m = &server.metrics;
    m.sessions.set(server.sessions.len() as i64);
    m.uptime
        .set(server.started.elapsed().unwrap_or(Duration::ZERO).as_secs() as i64);
    match server.stores.stats.size_on_disk() {
        Ok(b) => m.storage_bytes.set(b as i64),
        Err(e) => tracing::warn!(error = %e, "reading the store's size for metrics failed"),
    }
    match server.stores.stats.push_queue_depth() {
        Ok(n) => m.push_queue.set(n as i64),
        Err(e) => tracing::warn!(error = %e, "reading the push queue depth for metrics failed"),
    }
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&m.registry.gather(), &mut out) {
        tracing::error!(error = %e, "encoding metrics failed");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], out).into_response()
}

/// 200 when the store answers a read and the node is not shutting down, else 503.
async fn health(State(st): State<HttpState>) -> Response {
    let json = |status: StatusCode, s: &str| {
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            format!("{{\"status\":\"{s}\"}}"),
        )
            .into_response()
    };
    if *st.server.shutdown.borrow() {
        return json(StatusCode::SERVICE_UNAVAILABLE, "shutting_down");
    }
    let probe = match jid::BareJid::new(&format!("health-probe@{}", st.server.domain())) {
        Ok(j) => j,
        Err(_) => return json(StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    match st.server.stores.accounts.get(&probe).await {
        Ok(_) => json(StatusCode::OK, "ok"),
        Err(e) => {
            tracing::error!(error = %e, "health check: the store did not answer");
            json(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_encodes() {
        let m = Metrics::new().unwrap();
        m.stanzas_out.inc_serialised(b"<message to='a'/>");
        m.stanzas_out.inc_serialised(b"<r xmlns='urn:xmpp:sm:3'/>");
        m.stanzas_in.inc(Kind::Iq);
        m.connections.with_label_values(&["tcp"]).inc();
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("halyard_stanzas_out_total{kind=\"message\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("halyard_stanzas_out_total{kind=\"iq\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("halyard_stanzas_in_total{kind=\"iq\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("halyard_connections{transport=\"tcp\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn allow_list() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(allowed(&[], other));
        assert!(allowed(&[lo], lo));
        assert!(allowed(&[lo], "::ffff:127.0.0.1".parse().unwrap()));
        assert!(!allowed(&[lo], other));
    }
}
