//! The built-in XEP-0357 app server: a component at `push.<domain>` (configurable) that takes
//! push notifications published by users' servers and delivers them to phones through FCM,
//! APNs or a webhook.
//!
//! - **Registration** (XEP-0050 ad-hoc commands, the convention of Conversations' p2 app
//!   server): the app executes `register-push-fcm`, `register-push-apns` or
//!   `register-push-webhook` with the fields `token` and `device-id`, and gets back a form with
//!   `node` and `secret`, which it passes to `<enable/>` at its own server. `unregister-push`
//!   (field `device-id`) removes the device. Registrations belong to the registering account's
//!   bare JID; registering the same device id again replaces provider and token and keeps node
//!   and secret (see `crate::store::appserver`).
//! - **Publish** (XEP-0357 §7): an iq set with `<pubsub><publish node='…'>` carrying a
//!   `urn:xmpp:push:0` notification and the `secret` in `<publish-options/>`. Unknown node:
//!   `item-not-found`; missing secret: `not-authorized`; wrong secret: `forbidden`. The answer
//!   waits for the provider: `result` when it took the notification; `item-not-found` when it
//!   says the token is dead (the registration is deleted, so the user's server disables it);
//!   `internal-server-error` of type `wait` when it is temporarily failing, and
//!   `resource-constraint` when too many deliveries are in progress (the sender may retry).
//! - **Discovery**: identity `pubsub/push`; features commands, push, ping; the commands as
//!   disco#items of node `http://jabber.org/protocol/commands` (only those whose provider is
//!   configured).
//!
//! Deliveries run on their own task once the node is attached ([`AppServer::attach`]), so a
//! slow provider never holds up the session or stream that routed the publish. Logs name the
//! node, provider and outcome, never a token, secret or message text.

pub mod apns;
pub mod fcm;
pub mod http;
pub mod jwt;
pub mod webhook;

use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use halyard_xep::host::Host;
use halyard_xep::registry::Component;
use halyard_xep::stanza::{n, Kind, Stanza};
use hyper::StatusCode;
use minidom::Element;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use crate::store::appserver::{Provider, RegisterError, Registration, RegistrationStore};

pub const NS_PUSH: &str = "urn:xmpp:push:0";
pub const NS_PUSH_SUMMARY: &str = "urn:xmpp:push:summary";
pub const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
pub const NS_PUBLISH_OPTIONS: &str = "http://jabber.org/protocol/pubsub#publish-options";
pub const NS_COMMANDS: &str = "http://jabber.org/protocol/commands";
pub const NS_DATA: &str = "jabber:x:data";
pub const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
pub const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
pub const NS_PING: &str = "urn:xmpp:ping";
const NS_CLIENT: &str = "jabber:client";
const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

pub const CMD_FCM: &str = "register-push-fcm";
pub const CMD_APNS: &str = "register-push-apns";
pub const CMD_WEBHOOK: &str = "register-push-webhook";
pub const CMD_UNREGISTER: &str = "unregister-push";

/// Longest values accepted from a registration or a publish.
const MAX_DEVICE_ID: usize = 256;
const MAX_TOKEN: usize = 4096;
const MAX_SENDER: usize = 3071;
/// Providers cap a notification at about 4 KB; a longer body is cut (at a character boundary).
const MAX_BODY: usize = 1024;

/// What a publish says about the waiting messages (XEP-0357 §7's summary form).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notification {
    pub message_count: Option<String>,
    pub last_message_sender: Option<String>,
    pub last_message_body: Option<String>,
}

/// How a delivery went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// The provider says the device token is dead.
    Gone(String),
    /// The provider, or our credentials with it, failed for now; the sender should retry.
    Retry(String),
    /// The provider refused this notification for good.
    Failed(String),
}

impl Outcome {
    fn with_reason(self, reason: &str) -> Outcome {
        match self {
            Outcome::Retry(s) => Outcome::Retry(format!("{s} ({reason})")),
            Outcome::Failed(s) => Outcome::Failed(format!("{s} ({reason})")),
            o => o,
        }
    }
}

