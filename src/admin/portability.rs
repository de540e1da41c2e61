//! `halyard export FILE` / `halyard import FILE`: everything the store holds, to and from
//! XEP-0227 (Portable Import/Export, `urn:xmpp:pie:0`), extended in `urn:halyard:pie:0` where
//! XEP-0227 has no element. The format is documented in docs/export-format.md.
//!
//! The export streams: accounts one after another, each archive read in pages of [`PAGE`]
//! messages and written as it is read, so memory does not grow with the archive (it holds the
//! list of account JIDs, one roster and one offline queue at a time). It runs on a live store:
//! every row is read as it is at that moment; the file is not a point-in-time snapshot across
//! accounts (stop the server for one).
//!
//! The import streams too (rxml, event by event; each user's roster is collected until its
//! `</user>`, archived and offline messages are written as they are read) and reads the file
//! twice: a first pass validates all of it and checks that the store holds nothing for any
//! account in it, writing nothing; only then the second pass writes. So a malformed file, or
//! one that names an existing account, leaves the store untouched. Each account's rows are
//! written before its account row, and an account that fails half-way is removed again.
//!
//! Round trip: stored stanzas (archived, offline, pending subscription requests) are embedded
//! as XML when they are in minidom's canonical form (parsing and serialising them gives the
//! same bytes: the form the server stores), else as base64 (`<raw-stanza/>`), so an import
//! rebuilds them byte for byte. Keys, ids, sequence numbers and counters are carried exactly,
//! so exporting a store and importing the file into an empty one gives identical trees.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context as _};
use base64::Engine;
use halyard_xep::host::{
    ArchiveKey, ArchivePrefs, KeyRange, LastActivity, OfflineMessage, PushRegistration, RosterItem,
    Subscription,
};
use jid::{BareJid, Jid};
use minidom::rxml::{self, RawEvent};
use minidom::tree_builder::TreeBuilder;
use minidom::{Element, Node};

use super::Context;
use crate::sasl::scram::StoredCredentials;
use crate::store::archive::Running;
use crate::store::{Account, AccountError, Stores};

pub const NS_PIE: &str = "urn:xmpp:pie:0";
pub const NS_PIE_SCRAM: &str = "urn:xmpp:pie:0#scram";
pub const NS_PIE_MAM: &str = "urn:xmpp:pie:0#mam";
/// Our extension namespace.
pub const NS_EXT: &str = "urn:halyard:pie:0";
const NS_ROSTER: &str = "jabber:iq:roster";
const NS_CLIENT: &str = "jabber:client";
const NS_MAM: &str = "urn:xmpp:mam:2";
const NS_FORWARD: &str = "urn:xmpp:forward:0";
const NS_DELAY: &str = "urn:xmpp:delay";
const NS_DATA_FORMS: &str = "jabber:x:data";
const NS_XINCLUDE: &str = "http://www.w3.org/2001/XInclude";

/// Version of our extensions, in `<format xmlns='urn:halyard:pie:0' version='1'/>`.
pub const FORMAT_VERSION: u32 = 1;
/// Archive messages read per store scan.
pub const PAGE: usize = 1000;
/// Largest attribute value or name the import accepts (text is streamed in chunks).
const MAX_TOKEN: usize = 1 << 20;
/// How deep XInclude may nest.
const MAX_INCLUDE_DEPTH: usize = 16;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

