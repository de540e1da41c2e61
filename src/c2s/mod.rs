//! Client-to-server sessions: negotiation (TLS, SASL, bind) and the bound session's loop.
//!
//! One task per connection. Negotiation runs as a sequence of stream restarts under a single
//! pre-authentication deadline and byte budget; once bound, the task reads stanzas in order
//! (each is routed to completion before the next is read, RFC 6120 §10.1), writes what other
//! sessions queue for it, and pings the client after a quiet period to detect dead peers.

pub mod sm;
pub mod transport;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use halyard_xep::ns;
use halyard_xep::stanza::n;
use jid::{BareJid, FullJid, ResourcePart};
use minidom::Element;
use rand::Rng;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::Instrument;

use crate::sasl::scram::{self, ScramServer};
use crate::sasl::{self, plain};
use crate::server::Server;
use crate::sessions::Outbound;
use crate::stream::{writer, StreamError, StreamErrorKind, StreamEvent};
pub use transport::{TcpTransport, Transport, TransportError};

/// A failed SASL attempt: the condition, an optional text, and the account it named (counted
/// by the per-account throttle, known or not).
type AuthFailure = (&'static str, Option<String>, Option<BareJid>);

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Runs one connection: negotiation in this task; once bound, the session continues in a task of
/// its own whose future holds only the bound loop's state, so that an idle session costs as
/// little memory as possible (negotiation's state is freed with this task).
/// `slot` is the connection's place under the connection limits (`None` for WebSocket and
/// BOSH, whose HTTP connection holds it); it is given back when the connection closes, even if
/// the session then waits to be resumed.
pub async fn run<T: Transport + 'static>(
    server: Arc<Server>,
    t: T,
    slot: Option<crate::limits::ConnSlot>,
) {
    let conn_id = server.next_conn_id();
    let span = tracing::info_span!(
        "c2s",
        conn = conn_id,
        ip = %t.peer().ip(),
        transport = t.transport_name(),
        jid = tracing::field::Empty
    );
    let guard = ConnGuard::new(server.clone(), t.transport_name());
    let session = Session {
        server,
        t,
        conn_id,
        stream_id: String::new(),
        header_sent: false,
        _guard: guard,
        _slot: slot,
    };
    match session.negotiate_phase().instrument(span.clone()).await {
        Some((mut session, Negotiated::Bound(full))) => {
            // Binding runs here, so that the spawned task's future is the bound loop alone:
            // awaiting the loop from inside the binding code would keep a second copy of the
            // session in the task (about 1.9 KB per idle session, measured).
            let b = session.bind_session(full).instrument(span.clone()).await;
            spawn_bound(session.run_bound(b).instrument(span));
        }
        Some((session, Negotiated::Resumed(b))) => {
            spawn_bound(session.run_bound(b).instrument(span));
        }
        _ => {}
    }
}

/// Spawns a bound session's task. Its future is most of what an idle session costs: its size is
/// logged (debug) to keep an eye on it.
fn spawn_bound<F: std::future::Future<Output = ()> + Send + 'static>(fut: F) {
    tracing::debug!(
        future_bytes = std::mem::size_of_val(&fut),
        "bound session task"
    );
    tokio::spawn(fut);
}

/// Tells a connection refused by a connection limit why: waits for its stream header, answers
/// with ours (RFC 6120 §4.9.1.1 wants a header before the error) and the stream error, and
/// closes. The caller bounds the time this may take.
pub async fn refuse<T: Transport>(server: &Server, mut t: T, err: StreamError) {
    let header = match t.next_event().await {
        Ok(Some(StreamEvent::Open(h))) => h,
        _ => {
            t.close(None).await;
            return;
        }
    };
    let to = header.attr("to").map(|d| d.to_ascii_lowercase());
    let domain = match to {
        Some(d) if server.config.domains.contains(&d) => d,
        _ => server.domain().to_owned(),
    };
    if t.open(&random_id(16), &domain, None).await.is_ok() {
        t.close(Some(&err)).await;
    }
}