/// The outcome of a provider's HTTP status when nothing more specific applies: 2xx delivered;
/// 408, 429, 5xx, and 401/403 (our credentials, which the operator can fix) retry; any other
/// status failed.
pub fn classify(who: &str, status: StatusCode) -> Outcome {
    match status.as_u16() {
        200..=299 => Outcome::Delivered,
        401 | 403 | 408 | 429 | 500..=599 => Outcome::Retry(format!("{who} answered {status}")),
        _ => Outcome::Failed(format!("{who} answered {status}")),
    }
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The error reply to an iq (or message), with an optional text and application condition. The
/// request's payload is not echoed (it may carry the push secret).
fn iq_error(
    st: &Stanza,
    condition: &str,
    type_: &str,
    text: Option<&str>,
    app: Option<Element>,
) -> Element {
    let mut e = Element::builder("error", NS_CLIENT)
        .attr(n("type"), type_)
        .append(Element::builder(condition, NS_STANZAS).build());
    if let Some(t) = text {
        e = e.append(Element::builder("text", NS_STANZAS).append(t).build());
    }
    if let Some(a) = app {
        e = e.append(a);
    }
    let mut b = Element::builder(st.el.name(), NS_CLIENT)
        .attr(n("type"), "error")
        .attr(n("from"), st.to_or_sender_bare())
        .attr(n("to"), st.from.to_string());
    if let Some(id) = st.id() {
        b = b.attr(n("id"), id);
    }
    b.append(e.build()).build()
}

fn field(var: &str, value: &str) -> Element {
    Element::builder("field", NS_DATA)
        .attr(n("var"), var)
        .append(Element::builder("value", NS_DATA).append(value).build())
        .build()
}

/// The first value of each field of a data form, by `var`.
fn form_values(x: &Element) -> Vec<(String, String)> {
    x.children()
        .filter(|f| f.is("field", NS_DATA))
        .filter_map(|f| {
            let var = f.attr("var")?.to_string();
            let v = f
                .children()
                .find(|v| v.is("value", NS_DATA))
                .map(|v| v.text())
                .unwrap_or_default();
            Some((var, v))
        })
        .collect()
}

fn value<'a>(fields: &'a [(String, String)], var: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == var)
        .map(|(_, v)| v.as_str())
}

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// A publish that passed parsing: the node, the summary and the secret, if any.
#[derive(Debug)]
pub struct Publish {
    pub node: String,
    pub notification: Notification,
    pub secret: Option<String>,
}

/// Parses an XEP-0357 publish (`<pubsub>` payload); `Err` is the condition and text to answer.
pub fn parse_publish(pubsub: &Element) -> Result<Publish, (&'static str, &'static str)> {
    let publish = pubsub
        .get_child("publish", NS_PUBSUB)
        .ok_or(("bad-request", "only publish is supported here"))?;
    let node = publish
        .attr("node")
        .filter(|n| !n.is_empty())
        .ok_or(("bad-request", "the publish has no node"))?
        .to_string();
    let notif = publish
        .get_child("item", NS_PUBSUB)
        .and_then(|i| i.get_child("notification", NS_PUSH))
        .ok_or((
            "bad-request",
            "the item is not a urn:xmpp:push:0 notification",
        ))?;
    let mut notification = Notification::default();
    if let Some(x) = notif.get_child("x", NS_DATA) {
        let f = form_values(x);
        let form_type = value(&f, "FORM_TYPE");
        if form_type.is_none() || form_type == Some(NS_PUSH_SUMMARY) {
            fn nonempty(v: Option<&str>) -> Option<&str> {
                v.filter(|s| !s.is_empty())
            }
            notification.message_count = nonempty(value(&f, "message-count"))
                .filter(|c| c.len() <= 20 && c.bytes().all(|b| b.is_ascii_digit()))
                .map(str::to_string);
            notification.last_message_sender =
                nonempty(value(&f, "last-message-sender")).map(|s| cut(s, MAX_SENDER));
            notification.last_message_body =
                nonempty(value(&f, "last-message-body")).map(|s| cut(s, MAX_BODY));
        }
    }
    let secret = pubsub
        .get_child("publish-options", NS_PUBSUB)
        .and_then(|o| o.get_child("x", NS_DATA))
        .map(form_values)
        .filter(|f| value(f, "FORM_TYPE").is_none_or(|t| t == NS_PUBLISH_OPTIONS))
        .and_then(|f| value(&f, "secret").map(str::to_string));
    Ok(Publish {
        node,
        notification,
        secret,
    })
}

