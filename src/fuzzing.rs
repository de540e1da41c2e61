//! Entry points of the cargo-fuzz targets in `fuzz/` (see docs/fuzzing.md).
//!
//! Each target is one `pub fn <target>(data: &[u8])` here, so that the fuzzers and the normal
//! test suite run the same code: `fuzz/fuzz_targets/<target>.rs` calls it with libFuzzer's
//! input, and the test at the bottom of this file replays every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` through it. A function returns
//! normally for any input; a panic (including a failed invariant assertion) is a finding.

use std::sync::{Mutex, OnceLock};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use jid::{BareJid, FullJid, Jid};

use crate::sasl::plain;
use crate::sasl::scram::{self, ChannelBindings, Hash, ScramServer, StoredCredentials};
use crate::stream::reader::{parse_element, Limits, XmlReader};
use crate::stream::StreamEvent;
use halyard_xep::ns;

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Target names, as directories under `fuzz/corpus/` and `fuzz/regressions/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("stream_reader", stream_reader),
    ("framing", framing),
    ("sasl", sasl),
    ("jid", jid),
    ("stanza", stanza),
    ("config", config),
];

/// Takes the first byte of `data` (0 when empty).
fn take_byte(data: &mut &[u8]) -> u8 {
    match data.split_first() {
        Some((b, rest)) => {
            *data = rest;
            *b
        }
        None => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// stream_reader

/// The c2s stream reader ([`XmlReader`]): bytes in, stream events out.
///
/// Input: one byte choosing the limits, one byte `n` (low 4 bits) followed by `n` chunk lengths
/// (each byte + 1, used in turn), then the stream. With `n = 0` the stream arrives in one read.
/// After `<auth/>`, `<response/>` or `<starttls/>` the reader restarts (as after SASL success or
/// the TLS handshake) and gets the rest of the input, as the TCP transport does.
pub fn stream_reader(data: &[u8]) {
    let mut data = data;
    let sel = take_byte(&mut data);
    let limits = Limits {
        max_stanza_bytes: [10_000, 64, 300, 256 * 1024][usize::from(sel & 3)],
        max_depth: [32, 1, 3, 8][usize::from((sel >> 2) & 3)],
        max_attributes: [64, 2][usize::from((sel >> 4) & 1)],
        max_attribute_bytes: [4096, 16][usize::from((sel >> 5) & 1)],
    };
    let n = usize::from(take_byte(&mut data) & 15).min(data.len());
    let (sizes, stream) = data.split_at(n);
    let mut reader = XmlReader::new(limits);
    let mut next_size = sizes.iter().map(|s| usize::from(*s) + 1).cycle();
    let mut rest = stream;
    let mut events = 0usize;
    while !rest.is_empty() {
        let len = if sizes.is_empty() {
            rest.len()
        } else {
            next_size.next().unwrap_or(1).min(rest.len())
        };
        let (chunk, after) = rest.split_at(len);
        rest = after;
        let mut input = chunk;
        loop {
            let before = input.len();
            match reader.next(&mut input) {
                Ok(Some(StreamEvent::Element(el))) => {
                    events += 1;
                    // The byte budget holds: what was accepted re-serialises to a bounded size
                    // (escaping can at most grow it by a constant factor).
                    let out = String::from(&el);
                    assert!(
                        out.len() <= 8 * limits.max_stanza_bytes + 512,
                        "a {}-byte element got past a {}-byte limit",
                        out.len(),
                        limits.max_stanza_bytes
                    );
                    if el.is("auth", ns::SASL)
                        || el.is("response", ns::SASL)
                        || el.is("starttls", ns::TLS)
                    {
                        reader.reset();
                    }
                }
                Ok(Some(StreamEvent::Open(h))) => {
                    events += 1;
                    assert!(h.is("stream", ns::STREAM));
                    assert!(reader.is_open());
                }
                Ok(Some(StreamEvent::Close)) => return,
                Ok(None) => {
                    assert!(input.is_empty(), "Ok(None) left input unconsumed");
                    break;
                }
                Err(_) => return,
            }
            assert!(
                input.len() < before || events > 0,
                "the reader made no progress"
            );
        }
        // Idle between reads, as the TCP transport is; and (on half the inputs) released and
        // rebuilt where an idle session would.
        reader.shrink();
        if sel & 0x40 != 0 && reader.releasable() {
            reader = XmlReader::after_header(limits).expect("a reader after the header");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// framing

/// Single-element framing: WebSocket messages (RFC 7395 `<open/>`, `<close/>`, stanzas) and BOSH
/// request bodies (XEP-0124 `<body/>` wrapper with its attributes and payloads).
///
/// Input: one byte (bit 0: BOSH instead of WebSocket; bit 1: small limits), then the message.
pub fn framing(data: &[u8]) {
    let mut data = data;
    let sel = take_byte(&mut data);
    let limits = if sel & 2 == 0 {
        Limits {
            max_stanza_bytes: 256 * 1024,
            max_depth: 32,
            max_attributes: 64,
            max_attribute_bytes: 4096,
        }
    } else {
        Limits {
            max_stanza_bytes: 200,
            max_depth: 3,
            max_attributes: 4,
            max_attribute_bytes: 32,
        }
    };
    if sel & 1 == 0 {
        let Ok(text) = std::str::from_utf8(data) else {
            // WebSocket text messages are UTF-8 by construction.
            return;
        };
        match crate::listener::websocket::frame(text, limits) {
            Ok(Some(StreamEvent::Open(el))) => assert!(el.is("open", ns::FRAMING)),
            Ok(Some(StreamEvent::Element(el))) => {
                assert!(!el.is("open", ns::FRAMING) && !el.is("close", ns::FRAMING));
                // Every stanza gets serialised (routing, storage).
                let _ = crate::stream::writer::to_bytes(&el);
            }
            Ok(Some(StreamEvent::Close)) | Ok(None) | Err(_) => {}
        }
    } else {
        crate::http::bosh::fuzz_request(data, limits);
    }
}

// ---------------------------------------------------------------------------------------------
// sasl

const PASSWORD: &str = "pencil";
const USER: &str = "user";
const SERVER_NONCE: &str = "3rfcNHYJY1ZVvWVs7j";
const FAKE_SECRET: &[u8] = b"fuzzing fake-salt secret";

/// The stored credential of `user` (password `pencil`) per hash, and its SaltedPassword.
fn credential(hash: Hash) -> &'static (StoredCredentials, Vec<u8>) {
    static CREDS: OnceLock<Vec<(StoredCredentials, Vec<u8>)>> = OnceLock::new();
    let all = CREDS.get_or_init(|| {
        Hash::all()
            .into_iter()
            .map(|h| {
                let salt = b"fuzzing salt 16b";
                let stored = scram::derive(h, PASSWORD, salt, scram::MIN_ITERATIONS)
                    .expect("valid parameters");
                let salted = h.hi(PASSWORD.as_bytes(), salt, scram::MIN_ITERATIONS);
                (stored, salted)
            })
            .collect()
    });
    let i = Hash::all()
        .iter()
        .position(|h| *h == hash)
        .unwrap_or_default();
    &all[i]
}

/// SASL exchanges against a fixed stored credential (`user` / `pencil`): SCRAM-SHA-1/256/512
/// with and without -PLUS, and PLAIN.
///
/// Input, as text lines: `<mechanism> <bindings>` (bindings: `none` for a plaintext stream,
/// `tls`, `exporter`, `endpoint` or `both`), then for PLAIN the rest is the message; for SCRAM
/// the next line is client-first-message and the rest client-final-message, in which `{nonce}`,
/// `{cb}` and `{proof}` are replaced by the combined nonce, the base64 channel-binding input and
/// the correct proof for everything before the last comma, so that the fuzzer gets past the
/// cryptographic checks and can break one thing at a time.
pub fn sasl(data: &[u8]) {
    let mut lines = data.splitn(2, |b| *b == b'\n');
    let head = String::from_utf8_lossy(lines.next().unwrap_or_default());
    let rest = lines.next().unwrap_or_default();
    let mut words = head.split(' ');
    let mech = words.next().unwrap_or_default();
    let cb = match words.next().unwrap_or_default() {
        "tls" => ChannelBindings {
            tls: true,
            ..Default::default()
        },
        "exporter" => ChannelBindings {
            tls_exporter: Some(vec![0x42; 32]),
            tls_server_end_point: None,
            tls: true,
        },
        "endpoint" => ChannelBindings {
            tls_exporter: None,
            tls_server_end_point: Some(vec![0x17; 32]),
            tls: true,
        },
        "both" => ChannelBindings {
            tls_exporter: Some(vec![0x42; 32]),
            tls_server_end_point: Some(vec![0x17; 32]),
            tls: true,
        },
        _ => ChannelBindings::default(),
    };
    if let Some(plain_hash) = mech.strip_prefix("PLAIN") {
        let hash = match plain_hash {
            "-1" => Hash::Sha1,
            "-512" => Hash::Sha512,
            _ => Hash::Sha256,
        };
        if let Ok(c) = plain::parse(rest) {
            assert!(!c.authcid.is_empty() && !c.password.is_empty());
            if c.authcid == USER {
                let ok = plain::verify(hash, &credential(hash).0, &c.password);
                let expected = scram::saslprep(&c.password).is_ok_and(|p| p == PASSWORD);
                assert_eq!(
                    ok, expected,
                    "PLAIN verify disagrees with SASLprep equality"
                );
            }
        }
        return;
    }
    let Some((hash, plus)) = scram::parse_mechanism(mech) else {
        return;
    };
    let mut lines = rest.splitn(2, |b| *b == b'\n');
    let first = lines.next().unwrap_or_default();
    let last = lines.next();
    let mut server = ScramServer::with_fixed_nonce(hash, plus, cb.clone(), SERVER_NONCE);
    let Ok(cf) = server.client_first(first) else {
        // Any error ends the exchange: the next step must fail too.
        assert!(server.client_final(b"c=biws,r=x,p=eA==").is_err());
        return;
    };
    assert!(!cf.username.is_empty());
    let known = cf.username == USER;
    let (stored, salted) = credential(hash);
    let server_first = server.server_first(known.then_some(stored), FAKE_SECRET, 4096);
    let server_first = String::from_utf8(server_first).expect("server-first is ASCII");
    let Some(last) = last else { return };
    // What a correct client would put in its final message.
    let first = std::str::from_utf8(first).expect("accepted client-first is UTF-8");
    let (gs2, bare) = split_after_second_comma(first);
    let nonce = server_first
        .strip_prefix("r=")
        .and_then(|r| r.split(',').next())
        .unwrap_or_default()
        .to_owned();
    let cb_data: &[u8] = match gs2.strip_prefix("p=").and_then(|g| g.split(',').next()) {
        Some("tls-exporter") => cb.tls_exporter.as_deref().unwrap_or_default(),
        Some("tls-server-end-point") => cb.tls_server_end_point.as_deref().unwrap_or_default(),
        _ => &[],
    };
    let cbind = STANDARD.encode([gs2.as_bytes(), cb_data].concat());
    let mut msg = String::from_utf8_lossy(last)
        .replace("{nonce}", &nonce)
        .replace("{cb}", &cbind);
    let auth_message = |without_proof: &str| format!("{bare},{server_first},{without_proof}");
    if msg.contains("{proof}") {
        let without_proof = msg.rsplit_once(',').map_or("", |(w, _)| w).to_owned();
        let client_key = hash.hmac(salted, b"Client Key");
        let signature = hash.hmac(
            &hash.h(&client_key),
            auth_message(&without_proof).as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(k, s)| k ^ s)
            .collect();
        msg = msg.replace("{proof}", &STANDARD.encode(proof));
    }
    if let Ok(server_final) = server.client_final(msg.as_bytes()) {
        assert!(known, "an unknown user authenticated");
        let without_proof = msg.rsplit_once(',').map_or("", |(w, _)| w);
        let expected = hash.hmac(&stored.server_key, auth_message(without_proof).as_bytes());
        assert_eq!(
            server_final,
            format!("v={}", STANDARD.encode(expected)).into_bytes(),
            "server signature"
        );
    }
    // The exchange is over either way.
    assert!(server.client_final(msg.as_bytes()).is_err());
}

fn split_after_second_comma(s: &str) -> (&str, &str) {
    let mut commas = s.match_indices(',').map(|(i, _)| i);
    let _ = commas.next();
    match commas.next() {
        Some(i) => (&s[..=i], &s[i + 1..]),
        None => (s, ""),
    }
}

// ---------------------------------------------------------------------------------------------
// jid

/// JID parsing and normalisation (RFC 7622, the `jid` crate) as the server uses it: `to`
/// addresses in the router and domains in the configuration go through
/// [`halyard_xep::stanza::parse_jid`].
pub fn jid(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // The jid crate alone is not idempotent (see parse_jid); the server parses with parse_jid.
    let raw = Jid::new(s);
    match halyard_xep::stanza::parse_jid(s) {
        Ok(j) => {
            assert_eq!(raw.as_ref().ok(), Some(&j));
            let text = j.to_string();
            let again = Jid::new(&text)
                .unwrap_or_else(|e| panic!("normalised {text:?} of {s:?} does not parse: {e}"));
            assert_eq!(again, j, "normalising {s:?} is not idempotent");
            assert_eq!(again.to_string(), text);
            let bare = j.to_bare();
            let bare_again = BareJid::new(&bare.to_string())
                .unwrap_or_else(|e| panic!("bare {bare} of {s:?} does not parse: {e}"));
            assert_eq!(bare_again, bare);
            assert_eq!(bare.domain(), j.domain());
            assert_eq!(bare.node(), j.node());
            match j.try_as_full() {
                Ok(full) => {
                    assert!(j.resource().is_some());
                    let f = FullJid::new(&text).expect("a full JID parses as one");
                    assert_eq!(&f, full);
                }
                Err(b) => {
                    assert!(j.resource().is_none());
                    assert_eq!(b, &bare);
                    assert!(FullJid::new(&text).is_err());
                }
            }
            // As config.validate() normalises a domain.
            if j.node().is_none() && j.resource().is_none() {
                let mut c = crate::config::Config {
                    domains: vec![s.to_owned()],
                    ..Default::default()
                };
                let _ = c.validate();
                assert_eq!(c.domains, vec![j.domain().to_string()]);
            }
        }
        Err(_) if raw.is_err() => {
            assert!(
                BareJid::new(s).is_err(),
                "{s:?}: BareJid accepts what Jid refuses"
            );
            assert!(
                FullJid::new(s).is_err(),
                "{s:?}: FullJid accepts what Jid refuses"
            );
        }
        Err(_) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// config

/// The configuration loader: TOML text to [`crate::config::Config`], path resolution and
/// validation, then every derived value the server reads at start-up.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut c) = crate::config::Config::parse(text) else {
        return;
    };
    c.resolve_paths(std::path::Path::new("/nonexistent/halyard-fuzz"));
    let valid = c.validate().is_ok();
    let _ = (c.cache_bytes(), c.group_commit(), c.primary_domain());
    let _ = (
        c.c2s.preauth_timeout(),
        c.c2s.idle_timeout(),
        c.c2s.ping_timeout(),
        c.c2s.write_timeout(),
    );
    let _ = c.appserver.timeout();
    let _ = c.appserver.domain_for(c.primary_domain());
    let _ = c.upload.domain_for(c.primary_domain());
    if valid {
        // A valid configuration stays valid (validate() normalises in place).
        let mut again = c.clone();
        assert!(again.validate().is_ok(), "validate() is not idempotent");
        assert_eq!(again.domains, c.domains);
    }
}

// ---------------------------------------------------------------------------------------------
// stanza

/// A stanza a bound client sends, described structurally so that the fuzzer spends its time on
/// the module handlers rather than on XML syntax.
#[derive(Debug, arbitrary::Arbitrary)]
pub struct StanzaStep {
    /// Index into the bound sessions.
    sender: u8,
    kind: StanzaKind,
    /// Index into the kind's `type` values (the last is none).
    typ: u8,
    /// Index into [`JIDS`] (the first is none).
    to: u8,
    id: Option<u8>,
    attrs: Vec<Attr>,
    children: Vec<Child>,
}

#[derive(Debug, arbitrary::Arbitrary)]
pub enum StanzaKind {
    Message,
    Presence,
    Iq,
}

#[derive(Debug, arbitrary::Arbitrary)]
pub struct Child {
    /// Index into [`ELEMENTS`].
    el: u8,
    attrs: Vec<Attr>,
    children: Vec<Child>,
    text: Option<String>,
}

#[derive(Debug, arbitrary::Arbitrary)]
pub struct Attr {
    /// Index into [`ATTRS`].
    name: u8,
    value: Value,
}

#[derive(Debug, arbitrary::Arbitrary)]
pub enum Value {
    Known(u8),
    Jid(u8),
    Number(i64),
    Text(String),
}

const NS_RSM: &str = "http://jabber.org/protocol/rsm";
const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";

/// Elements the modules look at (payloads and what goes inside them), and a few they do not.
const ELEMENTS: &[(&str, &str)] = &[
    (ns::PING, "ping"),
    (ns::ROSTER, "query"),
    (ns::ROSTER, "item"),
    (ns::ROSTER, "group"),
    (ns::DISCO_INFO, "query"),
    (ns::DISCO_ITEMS, "query"),
    (ns::VERSION, "query"),
    (ns::LAST, "query"),
    (halyard_xep::mam::NS, "query"),
    (halyard_xep::mam::NS, "prefs"),
    (halyard_xep::mam::NS, "always"),
    (halyard_xep::mam::NS, "never"),
    (halyard_xep::mam::NS, "jid"),
    (halyard_xep::mam::NS, "metadata"),
    (halyard_xep::mam::NS, "fin"),
    (ns::DATA_FORMS, "x"),
    (ns::DATA_FORMS, "field"),
    (ns::DATA_FORMS, "value"),
    (NS_RSM, "set"),
    (NS_RSM, "max"),
    (NS_RSM, "before"),
    (NS_RSM, "after"),
    (NS_RSM, "index"),
    (halyard_xep::carbons::NS, "enable"),
    (halyard_xep::carbons::NS, "disable"),
    (halyard_xep::carbons::NS, "private"),
    (halyard_xep::carbons::NS, "sent"),
    (halyard_xep::carbons::NS, "received"),
    ("urn:xmpp:forward:0", "forwarded"),
    (halyard_xep::push::NS, "enable"),
    (halyard_xep::push::NS, "disable"),
    (NS_PUBSUB, "pubsub"),
    (NS_PUBSUB, "publish"),
    (NS_PUBSUB, "item"),
    (
        "http://jabber.org/protocol/pubsub#publish-options",
        "publish-options",
    ),
    (crate::appserver::NS_PUSH_SUMMARY, "notification"),
    (crate::appserver::NS_COMMANDS, "command"),
    (crate::upload::NS_UPLOAD, "request"),
    ("urn:xmpp:hints", "no-store"),
    ("urn:xmpp:hints", "no-permanent-store"),
    ("urn:xmpp:hints", "store"),
    ("urn:xmpp:hints", "no-copy"),
    (ns::DELAY, "delay"),
    (ns::CLIENT, "body"),
    (ns::CLIENT, "subject"),
    (ns::CLIENT, "thread"),
    (ns::CLIENT, "show"),
    (ns::CLIENT, "status"),
    (ns::CLIENT, "priority"),
    (ns::CLIENT, "error"),
    (ns::STANZAS, "item-not-found"),
    (ns::CAPS, "c"),
    ("urn:xmpp:sid:0", "stanza-id"),
    ("urn:xmpp:sid:0", "origin-id"),
    ("http://jabber.org/protocol/chatstates", "active"),
    ("urn:xmpp:chat-markers:0", "displayed"),
    ("urn:xmpp:receipts", "request"),
    ("urn:xmpp:time", "time"),
    ("vcard-temp", "vCard"),
    ("urn:xmpp:blocking", "blocklist"),
    ("urn:xmpp:blocking", "block"),
    (ns::BIND, "bind"),
    (ns::SESSION, "session"),
    (halyard_xep::csi::NS, "inactive"),
    (halyard_xep::sm::NS, "r"),
];

const ATTRS: &[&str] = &[
    "jid",
    "name",
    "subscription",
    "ask",
    "approved",
    "ver",
    "node",
    "var",
    "type",
    "queryid",
    "id",
    "with",
    "start",
    "end",
    "by",
    "stamp",
    "from",
    "to",
    "default",
    "hash",
    "filename",
    "size",
    "content-type",
    "action",
    "sessionid",
    "label",
    "code",
    "xmlns:foo",
];

const VALUES: &[&str] = &[
    "",
    "get",
    "set",
    "result",
    "error",
    "subscribe",
    "subscribed",
    "unsubscribe",
    "unsubscribed",
    "unavailable",
    "probe",
    "chat",
    "normal",
    "headline",
    "groupchat",
    "remove",
    "both",
    "none",
    "to",
    "from",
    "always",
    "never",
    "roster",
    "true",
    "false",
    "0",
    "1",
    "-1",
    "18446744073709551616",
    "urn:xmpp:mam:2",
    "urn:xmpp:mam:2#extended",
    "urn:xmpp:push:0",
    "FORM_TYPE",
    "hidden",
    "submit",
    "form",
    "execute",
    "complete",
    "cancel",
    "2010-01-01T00:00:00Z",
    "1969-12-31T23:59:59Z",
    "9999-12-31T23:59:59.999999999+14:00",
    "text/plain",
    "a.txt",
    "../../etc/passwd",
    "http://jabber.org/protocol/pubsub#publish-options",
    "urn:xmpp:push:summary",
    "register-push-fcm",
    "unregister-push",
    "sha-1",
];

/// `to` addresses and JID-valued attributes: served, unserved, malformed.
const JIDS: &[&str] = &[
    "",
    "example.com",
    "alice@example.com",
    "alice@example.com/phone",
    "alice@example.com/laptop",
    "bob@example.com",
    "bob@example.com/pc",
    "carol@example.com",
    "carol@example.com/x",
    "upload.example.com",
    "push.example.com",
    "example.org",
    "dave@example.org/r",
    "ALICE@EXAMPLE.COM/phone",
    "example.com/res",
    "@example.com",
    "alice@",
    "a@b@c",
    "alice@example.com/",
    "[::1]",
    "xn--zz",
    "bob@example.com/pc/extra",
];

/// The bound sessions stanzas are sent from.
const SENDERS: &[&str] = &[
    "alice@example.com/phone",
    "alice@example.com/laptop",
    "bob@example.com/pc",
];

fn pick<'a>(list: &[&'a str], i: u8) -> &'a str {
    list[usize::from(i) % list.len()]
}

/// Only characters XML allows: the stream reader refuses the rest, so no stanza carries them.
fn xml_chars(s: &str) -> String {
    s.chars()
        .filter(|c| {
            matches!(c, '\t' | '\n' | '\r') || (*c >= ' ' && !matches!(c, '\u{fffe}' | '\u{ffff}'))
        })
        .collect()
}

fn value(v: &Value) -> String {
    match v {
        Value::Known(i) => pick(VALUES, *i).to_owned(),
        Value::Jid(i) => pick(JIDS, *i).to_owned(),
        Value::Number(n) => n.to_string(),
        Value::Text(t) => xml_chars(t),
    }
}

/// Writes `attrs` (duplicates keep the first) as XML.
fn write_attrs(out: &mut String, attrs: &[Attr], taken: &mut Vec<&'static str>) {
    for a in attrs.iter().take(6) {
        let name = pick(ATTRS, a.name);
        if taken.contains(&name) || name.starts_with("xmlns") {
            continue;
        }
        taken.push(name);
        out.push_str(&format!(
            " {name}='{}'",
            halyard_xep::stanza::escape(&value(&a.value))
        ));
    }
}

fn write_child(out: &mut String, c: &Child, parent_ns: &str, depth: usize) {
    let (ns_, name) = ELEMENTS[usize::from(c.el) % ELEMENTS.len()];
    out.push('<');
    out.push_str(name);
    if ns_ != parent_ns {
        out.push_str(&format!(" xmlns='{ns_}'"));
    }
    write_attrs(out, &c.attrs, &mut Vec::new());
    out.push('>');
    if let Some(t) = &c.text {
        out.push_str(&halyard_xep::stanza::escape(&xml_chars(t)));
    }
    if depth < 6 {
        for g in c.children.iter().take(4) {
            write_child(out, g, ns_, depth + 1);
        }
    }
    out.push_str(&format!("</{name}>"));
}

impl StanzaStep {
    /// The stanza as it would arrive on the wire.
    fn xml(&self) -> String {
        let (name, types): (&str, &[&str]) = match self.kind {
            StanzaKind::Message => (
                "message",
                &["chat", "normal", "headline", "groupchat", "error", "bogus"],
            ),
            StanzaKind::Presence => (
                "presence",
                &[
                    "unavailable",
                    "subscribe",
                    "subscribed",
                    "unsubscribe",
                    "unsubscribed",
                    "probe",
                    "error",
                    "bogus",
                ],
            ),
            StanzaKind::Iq => ("iq", &["get", "set", "result", "error", "bogus"]),
        };
        let mut out = format!("<{name} xmlns='jabber:client'");
        let mut taken = vec!["type", "to", "id", "from"];
        let t = usize::from(self.typ) % (types.len() + 1);
        if let Some(t) = types.get(t) {
            out.push_str(&format!(" type='{t}'"));
        }
        let to = pick(JIDS, self.to);
        if !to.is_empty() {
            out.push_str(&format!(" to='{to}'"));
        }
        if let Some(id) = self.id {
            out.push_str(&format!(" id='i{id}'"));
        }
        write_attrs(&mut out, &self.attrs, &mut taken);
        out.push('>');
        for c in self.children.iter().take(4) {
            write_child(&mut out, c, ns::CLIENT, 1);
        }
        out.push_str(&format!("</{name}>"));
        out
    }
}

struct StanzaHarness {
    rt: tokio::runtime::Runtime,
    server: std::sync::Arc<crate::server::Server>,
    account: crate::store::Account,
    lock: Mutex<()>,
}

fn stanza_harness() -> &'static StanzaHarness {
    static H: OnceLock<StanzaHarness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        // tmpfs when there is one: the store is rewritten for every input.
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        // One store per process; those of processes that are gone are removed.
        let proc_fs = std::path::Path::new("/proc/self").exists();
        if let Ok(entries) = std::fs::read_dir(&base).map(|e| e.filter(|_| proc_fs)) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("halyard-fuzz-"))
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = base.join(format!("halyard-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = crate::config::Config {
            domains: vec!["example.com".into()],
            data_dir: dir.clone(),
            certs_dir: dir.join("certs"),
            ..Default::default()
        };
        config.storage.group_commit_ms = 0;
        config.storage.cache_mb = 8;
        config.appserver.enabled = true;
        // Nothing listens there: a notification fails at once.
        config.appserver.webhook.url = "http://127.0.0.1:9/push".into();
        config.appserver.webhook.secret = "fuzzing webhook secret".into();
        config.appserver.timeout_secs = 1;
        config.upload.enabled = true;
        config.upload.secret = "fuzzing upload secret".into();
        config.validate().expect("fuzzing config");
        let server = rt.block_on(async {
            crate::install_crypto_provider();
            let stores = crate::store::Stores::open_sled(
                &config.data_dir,
                config.group_commit(),
                config.cache_bytes(),
            )
            .expect("store");
            let (_tx, rx) = tokio::sync::watch::channel(false);
            let server = std::sync::Arc::new(
                crate::server::Server::new(config, stores, None, rx).expect("server"),
            );
            let _ = server.public_url.set("https://example.com:5281".into());
            if let Some(u) = &server.upload {
                u.set_base_url(server.public_url());
            }
            server
        });
        let account = crate::sasl::new_account(PASSWORD, scram::MIN_ITERATIONS).expect("account");
        StanzaHarness {
            rt,
            server,
            account,
            lock: Mutex::new(()),
        }
    })
}

/// Stanzas from bound clients through the real router and module handlers, against a store on
/// disk (tmpfs) that is reset for every input: accounts `alice` (resources `phone`, `laptop`)
/// and `bob` (`pc`), an upload and a push app-server component.
///
/// Checks that nothing panics and that every iq get/set that the server itself must answer
/// (everything but an iq to another bound resource, which is passed on) gets exactly one
/// result or error back.
pub fn stanza(data: &[u8]) {
    let mut u = arbitrary::Unstructured::new(data);
    let steps: Vec<StanzaStep> = match u.arbitrary_iter() {
        Ok(iter) => iter.take(12).map_while(Result::ok).collect(),
        Err(_) => return,
    };
    run_stanzas(&steps);
}

/// Runs decoded steps (see [`stanza`]).
pub fn run_stanzas(steps: &[StanzaStep]) {
    use crate::sessions::Outbound;
    let h = stanza_harness();
    let _guard = h.lock.lock().unwrap_or_else(|e| e.into_inner());
    let server = &h.server;
    h.rt.block_on(async {
        for user in ["alice@example.com", "bob@example.com"] {
            let bare = BareJid::new(user).expect("bare");
            let _ = server.stores.accounts.remove(&bare).await;
            server
                .stores
                .accounts
                .create(&bare, &h.account)
                .await
                .expect("creating a fuzzing account");
        }
        let fulls: Vec<FullJid> = SENDERS
            .iter()
            .map(|s| FullJid::new(s).expect("full"))
            .collect();
        let mut rxs = Vec::new();
        for full in &fulls {
            let (tx, rx) = crate::outbound::channel::<Outbound>(4096);
            let conn = server.next_conn_id();
            let _ = server.sessions.bind(full, conn, tx);
            for hook in server.registry.session_hooks() {
                hook.bound(server.as_ref(), full).await;
            }
            rxs.push((conn, rx));
        }
        let limits = crate::listener::limits(server);
        for step in steps {
            let sender = &fulls[usize::from(step.sender) % fulls.len()];
            let xml = step.xml();
            let Ok(el) = parse_element(xml.as_bytes(), limits) else {
                continue;
            };
            let is_request =
                el.name() == "iq" && matches!(el.attr("type"), Some("get") | Some("set"));
            let passed_on = el
                .attr("to")
                .and_then(|t| Jid::new(t).ok())
                .and_then(|j| j.try_as_full().ok().cloned())
                .is_some_and(|f| fulls.contains(&f));
            let id = el.attr("id").map(str::to_owned);
            crate::router::from_client(server, sender, el).await;
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            let mut answers = 0;
            for (i, (_, rx)) in rxs.iter_mut().enumerate() {
                while let Ok(out) = rx.try_recv() {
                    let Outbound::Data(bytes) = out else { continue };
                    if fulls[i] != *sender || !is_request {
                        continue;
                    }
                    let reply = parse_element(&bytes, limits)
                        .unwrap_or_else(|e| panic!("the server sent unparseable XML: {e}"));
                    if reply.name() == "iq"
                        && matches!(reply.attr("type"), Some("result") | Some("error"))
                        && reply.attr("id") == id.as_deref()
                    {
                        answers += 1;
                    }
                }
            }
            if is_request && !passed_on {
                assert_eq!(answers, 1, "iq {xml} from {sender} got {answers} answers");
            }
        }
        for (full, (conn, _)) in fulls.iter().zip(&rxs) {
            if let Some((presence, directed)) = server.sessions.unbind(full, *conn) {
                for hook in server.registry.session_hooks() {
                    hook.ended(server.as_ref(), full, presence.as_ref(), &directed)
                        .await;
                }
            }
        }
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays every committed corpus and regression file through its target, as CI does not
    /// fuzz.
    #[test]
    fn replay_corpora_and_regressions() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut total = 0;
        for (name, target) in TARGETS {
            for kind in ["corpus", "regressions"] {
                let dir = root.join(kind).join(name);
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.expect("directory entry").path();
                    if !path.is_file() {
                        continue;
                    }
                    let data = std::fs::read(&path).expect("readable corpus file");
                    let r = std::panic::catch_unwind(|| target(&data));
                    assert!(r.is_ok(), "{name}: {} panicked", path.display());
                    total += 1;
                }
            }
            assert!(
                root.join("corpus").join(name).is_dir(),
                "fuzz/corpus/{name} is missing"
            );
        }
        assert!(total > 0, "no corpus files found under {}", root.display());
    }
}