/// Counts a live connection for shutdown and metrics, whichever task owns it.
struct ConnGuard(Arc<Server>, &'static str);

impl ConnGuard {
    fn new(server: Arc<Server>, transport: &'static str) -> Self {
        server.connections.fetch_add(1, Ordering::Relaxed);
        let m = &server.metrics;
        m.connections.with_label_values(&[transport]).inc();
        m.connections_total.with_label_values(&[transport]).inc();
        ConnGuard(server, transport)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.0
            .metrics
            .connections
            .with_label_values(&[self.1])
            .dec();
    }
}

struct Session<T> {
    server: Arc<Server>,
    t: T,
    conn_id: u64,
    stream_id: String,
    /// Our stream header for the current stream has been sent (a stream error needs one first,
    /// RFC 6120 §4.9.1.1).
    header_sent: bool,
    _guard: ConnGuard,
    /// Released with the connection (see [`run`]).
    _slot: Option<crate::limits::ConnSlot>,
}

/// How negotiation ended.
enum Negotiated {
    Bound(FullJid),
    /// An earlier session was resumed (XEP-0198) and its unacknowledged stanzas sent again.
    Resumed(Box<sm::Bound>),
    /// The stream is over; the error (if any) has to be sent.
    Closed(Option<StreamError>),
}

fn stream_err(kind: StreamErrorKind, text: &str) -> Negotiated {
    Negotiated::Closed(Some(StreamError::new(kind, text)))
}

fn random_id(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn el_to_string(el: &Element) -> Vec<u8> {
    writer::to_bytes(el).to_vec()
}

impl<T: Transport> Session<T> {
    /// Negotiates; returns the session once bound or resumed, or `None` after closing.
    async fn negotiate_phase(mut self) -> Option<(Self, Negotiated)> {
        self.t
            .set_read_limit(Some(self.server.config.c2s.preauth_max_bytes as u64));
        let mut shutdown = self.server.shutdown.clone();
        let deadline = self.server.config.c2s.preauth_timeout();
        let outcome = tokio::select! {
            r = timeout(deadline, self.negotiate()) => match r {
                Ok(n) => n,
                Err(_) => stream_err(StreamErrorKind::ConnectionTimeout, "authentication and binding took too long"),
            },
            _ = crate::server::until_shutdown(&mut shutdown) => Negotiated::Closed(Some(StreamError::bare(StreamErrorKind::SystemShutdown))),
        };
        match outcome {
            Negotiated::Closed(err) => {
                if let Some(e) = &err {
                    tracing::debug!(error = %e, "closing stream during negotiation");
                }
                self.close(err.as_ref()).await;
                None
            }
            done => Some((self, done)),
        }
    }

    async fn close(&mut self, err: Option<&StreamError>) {
        let _ = timeout(Duration::from_secs(2), async {
            if !self.header_sent && err.is_some() {
                if self.stream_id.is_empty() {
                    self.stream_id = random_id(16);
                }
                let domain = self.server.domain().to_owned();
                let _ = self.t.open(&self.stream_id, &domain, None).await;
            }
            self.t.close(err).await
        })
        .await;
    }

    async fn send_el(&mut self, el: &Element) -> std::io::Result<()> {
        self.t.write(&el_to_string(el)).await?;
        self.t.flush().await
    }

    /// Reads the next event, enforcing the pre-authentication byte budget.
    async fn next_preauth(&mut self) -> Result<Option<StreamEvent>, Negotiated> {
        self.t.next_event().await.map_err(|e| match e {
            TransportError::Stream(s) => Negotiated::Closed(Some(s)),
            TransportError::Io(_) => Negotiated::Closed(None),
        })
    }

    /// Waits for a stream header and answers it with ours. Returns the domain the client asked
    /// for.
    async fn open_stream(&mut self) -> Result<String, Negotiated> {
        let header = match self.next_preauth().await? {
            Some(StreamEvent::Open(h)) => h,
            Some(StreamEvent::Close) | None => return Err(Negotiated::Closed(None)),
            Some(StreamEvent::Element(_)) => {
                return Err(stream_err(
                    StreamErrorKind::NotWellFormed,
                    "expected a stream header",
                ))
            }
        };
        self.stream_id = random_id(16);
        let primary = self.server.domain().to_owned();
        // Our header goes out before any error, so the client can parse the error (RFC 6120
        // §4.9.1.1).
        let to = header.attr("to").map(|t| t.to_ascii_lowercase());
        let domain = match to.as_deref() {
            Some(d) if self.server.config.domains.iter().any(|x| x == d) => d.to_owned(),
            None => primary.clone(),
            Some(_) => {
                if self.t.open(&self.stream_id, &primary, None).await.is_ok() {
                    self.header_sent = true;
                }
                return Err(stream_err(
                    StreamErrorKind::HostUnknown,
                    "this server does not serve that domain",
                ));
            }
        };
        let from = header
            .attr("from")
            .and_then(|f| halyard_xep::stanza::parse_bare_jid(f).ok())
            .map(|j| j.to_string());
        if self
            .t
            .open(&self.stream_id, &domain, from.as_deref())
            .await
            .is_err()
        {
            return Err(Negotiated::Closed(None));
        }
        self.header_sent = true;
        match header.attr("version") {
            Some(v)
                if v.split('.')
                    .next()
                    .and_then(|m| m.parse::<u32>().ok())
                    .unwrap_or(0)
                    >= 1 =>
            {
                Ok(domain)
            }
            _ => Err(stream_err(
                StreamErrorKind::UnsupportedVersion,
                "XMPP 1.0 streams are required",
            )),
        }
    }

    fn limits_feature(&self) -> Element {
        let c = &self.server.config.c2s;
        Element::builder("limits", ns::STREAM_LIMITS)
            .append(
                Element::builder("max-bytes", ns::STREAM_LIMITS)
                    .append(c.max_stanza_bytes.to_string())
                    .build(),
            )
            .append(
                Element::builder("idle-seconds", ns::STREAM_LIMITS)
                    .append(c.idle_timeout_secs.to_string())
                    .build(),
            )
            .build()
    }

    async fn negotiate(&mut self) -> Negotiated {
        let mut user: Option<BareJid> = None;
        let mut failures = 0u32;
        loop {
            let domain = match self.open_stream().await {
                Ok(d) => d,
                Err(n) => return n,
            };
            let mut features = Element::builder("features", ns::STREAM);
            let cb = self.t.bindings();
            match &user {
                None => {
                    if self.t.can_starttls() {
                        let mut st = Element::builder("starttls", ns::TLS);
                        if !self.t.auth_allowed() {
                            st = st.append(Element::bare("required", ns::TLS));
                        }
                        features = features.append(st.build());
                    }
                    if self.t.auth_allowed() {
                        let mut mechs = Element::builder("mechanisms", ns::SASL);
                        for m in sasl::mechanisms(
                            &cb,
                            self.server.config.auth.allow_plain && self.t.is_secure(),
                        ) {
                            mechs = mechs
                                .append(Element::builder("mechanism", ns::SASL).append(m).build());
                        }
                        features = features.append(mechs.build());
                        let types = sasl::binding_types(&cb);
                        if !types.is_empty() {
                            let mut b = Element::builder("sasl-channel-binding", ns::SASL_CB);
                            for ty in types {
                                b = b.append(
                                    Element::builder("channel-binding", ns::SASL_CB)
                                        .attr(n("type"), ty)
                                        .build(),
                                );
                            }
                            features = features.append(b.build());
                        }
                    }
                }
                Some(_) => {
                    features = features.append(Element::bare("bind", ns::BIND)).append(
                        Element::builder("session", ns::SESSION)
                            .append(Element::bare("optional", ns::SESSION))
                            .build(),
                    );
                    for f in self.server.registry.stream_features() {
                        features = features.append(f.clone());
                    }
                }
            }
            features = features
                .append(self.limits_feature())
                .append(self.server.caps.clone());
            if self.send_el(&features.build()).await.is_err() {
                return Negotiated::Closed(None);
            }

            // Elements until the next restart (or binding).
            loop {
                let el = match self.next_preauth().await {
                    Ok(Some(StreamEvent::Element(el))) => el,
                    Ok(Some(StreamEvent::Close)) | Ok(None) => return Negotiated::Closed(None),
                    Ok(Some(StreamEvent::Open(_))) => {
                        return stream_err(
                            StreamErrorKind::NotWellFormed,
                            "unexpected stream header",
                        )
                    }
                    Err(n) => return n,
                };
                if el.is("starttls", ns::TLS) && user.is_none() {
                    if !self.t.can_starttls() {
                        let _ = self.send_el(&Element::bare("failure", ns::TLS)).await;
                        return Negotiated::Closed(None);
                    }
                    if self
                        .send_el(&Element::bare("proceed", ns::TLS))
                        .await
                        .is_err()
                    {
                        return Negotiated::Closed(None);
                    }
                    match self.t.starttls().await {
                        Ok(()) => {
                            self.header_sent = false;
                            break;
                        }
                        Err(TransportError::Stream(e)) => return Negotiated::Closed(Some(e)),
                        Err(TransportError::Io(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return Negotiated::Closed(None);
                        }
                    }
                }
                if el.is("auth", ns::SASL) && user.is_none() {
                    match self.authenticate(&el, &domain).await {
                        Ok(Some(jid)) => {
                            tracing::Span::current().record("jid", tracing::field::display(&jid));
                            tracing::info!(
                                mechanism = el.attr("mechanism").unwrap_or(""),
                                "authenticated"
                            );
                            user = Some(jid);
                            self.t.restart();
                            self.header_sent = false;
                            break;
                        }
                        Ok(None) => {
                            failures += 1;
                            if failures >= self.server.config.auth.max_failures_per_connection {
                                return stream_err(
                                    StreamErrorKind::PolicyViolation,
                                    "too many failed authentication attempts",
                                );
                            }
                            continue;
                        }
                        Err(n) => return n,
                    }
                }
                if let Some(bare) = &user {
                    match halyard_xep::sm::parse(&el) {
                        Ok(Some(halyard_xep::sm::Nonza::Resume { previd, h })) => {
                            match self.resume(bare, &previd, h).await {
                                Ok(Some(b)) => return Negotiated::Resumed(b),
                                Ok(None) => continue,
                                Err(n) => return n,
                            }
                        }
                        Ok(Some(_)) | Err(_) => {
                            // XEP-0198 §3: enabling (or acking) before binding is refused.
                            let failed = halyard_xep::sm::failed("unexpected-request", None);
                            if self.send_el(&failed).await.is_err() {
                                return Negotiated::Closed(None);
                            }
                            continue;
                        }
                        Ok(None) => {}
                    }
                    if el.is("iq", ns::CLIENT)
                        && el.attr("type") == Some("set")
                        && el.get_child("bind", ns::BIND).is_some()
                    {
                        match self.bind(bare, &el).await {
                            Ok(Some(full)) => return Negotiated::Bound(full),
                            Ok(None) => continue,
                            Err(n) => return n,
                        }
                    }
                    if el.is("iq", ns::CLIENT) && el.get_child("session", ns::SESSION).is_some() {
                        // RFC 3921 session establishment is a no-op kept for old clients.
                        let reply = iq_result(&el, None);
                        if self.send_el(&reply).await.is_err() {
                            return Negotiated::Closed(None);
                        }
                        continue;
                    }
                }
                return if halyard_xep::Kind::of(&el).is_some() {
                    stream_err(
                        StreamErrorKind::NotAuthorized,
                        "stanzas are allowed only after authentication and resource binding",
                    )
                } else {
                    stream_err(
                        StreamErrorKind::UnsupportedStanzaType,
                        "unexpected element during negotiation",
                    )
                };
            }
        }
    }

    /// One SASL exchange. `Ok(Some(jid))` on success, `Ok(None)` after a failure the client may
    /// retry.
    async fn authenticate(
        &mut self,
        auth: &Element,
        domain: &str,
    ) -> Result<Option<BareJid>, Negotiated> {
        if !self.t.auth_allowed() {
            self.sasl_failure("encryption-required", Some("use STARTTLS first"))
                .await?;
            return Ok(None);
        }
        let mech = auth.attr("mechanism").unwrap_or("");
        let offered = sasl::mechanisms(
            &self.t.bindings(),
            self.server.config.auth.allow_plain && self.t.is_secure(),
        );
        if !offered.contains(&mech) {
            self.sasl_failure("invalid-mechanism", None).await?;
            return Ok(None);
        }
        let initial = match decode_sasl(&auth.text()) {
            Ok(d) => d,
            Err(()) => {
                self.sasl_failure("incorrect-encoding", None).await?;
                return Ok(None);
            }
        };
        let result = if mech == "PLAIN" {
            self.auth_plain(&initial, domain).await
        } else {
            self.auth_scram(mech, initial, domain).await?
        };
        match result {
            Ok(jid) => {
                self.server.metrics.logins.with_label_values(&["c2s"]).inc();
                Ok(Some(jid))
            }
            Err((cond, text, named)) => {
                self.server
                    .metrics
                    .auth_failures
                    .with_label_values(&["c2s"])
                    .inc();
                let named = named.map(|j| j.to_string());
                let ip = self.t.peer().ip();
                let delay = self.server.auth_throttle.failure(ip, named.as_deref());
                // The span carries the address too; it is repeated for log scanners (fail2ban).
                tracing::info!(
                    condition = cond,
                    %ip,
                    account = named.as_deref().unwrap_or(""),
                    delay_ms = delay.as_millis() as u64,
                    "authentication failed"
                );
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                self.sasl_failure(cond, text.as_deref()).await?;
                Ok(None)
            }
        }
    }

    async fn sasl_failure(&mut self, cond: &str, text: Option<&str>) -> Result<(), Negotiated> {
        let mut b = Element::builder("failure", ns::SASL).append(Element::bare(cond, ns::SASL));
        if let Some(t) = text {
            b = b.append(Element::builder("text", ns::SASL).append(t).build());
        }
        self.send_el(&b.build())
            .await
            .map_err(|_| Negotiated::Closed(None))
    }

    /// Maps a SASL authcid to the account it names on this domain.
    fn account_for(&self, username: &str, domain: &str) -> Option<BareJid> {
        if username.is_empty() {
            return None;
        }
        // Client input: a name that does not prepare to itself names no account.
        halyard_xep::stanza::parse_bare_jid(&format!("{username}@{domain}")).ok()
    }

    async fn auth_plain(&mut self, msg: &[u8], domain: &str) -> Result<BareJid, AuthFailure> {
        let creds = plain::parse(msg).map_err(|e| (e.condition(), None, None))?;
        let jid = self
            .account_for(&creds.authcid, domain)
            .ok_or(("not-authorized", None, None))?;
        if let Some(z) = creds.authzid.as_deref().filter(|z| !z.is_empty()) {
            if halyard_xep::stanza::parse_bare_jid(z).ok().as_ref() != Some(&jid) {
                return Err(("invalid-authzid", None, Some(jid)));
            }
        }
        let account = match self.server.stores.accounts.get(&jid).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "account lookup failed");
                return Err(("temporary-auth-failure", None, None));
            }
        };
        let hash = scram::Hash::Sha256;
        // An unknown user is checked against fake credentials so the reply takes as long.
        let stored = match account.as_ref().and_then(|a| a.credentials(hash)) {
            Some(c) => c.clone(),
            None => scram::fake_credentials(
                hash,
                &self.server.fake_salt_secret,
                &creds.authcid,
                self.server.config.auth.scram_iterations,
            ),
        };
        let ok = plain::verify(hash, &stored, &creds.password) && account.is_some();
        if !ok {
            return Err(("not-authorized", None, Some(jid)));
        }
        self.send_el(&Element::bare("success", ns::SASL))
            .await
            .map_err(|_| ("aborted", None, None))?;
        Ok(jid)
    }

    /// SCRAM: client-first in `<auth>`, server-first in `<challenge>`, client-final in
    /// `<response>`, server-final in `<success>`.
    #[allow(clippy::type_complexity)]
    async fn auth_scram(
        &mut self,
        mech: &str,
        initial: Vec<u8>,
        domain: &str,
    ) -> Result<Result<BareJid, AuthFailure>, Negotiated> {
        let Some((hash, plus)) = scram::parse_mechanism(mech) else {
            return Ok(Err(("invalid-mechanism", None, None)));
        };
        let mut server = ScramServer::new(hash, plus, self.t.bindings());
        let first = match server.client_first(&initial) {
            Ok(f) => f,
            Err(e) => return Ok(Err((e.condition(), Some(e.to_string()), None))),
        };
        let jid = self.account_for(&first.username, domain);
        let creds = match &jid {
            Some(j) => match self.server.stores.accounts.get(j).await {
                Ok(a) => a.and_then(|a| a.credentials(hash).cloned()),
                Err(e) => {
                    tracing::error!(error = %e, "account lookup failed");
                    return Ok(Err(("temporary-auth-failure", None, None)));
                }
            },
            None => None,
        };
        let challenge = server.server_first(
            creds.as_ref(),
            &self.server.fake_salt_secret,
            self.server.config.auth.scram_iterations,
        );
        let ch = Element::builder("challenge", ns::SASL)
            .append(B64.encode(challenge))
            .build();
        self.send_el(&ch)
            .await
            .map_err(|_| Negotiated::Closed(None))?;
        let resp = match self.next_preauth().await? {
            Some(StreamEvent::Element(el)) if el.is("response", ns::SASL) => el,
            Some(StreamEvent::Element(el)) if el.is("abort", ns::SASL) => {
                return Ok(Err(("aborted", None, jid)))
            }
            Some(StreamEvent::Element(_)) => {
                return Ok(Err((
                    "malformed-request",
                    Some("expected <response/>".into()),
                    jid,
                )))
            }
            _ => return Err(Negotiated::Closed(None)),
        };
        let Ok(final_msg) = decode_sasl(&resp.text()) else {
            return Ok(Err(("incorrect-encoding", None, jid)));
        };
        let server_final = match server.client_final(&final_msg) {
            Ok(v) => v,
            Err(e) => return Ok(Err((e.condition(), None, jid))),
        };
        let (Some(jid), Some(_)) = (jid.clone(), creds) else {
            // Unreachable in practice: an unknown user's proof cannot verify.
            return Ok(Err(("not-authorized", None, jid)));
        };
        if let Some(z) = first.authzid.as_deref().filter(|z| !z.is_empty()) {
            if halyard_xep::stanza::parse_bare_jid(z).ok().as_ref() != Some(&jid) {
                return Ok(Err(("invalid-authzid", None, Some(jid))));
            }
        }
        let ok = Element::builder("success", ns::SASL)
            .append(B64.encode(server_final))
            .build();
        self.send_el(&ok)
            .await
            .map_err(|_| Negotiated::Closed(None))?;
        Ok(Ok(jid))
    }

    /// Resource binding (RFC 6120 §7). `Ok(None)` when the request got an error reply.
    async fn bind(&mut self, bare: &BareJid, iq: &Element) -> Result<Option<FullJid>, Negotiated> {
        let requested = iq
            .get_child("bind", ns::BIND)
            .and_then(|b| b.get_child("resource", ns::BIND))
            .map(|r| r.text())
            .filter(|r| !r.trim().is_empty());
        let resource = match requested {
            // RFC 6120 §7.7.2.1: a resource that cannot be processed (here: one not stable
            // under preparation, which would print as another resource) is bad-request.
            Some(r) => match halyard_xep::stanza::parse_resource(&r) {
                Ok(rp) => rp,
                Err(e) => {
                    let err = halyard_xep::stanza::error_reply(
                        iq,
                        "",
                        self.server.domain(),
                        halyard_xep::StanzaError::BadRequest(Some(e)),
                    );
                    if let Some(e) = err {
                        self.send_el(&e)
                            .await
                            .map_err(|_| Negotiated::Closed(None))?;
                    }
                    return Ok(None);
                }
            },
            None => match ResourcePart::new(&format!("halyard-{}", random_id(10))) {
                Ok(rp) => rp.into_owned(),
                Err(_) => {
                    return Err(stream_err(
                        StreamErrorKind::InternalServerError,
                        "resource generation failed",
                    ))
                }
            },
        };
        let full = FullJid::from_parts(bare.node(), bare.domain(), &resource);
        let reply = iq_result(
            iq,
            Some(
                Element::builder("bind", ns::BIND)
                    .append(
                        Element::builder("jid", ns::BIND)
                            .append(full.to_string())
                            .build(),
                    )
                    .build(),
            ),
        );
        self.send_el(&reply)
            .await
            .map_err(|_| Negotiated::Closed(None))?;
        Ok(Some(full))
    }

    /// Resumes session `previd` of `bare` on this connection: `<resumed/>`, then every stanza
    /// the client has not acknowledged, again. `Ok(None)` after `<failed/>` (the client may bind
    /// a new session instead).
    async fn resume(
        &mut self,
        bare: &BareJid,
        previd: &str,
        h: u32,
    ) -> Result<Option<Box<sm::Bound>>, Negotiated> {
        let server = self.server.clone();
        match server.sm.take(previd, bare, h).await {
            Ok(b) => {
                let Some(s) = b.sm.as_ref() else {
                    return Err(stream_err(
                        StreamErrorKind::InternalServerError,
                        "resumed a session without stream management",
                    ));
                };
                tracing::Span::current().record("jid", tracing::field::display(&b.full));
                tracing::info!(full = %b.full, resent = s.unacked.len(), "resumed");
                let mut out = el_to_string(&halyard_xep::sm::resumed(previd, s.h_in));
                for (_, bytes) in &s.unacked {
                    out.extend_from_slice(bytes);
                }
                let mut b = b;
                // Client state is the stream's (XEP-0352): a resumed stream starts active, so
                // what was held back for the old one goes out now, after the replay.
                let was_inactive = b.held.is_some();
                let held: Vec<bytes::Bytes> = b
                    .held
                    .take()
                    .map(|mut h| h.items.drain(..).map(|(_, b)| b).collect())
                    .unwrap_or_default();
                if was_inactive {
                    server.sessions.set_inactive(&b.full, false);
                }
                if let Some(s) = b.sm.as_mut() {
                    for bytes in held {
                        out.extend_from_slice(&bytes);
                        s.sent_one(bytes);
                    }
                    if !s.unacked.is_empty() {
                        out.extend_from_slice(&el_to_string(&halyard_xep::sm::request()));
                        s.r_sent_at = Some(std::time::Instant::now());
                    } else {
                        s.r_sent_at = None;
                    }
                }
                // Written even if it fails: the session then hibernates again in run_bound.
                let _ = async {
                    self.t.write(&out).await?;
                    self.t.flush().await
                }
                .await;
                Ok(Some(b))
            }
            Err(f) => {
                tracing::info!(condition = f.condition, "resumption failed");
                self.send_el(&f.element())
                    .await
                    .map_err(|_| Negotiated::Closed(None))?;
                Ok(None)
            }
        }
    }

    /// A new binding: the sessions table, conflict handling, session hooks. The bound loop
    /// ([`Self::run_bound`]) runs next, in a task of its own.
    async fn bind_session(&mut self, full: FullJid) -> Box<sm::Bound> {
        let server = self.server.clone();
        let c2s = &server.config.c2s;
        let (tx, rx) = crate::outbound::channel::<Outbound>(c2s.outbound_queue);
        if let Some(old) = server.sessions.bind(&full, self.conn_id, tx) {
            crate::sessions::Sessions::close_one(
                &old.tx,
                StreamError::new(
                    StreamErrorKind::Conflict,
                    "replaced by a new session with the same resource",
                ),
            );
            // The old session can no longer unbind itself (the entry is ours now): end it here,
            // so its contacts learn it went away (RFC 6121 §4.5.2).
            for hook in server.registry.session_hooks() {
                hook.ended(server.as_ref(), &full, old.presence.as_ref(), &old.directed)
                    .await;
            }
        }
        tracing::info!(%full, "bound");
        for hook in server.registry.session_hooks() {
            hook.bound(server.as_ref(), &full).await;
        }
        Box::new(sm::Bound {
            full,
            conn_id: self.conn_id,
            rx,
            sm: None,
            held: None,
            shaper: crate::limits::Shaper::new(
                &crate::limits::ShaperRates::from_config(&server.config.limits),
                std::time::Instant::now(),
            ),
        })
    }

    /// The bound session: stanzas in, queued stanzas out, pings when quiet. Handling an event
    /// (routing a stanza, writing a batch) is a boxed sub-future, so it does not sit inline in
    /// an idle task.
    /// When the connection is lost and the client enabled resumption, the session waits to be
    /// resumed (in this task, without the connection); otherwise, or when that wait ends, the
    /// session ends and what it did not get is rerouted.
    ///
    /// Not an `async fn`: one moves its arguments into locals of its body, and the session
    /// (~1 KB) would then take room twice in the task's future (measured: 2,656 → 1,648 bytes
    /// in a debug build); an `async move` block uses what it captures in place.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn run_bound(mut self, mut b: Box<sm::Bound>) -> impl std::future::Future<Output = ()> + Send
    where
        T: 'static,
    {
        async move {
            self.t.set_read_limit(None);
            let mut shutdown = self.server.shutdown.clone();
            let mut timers = Timers {
                last_read: Instant::now(),
                ping_sent: None,
                released: false,
            };
            b.shaper.seen = self.t.bytes_in();
            // Only the wait for the next event is inline in this task's future: handling an event
            // and ending the session are boxed, allocated while they run, so that an idle session's
            // future holds the session and this `select!` alone.
            let end: End = loop {
                let wake = self.wake_times(&b, &timers);
                self.t.idle();
                let takeover = async {
                    match b.sm.as_mut().and_then(|s| s.takeover.as_mut()) {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                };
                // Biased: shutdown first, then our queue, then input. Draining the queue before
                // reading more keeps a client that pipelines requests (each adding replies to its
                // own queue) from being taken for a slow reader; reading waits while we write.
                let event = tokio::select! {
                    biased;
                    _ = crate::server::until_shutdown(&mut shutdown) => Event::Shutdown,
                    t = takeover => match t {
                        Some(t) => Event::Takeover(t),
                        None => Event::Shutdown,
                    },
                    out = b.rx.recv() => Event::Out(out),
                    ev = self.t.next_event(), if !wake.throttled => Event::In(ev),
                    _ = sleep_until(wake.next) => Event::Timer,
                };
                let handled = Box::pin(self.on_event(&mut b, &mut timers, &wake, event));
                if let Some(end) = handled.await {
                    break end;
                }
            };
            let ended = Box::pin(self.end_bound(b, end));
            ended.await
        }
    }

    /// When the bound loop next has something to do without input or queued stanzas.
    fn wake_times(&self, b: &sm::Bound, timers: &Timers) -> Wake {
        let server = &self.server;
        let c2s = &server.config.c2s;
        let idle = match timers.ping_sent {
            Some(at) => at + c2s.ping_timeout(),
            None => timers.last_read + c2s.idle_timeout(),
        };
        let mut next = idle;
        if !timers.released {
            next = next.min(timers.last_read + RELEASE_AFTER);
        }
        // Over a read rate: read nothing until the debt is paid (TCP pushes back on the
        // sender); our own queue is still written.
        let throttled = b
            .shaper
            .ready_at(&crate::limits::ShaperRates::from_config(
                &server.config.limits,
            ))
            .map(Instant::from_std)
            .filter(|t| *t > Instant::now());
        if let Some(t) = throttled {
            next = next.min(t);
        }
        let ack_every = Duration::from_secs(server.config.stream_management.ack_request_secs);
        let r_due =
            b.sm.as_ref()
                .filter(|s| !s.unacked.is_empty())
                .and_then(|s| s.r_sent_at)
                .map(|at| Instant::from_std(at) + ack_every);
        if let Some(due) = r_due {
            next = next.min(due);
        }
        Wake {
            idle,
            next,
            throttled: throttled.is_some(),
            r_due,
        }
    }

    /// Handles one event of the bound loop; `Some` when the session is over.
    async fn on_event(
        &mut self,
        b: &mut sm::Bound,
        timers: &mut Timers,
        wake: &Wake,
        event: Event,
    ) -> Option<End> {
        let server = self.server.clone();
        match event {
            Event::Shutdown => Some(End::Error(StreamError::bare(
                StreamErrorKind::SystemShutdown,
            ))),
            Event::Takeover(t) => {
                let s = b.sm.as_mut()?;
                match s.ack(t.h) {
                    Err(e) => {
                        let _ = t.reply.send(Err(e));
                        None
                    }
                    Ok(()) => Some(End::TakenOver(t.reply)),
                }
            }
            Event::Out(Some(Outbound::Data(bytes))) => self.write_batch(bytes, b).await.err(),
            Event::Out(Some(Outbound::Close(e))) => Some(End::Error(*e)),
            Event::Out(None) => Some(End::Clean),
            Event::In(ev) => {
                timers.last_read = Instant::now();
                timers.ping_sent = None;
                timers.released = false;
                match ev {
                    Ok(Some(StreamEvent::Element(el))) => {
                        b.shaper.charge_read(
                            &crate::limits::ShaperRates::from_config(&server.config.limits),
                            self.t.bytes_in(),
                            std::time::Instant::now(),
                        );
                        self.handle_element(b, el).await.err()
                    }
                    Ok(Some(StreamEvent::Close)) => Some(End::Clean),
                    Ok(None) => Some(End::Lost),
                    Ok(Some(StreamEvent::Open(_))) => Some(End::Error(StreamError::new(
                        StreamErrorKind::NotWellFormed,
                        "unexpected stream header",
                    ))),
                    Err(TransportError::Stream(e)) => Some(End::Error(e)),
                    Err(TransportError::Io(e)) => {
                        tracing::debug!(error = %e, "read failed");
                        Some(End::Lost)
                    }
                }
            }
            Event::Timer => {
                let now = Instant::now();
                if !timers.released && now >= timers.last_read + RELEASE_AFTER {
                    self.t.release();
                    timers.released = true;
                }
                if wake.r_due.is_some_and(|due| now >= due) {
                    if let Some(s) = b.sm.as_mut() {
                        s.r_sent_at = Some(std::time::Instant::now());
                    }
                    if self.send_el(&halyard_xep::sm::request()).await.is_err() {
                        return Some(End::Lost);
                    }
                    return None;
                }
                if now < wake.idle {
                    return None;
                }
                if timers.ping_sent.is_some() {
                    return Some(End::Stalled(StreamError::new(
                        StreamErrorKind::ConnectionTimeout,
                        "no answer to ping",
                    )));
                }
                let ping = Element::builder("iq", ns::CLIENT)
                    .attr(n("type"), "get")
                    .attr(n("id"), format!("ping-{}", random_id(8)))
                    .attr(n("from"), b.full.domain().as_str())
                    .attr(n("to"), b.full.to_string())
                    .append(Element::bare("ping", ns::PING))
                    .build();
                if let Err(e) = self.send_stanza(b, writer::to_bytes(&ping)).await {
                    return Some(e);
                }
                timers.ping_sent = Some(Instant::now());
                None
            }
        }
    }

    /// The bound loop is over: hands the session to the connection that resumed it, waits to be
    /// resumed, or ends it.
    async fn end_bound(mut self, b: Box<sm::Bound>, end: End) {
        let resumable = b.sm.as_ref().is_some_and(|s| s.id.is_some());
        match end {
            End::TakenOver(reply) => {
                tracing::info!("session resumed on another connection: closing this one");
                self.close(None).await;
                if let Err(Ok(back)) = reply.send(Ok(b)) {
                    // The resuming connection went away before it got the session.
                    self.finish_after_hibernation(back).await;
                }
            }
            End::Lost if resumable => {
                self.finish_after_hibernation(b).await;
            }
            End::Stalled(e) if resumable => {
                tracing::info!(error = %e, "closing stream");
                self.close(Some(&e)).await;
                self.finish_after_hibernation(b).await;
            }
            other => {
                match &other {
                    End::Error(e) | End::Stalled(e) => tracing::info!(error = %e, "closing stream"),
                    _ => tracing::info!("session ended"),
                }
                // Unbind first so nothing more is queued for us, then say goodbye.
                let err = match other {
                    End::Error(e) | End::Stalled(e) => Some(e),
                    _ => None,
                };
                let server = self.server.clone();
                self.close(err.as_ref()).await;
                sm::finish(&server, b).await;
            }
        }
    }

    /// Waits (without a connection) for the session to be resumed, or ends it. It still
    /// counts as a connection, so that shutdown waits for its stanzas to be rerouted.
    async fn finish_after_hibernation(self, b: Box<sm::Bound>) {
        let Session {
            server,
            t,
            _guard,
            _slot,
            ..
        } = self;
        drop(t);
        drop(_slot);
        if let sm::Hibernation::Ended(b) = sm::hibernate(&server, b).await {
            sm::finish(&server, b).await;
        }
        drop(_guard);
    }

    /// Writes one stanza the session itself generates (pings, session results), counted for
    /// stream management like any other.
    async fn send_stanza(&mut self, b: &mut sm::Bound, bytes: bytes::Bytes) -> Result<(), End> {
        let wt = self.server.config.c2s.write_timeout();
        let was_empty = b.sm.as_ref().is_none_or(|s| s.unacked.is_empty());
        let r = async {
            self.t.write(&bytes).await?;
            self.t.flush().await
        };
        match timeout(wt, r).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(End::Lost),
            Err(_) => return Err(End::Stalled(stalled())),
        }
        if let Some(s) = b.sm.as_mut() {
            s.sent_one(bytes);
            if was_empty {
                self.server
                    .sessions
                    .set_unacked_since(&b.full, s.oldest_unacked());
            }
        }
        Ok(())
    }

    /// Writes one queued stanza and whatever else is already queued, then flushes once. For an
    /// inactive client, what is not urgent is held back instead; with stream management every
    /// stanza written is remembered until acknowledged, and an ack is requested.
    async fn write_batch(&mut self, first: bytes::Bytes, b: &mut sm::Bound) -> Result<(), End> {
        let wt = self.server.config.c2s.write_timeout();
        let max_held = self.server.config.csi.max_held;
        let was_empty = b.sm.as_ref().is_none_or(|s| s.unacked.is_empty());
        let mut next = Some(first);
        let mut n = 0;
        let mut out: Vec<bytes::Bytes> = Vec::new();
        while let Some(bytes) = next.take() {
            match b.held.as_mut() {
                None => out.push(bytes),
                Some(held) => {
                    let class = std::str::from_utf8(&bytes)
                        .ok()
                        .and_then(|s| s.parse::<Element>().ok())
                        .map_or(halyard_xep::csi::Class::Urgent, |el| {
                            halyard_xep::csi::classify(&el)
                        });
                    match class {
                        halyard_xep::csi::Class::Hold(key) => {
                            held.hold(key, bytes);
                            if held.items.len() > max_held {
                                out.extend(held.items.drain(..).map(|(_, b)| b));
                            }
                        }
                        halyard_xep::csi::Class::Urgent => {
                            out.extend(held.items.drain(..).map(|(_, b)| b));
                            out.push(bytes);
                        }
                    }
                }
            }
            n += 1;
            if n < 64 {
                match b.rx.try_recv() {
                    Ok(Outbound::Data(more)) => next = Some(more),
                    Ok(Outbound::Close(e)) => {
                        let _ = Box::pin(self.write_out(&mut out, b, wt)).await;
                        return Err(End::Error(*e));
                    }
                    Err(_) => {}
                }
            }
        }
        self.write_out(&mut out, b, wt).await?;
        if was_empty {
            if let Some(s) = b.sm.as_ref().filter(|s| !s.unacked.is_empty()) {
                self.server
                    .sessions
                    .set_unacked_since(&b.full, s.oldest_unacked());
            }
        }
        Ok(())
    }

    /// Writes `out` (and an ack request when stream management wants one), then flushes.
    async fn write_out(
        &mut self,
        out: &mut Vec<bytes::Bytes>,
        b: &mut sm::Bound,
        wt: Duration,
    ) -> Result<(), End> {
        if out.is_empty() {
            return Ok(());
        }
        for bytes in out.drain(..) {
            match timeout(wt, self.t.write(&bytes)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(End::Lost),
                Err(_) => return Err(End::Stalled(stalled())),
            }
            if let Some(s) = b.sm.as_mut() {
                s.sent_one(bytes);
            }
        }
        let max_unacked = self.server.config.stream_management.max_unacked;
        if b.sm.as_ref().is_some_and(|s| s.unacked.len() > max_unacked) {
            // A client that never acknowledges would make us keep everything forever.
            return Err(End::Error(StreamError::new(
                StreamErrorKind::PolicyViolation,
                format!("more than {max_unacked} stanzas left unacknowledged"),
            )));
        }
        if let Some(s) = b.sm.as_mut().filter(|s| s.r_sent_at.is_none()) {
            s.r_sent_at = Some(std::time::Instant::now());
            let r = el_to_string(&halyard_xep::sm::request());
            match timeout(wt, self.t.write(&r)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(End::Lost),
                Err(_) => return Err(End::Stalled(stalled())),
            }
        }
        match timeout(wt, self.t.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Lost),
            Err(_) => Err(End::Stalled(stalled())),
        }
    }

    async fn handle_element(&mut self, b: &mut sm::Bound, el: Element) -> Result<(), End> {
        let server = self.server.clone();
        match halyard_xep::sm::parse(&el) {
            Ok(None) => {}
            Ok(Some(nonza)) => return self.sm_nonza(b, nonza).await,
            Err(halyard_xep::sm::Malformed(why)) => {
                return Err(End::Error(StreamError::new(
                    StreamErrorKind::BadFormat,
                    why,
                )))
            }
        }
        if el.ns() == halyard_xep::csi::NS {
            match el.name() {
                "inactive" => {
                    if b.held.is_none() {
                        b.held = Some(Box::default());
                        server.sessions.set_inactive(&b.full, true);
                    }
                }
                "active" => {
                    if let Some(mut held) = b.held.take() {
                        server.sessions.set_inactive(&b.full, false);
                        let mut out: Vec<bytes::Bytes> =
                            held.items.drain(..).map(|(_, b)| b).collect();
                        let wt = server.config.c2s.write_timeout();
                        self.write_out(&mut out, b, wt).await?;
                    }
                }
                other => {
                    return Err(End::Error(StreamError::new(
                        StreamErrorKind::UnsupportedStanzaType,
                        format!("unsupported element <{other}/>"),
                    )))
                }
            }
            return Ok(());
        }
        if halyard_xep::Kind::of(&el).is_none() {
            return Err(End::Error(StreamError::new(
                StreamErrorKind::UnsupportedStanzaType,
                format!("unsupported element <{}/>", el.name()),
            )));
        }
        if el.name() == "iq"
            && el.attr("type") == Some("set")
            && el.get_child("session", ns::SESSION).is_some()
        {
            let reply = iq_result(&el, None);
            self.send_stanza(b, writer::to_bytes(&reply)).await?;
        } else {
            crate::router::from_client(&server, &b.full, el).await;
        }
        if let Some(s) = b.sm.as_mut() {
            s.h_in = s.h_in.wrapping_add(1);
        }
        Ok(())
    }

    /// `<enable/>`, `<r/>` and `<a/>` on a bound stream (XEP-0198).
    async fn sm_nonza(
        &mut self,
        b: &mut sm::Bound,
        nonza: halyard_xep::sm::Nonza,
    ) -> Result<(), End> {
        use halyard_xep::sm::Nonza;
        let server = self.server.clone();
        let cfg = &server.config.stream_management;
        let io = |r: std::io::Result<()>| r.map_err(|_| End::Lost);
        match nonza {
            Nonza::Enable { resume, max } => {
                if b.sm.is_some() {
                    let failed = halyard_xep::sm::failed("unexpected-request", None);
                    return io(self.send_el(&failed).await);
                }
                let timeout = max.map_or(cfg.resume_timeout_secs, |m| {
                    m.clamp(1, cfg.resume_timeout_secs)
                });
                let (id, takeover) = if resume {
                    let (id, rx) = server.sm.register(&b.full.to_bare());
                    (Some(id), Some(rx))
                } else {
                    (None, None)
                };
                let location = (!cfg.location.is_empty()).then_some(cfg.location.as_str());
                let enabled = halyard_xep::sm::enabled(id.as_deref(), Some(timeout), location);
                tracing::debug!(resume, "stream management enabled");
                b.sm = Some(Box::new(sm::Sm::new(
                    id,
                    takeover,
                    Duration::from_secs(timeout),
                )));
                io(self.send_el(&enabled).await)
            }
            Nonza::Request => {
                // The ack covers what the client sent; it is given only once that is durable
                // (archived, stored offline), so a crash after it loses nothing acknowledged.
                if let Err(e) = server.stores.durable.wait().await {
                    tracing::warn!(error = %e, "store flush failed: ack withheld");
                    return Ok(());
                }
                let Some(s) = b.sm.as_ref() else {
                    return io(self
                        .send_el(&halyard_xep::sm::failed("unexpected-request", None))
                        .await);
                };
                let a = halyard_xep::sm::ack(s.h_in);
                io(self.send_el(&a).await)
            }
            Nonza::Ack { h } => {
                let Some(s) = b.sm.as_mut() else {
                    return io(self
                        .send_el(&halyard_xep::sm::failed("unexpected-request", None))
                        .await);
                };
                if let Err((h, sent)) = s.ack(h) {
                    return Err(End::Error(sm::too_high_error(h, sent)));
                }
                s.r_sent_at = None;
                let oldest = s.oldest_unacked();
                server.sessions.set_unacked_since(&b.full, oldest);
                Ok(())
            }
            Nonza::Resume { .. } => io(self
                .send_el(&halyard_xep::sm::failed("unexpected-request", None))
                .await),
        }
    }
}