/// What the component shares with its delivery tasks.
struct Inner {
    domain: String,
    store: Arc<dyn RegistrationStore>,
    max_devices: usize,
    fcm: Option<fcm::Fcm>,
    apns: Option<apns::Apns>,
    webhook: Option<webhook::Webhook>,
    in_flight: Arc<Semaphore>,
    /// Notifications per device (push node) in the current minute.
    per_device: halyard_xep::rate::Windows<String>,
    per_device_limit: u32,
}

pub struct AppServer {
    inner: Arc<Inner>,
    /// The node, once it runs: deliveries then go to their own task and answer through it.
    host: OnceLock<Weak<dyn Host>>,
}

impl AppServer {
    /// Builds the component from `[appserver]`, reading the providers' key files. `domain` is
    /// its address.
    pub fn from_config(
        cfg: &crate::config::AppServer,
        domain: String,
        store: Arc<dyn RegistrationStore>,
    ) -> anyhow::Result<AppServer> {
        let http = http::HttpClient::new(&cfg.extra_ca_file, cfg.timeout())?;
        let fcm = (!cfg.fcm.service_account_file.as_os_str().is_empty())
            .then(|| fcm::Fcm::new(&cfg.fcm, http.clone()))
            .transpose()?;
        let apns = (!cfg.apns.key_file.as_os_str().is_empty())
            .then(|| apns::Apns::new(&cfg.apns, http.clone()))
            .transpose()?;
        let webhook = (!cfg.webhook.url.is_empty())
            .then(|| webhook::Webhook::new(&cfg.webhook, http.clone()))
            .transpose()?;
        tracing::info!(
            %domain,
            fcm = fcm.is_some(),
            apns = apns.is_some(),
            webhook = webhook.is_some(),
            "push app server ready"
        );
        Ok(AppServer {
            inner: Arc::new(Inner {
                domain,
                store,
                max_devices: cfg.max_devices_per_account,
                fcm,
                apns,
                webhook,
                in_flight: Arc::new(Semaphore::new(cfg.max_in_flight)),
                per_device: halyard_xep::rate::Windows::new(std::time::Duration::from_secs(60)),
                per_device_limit: cfg.max_per_device_per_minute,
            }),
            host: OnceLock::new(),
        })
    }

    /// Lets deliveries run on their own tasks, answering through `host`. Until then (and if the
    /// node is gone) they run inline.
    pub fn attach(&self, host: Weak<dyn Host>) {
        let _ = self.host.set(host);
    }

    pub fn domain(&self) -> &str {
        &self.inner.domain
    }
}

impl Inner {
    /// The ad-hoc commands offered, as (node, name).
    fn commands(&self) -> Vec<(&'static str, &'static str)> {
        let mut v = Vec::new();
        if self.fcm.is_some() {
            v.push((CMD_FCM, "Register an Android (FCM) device"));
        }
        if self.apns.is_some() {
            v.push((CMD_APNS, "Register an Apple (APNs) device"));
        }
        if self.webhook.is_some() {
            v.push((CMD_WEBHOOK, "Register a webhook device"));
        }
        v.push((CMD_UNREGISTER, "Unregister a device"));
        v
    }