use halyard_xep::stanza::n;

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Dates (XEP-0082), without a calendar crate.

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SS[.ffffff]Z` for seconds and microseconds since the epoch.
pub fn format_stamp(secs: u64, micros: Option<u32>) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    if let Some(us) = micros {
        let _ = write!(s, ".{us:06}");
    }
    s.push('Z');
    s
}

fn stamp_micros(ts: u64) -> String {
    format_stamp(ts / 1_000_000, Some((ts % 1_000_000) as u32))
}

/// Parses a XEP-0082 DateTime into microseconds since the epoch.
pub fn parse_stamp(s: &str) -> Option<u64> {
    let (secs, micros) = parse_stamp_parts(s)?;
    u64::try_from(secs * 1_000_000 + i128::from(micros)).ok()
}

/// Parses a XEP-0082 DateTime into whole seconds since the epoch (any fraction dropped).
pub fn parse_stamp_secs(s: &str) -> Option<u64> {
    u64::try_from(parse_stamp_parts(s)?.0).ok()
}

/// Seconds since the epoch (possibly negative) and microseconds.
fn parse_stamp_parts(s: &str) -> Option<(i128, u32)> {
    let s = s.trim();
    let (date, time) = s.split_once('T')?;
    let mut dp = date.rsplitn(3, '-');
    let d: u32 = dp.next()?.parse().ok()?;
    let m: u32 = dp.next()?.parse().ok()?;
    let ystr = dp.next()?;
    if ystr.len() < 4 || !ystr.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y: i64 = ystr.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let (clock, offset) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0i64)
    } else {
        let at = time.rfind(['+', '-'])?;
        let (c, o) = time.split_at(at);
        let sign = if o.starts_with('-') { -1 } else { 1 };
        let (oh, om) = o[1..].split_once(':')?;
        let oh: i64 = oh.parse().ok()?;
        let om: i64 = om.parse().ok()?;
        (c, sign * (oh * 3600 + om * 60))
    };
    let (hms, frac) = match clock.split_once('.') {
        Some((a, f)) => (a, Some(f)),
        None => (clock, None),
    };
    let mut t = hms.split(':');
    let hh: i64 = t.next()?.parse().ok()?;
    let mm: i64 = t.next()?.parse().ok()?;
    let ss: i64 = t.next()?.parse().ok()?;
    if t.next().is_some() || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let micros: u32 = match frac {
        Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
            let mut digits: String = f.chars().take(6).collect();
            while digits.len() < 6 {
                digits.push('0');
            }
            digits.parse().ok()?
        }
        Some(_) => return None,
        None => 0,
    };
    let secs = i128::from(days_from_civil(y, m, d)) * 86_400 + i128::from(hh * 3600 + mm * 60 + ss)
        - i128::from(offset);
    Some((secs, micros))
}

// ---------------------------------------------------------------------------------------------
// Writing XML.

/// XML 1.0 `Char`: what a file can carry at all.
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
}

fn checked<'a>(what: &str, s: &'a str) -> anyhow::Result<&'a str> {
    if let Some(c) = s.chars().find(|&c| !xml_char(c)) {
        bail!(
            "{what} {s:?} holds U+{:04X}, which XML cannot carry",
            c as u32
        );
    }
    Ok(s)
}

/// Escapes an attribute value (single-quoted); whitespace other than spaces as character
/// references, since attribute-value normalisation would turn it into spaces.
fn esc_attr(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

/// Escapes character data; CR as a reference, since parsers turn a raw CR LF into LF.
fn esc_text(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

/// A buffer written out to `W` in large chunks.
struct Out<W: Write> {
    w: W,
    buf: String,
}

impl<W: Write> Out<W> {
    fn attr(&mut self, name: &str, value: &str) -> anyhow::Result<()> {
        checked(name, value)?;
        self.buf.push(' ');
        self.buf.push_str(name);
        self.buf.push_str("='");
        esc_attr(&mut self.buf, value);
        self.buf.push('\'');
        Ok(())
    }

    fn text(&mut self, what: &str, value: &str) -> anyhow::Result<()> {
        checked(what, value)?;
        esc_text(&mut self.buf, value);
        Ok(())
    }

    /// `<name xmlns='ns'>text</name>` (or empty).
    fn text_el(&mut self, name: &str, ns: Option<&str>, text: &str) -> anyhow::Result<()> {
        self.buf.push('<');
        self.buf.push_str(name);
        if let Some(ns) = ns {
            self.attr("xmlns", ns)?;
        }
        self.buf.push('>');
        self.text(name, text)?;
        let _ = write!(self.buf, "</{name}>");
        Ok(())
    }

    fn push(&mut self, s: &str) {
        self.buf.push_str(s);
    }

    fn maybe_flush(&mut self) -> std::io::Result<()> {
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.w.write_all(self.buf.as_bytes())?;
        self.buf.clear();
        Ok(())
    }
}

/// `s` parsed, if serialising it again gives `s` exactly (then it can be embedded as XML and
/// rebuilt byte for byte).
fn canonical(s: &str) -> Option<Element> {
    let el: Element = s.parse().ok()?;
    (String::from(&el) == s).then_some(el)
}

/// What an export wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExportStats {
    pub hosts: usize,
    pub users: usize,
    pub accounts: usize,
    pub roster_items: u64,
    pub offline: u64,
    pub archived: u64,
    pub push_registrations: u64,
    pub push_devices: u64,
    /// XEP-0363 uploaded files (their metadata; the files stay in `<data_dir>/uploads`).
    pub uploads: u64,
    /// Stanzas that were not in canonical form and went out as base64.
    pub raw_stanzas: u64,
    /// Owners that could not be written (no user part).
    pub skipped: Vec<String>,
}

/// Writes everything `stores` hold to `out` (see the module docs).
pub async fn write_export<W: Write + Send>(stores: &Stores, out: W) -> anyhow::Result<ExportStats> {
    let mut owners = stores.restore.owners().await?;
    owners.sort_by(|a, b| {
        (a.domain().as_str(), a.node().map(|n| n.as_str()))
            .cmp(&(b.domain().as_str(), b.node().map(|n| n.as_str())))
    });
    let mut o = Out {
        w: out,
        buf: String::with_capacity(128 * 1024),
    };
    let mut stats = ExportStats::default();
    o.push("<?xml version='1.0' encoding='UTF-8'?>\n<server-data xmlns='urn:xmpp:pie:0'>\n");
    o.push("  <format xmlns='urn:halyard:pie:0'");
    o.attr("version", &FORMAT_VERSION.to_string())?;
    o.attr("generator", concat!("halyard ", env!("CARGO_PKG_VERSION")))?;
    o.push("/>\n");
    let mut host: Option<String> = None;
    for jid in &owners {
        let Some(node) = jid.node() else {
            stats.skipped.push(jid.to_string());
            continue;
        };
        let domain = jid.domain().as_str();
        if host.as_deref() != Some(domain) {
            if host.is_some() {
                o.push("  </host>\n");
            }
            o.push("  <host");
            o.attr("jid", domain)?;
            o.push(">\n");
            host = Some(domain.to_string());
            stats.hosts += 1;
        }
        write_user(stores, &mut o, jid, node.as_str(), &mut stats)
            .await
            .with_context(|| format!("exporting {jid}"))?;
        stats.users += 1;
    }
    if host.is_some() {
        o.push("  </host>\n");
    }
    o.push("</server-data>\n");
    o.flush()?;
    o.w.flush()?;
    Ok(stats)
}

fn write_item<W: Write>(o: &mut Out<W>, item: &RosterItem, ns: bool) -> anyhow::Result<()> {
    o.push("<item");
    if ns {
        o.attr("xmlns", NS_ROSTER)?;
    }
    o.attr("jid", &item.jid)?;
    if let Some(name) = &item.name {
        o.attr("name", name)?;
    }
    o.attr("subscription", item.subscription.as_str())?;
    if item.ask {
        o.attr("ask", "subscribe")?;
    }
    if item.approved {
        o.attr("approved", "true")?;
    }
    if item.groups.is_empty() {
        o.push("/>");
    } else {
        o.push(">");
        for g in &item.groups {
            o.text_el("group", None, g)?;
        }
        o.push("</item>");
    }
    Ok(())
}

fn write_raw<W: Write>(
    o: &mut Out<W>,
    stanza: &str,
    attrs: &[(&str, String)],
) -> anyhow::Result<()> {
    o.push("<raw-stanza xmlns='urn:halyard:pie:0'");
    for (k, v) in attrs {
        o.attr(k, v)?;
    }
    o.push(">");
    o.push(&b64().encode(stanza.as_bytes()));
    o.push("</raw-stanza>");
    Ok(())
}

async fn write_user<W: Write + Send>(
    stores: &Stores,
    o: &mut Out<W>,
    jid: &BareJid,
    node: &str,
    stats: &mut ExportStats,
) -> anyhow::Result<()> {
    let account = stores.accounts.get(jid).await?;
    o.push("    <user");
    o.attr("name", node)?;
    if let Some(a) = &account {
        o.attr("createdAt", &format_stamp(a.created, None))?;
    }
    o.push(">\n");
    match &account {
        None => o.push("      <no-account xmlns='urn:halyard:pie:0'/>\n"),
        Some(a) => {
            stats.accounts += 1;
            for (mech, c) in &a.scram {
                o.push("      <scram-credentials xmlns='urn:xmpp:pie:0#scram'");
                o.attr("mechanism", mech)?;
                o.push(">");
                o.text_el("iter-count", None, &c.iterations.to_string())?;
                o.text_el("salt", None, &b64().encode(&c.salt))?;
                o.text_el("server-key", None, &b64().encode(&c.server_key))?;
                o.text_el("stored-key", None, &b64().encode(&c.stored_key))?;
                o.push("</scram-credentials>\n");
            }
        }
    }

    // Roster: visible items in the standard query, the others in our extension; pending
    // inbound requests as XEP-0227 presence elements.
    let items = stores.roster.items(jid).await?;
    stats.roster_items += items.len() as u64;
    let ver = stores.restore.roster_version_row(jid).await?;
    if ver.is_some() || items.iter().any(|i| i.in_roster) {
        o.push("      <query xmlns='jabber:iq:roster'");
        if let Some(v) = ver {
            o.attr("ver", &v.to_string())?;
        }
        o.push(">");
        for i in items.iter().filter(|i| i.in_roster) {
            o.push("\n        ");
            write_item(o, i, false)?;
        }
        o.push("\n      </query>\n");
    }
    if items.iter().any(|i| !i.in_roster) {
        o.push("      <hidden-roster xmlns='urn:halyard:pie:0'>");
        for i in items.iter().filter(|i| !i.in_roster) {
            o.push("\n        ");
            write_item(o, i, true)?;
        }
        o.push("\n      </hidden-roster>\n");
    }
    for i in &items {
        let Some(p) = &i.pending_in else { continue };
        o.push("      ");
        let standard = canonical(p).filter(|el| {
            el.is("presence", NS_CLIENT)
                && el.attr("type") == Some("subscribe")
                && el
                    .attr("from")
                    // Export: a stanza from our store, checked when it was stored.
                    .and_then(|f| Jid::new(f).ok())
                    .is_some_and(|f| f.to_bare().as_str() == i.jid)
        });
        if standard.is_some() {
            o.push(p);
        } else {
            stats.raw_stanzas += 1;
            o.push("<pending-in xmlns='urn:halyard:pie:0'");
            o.attr("jid", &i.jid)?;
            o.push(">");
            o.push(&b64().encode(p.as_bytes()));
            o.push("</pending-in>");
        }
        o.push("\n");
    }

    if let Some(l) = stores.last.get(jid).await? {
        o.push("      <last-activity xmlns='urn:halyard:pie:0'");
        o.attr("logout", &l.logout.to_string())?;
        o.push(">");
        o.text("status", &l.status)?;
        o.push("</last-activity>\n");
    }
    if let Some(p) = stores.restore.archive_prefs_row(jid).await? {
        o.push("      <prefs xmlns='urn:xmpp:mam:2'");
        o.attr("default", &p.default)?;
        o.push(">");
        for (name, list) in [("always", &p.always), ("never", &p.never)] {
            let _ = write!(o.buf, "<{name}>");
            for j in list {
                o.text_el("jid", None, j)?;
            }
            let _ = write!(o.buf, "</{name}>");
        }
        o.push("</prefs>\n");
    }
    // XEP-0357 registrations. The notification queue is not exported: it only holds wake-ups
    // for devices of this server's users, owed for messages that travel in the offline queue and
    // the archive; after an import the next message notifies again.
    for reg in stores.push.registrations(jid).await? {
        o.push("      <push-registration xmlns='urn:halyard:pie:0'");
        o.attr("jid", &reg.jid)?;
        o.attr("node", &reg.node)?;
        match &reg.options {
            None => o.push("/>\n"),
            Some(opts) => {
                o.push(">");
                if canonical(opts).is_some_and(|el| el.is("x", NS_DATA_FORMS)) {
                    o.push(opts);
                } else {
                    stats.raw_stanzas += 1;
                    write_raw(o, opts, &[])?;
                }
                o.push("</push-registration>\n");
            }
        }
        stats.push_registrations += 1;
    }

    // Offline messages (XEP-0160), oldest first, each with a delay stamp (as XEP-0227 shows)
    // and our marker carrying its exact sequence number and time.
    if let Some((next, count)) = stores.restore.offline_meta(jid).await? {
        o.push("      <offline-state xmlns='urn:halyard:pie:0'");
        o.attr("next-seq", &next.to_string())?;
        o.attr("count", &count.to_string())?;
        o.push("/>\n");
    }
    // Devices registered with the XEP-0357 app server (`crate::appserver`) by this account.
    let devices = stores.appserver.list(jid).await?;
    if !devices.is_empty() {
        o.push("      <push-devices xmlns='urn:halyard:pie:0'>");
        for d in &devices {
            o.push("\n        <device");
            o.attr("id", &d.device_id)?;
            o.attr("provider", d.provider.as_str())?;
            o.attr("token", &d.token)?;
            o.attr("node", &d.node)?;
            o.attr("secret", &d.secret)?;
            o.attr("registered", &d.registered.to_string())?;
            o.push("/>");
            stats.push_devices += 1;
        }
        o.push("\n      </push-devices>\n");
    }
    // XEP-0363 uploads: the metadata of stored files (open slots are not carried; the file
    // bytes stay in `<data_dir>/uploads/<id>`, copied separately).
    let uploads: Vec<_> = stores
        .uploads
        .list(jid)
        .await?
        .into_iter()
        .filter(|u| u.state == crate::store::upload::UploadState::Stored)
        .collect();
    if !uploads.is_empty() {
        o.push("      <uploads xmlns='urn:halyard:pie:0'>");
        for u in &uploads {
            o.push("\n        <file");
            o.attr("id", &u.id)?;
            o.attr("filename", &u.filename)?;
            o.attr("size", &u.size.to_string())?;
            o.attr("content-type", &u.content_type)?;
            o.attr("created", &u.created.to_string())?;
            o.attr("expires", &u.expires.to_string())?;
            o.push("/>");
            stats.uploads += 1;
        }
        o.push("\n      </uploads>\n");
    }
    let offline = stores.offline.list(jid).await?;
    if !offline.is_empty() {
        o.push("      <offline-messages>\n");
        for m in &offline {
            o.push("        ");
            match canonical(&m.stanza).filter(|el| el.is("message", NS_CLIENT)) {
                Some(mut el) => {
                    el.append_child(
                        Element::builder("delay", NS_DELAY)
                            .attr(n("from"), jid.domain().as_str())
                            .attr(n("stamp"), stamp_micros(m.ts_micros))
                            .append("Offline Storage")
                            .build(),
                    );
                    el.append_child(
                        Element::builder("offline", NS_EXT)
                            .attr(n("seq"), m.seq.to_string())
                            .attr(n("ts"), m.ts_micros.to_string())
                            .build(),
                    );
                    o.push(&String::from(&el));
                }
                None => {
                    stats.raw_stanzas += 1;
                    write_raw(
                        o,
                        &m.stanza,
                        &[("seq", m.seq.to_string()), ("ts", m.ts_micros.to_string())],
                    )?;
                }
            }
            o.push("\n");
            stats.offline += 1;
        }
        o.push("      </offline-messages>\n");
    }

    // The archive (XEP-0227 §2.10: XEP-0313 results, oldest first), page by page.
    let mut after: Option<ArchiveKey> = None;
    let mut opened = false;
    loop {
        let page = stores
            .archive
            .scan(
                jid,
                None,
                KeyRange {
                    after,
                    before: None,
                },
                false,
                PAGE,
            )
            .await?;
        if page.is_empty() {
            break;
        }
        if !opened {
            o.push("      <archive xmlns='urn:xmpp:pie:0#mam'>\n");
            opened = true;
        }
        for (k, m) in &page {
            o.push("        <result xmlns='urn:xmpp:mam:2'");
            o.attr("id", &m.id)?;
            o.push("><forwarded xmlns='urn:xmpp:forward:0'><delay xmlns='urn:xmpp:delay'");
            o.attr("stamp", &stamp_micros(k.ts_micros))?;
            o.push("/>");
            if canonical(&m.stanza).is_some() {
                o.push(&m.stanza);
            } else {
                stats.raw_stanzas += 1;
                write_raw(o, &m.stanza, &[])?;
            }
            o.push("</forwarded><archived xmlns='urn:halyard:pie:0'");
            o.attr("ts", &k.ts_micros.to_string())?;
            o.attr("seq", &k.seq.to_string())?;
            o.attr("with", &m.with)?;
            if let Some(r) = stores.restore.archive_running(jid, *k).await? {
                o.attr("ord", &r.ord.to_string())?;
                o.attr("with-ord", &r.with_ord.to_string())?;
                o.attr("bytes-before", &r.prev_cum.to_string())?;
            }
            o.push("/></result>\n");
            stats.archived += 1;
        }
        o.maybe_flush()?;
        let last = page.last().map(|(k, _)| *k);
        if page.len() < PAGE {
            break;
        }
        after = last;
        // Let delivery run between pages when exporting from a live server.
        tokio::task::yield_now().await;
    }
    if opened {
        o.push("      </archive>\n");
    }
    o.push("    </user>\n");
    o.maybe_flush()?;
    Ok(())
}

/// `halyard export FILE`: `path` must be absolute (the CLI makes it so). Written to a
/// temporary file next to it (mode 0600) and renamed when complete.
pub async fn export(ctx: &Context<'_>, path: &str) -> anyhow::Result<Vec<String>> {
    let path = PathBuf::from(path);
    ensure!(
        path.is_absolute(),
        "the export path {} must be absolute",
        path.display()
    );
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let w = std::io::BufWriter::new(file);
    let stats = match write_export(ctx.stores, w).await {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.context(format!("export to {} failed", path.display())));
        }
    };
    let done = std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow!(e).context(format!("cannot write {}", path.display())));
    }
    let mut lines = vec![format!(
        "exported {} accounts on {} hosts to {}: {} roster items, {} offline messages, {} archived messages, {} push registrations",
        stats.accounts,
        stats.hosts,
        path.display(),
        stats.roster_items,
        stats.offline,
        stats.archived,
        stats.push_registrations
    )];
    if stats.push_devices > 0 {
        lines.push(format!(
            "{} push devices (app server registrations)",
            stats.push_devices
        ));
    }
    if stats.uploads > 0 {
        lines.push(format!(
            "{} uploaded files (metadata only: copy <data_dir>/uploads along with the export)",
            stats.uploads
        ));
    }
    if stats.users > stats.accounts {
        lines.push(format!(
            "note: {} JIDs hold rows without an account row; exported with <no-account/>",
            stats.users - stats.accounts
        ));
    }
    if !stats.skipped.is_empty() {
        lines.push(format!(
            "warning: rows of {} could not be exported (no user part)",
            stats.skipped.join(", ")
        ));
    }
    Ok(lines)
}

// ---------------------------------------------------------------------------------------------
// Reading: a streaming parser over rxml's raw events, with XInclude.

/// Where a record (a complete element handed to the importer) sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    ServerData,
    Host,
    User,
    Offline,
    Archive,
}

#[derive(Debug)]
enum Item {
    HostStart(String),
    HostEnd,
    UserStart(BTreeMap<String, String>),
    UserEnd,
    Record(Place, Element),
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    ServerData,
    Host,
    User,
    Offline,
    Archive,
    Include(String),
    Skip,
}

struct Frame {
    kind: Kind,
    /// Namespace declarations made on this element.
    decls: BTreeMap<Option<String>, String>,
    source: usize,
}

struct Source {
    reader: rxml::RawReader<std::io::BufReader<std::fs::File>>,
    path: PathBuf,
    offset: usize,
}

/// An element being built into a record.
struct Record {
    place: Place,
    builder: TreeBuilder,
    depth: usize,
    root_decls: BTreeMap<Option<String>, String>,
}

struct Parser {
    sources: Vec<Source>,
    frames: Vec<Frame>,
    head: Vec<RawEvent>,
    record: Option<Record>,
    tx: tokio::sync::mpsc::Sender<Item>,
    root_seen: bool,
}

fn open_source(path: &Path) -> Result<Source, String> {
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let opts = rxml::Options {
        max_token_length: MAX_TOKEN,
        context: None,
        comments: rxml::parser::CommentMode::Discard,
    };
    Ok(Source {
        reader: rxml::RawReader::with_options(
            std::io::BufReader::with_capacity(256 * 1024, f),
            opts,
        ),
        path: path.to_path_buf(),
        offset: 0,
    })
}

impl Parser {
    fn run(path: &Path, tx: tokio::sync::mpsc::Sender<Item>) -> Result<(), String> {
        let mut p = Parser {
            sources: vec![open_source(path)?],
            frames: Vec::new(),
            head: Vec::new(),
            record: None,
            tx,
            root_seen: false,
        };
        p.go().map_err(|e| match p.sources.last() {
            Some(s) => format!("{}: near byte {}: {e}", s.path.display(), s.offset),
            None => e,
        })?;
        if !p.root_seen {
            return Err(format!("{}: the file is empty", path.display()));
        }
        Ok(())
    }

    fn send(&self, item: Item) -> Result<(), String> {
        self.tx
            .blocking_send(item)
            .map_err(|_| "import stopped".to_string())
    }

    fn go(&mut self) -> Result<(), String> {
        loop {
            let Some(src) = self.sources.last_mut() else {
                return Ok(());
            };
            let ev = match src.reader.read() {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    self.sources.pop();
                    continue;
                }
                Err(e) => return Err(format!("not well-formed XML: {e}")),
            };
            src.offset += ev.metrics().len();
            if let Some(rec) = &mut self.record {
                let done = match &ev {
                    RawEvent::ElementHeadOpen(..) => {
                        rec.depth += 1;
                        false
                    }
                    RawEvent::ElementFoot(..) => {
                        rec.depth -= 1;
                        rec.depth == 0
                    }
                    _ => false,
                };
                rec.builder
                    .process_event(ev)
                    .map_err(|e| format!("in an element: {e}"))?;
                if done {
                    let rec = self
                        .record
                        .take()
                        .ok_or("internal error: no element being read")?;
                    let mut el = rec
                        .builder
                        .root
                        .ok_or_else(|| "an element did not complete".to_string())?;
                    // Keep only what the element declared itself, so it serialises as it
                    // would standalone.
                    el.prefixes = rec.root_decls.into();
                    self.send(Item::Record(rec.place, el))?;
                }
                continue;
            }
            match ev {
                RawEvent::XmlDeclaration(..) => {}
                RawEvent::ElementHeadOpen(..) | RawEvent::Attribute(..) => self.head.push(ev),
                RawEvent::ElementHeadClose(_) => {
                    self.head.push(ev);
                    self.open()?;
                }
                RawEvent::ElementFoot(_) => self.close()?,
                RawEvent::Text(_, t) => {
                    let skipping = matches!(
                        self.frames.last().map(|f| &f.kind),
                        Some(Kind::Skip | Kind::Include(_))
                    );
                    if !skipping && !t.trim().is_empty() {
                        return Err(format!(
                            "unexpected text {:?}",
                            t.chars().take(40).collect::<String>()
                        ));
                    }
                }
            }
        }
    }

    /// The namespace bound to `prefix` where the current source is.
    fn lookup(
        &self,
        decls: &BTreeMap<Option<String>, String>,
        prefix: &Option<String>,
    ) -> Option<String> {
        if let Some(ns) = decls.get(prefix) {
            return Some(ns.clone());
        }
        let src = self.sources.len() - 1;
        self.frames
            .iter()
            .rev()
            .take_while(|f| f.source == src)
            .find_map(|f| f.decls.get(prefix).cloned())
    }

    fn in_scope(&self) -> BTreeMap<Option<String>, String> {
        let src = self.sources.len() - 1;
        let mut m = BTreeMap::new();
        for f in self.frames.iter().filter(|f| f.source == src) {
            for (k, v) in &f.decls {
                m.insert(k.clone(), v.clone());
            }
        }
        m
    }

    /// An element's head is complete: decide what it is.
    fn open(&mut self) -> Result<(), String> {
        let head = std::mem::take(&mut self.head);
        let mut prefix = None;
        let mut local = String::new();
        let mut decls = BTreeMap::new();
        let mut attrs = BTreeMap::new();
        for ev in &head {
            match ev {
                RawEvent::ElementHeadOpen(_, (p, l)) => {
                    prefix = p.as_ref().map(|p| p.to_string());
                    local = l.to_string();
                }
                RawEvent::Attribute(_, (None, name), v) if name.as_str() == "xmlns" => {
                    decls.insert(None, v.to_string());
                }
                RawEvent::Attribute(_, (Some(p), name), v) if p.as_str() == "xmlns" => {
                    decls.insert(Some(name.to_string()), v.to_string());
                }
                RawEvent::Attribute(_, (None, name), v) => {
                    attrs.insert(name.to_string(), v.to_string());
                }
                _ => {}
            }
        }
        let parent = self.frames.last().map(|f| f.kind.clone());
        if matches!(parent, Some(Kind::Skip | Kind::Include(_))) {
            self.push(Kind::Skip, decls);
            return Ok(());
        }
        let ns = self
            .lookup(&decls, &prefix)
            .ok_or_else(|| match &prefix {
                Some(p) => format!("<{p}:{local}>: undeclared prefix {p}"),
                None if self.frames.is_empty() => format!(
                    "not a XEP-0227 file: the root element is <{local}/> without a namespace, not {{{NS_PIE}}}server-data"
                ),
                None => format!("<{local}> has no namespace"),
            })?;
        let is = |name: &str, want: &str| local == name && ns == want;
        if is("include", NS_XINCLUDE)
            && matches!(parent, Some(Kind::ServerData | Kind::Host | Kind::User))
        {
            if attrs.contains_key("parse") || attrs.contains_key("xpointer") {
                return Err("<xi:include/> with parse or xpointer is not supported".into());
            }
            let href = attrs
                .get("href")
                .ok_or("<xi:include/> without href")?
                .clone();
            self.push(Kind::Include(href), decls);
            return Ok(());
        }
        let place = match parent {
            None if self.frames.is_empty() && self.sources.len() == 1 => {
                if !is("server-data", NS_PIE) {
                    return Err(format!(
                        "not a XEP-0227 file: the root element is {{{ns}}}{local}, not {{{NS_PIE}}}server-data"
                    ));
                }
                self.root_seen = true;
                self.push(Kind::ServerData, decls);
                return Ok(());
            }
            None => return Err("an included file must hold <host/> or <user/> data".into()),
            Some(Kind::ServerData) if is("host", NS_PIE) => {
                let jid = attrs.get("jid").ok_or("<host/> without jid")?.clone();
                self.send(Item::HostStart(jid))?;
                self.push(Kind::Host, decls);
                return Ok(());
            }
            Some(Kind::Host) if is("user", NS_PIE) => {
                self.send(Item::UserStart(attrs))?;
                self.push(Kind::User, decls);
                return Ok(());
            }
            Some(Kind::User) if is("offline-messages", NS_PIE) => {
                self.push(Kind::Offline, decls);
                return Ok(());
            }
            Some(Kind::User) if is("archive", NS_PIE_MAM) => {
                self.push(Kind::Archive, decls);
                return Ok(());
            }
            Some(Kind::ServerData) => Place::ServerData,
            Some(Kind::Host) => Place::Host,
            Some(Kind::User) => Place::User,
            Some(Kind::Offline) => Place::Offline,
            Some(Kind::Archive) => Place::Archive,
            Some(Kind::Skip | Kind::Include(_)) => unreachable!("handled above"),
        };
        // A record: replay the head into a tree builder that knows the prefixes in scope.
        let mut builder = TreeBuilder::new().with_prefixes_stack(vec![self.in_scope().into()]);
        let mut depth = 0;
        for ev in head {
            if matches!(ev, RawEvent::ElementHeadOpen(..)) {
                depth += 1;
            }
            builder
                .process_event(ev)
                .map_err(|e| format!("<{local}>: {e}"))?;
        }
        self.record = Some(Record {
            place,
            builder,
            depth,
            root_decls: decls,
        });
        Ok(())
    }

    fn push(&mut self, kind: Kind, decls: BTreeMap<Option<String>, String>) {
        self.frames.push(Frame {
            kind,
            decls,
            source: self.sources.len() - 1,
        });
    }

    fn close(&mut self) -> Result<(), String> {
        let f = self.frames.pop().ok_or("unbalanced end tag")?;
        match f.kind {
            Kind::Host => self.send(Item::HostEnd)?,
            Kind::User => self.send(Item::UserEnd)?,
            Kind::Include(href) => {
                if self.sources.len() > MAX_INCLUDE_DEPTH {
                    return Err("XInclude nests too deep".into());
                }
                let base = self
                    .sources
                    .last()
                    .ok_or("internal error: no source file")?
                    .path
                    .clone();
                let rel = Path::new(&href);
                if href.contains("://") || rel.is_absolute() {
                    return Err(format!(
                        "<xi:include href='{href}'/>: only relative file references are supported"
                    ));
                }
                let target = base.parent().unwrap_or(Path::new(".")).join(rel);
                self.sources.push(open_source(&target)?);
            }
            _ => {}
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Importing.

/// One user's data as it is read.
#[derive(Default)]
struct UserState {
    jid: Option<BareJid>,
    created: Option<u64>,
    password: Option<String>,
    no_account: bool,
    scram: BTreeMap<String, StoredCredentials>,
    roster: BTreeMap<String, RosterItem>,
    roster_seen: bool,
    roster_ver: Option<u64>,
    pending: Vec<(String, String)>,
    last: Option<LastActivity>,
    prefs: Option<ArchivePrefs>,
    offline_meta: Option<(u64, u64)>,
    offline_seqs: BTreeSet<u64>,
    push: Vec<PushRegistration>,
    push_devices: Vec<crate::store::appserver::Registration>,
    uploads: Vec<crate::store::upload::Upload>,
    /// Something was written for this user (so a failure must undo it).
    wrote: bool,
}

#[derive(Default, Debug)]
struct ImportStats {
    hosts: BTreeSet<String>,
    accounts: u64,
    users: u64,
    roster_items: u64,
    offline: u64,
    archived: u64,
    push_registrations: u64,
    push_devices: u64,
    uploads: u64,
}

struct Importer<'a> {
    ctx: &'a Context<'a>,
    write: bool,
    host: Option<String>,
    user: Option<UserState>,
    seen: HashSet<BareJid>,
    conflicts: Vec<String>,
    warnings: BTreeMap<String, u64>,
    stats: ImportStats,
    max_seq: Option<u64>,
    format_version: Option<u32>,
    /// Upload ids seen in the file (they are unique across accounts).
    upload_ids: HashSet<String>,
}

/// A store error as one message (its display already includes its source).
fn flat(e: halyard_xep::host::StoreError) -> anyhow::Error {
    anyhow!("{e}")
}

fn attr_u64(el: &Element, name: &str) -> anyhow::Result<u64> {
    let v = el
        .attr(name)
        .with_context(|| format!("<{}/> has no {name} attribute", el.name()))?;
    v.parse()
        .with_context(|| format!("<{}/>: {name}='{v}' is not a number", el.name()))
}

fn b64_decode(what: &str, text: &str) -> anyhow::Result<Vec<u8>> {
    let clean: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    b64()
        .decode(clean)
        .with_context(|| format!("{what} is not valid base64"))
}

fn b64_string(what: &str, text: &str) -> anyhow::Result<String> {
    String::from_utf8(b64_decode(what, text)?).with_context(|| format!("{what} is not UTF-8"))
}

fn normalise(what: &str, raw: &str) -> anyhow::Result<String> {
    Ok(halyard_xep::stanza::parse_bare_jid(raw.trim())
        .map_err(|e| anyhow!("{what} {raw:?} is not a valid bare JID: {e}"))?
        .to_string())
}

fn parse_item(el: &Element, in_roster: bool) -> anyhow::Result<RosterItem> {
    ensure!(
        el.is("item", NS_ROSTER),
        "unexpected <{}/> in a roster",
        el.name()
    );
    let jid = normalise(
        "roster item",
        el.attr("jid").context("<item/> without jid")?,
    )?;
    let subscription = match el.attr("subscription").unwrap_or("none") {
        "none" => Subscription::None,
        "to" => Subscription::To,
        "from" => Subscription::From,
        "both" => Subscription::Both,
        s => bail!("roster item {jid}: subscription='{s}' is not none, to, from or both"),
    };
    Ok(RosterItem {
        name: el.attr("name").map(str::to_string),
        groups: el
            .children()
            .filter(|c| c.is("group", NS_ROSTER))
            .map(|c| c.text())
            .collect(),
        subscription,
        ask: el.attr("ask") == Some("subscribe"),
        pending_in: None,
        approved: matches!(el.attr("approved"), Some("true" | "1")),
        in_roster,
        jid,
    })
}

/// Removes the elements an export appended to a stanza (`names`, in order, at its end),
/// returning them; whitespace a reformatting tool may have put around them goes too.
fn strip_tail(el: &mut Element, names: &[(&str, &str)]) -> Option<Vec<Element>> {
    let mut nodes = el.take_nodes();
    let mut out = Vec::new();
    for (name, ns) in names.iter().rev() {
        while matches!(nodes.last(), Some(Node::Text(t)) if t.trim().is_empty()) {
            nodes.pop();
        }
        match nodes.pop() {
            Some(Node::Element(e)) if e.is(*name, *ns) => out.push(e),
            other => {
                if let Some(o) = other {
                    nodes.push(o);
                }
                for n in nodes {
                    el.append_node(n);
                }
                for e in out.into_iter().rev() {
                    el.append_child(e);
                }
                return None;
            }
        }
    }
    for n in nodes {
        el.append_node(n);
    }
    out.reverse();
    Some(out)
}

impl<'a> Importer<'a> {
    fn new(ctx: &'a Context<'a>, write: bool) -> Self {
        Importer {
            ctx,
            write,
            host: None,
            user: None,
            seen: HashSet::new(),
            conflicts: Vec::new(),
            warnings: BTreeMap::new(),
            stats: ImportStats::default(),
            max_seq: None,
            format_version: None,
            upload_ids: HashSet::new(),
        }
    }

    fn warn(&mut self, w: String) {
        *self.warnings.entry(w).or_default() += 1;
    }

    fn user(&mut self) -> anyhow::Result<&mut UserState> {
        self.user.as_mut().context("data outside a <user/>")
    }

    fn owner(&self) -> anyhow::Result<BareJid> {
        self.user
            .as_ref()
            .and_then(|u| u.jid.clone())
            .context("data outside a <user/>")
    }

    async fn handle(&mut self, item: Item) -> anyhow::Result<()> {
        match item {
            Item::HostStart(jid) => {
                let d = halyard_xep::stanza::parse_bare_jid(&jid)
                    .map_err(|e| anyhow!("<host jid='{jid}'/> is not a domain: {e}"))?;
                ensure!(
                    d.node().is_none(),
                    "<host jid='{jid}'/> is not a domain: it has a user part"
                );
                let d = d.domain().to_string();
                if !self.write && !self.ctx.domains.is_empty() && !self.ctx.domains.contains(&d) {
                    self.warn(format!(
                        "host {d} is not among the served domains ({}); its accounts are imported but unusable until it is added",
                        self.ctx.domains.join(", ")
                    ));
                }
                self.stats.hosts.insert(d.clone());
                self.host = Some(d);
            }
            Item::HostEnd => self.host = None,
            Item::UserStart(attrs) => self.user_start(attrs).await?,
            Item::UserEnd => {
                let jid = self.owner()?;
                self.user_end()
                    .await
                    .with_context(|| format!("user {jid}"))?;
            }
            Item::Record(place, el) => {
                let r = self.record(place, el).await;
                if let (Err(e), Ok(jid)) = (&r, self.owner()) {
                    bail!("user {jid}: {e:#}");
                }
                r?;
            }
        }
        Ok(())
    }

    async fn user_start(&mut self, attrs: BTreeMap<String, String>) -> anyhow::Result<()> {
        let host = self.host.clone().context("<user/> outside a <host/>")?;
        let name = attrs.get("name").context("<user/> without name")?;
        ensure!(
            !name.is_empty() && !name.contains(['@', '/']),
            "<user name='{name}'/> on {host} is not the user part of a JID"
        );
        let jid = halyard_xep::stanza::parse_bare_jid(&format!("{name}@{host}"))
            .map_err(|e| anyhow!("<user name='{name}'/> on {host} is not a valid JID: {e}"))?;
        ensure!(jid.node().is_some(), "<user name='{name}'/> is empty");
        ensure!(
            self.seen.insert(jid.clone()),
            "user {jid} appears twice in the file"
        );
        if !self.write && self.ctx.stores.restore.owns_anything(&jid).await? {
            self.conflicts.push(jid.to_string());
        }
        let created =
            match attrs.get("createdAt") {
                Some(s) => Some(parse_stamp_secs(s).with_context(|| {
                    format!("user {jid}: createdAt='{s}' is not a XEP-0082 date")
                })?),
                None => None,
            };
        self.user = Some(UserState {
            jid: Some(jid),
            created,
            password: attrs.get("password").cloned(),
            ..Default::default()
        });
        self.stats.users += 1;
        Ok(())
    }

    async fn record(&mut self, place: Place, el: Element) -> anyhow::Result<()> {
        match place {
            Place::ServerData if el.is("format", NS_EXT) => {
                let v = attr_u64(&el, "version")?;
                ensure!(
                    v <= u64::from(FORMAT_VERSION),
                    "this file uses version {v} of halyard's extensions; this halyard reads up to {FORMAT_VERSION}: import it with a newer halyard"
                );
                self.format_version = Some(v as u32);
            }
            Place::ServerData | Place::Host => {
                self.warn(format!(
                    "ignored <{} xmlns='{}'/> outside a <user/>",
                    el.name(),
                    el.ns()
                ));
            }
            Place::User => self.user_record(el).await?,
            Place::Offline => self.offline_record(el).await?,
            Place::Archive => self.archive_record(el).await?,
        }
        Ok(())
    }

    async fn user_record(&mut self, el: Element) -> anyhow::Result<()> {
        let ns = el.ns();
        match (el.name(), ns.as_str()) {
            ("scram-credentials", NS_PIE_SCRAM) => {
                let mech = el
                    .attr("mechanism")
                    .context("<scram-credentials/> without mechanism")?
                    .to_string();
                ensure!(
                    matches!(crate::sasl::scram::parse_mechanism(&mech), Some((_, false))),
                    "unsupported SCRAM mechanism {mech:?} (SCRAM-SHA-1, SCRAM-SHA-256 or SCRAM-SHA-512)"
                );
                let text = |name: &str| -> anyhow::Result<String> {
                    Ok(el
                        .get_child(name, NS_PIE_SCRAM)
                        .with_context(|| format!("<scram-credentials/> without <{name}/>"))?
                        .text())
                };
                let iter = text("iter-count")?;
                let creds = StoredCredentials {
                    iterations: iter
                        .trim()
                        .parse()
                        .with_context(|| format!("iter-count {iter:?} is not a number"))?,
                    salt: b64_decode("salt", &text("salt")?)?,
                    server_key: b64_decode("server-key", &text("server-key")?)?,
                    stored_key: b64_decode("stored-key", &text("stored-key")?)?,
                };
                let u = self.user()?;
                ensure!(
                    u.scram.insert(mech.clone(), creds).is_none(),
                    "two sets of {mech} credentials"
                );
            }
            ("query", NS_ROSTER) => {
                let ver = match el.attr("ver") {
                    Some(v) => Some(
                        v.parse::<u64>()
                            .with_context(|| format!("roster ver='{v}' is not a number"))?,
                    ),
                    None => None,
                };
                let items = el
                    .children()
                    .map(|c| parse_item(c, true))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let u = self.user()?;
                ensure!(!u.roster_seen, "two rosters");
                u.roster_seen = true;
                u.roster_ver = ver;
                for i in items {
                    ensure!(
                        !u.roster.contains_key(&i.jid),
                        "{} is twice in the roster",
                        i.jid
                    );
                    u.roster.insert(i.jid.clone(), i);
                }
            }
            ("hidden-roster", NS_EXT) => {
                let items = el
                    .children()
                    .map(|c| parse_item(c, false))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let u = self.user()?;
                for i in items {
                    ensure!(
                        !u.roster.contains_key(&i.jid),
                        "{} is twice in the roster",
                        i.jid
                    );
                    u.roster.insert(i.jid.clone(), i);
                }
            }
            ("presence", NS_CLIENT) => {
                if el.attr("type") != Some("subscribe") {
                    self.warn(format!(
                        "ignored a <presence type='{}'/> (only pending subscription requests are imported)",
                        el.attr("type").unwrap_or("")
                    ));
                    return Ok(());
                }
                let from = el
                    .attr("from")
                    .context("a pending subscription request without from")?;
                let contact = halyard_xep::stanza::parse_jid(from)
                    .map_err(|e| anyhow!("subscription request from {from:?}: not a JID: {e}"))?
                    .to_bare()
                    .to_string();
                let stanza = String::from(&el);
                self.user()?.pending.push((contact, stanza));
            }
            ("pending-in", NS_EXT) => {
                let jid = normalise(
                    "pending-in",
                    el.attr("jid").context("<pending-in/> without jid")?,
                )?;
                let stanza = b64_string("<pending-in/>", &el.text())?;
                self.user()?.pending.push((jid, stanza));
            }
            ("last-activity", NS_EXT) => {
                let last = LastActivity {
                    logout: attr_u64(&el, "logout")?,
                    status: el.text(),
                };
                let u = self.user()?;
                ensure!(u.last.replace(last).is_none(), "two <last-activity/>");
            }
            ("prefs", NS_MAM) => {
                let list = |name: &str| -> Vec<String> {
                    el.get_child(name, NS_MAM)
                        .map(|l| {
                            l.children()
                                .filter(|j| j.is("jid", NS_MAM))
                                .map(|j| j.text().trim().to_string())
                                .collect()
                        })
                        .unwrap_or_default()
                };
                let prefs = ArchivePrefs {
                    default: el.attr("default").unwrap_or("always").to_string(),
                    always: list("always"),
                    never: list("never"),
                };
                let u = self.user()?;
                ensure!(u.prefs.replace(prefs).is_none(), "two archive <prefs/>");
            }
            ("offline-state", NS_EXT) => {
                let meta = (attr_u64(&el, "next-seq")?, attr_u64(&el, "count")?);
                let u = self.user()?;
                ensure!(
                    u.offline_meta.replace(meta).is_none(),
                    "two <offline-state/>"
                );
            }
            ("push-registration", NS_EXT) => {
                let raw = el.attr("jid").context("<push-registration/> without jid")?;
                let jid = halyard_xep::stanza::parse_jid(raw)
                    .map_err(|e| anyhow!("push registration jid {raw:?} is not a JID: {e}"))?
                    .to_string();
                let node = el
                    .attr("node")
                    .filter(|n| !n.is_empty())
                    .context("<push-registration/> without node")?
                    .to_string();
                let mut children = el.children();
                let options = match (children.next(), children.next()) {
                    (None, _) => None,
                    (Some(x), None) if x.is("x", NS_DATA_FORMS) => Some(String::from(x)),
                    (Some(r), None) if r.is("raw-stanza", NS_EXT) => {
                        Some(b64_string("<raw-stanza/>", &r.text())?)
                    }
                    _ => {
                        bail!("<push-registration/> holds at most one data form (or <raw-stanza/>)")
                    }
                };
                let u = self.user()?;
                ensure!(
                    !u.push.iter().any(|r| r.jid == jid && r.node == node),
                    "push registration {jid} {node:?} appears twice"
                );
                u.push.push(PushRegistration { jid, node, options });
                self.stats.push_registrations += 1;
            }
            ("push-devices", NS_EXT) => {
                let owner = self.owner()?.to_string();
                let u = self.user()?;
                ensure!(u.push_devices.is_empty(), "two <push-devices/>");
                for d in el.children() {
                    ensure!(
                        d.is("device", NS_EXT),
                        "<push-devices/> holds only <device/>"
                    );
                    let a = |name: &str| -> anyhow::Result<String> {
                        d.attr(name)
                            .filter(|v| !v.is_empty())
                            .map(str::to_string)
                            .with_context(|| format!("<device/> without {name}"))
                    };
                    let provider = match a("provider")?.as_str() {
                        "fcm" => crate::store::appserver::Provider::Fcm,
                        "apns" => crate::store::appserver::Provider::Apns,
                        "webhook" => crate::store::appserver::Provider::Webhook,
                        other => bail!("unknown push provider {other:?}"),
                    };
                    let reg = crate::store::appserver::Registration {
                        owner: owner.clone(),
                        device_id: a("id")?,
                        provider,
                        token: a("token")?,
                        node: a("node")?,
                        secret: a("secret")?,
                        registered: attr_u64(d, "registered")?,
                    };
                    ensure!(
                        !u.push_devices
                            .iter()
                            .any(|r| r.device_id == reg.device_id || r.node == reg.node),
                        "two push devices with id {:?} or node {:?}",
                        reg.device_id,
                        reg.node
                    );
                    u.push_devices.push(reg);
                }
            }
            ("uploads", NS_EXT) => {
                let owner = self.owner()?.to_string();
                ensure!(self.user()?.uploads.is_empty(), "two <uploads/>");
                let mut files = Vec::new();
                for f in el.children() {
                    ensure!(f.is("file", NS_EXT), "<uploads/> holds only <file/>");
                    let a = |name: &str| -> anyhow::Result<String> {
                        f.attr(name)
                            .filter(|v| !v.is_empty())
                            .map(str::to_string)
                            .with_context(|| format!("<file/> without {name}"))
                    };
                    let id = a("id")?;
                    ensure!(
                        crate::store::upload::valid_id(&id),
                        "upload id {id:?} is not 16 to 64 URL-safe characters"
                    );
                    let filename = a("filename")?;
                    ensure!(
                        crate::upload::sanitize_filename(&filename).as_deref()
                            == Some(filename.as_str()),
                        "upload file name {filename:?} is not a safe file name"
                    );
                    let content_type = a("content-type")?;
                    ensure!(
                        crate::upload::check_content_type(Some(&content_type)).as_deref()
                            == Ok(content_type.as_str()),
                        "upload content type {content_type:?} is not valid"
                    );
                    ensure!(
                        self.upload_ids.insert(id.clone()),
                        "upload id {id:?} appears twice"
                    );
                    if !self.write && self.ctx.stores.uploads.get(&id).await?.is_some() {
                        let c = format!("{owner} (upload id {id} is stored here)");
                        if !self.conflicts.contains(&owner) {
                            self.conflicts.push(c);
                        }
                    }
                    files.push(crate::store::upload::Upload {
                        id,
                        owner: owner.clone(),
                        filename,
                        size: attr_u64(f, "size")?,
                        content_type,
                        created: attr_u64(f, "created")?,
                        expires: attr_u64(f, "expires")?,
                        state: crate::store::upload::UploadState::Stored,
                    });
                }
                self.user()?.uploads = files;
            }
            ("no-account", NS_EXT) => self.user()?.no_account = true,
            (name, ns) => {
                let what = match ns {
                    "vcard-temp" => " (vCards are not supported)",
                    "jabber:iq:private" => " (private XML storage is not supported)",
                    "jabber:iq:privacy" => " (privacy lists are not supported)",
                    "http://jabber.org/protocol/pubsub"
                    | "http://jabber.org/protocol/pubsub#owner" => " (PEP is not supported)",
                    _ => "",
                };
                self.warn(format!("ignored <{name} xmlns='{ns}'/>{what}"));
            }
        }
        Ok(())
    }

    async fn offline_record(&mut self, mut el: Element) -> anyhow::Result<()> {
        let owner = self.owner()?;
        let msg = if el.is("raw-stanza", NS_EXT) {
            OfflineMessage {
                seq: attr_u64(&el, "seq")?,
                ts_micros: attr_u64(&el, "ts")?,
                stanza: b64_string("<raw-stanza/>", &el.text())?,
            }
        } else if el.is("message", NS_CLIENT) {
            if let Some(ours) = strip_tail(&mut el, &[("delay", NS_DELAY), ("offline", NS_EXT)]) {
                OfflineMessage {
                    seq: attr_u64(&ours[1], "seq")?,
                    ts_micros: attr_u64(&ours[1], "ts")?,
                    stanza: String::from(&el),
                }
            } else {
                // Another server's export: the delay it added (from its domain) gives the time.
                let domain = owner.domain().to_string();
                let mut ts = None;
                if let Some(pos) = el.children().position(|c| {
                    c.is("delay", NS_DELAY) && c.attr("from") == Some(domain.as_str())
                }) {
                    let stamp = el.children().nth(pos).and_then(|d| d.attr("stamp"));
                    ts = stamp.and_then(parse_stamp);
                    let _ = el.remove_child("delay", NS_DELAY);
                }
                let u = self.user()?;
                let seq = u.offline_seqs.last().map(|s| s + 1).unwrap_or(0);
                OfflineMessage {
                    seq,
                    ts_micros: ts.unwrap_or_else(now_micros),
                    stanza: String::from(&el),
                }
            }
        } else {
            self.warn(format!(
                "ignored <{} xmlns='{}'/> in <offline-messages/>",
                el.name(),
                el.ns()
            ));
            return Ok(());
        };
        let u = self.user()?;
        ensure!(
            u.offline_seqs.insert(msg.seq),
            "offline message seq {} appears twice",
            msg.seq
        );
        self.stats.offline += 1;
        if self.write {
            self.user()?.wrote = true;
            self.ctx
                .stores
                .restore
                .put_offline(&owner, &msg)
                .await
                .map_err(flat)?;
        }
        Ok(())
    }

    async fn archive_record(&mut self, el: Element) -> anyhow::Result<()> {
        let owner = self.owner()?;
        if !el.is("result", NS_MAM) {
            self.warn(format!(
                "ignored <{} xmlns='{}'/> in <archive/>",
                el.name(),
                el.ns()
            ));
            return Ok(());
        }
        let id = el
            .attr("id")
            .context("archive <result/> without id")?
            .to_string();
        let fwd = el
            .get_child("forwarded", NS_FORWARD)
            .with_context(|| format!("archive result {id}: no <forwarded/>"))?;
        let running = match el.get_child("archived", NS_EXT) {
            Some(m) if m.attr("ord").is_some() => Some(Running {
                ord: attr_u64(m, "ord")?,
                with_ord: attr_u64(m, "with-ord")?,
                prev_cum: attr_u64(m, "bytes-before")?,
            }),
            _ => None,
        };
        let (ts_micros, seq, with, stanza) = match el.get_child("archived", NS_EXT) {
            Some(m) => {
                let st = fwd
                    .children()
                    .find(|c| !c.is("delay", NS_DELAY))
                    .with_context(|| format!("archive result {id}: no message"))?;
                let stanza = if st.is("raw-stanza", NS_EXT) {
                    b64_string("<raw-stanza/>", &st.text())?
                } else {
                    String::from(st)
                };
                let with = m
                    .attr("with")
                    .with_context(|| format!("archive result {id}: no with"))?
                    .to_string();
                (attr_u64(m, "ts")?, Some(attr_u64(m, "seq")?), with, stanza)
            }
            None => {
                // Another server's export: the time from the delay, the other party from the
                // message's addresses, a fresh sequence number.
                let ts = fwd
                    .get_child("delay", NS_DELAY)
                    .and_then(|d| d.attr("stamp"))
                    .and_then(parse_stamp)
                    .with_context(|| format!("archive result {id}: no valid delay stamp"))?;
                let msg = fwd
                    .children()
                    .find(|c| !c.is("delay", NS_DELAY))
                    .with_context(|| format!("archive result {id}: no message"))?;
                let bare = |a: &str| {
                    msg.attr(a)
                        .and_then(|j| halyard_xep::stanza::parse_jid(j).ok())
                        .map(|j| j.to_bare())
                };
                let with = match (bare("from"), bare("to")) {
                    (Some(f), Some(t)) if f == owner => t,
                    (Some(f), _) if f != owner => f,
                    (_, Some(t)) => t,
                    _ => owner.clone(),
                };
                (ts, None, with.to_string(), String::from(msg))
            }
        };
        ensure!(
            !id.is_empty() && id.len() <= 255,
            "archive id {id:?} must be 1 to 255 bytes"
        );
        ensure!(
            with.len() <= usize::from(u16::MAX),
            "archive result {id}: the with JID is too long"
        );
        self.stats.archived += 1;
        if self.write {
            let seq = match seq {
                Some(s) => {
                    self.max_seq = Some(self.max_seq.map_or(s, |m| m.max(s)));
                    s
                }
                None => self.ctx.stores.restore.new_seq().await?,
            };
            self.user()?.wrote = true;
            self.ctx
                .stores
                .restore
                .put_archived(
                    &owner,
                    ArchiveKey { ts_micros, seq },
                    &id,
                    &with,
                    &stanza,
                    running,
                )
                .await
                .map_err(flat)?;
        }
        Ok(())
    }

    async fn user_end(&mut self) -> anyhow::Result<()> {
        let u = self.user.take().context("</user> without <user>")?;
        let jid = u.jid.clone().context("user without a JID")?;
        let r = self.finish_user(&jid, u).await;
        match r {
            Err(e) if self.write => {
                // Everything this account owns was written by this import (the first pass
                // checked that the store held nothing for it): remove it again.
                let undo = self.ctx.stores.restore.discard(&jid, false).await;
                Err(match undo {
                    Ok(()) => e.context("nothing of this account was kept"),
                    Err(u) => e.context(format!("undoing its partial import failed too: {u}")),
                })
            }
            r => r,
        }
    }

    /// Completes a user at `</user>`: attaches pending requests, builds the account, and (when
    /// writing) writes the buffered rows, the account row last.
    async fn finish_user(&mut self, jid: &BareJid, mut u: UserState) -> anyhow::Result<()> {
        for (contact, stanza) in std::mem::take(&mut u.pending) {
            let item = u
                .roster
                .entry(contact.clone())
                .or_insert_with(|| RosterItem {
                    jid: contact.clone(),
                    ..Default::default()
                });
            ensure!(
                item.pending_in.replace(stanza).is_none(),
                "two pending subscription requests from {contact}"
            );
        }
        let account = if u.no_account {
            ensure!(
                u.scram.is_empty() && u.password.is_none() && u.created.is_none(),
                "<no-account/> together with credentials or createdAt"
            );
            None
        } else {
            let created = u.created.unwrap_or_else(|| now_micros() / 1_000_000);
            let scram = if u.scram.is_empty() {
                match &u.password {
                    Some(pw) => {
                        crate::sasl::new_account(pw, self.ctx.scram_iterations)
                            .map_err(|e| anyhow!("password refused: {}", e.text()))?
                            .scram
                    }
                    None => {
                        self.warn("accounts without credentials were imported (set a password with `halyard user passwd`)".into());
                        BTreeMap::new()
                    }
                }
            } else {
                std::mem::take(&mut u.scram)
            };
            Some(Account { scram, created })
        };
        self.stats.roster_items += u.roster.len() as u64;
        self.stats.push_devices += u.push_devices.len() as u64;
        self.stats.uploads += u.uploads.len() as u64;
        if account.is_some() {
            self.stats.accounts += 1;
        }
        if !self.write {
            return Ok(());
        }
        // Rows first, the account row last: nobody can log in to a half-imported account.
        self.write_user(jid, &u, account.as_ref()).await
    }

    async fn write_user(
        &self,
        jid: &BareJid,
        u: &UserState,
        account: Option<&Account>,
    ) -> anyhow::Result<()> {
        let r = &self.ctx.stores.restore;
        for item in u.roster.values() {
            r.put_roster_item(jid, item).await?;
        }
        if let Some(v) = u.roster_ver {
            r.set_roster_version(jid, v).await?;
        }
        if let Some(l) = &u.last {
            self.ctx.stores.last.set(jid, l).await?;
        }
        if let Some(p) = &u.prefs {
            r.set_archive_prefs(jid, p).await?;
        }
        if let Some((next, count)) = u.offline_meta {
            r.set_offline_meta(jid, next, count).await?;
        }
        for reg in &u.push {
            self.ctx.stores.push.put_registration(jid, reg).await?;
        }
        for d in &u.push_devices {
            r.put_push_device(d).await?;
        }
        for f in &u.uploads {
            r.put_upload(f).await?;
        }
        if let Some(a) = account {
            match r.put_account(jid, a).await {
                Ok(()) => {}
                Err(AccountError::Exists(_)) => {
                    bail!("the account was created while the import ran")
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// After a failure in the write pass: undo the account being written.
    async fn abort(&mut self) -> Option<String> {
        let u = self.user.take()?;
        let jid = u.jid?;
        if !self.write || !u.wrote {
            return None;
        }
        match self.ctx.stores.restore.discard(&jid, false).await {
            Ok(()) => Some(format!("the partial import of {jid} was undone")),
            Err(e) => Some(format!("undoing the partial import of {jid} failed: {e}")),
        }
    }
}

/// One pass over the file.
async fn pass(path: &Path, imp: &mut Importer<'_>) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let p = path.to_path_buf();
    let parser = tokio::task::spawn_blocking(move || Parser::run(&p, tx));
    let mut failed = None;
    while let Some(item) = rx.recv().await {
        if let Err(e) = imp.handle(item).await {
            failed = Some(e);
            break;
        }
    }
    drop(rx);
    let parsed = parser
        .await
        .map_err(|e| anyhow!("the import parser failed: {e}"))?;
    let err = match (failed, parsed) {
        (Some(e), _) => Some(e),
        (None, Err(e)) => Some(anyhow!(e)),
        (None, Ok(())) => None,
    };
    if let Some(e) = err {
        return Err(match imp.abort().await {
            Some(note) => e.context(note),
            None => e,
        });
    }
    Ok(())
}

/// `halyard import FILE`: `path` must be absolute (the CLI makes it so).
pub async fn import(ctx: &Context<'_>, path: &str) -> anyhow::Result<Vec<String>> {
    let path = PathBuf::from(path);
    ensure!(
        path.is_absolute(),
        "the import path {} must be absolute",
        path.display()
    );
    let mut f = std::io::BufReader::new(
        std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?,
    );
    ensure!(
        !f.fill_buf()?.is_empty(),
        "{} is empty: nothing to import",
        path.display()
    );
    drop(f);

    // Pass 1: validate everything and look for accounts the store already holds.
    let mut check = Importer::new(ctx, false);
    pass(&path, &mut check)
        .await
        .context("the file was not imported (nothing was written)")?;
    if !check.conflicts.is_empty() {
        bail!(
            "the store already holds data for {} account(s) in the file: {} \
             (import writes into an empty store: remove them with `halyard user remove` or import elsewhere); nothing was written",
            check.conflicts.len(),
            check.conflicts.join(", ")
        );
    }

    // Pass 2: write.
    let mut write = Importer::new(ctx, true);
    if let Err(e) = pass(&path, &mut write).await {
        let done = write.stats.accounts;
        return Err(e.context(format!(
            "the import stopped after {done} complete accounts; remove them (or start from an empty data_dir) before importing again"
        )));
    }
    if let Some(max) = write.max_seq {
        ctx.stores.restore.reserve_seqs(max).await?;
    }
    ctx.stores.restore.flush().await?;

    let s = &check.stats;
    let mut lines = vec![format!(
        "imported {} accounts on {} hosts ({}): {} roster items, {} offline messages, {} archived messages, {} push registrations",
        s.accounts,
        s.hosts.len(),
        s.hosts.iter().cloned().collect::<Vec<_>>().join(", "),
        s.roster_items,
        s.offline,
        s.archived,
        s.push_registrations
    )];
    if s.push_devices > 0 {
        lines.push(format!(
            "{} push devices (app server registrations)",
            s.push_devices
        ));
    }
    if s.uploads > 0 {
        lines.push(format!(
            "{} uploaded files (metadata only: their files must be copied into <data_dir>/uploads)",
            s.uploads
        ));
    }
    if s.users > s.accounts {
        lines.push(format!(
            "note: {} JIDs without an account row were restored as they were (their rows only)",
            s.users - s.accounts
        ));
    }
    for (w, count) in &check.warnings {
        lines.push(if *count > 1 {
            format!("warning ({count}×): {w}")
        } else {
            format!("warning: {w}")
        });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::group_commit::GroupCommit;
    use crate::store::sled::SledStore;
    use crate::store::trees;

    fn j(s: &str) -> BareJid {
        BareJid::new(s).unwrap()
    }

    fn stores_of(s: Arc<SledStore>) -> Stores {
        let f = s.clone();
        Stores {
            accounts: s.clone(),
            roster: s.clone(),
            archive: s.archive.clone(),
            offline: s.offline.clone(),
            push: s.push.clone(),
            appserver: s.appserver.clone(),
            uploads: s.uploads.clone(),
            restore: s.clone(),
            last: s.clone(),
            durable: Arc::new(GroupCommit::start(s.db.clone(), std::time::Duration::ZERO)),
            flush: Arc::new(move || f.flush()),
            tokens: s.tokens.clone(),
            stats: s.clone(),
        }
    }

    fn ctx(stores: &Stores) -> Context<'_> {
        static DOMAINS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        Context {
            stores,
            server: None,
            domains: DOMAINS.get_or_init(|| vec!["x".to_string()]),
            scram_iterations: 4096,
        }
    }

    /// Every tree, key by key.
    type Trees = BTreeMap<Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>>;

    fn dump(db: &sled::Db) -> Trees {
        db.tree_names()
            .into_iter()
            .map(|name| {
                let rows = db
                    .open_tree(&name)
                    .unwrap()
                    .iter()
                    .map(|kv| {
                        let (k, v) = kv.unwrap();
                        (k.to_vec(), v.to_vec())
                    })
                    .collect();
                (name.to_vec(), rows)
            })
            .collect()
    }

    fn canon(xml: &str) -> String {
        String::from(&xml.parse::<Element>().unwrap())
    }

    async fn fill(s: &Stores) {
        let mut alice = crate::sasl::new_account("pw", 4096).unwrap();
        alice.created = 1_700_000_000;
        s.accounts.create(&j("alice@x"), &alice).await.unwrap();
        s.accounts
            .create(
                &j("bob@x"),
                &Account {
                    scram: BTreeMap::new(),
                    created: 0,
                },
            )
            .await
            .unwrap();
        let a = j("alice@x");
        let items = [
            RosterItem {
                jid: "bob@x".into(),
                name: Some("Bob \r\n\t'\"<&> é".into()),
                groups: vec!["A".into(), "".into(), "x  y".into()],
                subscription: Subscription::Both,
                in_roster: true,
                ..Default::default()
            },
            RosterItem {
                jid: "carol@x".into(),
                pending_in: Some(canon(
                    "<presence xmlns='jabber:client' from='carol@x' to='alice@x' type='subscribe'><status>hi</status></presence>",
                )),
                ..Default::default()
            },
            RosterItem {
                jid: "dave@y".into(),
                subscription: Subscription::From,
                pending_in: Some("<presence from='dave@y' type='subscribe'/>".into()),
                in_roster: true,
                ..Default::default()
            },
            RosterItem {
                jid: "erin@x".into(),
                ask: true,
                approved: true,
                subscription: Subscription::To,
                in_roster: true,
                ..Default::default()
            },
        ];
        for i in &items {
            s.roster.put(&a, i).await.unwrap();
        }
        s.roster.remove(&a, &j("gone@x")).await.unwrap();
        s.last
            .set(
                &a,
                &LastActivity {
                    logout: 1_700_000_100,
                    status: " away\r\nnow ".into(),
                },
            )
            .await
            .unwrap();
        s.last
            .set(
                &j("bob@x"),
                &LastActivity {
                    logout: 5,
                    status: String::new(),
                },
            )
            .await
            .unwrap();
        s.archive
            .set_prefs(
                &a,
                &ArchivePrefs {
                    default: "roster".into(),
                    always: vec!["bob@x".into()],
                    never: vec![],
                },
            )
            .await
            .unwrap();
        let m1 = canon("<message xmlns='jabber:client' from='bob@x/r' to='alice@x' type='chat' xml:lang='en'><body>hi &amp; &lt;bye&gt;\r\n</body><x xmlns:p='urn:p' p:a='1'/></message>");
        for st in [
            m1.as_str(),
            "<m1/>",
            "<message xmlns='jabber:client'><body>x</body></message>\n",
            m1.as_str(),
        ] {
            assert!(s
                .offline
                .push(&a, 1_700_000_000_123_456, st, 100)
                .await
                .unwrap());
        }
        let first = s.offline.list(&a).await.unwrap()[0].seq;
        s.offline.remove(&a, &[first]).await.unwrap();
        // A queue emptied by delivery keeps its counters.
        s.offline.push(&j("bob@x"), 1, "<m/>", 10).await.unwrap();
        s.offline.remove(&j("bob@x"), &[0]).await.unwrap();
        for i in 0..(PAGE as u64 + 5) {
            let (with, st) = match i % 3 {
                0 => (j("bob@x"), canon(&format!("<message xmlns='jabber:client' from='alice@x/r' to='bob@x' type='chat'><body>n° {i}</body></message>"))),
                1 => (j("carol@x"), format!("<raw n='{i}'/>")),
                _ => (j("bob@x"), format!("<message xmlns='jabber:client'>\r\n{i}</message>")),
            };
            s.archive
                .append(&a, &with.into(), 1_700_000_000_000_000 + i / 2, &st)
                .await
                .unwrap();
        }
        s.archive
            .append(&j("bob@x"), &Jid::new("alice@x/r").unwrap(), 7, &m1)
            .await
            .unwrap();
        // XEP-0357 registrations: options as a canonical form, as other bytes, and none; and a
        // queued notification (not exported).
        let form = canon("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='secret'><value>s3cr&lt;t</value></field></x>");
        for (jid, node, options) in [
            ("push.x", "n1", Some(form)),
            (
                "push.x",
                "n2",
                Some("<x xmlns=\"jabber:x:data\"/>".to_string()),
            ),
            ("app.example/res", "dev ice", None),
        ] {
            s.push
                .put_registration(
                    &a,
                    &PushRegistration {
                        jid: jid.into(),
                        node: node.into(),
                        options,
                    },
                )
                .await
                .unwrap();
        }
        s.push
            .update_job(
                &halyard_xep::host::PushKey {
                    owner: a.clone(),
                    jid: "push.x".into(),
                    node: "n1".into(),
                },
                &|_| {
                    Some(halyard_xep::host::PushJob {
                        count: 3,
                        pending: true,
                        due_micros: Some(5),
                        ..Default::default()
                    })
                },
            )
            .await
            .unwrap();
        // Rows without an account.
        s.roster
            .put(
                &j("ghost@x"),
                &RosterItem {
                    jid: "alice@x".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        for (dev, provider) in [
            ("pixel", crate::store::appserver::Provider::Fcm),
            ("iphone", crate::store::appserver::Provider::Apns),
        ] {
            s.appserver
                .register(&a, dev, provider, &format!("{dev}-token"), 10)
                .await
                .unwrap();
        }
        // Two stored uploads (an open slot is not exported).
        for (id, name, size) in [
            ("AAAAAAAAAAAAAAAAAAAAAAAA", "très cool.jpg", 23456u64),
            ("BBBBBBBBBBBBBBBBBBBBBBBB", "notes.txt", 0),
        ] {
            let slot = crate::store::upload::Upload {
                id: id.into(),
                owner: "alice@x".into(),
                filename: name.into(),
                size,
                content_type: "image/jpeg".into(),
                created: 1_700_000_000,
                expires: 1_700_000_300,
                state: crate::store::upload::UploadState::Pending,
            };
            s.uploads.reserve(&slot, 0).await.unwrap();
            s.uploads.claim(id).await.unwrap().unwrap();
            assert!(s.uploads.complete(id, 1_700_000_100, 0).await.unwrap());
        }
        s.last
            .set(
                &j("ghost@y"),
                &LastActivity {
                    logout: 9,
                    status: "boo".into(),
                },
            )
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn export_import_round_trip_gives_identical_trees() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s1 = Arc::new(SledStore::open(d1.path(), 1 << 24).unwrap());
        let st1 = stores_of(s1.clone());
        fill(&st1).await;
        let file = d1.path().join("export.xml");
        let stats = write_export(&st1, std::fs::File::create(&file).unwrap())
            .await
            .unwrap();
        assert_eq!((stats.users, stats.accounts, stats.hosts), (4, 2, 2));
        assert_eq!(stats.archived, PAGE as u64 + 6);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("<user name='alice' createdAt='2023-11-14T22:13:20Z'>"));
        assert!(text.contains(
            "<scram-credentials xmlns='urn:xmpp:pie:0#scram' mechanism='SCRAM-SHA-256'>"
        ));
        assert!(text.contains("<hidden-roster xmlns='urn:halyard:pie:0'>"));
        assert!(text.contains("<presence xmlns='jabber:client' from='carol@x'"));
        assert!(text.contains("<archive xmlns='urn:xmpp:pie:0#mam'>"));
        assert!(text.contains("<push-registration xmlns='urn:halyard:pie:0' jid='push.x' node='n1'><x xmlns='jabber:x:data'"));
        assert_eq!(stats.push_registrations, 3);
        assert!(text.contains("<push-devices xmlns='urn:halyard:pie:0'>"));
        assert!(text.contains("provider='apns' token='iphone-token'"));
        assert_eq!(stats.push_devices, 2);
        assert!(text.contains("<uploads xmlns='urn:halyard:pie:0'>"));
        assert!(text.contains("<file id='AAAAAAAAAAAAAAAAAAAAAAAA' filename='très cool.jpg' size='23456' content-type='image/jpeg' created='1700000100' expires='0'/>"));
        assert_eq!(stats.uploads, 2);

        let s2 = Arc::new(SledStore::open(d2.path(), 1 << 24).unwrap());
        let st2 = stores_of(s2.clone());
        let lines = import(&ctx(&st2), file.to_str().unwrap()).await.unwrap();
        assert!(
            lines[0].starts_with("imported 2 accounts on 2 hosts"),
            "{lines:?}"
        );
        // The push queue is not exported (see write_user): apart from it, identical trees.
        let (mut t1, t2) = (dump(&s1.db), dump(&s2.db));
        for tree in [trees::PUSH_QUEUE, trees::PUSH_DUE] {
            let rows = t1.get_mut(tree.as_bytes()).unwrap();
            assert_eq!(rows.len(), 1, "{tree} was filled");
            rows.clear();
        }
        assert_eq!(t1, t2);

        // Exporting the copy gives the same file.
        let again = d2.path().join("again.xml");
        write_export(&st2, std::fs::File::create(&again).unwrap())
            .await
            .unwrap();
        assert_eq!(text, std::fs::read_to_string(&again).unwrap());

        // New appends do not reuse an imported key.
        let max = st1
            .archive
            .scan(&j("alice@x"), None, KeyRange::default(), true, 1)
            .await
            .unwrap()[0]
            .0
            .seq;
        assert!(st2.restore.new_seq().await.unwrap() > max);

        // A second import is refused, naming the accounts, and writes nothing.
        let before = dump(&s2.db);
        let e = import(&ctx(&st2), file.to_str().unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("alice@x") && e.contains("nothing was written"),
            "{e}"
        );
        assert_eq!(before, dump(&s2.db));
    }

    #[tokio::test]
    async fn malformed_files_write_nothing() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s1 = Arc::new(SledStore::open(d1.path(), 1 << 24).unwrap());
        let st1 = stores_of(s1.clone());
        fill(&st1).await;
        let mut text = Vec::new();
        write_export(&st1, &mut text).await.unwrap();
        let text = String::from_utf8(text).unwrap();
        let s2 = Arc::new(SledStore::open(d2.path(), 1 << 24).unwrap());
        let st2 = stores_of(s2.clone());
        let empty = dump(&s2.db);
        let cut = text.rfind("<user name='ghost'").unwrap();
        let broken_ver = text.replacen("ver='", "ver='x", 1);
        let cases: Vec<(&str, String)> = vec![
            ("truncated", text[..cut].to_string()),
            ("bad number", broken_ver),
            ("not xep-0227", "<foo xmlns='bar'/>".into()),
            ("text", text.replacen("<host", "junk<host", 1)),
            ("", String::new()),
        ];
        for (what, body) in cases {
            let f = d2.path().join("bad.xml");
            std::fs::write(&f, body).unwrap();
            let e = import(&ctx(&st2), f.to_str().unwrap()).await;
            assert!(e.is_err(), "{what}: accepted");
            assert_eq!(empty, dump(&s2.db), "{what}: wrote something");
        }
    }

    #[tokio::test]
    async fn another_servers_export_and_xinclude() {
        let d = tempfile::tempdir().unwrap();
        let s = Arc::new(SledStore::open(d.path(), 1 << 24).unwrap());
        let st = stores_of(s.clone());
        std::fs::create_dir_all(d.path().join("x")).unwrap();
        std::fs::write(
            d.path().join("main.xml"),
            "<?xml version='1.0' encoding='UTF-8'?>\n<server-data xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude'>\n<!-- exported elsewhere -->\n<xi:include href='x.xml'/></server-data>",
        )
        .unwrap();
        std::fs::write(
            d.path().join("x.xml"),
            "<host xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude' jid='x'><xi:include href='x/juliet.xml'/></host>",
        )
        .unwrap();
        std::fs::write(
            d.path().join("x/juliet.xml"),
            r#"<user xmlns='urn:xmpp:pie:0' name='juliet' password='secret'>
  <query xmlns='jabber:iq:roster'><item jid='romeo@y' name='Romeo' subscription='both'><group>Friends</group></item></query>
  <vCard xmlns='vcard-temp'><FN>Juliet</FN></vCard>
  <presence xmlns='jabber:client' type='subscribe' from='mercutio@y/r'/>
  <offline-messages>
    <message xmlns='jabber:client' from='romeo@y/orchard' to='juliet@x/balcony' type='chat'><body>Neither</body><delay xmlns='urn:xmpp:delay' from='x' stamp='2009-07-21T00:32:29Z'>Offline Storage</delay></message>
  </offline-messages>
  <archive xmlns='urn:xmpp:pie:0#mam'>
    <result xmlns='urn:xmpp:mam:2' id='28482-98726-73623'><forwarded xmlns='urn:xmpp:forward:0'><delay xmlns='urn:xmpp:delay' stamp='2010-07-10T23:08:25Z'/><message xmlns='jabber:client' to='juliet@x/balcony' from='romeo@y/orchard' type='chat'><body>Call me</body></message></forwarded></result>
  </archive>
</user>"#,
        )
        .unwrap();
        let lines = import(&ctx(&st), d.path().join("main.xml").to_str().unwrap())
            .await
            .unwrap();
        assert!(
            lines.iter().any(|l| l.contains("vCards are not supported")),
            "{lines:?}"
        );
        let jul = j("juliet@x");
        let acc = st.accounts.get(&jul).await.unwrap().unwrap();
        assert_eq!(acc.scram.len(), 3);
        let items = st.roster.items(&jul).await.unwrap();
        assert_eq!(items.len(), 2);
        let merc = items.iter().find(|i| i.jid == "mercutio@y").unwrap();
        assert!(!merc.in_roster && merc.pending_in.is_some());
        let off = st.offline.list(&jul).await.unwrap();
        assert_eq!(off.len(), 1);
        assert!(!off[0].stanza.contains("delay"));
        assert_eq!(
            off[0].ts_micros,
            parse_stamp("2009-07-21T00:32:29Z").unwrap()
        );
        let arch = st
            .archive
            .scan(&jul, None, KeyRange::default(), false, 10)
            .await
            .unwrap();
        assert_eq!(arch.len(), 1);
        assert_eq!(arch[0].1.id, "28482-98726-73623");
        assert_eq!(arch[0].1.with, "romeo@y");
    }

    #[tokio::test]
    async fn a_failure_while_writing_undoes_that_account_only() {
        let d = tempfile::tempdir().unwrap();
        let s = Arc::new(SledStore::open(&d.path().join("data"), 1 << 24).unwrap());
        let st = stores_of(s);
        let result = |body: &str| {
            format!("<result xmlns='urn:xmpp:mam:2' id='same'><forwarded xmlns='urn:xmpp:forward:0'><delay xmlns='urn:xmpp:delay' stamp='2020-01-01T00:00:00Z'/><message xmlns='jabber:client' from='a@x/r' to='b@x'><body>{body}</body></message></forwarded></result>")
        };
        let file = d.path().join("dup.xml");
        std::fs::write(
            &file,
            format!(
                "<server-data xmlns='urn:xmpp:pie:0'><host jid='x'>\
                 <user name='a' createdAt='2020-01-01T00:00:00Z'><query xmlns='jabber:iq:roster' ver='1'><item jid='b@x' subscription='both'/></query></user>\
                 <user name='b' createdAt='2020-01-01T00:00:00Z'><query xmlns='jabber:iq:roster' ver='1'><item jid='a@x' subscription='both'/></query>\
                 <offline-messages><message xmlns='jabber:client'><body>x</body></message></offline-messages>\
                 <archive xmlns='urn:xmpp:pie:0#mam'>{}{}</archive></user></host></server-data>",
                result("1"),
                result("2")
            ),
        )
        .unwrap();
        let e = format!(
            "{:#}",
            import(&ctx(&st), file.to_str().unwrap()).await.unwrap_err()
        );
        assert!(
            e.contains("after 1 complete accounts") && e.contains("b@x"),
            "{e}"
        );
        assert!(st.accounts.get(&j("a@x")).await.unwrap().is_some());
        assert_eq!(st.roster.version(&j("a@x")).await.unwrap(), 1);
        assert!(
            !st.restore.owns_anything(&j("b@x")).await.unwrap(),
            "b was undone"
        );
    }

    /// The example in docs/export-format.md imports, and exports back to the same text.
    #[tokio::test]
    async fn documented_example_round_trips() {
        let doc = include_str!("../../docs/export-format.md");
        let example = &doc[doc.find("## Example").unwrap()..];
        let start = example.find("<?xml").unwrap();
        let end = start + example[start..].find("```").unwrap();
        let example = &example[start..end];
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("example.xml");
        std::fs::write(&file, example).unwrap();
        let s = Arc::new(SledStore::open(&d.path().join("data"), 1 << 24).unwrap());
        let st = stores_of(s);
        let lines = import(&ctx(&st), file.to_str().unwrap()).await.unwrap();
        assert!(
            lines[0].starts_with("imported 1 accounts on 1 hosts (capulet.lit): 3 roster items, 2 offline messages, 2 archived messages, 1 push registrations"),
            "{lines:?}"
        );
        assert!(lines
            .iter()
            .any(|l| l.contains("capulet.lit is not among the served domains")));
        let mut out = Vec::new();
        write_export(&st, &mut out).await.unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), example);
    }

    #[test]
    fn stamps() {
        for (s, us) in [
            ("1970-01-01T00:00:00Z", 0u64),
            ("2023-11-14T22:13:20.000001Z", 1_700_000_000_000_001),
            ("2000-02-29T12:00:00.5+01:00", 951_822_000_500_000),
        ] {
            assert_eq!(parse_stamp(s), Some(us), "{s}");
        }
        for us in [
            0u64,
            1,
            951_825_600_123_456,
            4_102_444_800_000_000,
            253_402_300_799_999_999,
        ] {
            assert_eq!(parse_stamp(&stamp_micros(us)), Some(us));
        }
        assert_eq!(
            parse_stamp(&format_stamp(u64::MAX / 1_000_000, None)),
            Some(u64::MAX / 1_000_000 * 1_000_000)
        );
        for secs in [0, 1_700_000_000, u64::MAX] {
            assert_eq!(parse_stamp_secs(&format_stamp(secs, None)), Some(secs));
        }
        assert_eq!(
            parse_stamp("1469-07-21T00:32:29Z"),
            None,
            "before the epoch"
        );
        assert_eq!(parse_stamp("2020-13-01T00:00:00Z"), None);
    }
}