/// How a bound connection's loop ended.
enum End {
    /// The client closed the stream (`</stream:stream>`), or the session was unbound.
    Clean,
    /// The connection dropped without a close.
    Lost,
    /// The client stopped reading or answering: closed with this error, but resumable.
    Stalled(StreamError),
    /// Closed with this stream error.
    Error(StreamError),
    /// Another connection resumed the session: hand it over.
    TakenOver(tokio::sync::oneshot::Sender<Result<Box<sm::Bound>, (u32, u32)>>),
}

/// The bound loop's timers: the last input, and the ping awaiting an answer.
struct Timers {
    last_read: Instant,
    ping_sent: Option<Instant>,
    /// The transport released its parser since the last input ([`Transport::release`]).
    released: bool,
}

/// How long a bound session reads nothing before its transport releases what it can rebuild
/// (the stream parser, ~1.5 KB): long enough that a chatting session does not rebuild it for
/// every stanza, short enough that most sessions, which are idle most of the time, hold none.
const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// When the bound loop wakes without an event, and why.
struct Wake {
    /// The idle ping (or its answer) is due.
    idle: Instant,
    /// The earliest of every reason.
    next: Instant,
    /// Over a read rate: no reading until `next`.
    throttled: bool,
    /// An ack request (XEP-0198) is due.
    r_due: Option<Instant>,
}