    fn disco_info(&self, st: &Stanza, q: &Element) -> Element {
        let mut b = Element::builder("query", NS_DISCO_INFO);
        let identity = |cat: &str, typ: &str, name: &str| {
            Element::builder("identity", NS_DISCO_INFO)
                .attr(n("category"), cat)
                .attr(n("type"), typ)
                .attr(n("name"), name)
                .build()
        };
        let feature = |var: &str| {
            Element::builder("feature", NS_DISCO_INFO)
                .attr(n("var"), var)
                .build()
        };
        match q.attr("node") {
            None => {
                b = b.append(identity("pubsub", "push", "Halyard push notifications"));
                for f in [NS_DISCO_INFO, NS_DISCO_ITEMS, NS_COMMANDS, NS_PUSH, NS_PING] {
                    b = b.append(feature(f));
                }
            }
            Some(node) => match self.commands().into_iter().find(|(c, _)| *c == node) {
                Some((c, name)) => {
                    b = b
                        .attr(n("node"), c)
                        .append(identity("automation", "command-node", name))
                        .append(feature(NS_COMMANDS))
                        .append(feature(NS_DATA));
                }
                None if node == NS_COMMANDS => {
                    b = b.attr(n("node"), NS_COMMANDS).append(identity(
                        "automation",
                        "command-list",
                        "Commands",
                    ));
                }
                None => return iq_error(st, "item-not-found", "cancel", None, None),
            },
        }
        st.iq_result(Some(b.build()))
    }

    fn disco_items(&self, st: &Stanza, q: &Element) -> Element {
        let mut b = Element::builder("query", NS_DISCO_ITEMS);
        match q.attr("node") {
            None => {}
            Some(NS_COMMANDS) => {
                b = b.attr(n("node"), NS_COMMANDS);
                for (node, name) in self.commands() {
                    b = b.append(
                        Element::builder("item", NS_DISCO_ITEMS)
                            .attr(n("jid"), self.domain.as_str())
                            .attr(n("node"), node)
                            .attr(n("name"), name)
                            .build(),
                    );
                }
            }
            Some(_) => return iq_error(st, "item-not-found", "cancel", None, None),
        }
        st.iq_result(Some(b.build()))
    }