/// What woke the bound loop.
enum Event {
    Shutdown,
    Takeover(sm::Takeover),
    Out(Option<Outbound>),
    In(Result<Option<StreamEvent>, TransportError>),
    Timer,
}

fn stalled() -> StreamError {
    StreamError::new(
        StreamErrorKind::PolicyViolation,
        "the client is not reading",
    )
}

fn iq_result(iq: &Element, payload: Option<Element>) -> Element {
    let mut b = Element::builder("iq", ns::CLIENT).attr(n("type"), "result");
    if let Some(id) = iq.attr("id") {
        b = b.attr(n("id"), id);
    }
    if let Some(p) = payload {
        b = b.append(p);
    }
    b.build()
}

/// SASL payloads are base64, with `=` standing for an empty response (RFC 6120 §6.4.2).
fn decode_sasl(text: &str) -> Result<Vec<u8>, ()> {
    let t = text.trim();
    if t.is_empty() || t == "=" {
        return Ok(Vec::new());
    }
    B64.decode(t).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle bound session costs mostly its task's future: keep it from growing unnoticed.
    #[tokio::test]
    async fn bound_session_future_stays_small() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config {
            domains: vec!["example.com".into()],
            data_dir: dir.path().join("data"),
            certs_dir: dir.path().join("certs"),
            ..Default::default()
        };
        let stores = crate::store::Stores::open_sled(
            &config.data_dir,
            config.group_commit(),
            config.cache_bytes(),
        )
        .unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let server = Arc::new(Server::new(config, stores, None, rx).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (sock, peer) = listener.accept().await.unwrap();
        let limits = crate::listener::limits(&server);
        let t = TcpTransport::plain(sock, peer, None, false, limits);
        let mut session = Session {
            server: server.clone(),
            t,
            conn_id: 1,
            stream_id: String::new(),
            header_sent: true,
            _guard: ConnGuard::new(server.clone(), "tcp"),
            _slot: None,
        };
        let b = session
            .bind_session("a@example.com/r".parse().unwrap())
            .await;
        let fut = session.run_bound(b);
        let size = std::mem::size_of_val(&fut);
        // 3,080 bytes (debug build) before the loop's handlers were boxed and `run_bound` was
        // made an `async` block; 1,648 after.
        assert!(size <= 2048, "the bound session's future is {size} bytes");
    }
}