    /// XEP-0050: every command is single-stage; executing one without a form returns the form.
    async fn command(&self, st: &Stanza, cmd: &Element) -> Element {
        let bad = |text: &str| {
            iq_error(
                st,
                "bad-request",
                "modify",
                Some(text),
                Some(Element::bare("bad-payload", NS_COMMANDS)),
            )
        };
        let node = cmd.attr("node").unwrap_or("");
        let Some((node, name)) = self.commands().into_iter().find(|(c, _)| *c == node) else {
            return iq_error(
                st,
                "item-not-found",
                "cancel",
                Some("no such command"),
                None,
            );
        };
        let session = cmd
            .attr("sessionid")
            .map(str::to_string)
            .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
        let reply = |status: &str, form: Option<Element>, actions: bool| {
            let mut c = Element::builder("command", NS_COMMANDS)
                .attr(n("node"), node)
                .attr(n("sessionid"), session.as_str())
                .attr(n("status"), status);
            if actions {
                c = c.append(
                    Element::builder("actions", NS_COMMANDS)
                        .attr(n("execute"), "complete")
                        .append(Element::bare("complete", NS_COMMANDS))
                        .build(),
                );
            }
            if let Some(f) = form {
                c = c.append(f);
            }
            st.iq_result(Some(c.build()))
        };
        let action = cmd.attr("action").unwrap_or("execute");
        match action {
            "cancel" => return reply("canceled", None, false),
            "execute" | "complete" | "next" => {}
            _ => return bad("unknown action"),
        }
        let submitted = cmd
            .get_child("x", NS_DATA)
            .filter(|x| x.attr("type") == Some("submit"));
        let Some(x) = submitted else {
            return reply("executing", Some(blank_form(node, name)), true);
        };
        let f = form_values(x);
        // Conversations sends the device id as `android-id`.
        let device_id = value(&f, "device-id")
            .or_else(|| value(&f, "android-id"))
            .unwrap_or("")
            .trim();
        if device_id.is_empty()
            || device_id.len() > MAX_DEVICE_ID
            || device_id.chars().any(char::is_control)
        {
            return bad("device-id must be 1 to 256 characters");
        }
        let owner = st.from.to_bare();
        if node == CMD_UNREGISTER {
            return match self.store.unregister(&owner, device_id).await {
                Ok(Some(r)) => {
                    tracing::info!(node = %r.node, provider = r.provider.as_str(), "push device unregistered");
                    reply("completed", None, false)
                }
                Ok(None) => iq_error(
                    st,
                    "item-not-found",
                    "cancel",
                    Some("no device with this id is registered for your account"),
                    None,
                ),
                Err(e) => {
                    tracing::error!(error = %e, "unregistering a push device failed");
                    iq_error(st, "internal-server-error", "wait", None, None)
                }
            };
        }
        let provider = match node {
            CMD_FCM => Provider::Fcm,
            CMD_APNS => Provider::Apns,
            _ => Provider::Webhook,
        };
        let token = value(&f, "token").unwrap_or("").trim();
        if token.is_empty()
            || token.len() > MAX_TOKEN
            || token.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return bad("token must be 1 to 4096 characters without spaces");
        }
        if provider == Provider::Apns && !apns::valid_token(token) {
            return bad("an APNs device token is hexadecimal");
        }
        match self
            .store
            .register(&owner, device_id, provider, token, self.max_devices)
            .await
        {
            Ok(r) => {
                tracing::info!(node = %r.node, provider = provider.as_str(), "push device registered");
                let form = Element::builder("x", NS_DATA)
                    .attr(n("type"), "result")
                    .append(field("node", &r.node))
                    .append(field("secret", &r.secret))
                    .build();
                reply("completed", Some(form), false)
            }
            Err(RegisterError::TooMany(k)) => iq_error(
                st,
                "resource-constraint",
                "wait",
                Some(&format!(
                    "your account already has {k} devices registered: unregister one first"
                )),
                None,
            ),
            Err(RegisterError::Store(e)) => {
                tracing::error!(error = %e, "registering a push device failed");
                iq_error(st, "internal-server-error", "wait", None, None)
            }
        }
    }

    /// Checks a publish against its registration. `Ok` is the registration to deliver to.
    async fn authorize(&self, st: &Stanza, p: &Publish) -> Result<Registration, Element> {
        let reg = match self.store.by_node(&p.node).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(iq_error(
                    st,
                    "item-not-found",
                    "cancel",
                    Some("no device is registered for this node"),
                    None,
                ))
            }
            Err(e) => {
                tracing::error!(error = %e, "looking up a push node failed");
                return Err(iq_error(st, "internal-server-error", "wait", None, None));
            }
        };
        let Some(secret) = &p.secret else {
            return Err(iq_error(
                st,
                "not-authorized",
                "auth",
                Some("the publish-options carry no secret"),
                None,
            ));
        };
        if !bool::from(secret.as_bytes().ct_eq(reg.secret.as_bytes())) {
            tracing::info!(node = %p.node, "push publish with a wrong secret refused");
            return Err(iq_error(st, "forbidden", "auth", None, None));
        }
        Ok(reg)
    }

    async fn deliver(&self, reg: &Registration, n: &Notification) -> Option<Outcome> {
        Some(match reg.provider {
            Provider::Fcm => self.fcm.as_ref()?.deliver(reg, n).await,
            Provider::Apns => self.apns.as_ref()?.deliver(reg, n).await,
            Provider::Webhook => self.webhook.as_ref()?.deliver(reg, n).await,
        })
    }

    /// Delivers and builds the answer to the publish.
    async fn deliver_and_answer(&self, st: &Stanza, reg: Registration, n: Notification) -> Element {
        let provider = reg.provider.as_str();
        let Some(outcome) = self.deliver(&reg, &n).await else {
            tracing::warn!(node = %reg.node, provider, "push for a provider that is no longer configured");
            return iq_error(
                st,
                "item-not-found",
                "cancel",
                Some("this device's push provider is not configured here"),
                None,
            );
        };
        match outcome {
            Outcome::Delivered => {
                tracing::debug!(node = %reg.node, provider, "push delivered");
                st.iq_result(None)
            }
            Outcome::Gone(why) => {
                tracing::info!(node = %reg.node, provider, reason = %why, "push token is dead; registration removed");
                if let Err(e) = self.store.remove_dead(&reg.node, &reg.token).await {
                    tracing::error!(error = %e, node = %reg.node, "removing a dead push registration failed");
                }
                iq_error(
                    st,
                    "item-not-found",
                    "cancel",
                    Some("the device is no longer registered with its push provider"),
                    None,
                )
            }
            Outcome::Retry(why) => {
                tracing::warn!(node = %reg.node, provider, reason = %why, "push provider failed for now");
                iq_error(
                    st,
                    "internal-server-error",
                    "wait",
                    Some("the push provider is temporarily unavailable"),
                    None,
                )
            }
            Outcome::Failed(why) => {
                tracing::warn!(node = %reg.node, provider, reason = %why, "push provider refused the notification");
                iq_error(
                    st,
                    "internal-server-error",
                    "cancel",
                    Some("the push provider refused the notification"),
                    None,
                )
            }
        }
    }
}

fn blank_form(node: &str, name: &str) -> Element {
    let text_field = |var: &str, label: &str| {
        Element::builder("field", NS_DATA)
            .attr(n("var"), var)
            .attr(n("type"), "text-single")
            .attr(n("label"), label)
            .append(Element::bare("required", NS_DATA))
            .build()
    };
    let mut x = Element::builder("x", NS_DATA)
        .attr(n("type"), "form")
        .append(Element::builder("title", NS_DATA).append(name).build());
    if node != CMD_UNREGISTER {
        x = x.append(text_field("token", "Device token"));
    }
    x.append(text_field("device-id", "Device id")).build()
}

#[async_trait]
impl Component for AppServer {
    fn name(&self) -> &str {
        "Push notifications"
    }

    async fn handle(&self, host: &dyn Host, st: Stanza) {
        let me = &self.inner;
        if st.kind != Kind::Iq {
            // Messages and presence mean nothing here; errors are never answered.
            if st.kind == Kind::Message && !st.is_error() {
                host.route(iq_error(&st, "service-unavailable", "cancel", None, None))
                    .await;
            }
            return;
        }
        let typ = st.type_().to_string();
        if typ != "get" && typ != "set" {
            return; // results and errors: we send no requests
        }
        let addressed_to_service = st
            .to
            .as_ref()
            .is_some_and(|t| t.node().is_none() && t.resource().is_none());
        let Some(payload) = st.payload().cloned() else {
            host.route(iq_error(&st, "bad-request", "modify", None, None))
                .await;
            return;
        };
        if !addressed_to_service {
            host.route(iq_error(&st, "service-unavailable", "cancel", None, None))
                .await;
            return;
        }
        let reply = match (typ.as_str(), payload.name(), payload.ns().as_str()) {
            ("get", "query", NS_DISCO_INFO) => me.disco_info(&st, &payload),
            ("get", "query", NS_DISCO_ITEMS) => me.disco_items(&st, &payload),
            ("get", "ping", NS_PING) => st.iq_result(None),
            ("set", "command", NS_COMMANDS) => me.command(&st, &payload).await,
            ("set", "pubsub", NS_PUBSUB) => {
                let publish = match parse_publish(&payload) {
                    Ok(p) => p,
                    Err((cond, text)) => {
                        host.route(iq_error(&st, cond, "modify", Some(text), None))
                            .await;
                        return;
                    }
                };
                let reg = match me.authorize(&st, &publish).await {
                    Ok(r) => r,
                    Err(e) => {
                        host.route(e).await;
                        return;
                    }
                };
                if let Err(left) = me.per_device.admit(reg.node.clone(), me.per_device_limit) {
                    tracing::info!(node = %publish.node, "push refused: device over its rate");
                    let text = format!(
                        "notifications to one device are limited to {} per minute \
                         (appserver.max_per_device_per_minute): retry in {} s",
                        me.per_device_limit,
                        left.as_secs() + 1
                    );
                    host.route(iq_error(
                        &st,
                        "resource-constraint",
                        "wait",
                        Some(&text),
                        None,
                    ))
                    .await;
                    return;
                }
                let Ok(permit) = me.in_flight.clone().try_acquire_owned() else {
                    tracing::warn!(node = %publish.node, "too many push deliveries in progress");
                    host.route(iq_error(
                        &st,
                        "resource-constraint",
                        "wait",
                        Some("too many notifications in progress; retry later"),
                        None,
                    ))
                    .await;
                    return;
                };
                let n = publish.notification;
                if let Some(h) = self.host.get().and_then(Weak::upgrade) {
                    let inner = me.clone();
                    tokio::spawn(async move {
                        let answer = inner.deliver_and_answer(&st, reg, n).await;
                        drop(permit);
                        h.route(answer).await;
                    });
                    return;
                }
                let answer = me.deliver_and_answer(&st, reg, n).await;
                drop(permit);
                answer
            }
            _ => iq_error(&st, "service-unavailable", "cancel", None, None),
        };
        host.route(reply).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Element {
        s.parse().unwrap()
    }

    const PUBLISH: &str = "<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='N1'><item><notification xmlns='urn:xmpp:push:0'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field><field var='message-count'><value>3</value></field><field var='last-message-sender'><value>juliet@x/r</value></field></x></notification></item></publish><publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='secret'><value>S3</value></field></x></publish-options></pubsub>";

    #[test]
    fn appserver_parses_a_publish() {
        let p = parse_publish(&parse(PUBLISH)).unwrap();
        assert_eq!(p.node, "N1");
        assert_eq!(p.secret.as_deref(), Some("S3"));
        assert_eq!(p.notification.message_count.as_deref(), Some("3"));
        assert_eq!(
            p.notification.last_message_sender.as_deref(),
            Some("juliet@x/r")
        );
        assert_eq!(p.notification.last_message_body, None);
    }

    #[test]
    fn appserver_publish_without_form_or_node() {
        let p = parse_publish(&parse("<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='N'><item><notification xmlns='urn:xmpp:push:0'/></item></publish></pubsub>")).unwrap();
        assert_eq!(p.notification, Notification::default());
        assert_eq!(p.secret, None);
        assert!(parse_publish(&parse("<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish><item><notification xmlns='urn:xmpp:push:0'/></item></publish></pubsub>")).is_err());
        assert!(parse_publish(&parse(
            "<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='N'><item/></publish></pubsub>"
        ))
        .is_err());
    }

    #[test]
    fn appserver_long_bodies_are_cut_at_a_char_boundary() {
        let s = "é".repeat(MAX_BODY);
        let c = cut(&s, MAX_BODY);
        assert!(c.len() <= MAX_BODY && c.len() >= MAX_BODY - 1);
        assert!(c.chars().all(|ch| ch == 'é'));
    }

    #[test]
    fn appserver_status_classes() {
        assert_eq!(classify("x", StatusCode::OK), Outcome::Delivered);
        assert!(matches!(
            classify("x", StatusCode::SERVICE_UNAVAILABLE),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            classify("x", StatusCode::TOO_MANY_REQUESTS),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            classify("x", StatusCode::PAYLOAD_TOO_LARGE),
            Outcome::Failed(_)
        ));
    }
}
