//! The message archive (XEP-0313) on sled, as the ordered index `ArchiveStore` describes; the
//! query semantics are the `mam` module's.
//!
//! Layout (see trees.rs): messages keyed `owner \0 ts_be seq_be`, so a page is one range scan;
//! a per-contact index keyed `owner \0 with \0 ts_be seq_be`. Both rows carry running values
//! (the row's ordinal in the owner's archive, resp. in the conversation, and the running total
//! of stored bytes), so a count is `last − first + 1` from two O(log n) lookups at the ends of
//! a range: no counter row is read-modified-written per message and no scan ever counts. That
//! holds because rows are only ever appended at the end (an owner's appends are serialised and
//! never go back in time) and removed from the front (retention) or all at once (account
//! removal).
//!
//! Appends are plain inserts, no sled transaction (which cost 3x in throughput and disk, see
//! the README's performance section): the index row is written before the message row, so a
//! crash between the two leaves at most an index row pointing nowhere, which scans skip.
//! Stable ids carry the message's key and a random part, so looking one up needs no id index;
//! only ids imported from another server's export are mapped in `archive_ids`.
//!
//! Stanzas are stored compressed with LZ4 against a fixed dictionary of XMPP boilerplate: on
//! ~250-byte chat messages that halves the stored bytes for ~1 µs per message.

use async_trait::async_trait;
use base64::Engine;
use halyard_xep::host::{
    ArchiveKey, ArchivePrefs, ArchiveStore, ArchivedMessage, KeyRange, StoreError, StoreResult,
};
use jid::{BareJid, Jid};
use rand::RngCore;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use super::trees;
use super::{err, u64_at};

/// Appends to one owner's archive run one at a time (their running values and key order depend
/// on the previous row); owners are spread over this many locks.
const STRIPES: usize = 64;
/// Owners whose archive tail a stripe remembers (64k in all), and conversations per owner; past
/// either, the stripe (or the owner's conversations) starts over, reading tails from the store.
const TAILS_PER_STRIPE: usize = 1024;
const CONVERSATIONS_PER_TAIL: usize = 64;

/// What the next row of an owner's archive needs from the previous ones. Reading it from the
/// store takes a reverse scan per tree (sled's `next_back` walks from the root and was a fifth
/// of the server's CPU at chat saturation), so the owner's lock keeps it once read.
struct Tail {
    /// The next row's ordinal, the bytes stored so far, and the last row's key.
    ord: u64,
    cum: u64,
    last_key: Option<ArchiveKey>,
    /// The next index row's ordinal per conversation.
    with: HashMap<Box<str>, u64>,
}

/// One lock's worth of owners: serialises their appends and remembers their tails.
#[derive(Default)]
pub(crate) struct Stripe {
    tails: HashMap<Box<str>, Tail>,
}

impl Stripe {
    /// Forgets what was remembered of `owner`'s archive (after writes other than appends).
    pub(crate) fn forget(&mut self, owner: &BareJid) {
        self.tails.remove(owner.as_str());
    }
}

pub struct SledArchive {
    pub(crate) db: sled::Db,
    pub(crate) messages: sled::Tree,
    pub(crate) by_with: sled::Tree,
    pub(crate) ids: sled::Tree,
    pub(crate) prefs: sled::Tree,
    stripes: Vec<Mutex<Stripe>>,
}

pub(crate) fn key_bytes(k: ArchiveKey) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&k.ts_micros.to_be_bytes());
    out[8..].copy_from_slice(&k.seq.to_be_bytes());
    out
}

fn key_from(b: &[u8]) -> ArchiveKey {
    ArchiveKey {
        ts_micros: u64_at(b, 0),
        seq: u64_at(b, 8),
    }
}

/// `prefix ‖ key`.
pub(crate) fn with_key(prefix: &[u8], k: ArchiveKey) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(&key_bytes(k));
    v
}

/// `owner \0 with \0`.
pub(crate) fn with_prefix(owner: &BareJid, with: &str) -> Vec<u8> {
    let mut p = trees::owner_key(owner.as_str(), with);
    p.push(0);
    p
}

/// The dictionary stored stanzas are compressed against (format 1). Never change it: rows
/// written with it must stay readable. A better one gets a new format byte.
const DICT_V1: &[u8] = b"<message xmlns='jabber:client' type='chat' from='@/' to='@' id='>\
<body></body><origin-id xmlns='urn:xmpp:sid:0' id='/><stanza-id xmlns='urn:xmpp:sid:0' by='\
<request xmlns='urn:xmpp:receipts'/><received xmlns='urn:xmpp:receipts' id='\
<markable xmlns='urn:xmpp:chat-markers:0'/><displayed xmlns='urn:xmpp:chat-markers:0' id='\
<active xmlns='http://jabber.org/protocol/chatstates'/><store xmlns='urn:xmpp:hints'/>\
<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='<key rid='<iv></iv><payload>\
<x xmlns='jabber:x:oob'><url>https://</url></x><replace xmlns='urn:xmpp:message-correct:0' id='\
<encryption xmlns='urn:xmpp:eme:0' namespace='</message>";

const STANZA_PLAIN: u8 = 0;
const STANZA_LZ4_DICT_V1: u8 = 1;

/// Stable id length for ids we issue: `ts ‖ seq ‖ 6 random bytes`, base64url (30 chars).
const OWN_ID_RAW: usize = 22;

fn own_id(key: ArchiveKey, random: &[u8; 6]) -> String {
    let mut raw = [0u8; OWN_ID_RAW];
    raw[..16].copy_from_slice(&key_bytes(key));
    raw[16..].copy_from_slice(random);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

/// The key and random part of an id we issued; `None` for anything else (an imported id).
fn parse_own_id(id: &str) -> Option<(ArchiveKey, [u8; 6])> {
    if id.len() != 30 {
        return None;
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(id)
        .ok()?;
    let random: [u8; 6] = raw.get(16..OWN_ID_RAW)?.try_into().ok()?;
    Some((key_from(&raw), random))
}

/// Where a row's stable id comes from.
enum RowId<'a> {
    /// Issued by us: the id is the key plus these random bytes.
    Own([u8; 6]),
    /// Imported as is.
    Foreign(&'a str),
}

/// A message row's value:
/// `ord u64 ‖ cum_bytes u64 ‖ id_kind u8 ‖ (6 random bytes | id_len u8 ‖ id) ‖ with_len u16 ‖
/// with ‖ format u8 ‖ stanza`, where `cum_bytes` counts this row's value too.
fn encode(ord: u64, prev_cum: u64, id: &RowId, with: &str, stanza: &str) -> Vec<u8> {
    let mut packed = None;
    if stanza.len() > 32 {
        let c = lz4_flex::block::compress_with_dict(stanza.as_bytes(), DICT_V1);
        if c.len() + 4 < stanza.len() {
            packed = Some(c);
        }
    }
    let body: &[u8] = packed.as_deref().unwrap_or(stanza.as_bytes());
    let mut v = Vec::with_capacity(40 + with.len() + body.len());
    v.extend_from_slice(&ord.to_be_bytes());
    v.extend_from_slice(&[0; 8]);
    match id {
        RowId::Own(r) => {
            v.push(0);
            v.extend_from_slice(r);
        }
        RowId::Foreign(s) => {
            v.push(1);
            v.push(s.len() as u8);
            v.extend_from_slice(s.as_bytes());
        }
    }
    v.extend_from_slice(&(with.len() as u16).to_be_bytes());
    v.extend_from_slice(with.as_bytes());
    match &packed {
        Some(_) => {
            // The uncompressed length, so decompression allocates once.
            v.push(STANZA_LZ4_DICT_V1);
            v.extend_from_slice(&(stanza.len() as u32).to_be_bytes());
        }
        None => v.push(STANZA_PLAIN),
    }
    v.extend_from_slice(body);
    let cum = prev_cum + v.len() as u64;
    v[8..16].copy_from_slice(&cum.to_be_bytes());
    v
}

/// The parts of a message row.
pub(crate) struct Row {
    pub ord: u64,
    pub cum: u64,
    pub len: u64,
    pub id: String,
    pub random: Option<[u8; 6]>,
    pub with: String,
    pub stanza: String,
}

fn decode(key: ArchiveKey, v: &[u8]) -> Option<Row> {
    let ord = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let cum = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    let mut at = 16;
    let (id, random) = match *v.get(at)? {
        0 => {
            let r: [u8; 6] = v.get(at + 1..at + 7)?.try_into().ok()?;
            at += 7;
            (own_id(key, &r), Some(r))
        }
        1 => {
            let n = *v.get(at + 1)? as usize;
            let s = std::str::from_utf8(v.get(at + 2..at + 2 + n)?).ok()?;
            at += 2 + n;
            (s.to_string(), None)
        }
        _ => return None,
    };
    let with_len = u16::from_be_bytes(v.get(at..at + 2)?.try_into().ok()?) as usize;
    let with = std::str::from_utf8(v.get(at + 2..at + 2 + with_len)?).ok()?;
    at += 2 + with_len;
    let stanza = match *v.get(at)? {
        STANZA_PLAIN => std::str::from_utf8(v.get(at + 1..)?).ok()?.to_string(),
        STANZA_LZ4_DICT_V1 => {
            let n = u32::from_be_bytes(v.get(at + 1..at + 5)?.try_into().ok()?) as usize;
            let raw = lz4_flex::block::decompress_with_dict(v.get(at + 5..)?, n, DICT_V1).ok()?;
            String::from_utf8(raw).ok()?
        }
        _ => return None,
    };
    Some(Row {
        ord,
        cum,
        len: v.len() as u64,
        id,
        random,
        with: with.to_string(),
        stanza,
    })
}

fn to_message(key: ArchiveKey, row: Row) -> ArchivedMessage {
    ArchivedMessage {
        id: row.id,
        ts_micros: key.ts_micros,
        with: row.with,
        stanza: row.stanza,
    }
}

/// The `ord` (first 8 bytes) of a row's value, or of an index row's value.
fn ord_of(v: &[u8]) -> u64 {
    u64_at(v, 0)
}

fn random_bytes() -> [u8; 6] {
    let mut r = [0u8; 6];
    rand::thread_rng().fill_bytes(&mut r);
    r
}

/// The running values a restored row gets from the export, or fresh ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// Ordinal in the owner's archive.
    pub ord: u64,
    /// Ordinal in the conversation with `with`.
    pub with_ord: u64,
    /// Stored bytes of the owner's archive up to the row before this one.
    pub prev_cum: u64,
}

impl SledArchive {
    pub fn open(db: &sled::Db) -> anyhow::Result<SledArchive> {
        Ok(SledArchive {
            db: db.clone(),
            messages: db.open_tree(trees::ARCHIVE)?,
            by_with: db.open_tree(trees::ARCHIVE_WITH)?,
            ids: db.open_tree(trees::ARCHIVE_IDS)?,
            prefs: db.open_tree(trees::ARCHIVE_PREFS)?,
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(Stripe::default()))
                .collect(),
        })
    }

    /// Serialises the writers of one owner's archive.
    pub(crate) fn lock(&self, owner: &BareJid) -> MutexGuard<'_, Stripe> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        owner.as_str().hash(&mut h);
        let m = &self.stripes[(h.finish() as usize) % STRIPES];
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last row under `prefix` in `tree`: its key suffix and value.
    fn last(tree: &sled::Tree, prefix: &[u8]) -> StoreResult<Option<(sled::IVec, sled::IVec)>> {
        tree.scan_prefix(prefix)
            .next_back()
            .transpose()
            .map_err(err("reading the end of the archive"))
    }

    fn first(tree: &sled::Tree, prefix: &[u8]) -> StoreResult<Option<(sled::IVec, sled::IVec)>> {
        tree.scan_prefix(prefix)
            .next()
            .transpose()
            .map_err(err("reading the start of the archive"))
    }

    /// The running values the next row of `owner`'s archive (with `with`) gets, and the
    /// smallest key it may have (appends never go back in time). Call with the owner's lock.
    pub(crate) fn next_running(
        &self,
        stripe: &mut Stripe,
        owner: &BareJid,
        with: &str,
    ) -> StoreResult<(Running, Option<ArchiveKey>)> {
        if !stripe.tails.contains_key(owner.as_str()) {
            let prefix = trees::owner_prefix(owner.as_str());
            let tail = match Self::last(&self.messages, &prefix)? {
                Some((k, v)) => Tail {
                    ord: ord_of(&v) + 1,
                    cum: u64_at(&v, 8),
                    last_key: Some(key_from(&k[prefix.len()..])),
                    with: HashMap::new(),
                },
                None => Tail {
                    ord: 0,
                    cum: 0,
                    last_key: None,
                    with: HashMap::new(),
                },
            };
            if stripe.tails.len() >= TAILS_PER_STRIPE {
                stripe.tails.clear();
            }
            stripe.tails.insert(owner.as_str().into(), tail);
        }
        let Some(tail) = stripe.tails.get_mut(owner.as_str()) else {
            return Err(StoreError {
                context: "reading the end of the archive".into(),
                source: "the archive tail just read is missing".into(),
            });
        };
        let with_ord = match tail.with.get(with) {
            Some(n) => *n,
            None => {
                let n = match Self::last(&self.by_with, &with_prefix(owner, with))? {
                    Some((_, v)) => ord_of(&v) + 1,
                    None => 0,
                };
                if tail.with.len() >= CONVERSATIONS_PER_TAIL {
                    tail.with.clear();
                }
                tail.with.insert(with.into(), n);
                n
            }
        };
        Ok((
            Running {
                ord: tail.ord,
                with_ord,
                prev_cum: tail.cum,
            },
            tail.last_key,
        ))
    }

    /// Writes one message's rows (index first, see the module comment) and returns the bytes
    /// stored up to and including it. Call with the owner's lock.
    pub(crate) fn write_rows(
        &self,
        owner: &BareJid,
        key: ArchiveKey,
        id: &str,
        with: &str,
        stanza: &str,
        run: Running,
    ) -> StoreResult<u64> {
        let own = parse_own_id(id).filter(|(k, _)| *k == key);
        let row_id = match &own {
            Some((_, r)) => RowId::Own(*r),
            None => RowId::Foreign(id),
        };
        let value = encode(run.ord, run.prev_cum, &row_id, with, stanza);
        let cum = u64_at(&value, 8);
        self.by_with
            .insert(
                with_key(&with_prefix(owner, with), key),
                &run.with_ord.to_be_bytes(),
            )
            .map_err(err("writing the archive's contact index"))?;
        if own.is_none() {
            self.ids
                .insert(trees::owner_key(owner.as_str(), id), &key_bytes(key))
                .map_err(err("writing an imported archive id"))?;
        }
        self.messages
            .insert(with_key(&trees::owner_prefix(owner.as_str()), key), value)
            .map_err(err("writing an archived message"))?;
        Ok(cum)
    }

    /// The running values stored with a message (for an exact export).
    pub(crate) fn running(&self, owner: &BareJid, key: ArchiveKey) -> StoreResult<Option<Running>> {
        let prefix = trees::owner_prefix(owner.as_str());
        let Some(v) = self
            .messages
            .get(with_key(&prefix, key))
            .map_err(err("reading an archived message"))?
        else {
            return Ok(None);
        };
        let Some(row) = decode(key, &v) else {
            return Ok(None);
        };
        let with_ord = self
            .by_with
            .get(with_key(&with_prefix(owner, &row.with), key))
            .map_err(err("reading the archive's contact index"))?
            .map(|v| ord_of(&v))
            .unwrap_or(0);
        Ok(Some(Running {
            ord: row.ord,
            with_ord,
            prev_cum: row.cum - row.len,
        }))
    }

    /// Removes one message and its index rows (index first: a crash in between leaves a
    /// message that the next prune removes, never an index row in the middle).
    fn delete(&self, owner: &BareJid, key: ArchiveKey, value: &[u8]) -> StoreResult<()> {
        let Some(row) = decode(key, value) else {
            return Ok(());
        };
        self.by_with
            .remove(with_key(&with_prefix(owner, &row.with), key))
            .map_err(err("removing an archive index row"))?;
        if row.random.is_none() {
            self.ids
                .remove(trees::owner_key(owner.as_str(), &row.id))
                .map_err(err("removing an imported archive id"))?;
        }
        self.messages
            .remove(with_key(&trees::owner_prefix(owner.as_str()), key))
            .map_err(err("removing an archived message"))?;
        Ok(())
    }

    /// Removes everything `owner` has archived, and its preferences (account removal).
    pub fn remove_owner(&self, owner: &BareJid) -> StoreResult<()> {
        let prefix = trees::owner_prefix(owner.as_str());
        let mut stripe = self.lock(owner);
        stripe.forget(owner);
        for tree in [&self.by_with, &self.ids, &self.messages] {
            let mut batch = sled::Batch::default();
            for kv in tree.scan_prefix(&prefix) {
                batch.remove(kv.map_err(err("scanning archive for removal"))?.0);
            }
            tree.apply_batch(batch)
                .map_err(err("removing archive rows"))?;
        }
        self.prefs
            .remove(owner.as_str())
            .map_err(err("removing archive preferences"))?;
        Ok(())
    }

    /// Where the message with stable id `id` is, if `owner`'s archive has it.
    pub(crate) fn find_id(&self, owner: &BareJid, id: &str) -> StoreResult<Option<ArchiveKey>> {
        if let Some((key, random)) = parse_own_id(id) {
            let prefix = trees::owner_prefix(owner.as_str());
            if let Some(v) = self
                .messages
                .get(with_key(&prefix, key))
                .map_err(err("looking up an archive id"))?
            {
                if decode(key, &v).and_then(|r| r.random) == Some(random) {
                    return Ok(Some(key));
                }
            }
        }
        Ok(self
            .ids
            .get(trees::owner_key(owner.as_str(), id))
            .map_err(err("looking up an archive id"))?
            .map(|v| key_from(&v)))
    }

    /// Whether `owner`'s archive has a row under `key`.
    pub(crate) fn has_key(&self, owner: &BareJid, key: ArchiveKey) -> StoreResult<bool> {
        self.messages
            .contains_key(with_key(&trees::owner_prefix(owner.as_str()), key))
            .map_err(err("reading an archived message"))
    }

    /// Owners with a non-empty archive, seeking from one owner's rows to the next.
    fn owners(&self) -> StoreResult<Vec<BareJid>> {
        let mut out = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        while let Some(k) = self.messages.range(from.clone()..).keys().next() {
            let k = k.map_err(err("listing archive owners"))?;
            let nul = k.iter().position(|&b| b == 0).unwrap_or(k.len());
            if let Ok(j) = BareJid::new(&String::from_utf8_lossy(&k[..nul])) {
                out.push(j);
            }
            from = k[..nul].to_vec();
            from.push(1);
        }
        Ok(out)
    }

    /// The ordinals of the first and last row under `prefix`.
    fn span(tree: &sled::Tree, prefix: &[u8]) -> StoreResult<Option<(u64, u64)>> {
        let (Some((_, first)), Some((_, last))) =
            (Self::first(tree, prefix)?, Self::last(tree, prefix)?)
        else {
            return Ok(None);
        };
        Ok(Some((ord_of(&first), ord_of(&last))))
    }
}

#[async_trait]
impl ArchiveStore for SledArchive {
    async fn append(
        &self,
        owner: &BareJid,
        with: &Jid,
        ts_micros: u64,
        stanza: &str,
    ) -> StoreResult<String> {
        let with = with.to_bare();
        if with.as_str().len() > u16::MAX as usize {
            return Err(StoreError {
                context: "appending to the archive".into(),
                source: "the other party's JID is longer than 65535 bytes".into(),
            });
        }
        let mut stripe = self.lock(owner);
        let (run, last_key) = self.next_running(&mut stripe, owner, with.as_str())?;
        let seq = self
            .db
            .generate_id()
            .map_err(err("allocating an archive key"))?;
        // Never before the last row: a clock stepping back must not reorder the archive.
        let ts_micros = last_key.map_or(ts_micros, |k| ts_micros.max(k.ts_micros));
        let key = ArchiveKey { ts_micros, seq };
        let id = own_id(key, &random_bytes());
        match self.write_rows(owner, key, &id, with.as_str(), stanza, run) {
            Ok(cum) => {
                if let Some(tail) = stripe.tails.get_mut(owner.as_str()) {
                    tail.ord = run.ord + 1;
                    tail.cum = cum;
                    tail.last_key = Some(key);
                    tail.with.insert(with.as_str().into(), run.with_ord + 1);
                }
            }
            Err(e) => {
                // Part of the rows may be written: read the tail from the store next time.
                stripe.forget(owner);
                return Err(e);
            }
        }
        Ok(id)
    }

    async fn scan(
        &self,
        owner: &BareJid,
        with: Option<&BareJid>,
        range: KeyRange,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Vec<(ArchiveKey, ArchivedMessage)>> {
        let prefix = match with {
            Some(w) => with_prefix(owner, w.as_str()),
            None => trees::owner_prefix(owner.as_str()),
        };
        // Exclusive bounds: the key just after `after`, up to (not including) `before`.
        let lo = match range.after {
            Some(k) => {
                let mut v = with_key(&prefix, k);
                v.push(0);
                v
            }
            None => prefix.clone(),
        };
        let hi = match range.before {
            Some(k) => with_key(&prefix, k),
            None => {
                let mut v = prefix.clone();
                v.extend_from_slice(&[0xff; 17]);
                v
            }
        };
        if lo >= hi {
            return Ok(Vec::new());
        }
        let tree = if with.is_some() {
            &self.by_with
        } else {
            &self.messages
        };
        let iter = tree.range(lo..hi);
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if reverse {
            Box::new(iter.rev())
        } else {
            Box::new(iter)
        };
        let owner_prefix = trees::owner_prefix(owner.as_str());
        let mut out = Vec::with_capacity(limit.min(1024));
        for kv in iter {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv.map_err(err("scanning the archive"))?;
            let key = key_from(&k[prefix.len()..]);
            let value = if with.is_some() {
                match self
                    .messages
                    .get(with_key(&owner_prefix, key))
                    .map_err(err("reading an archived message"))?
                {
                    Some(v) => v,
                    // An index row whose message a crash kept from being written.
                    None => continue,
                }
            } else {
                v
            };
            if let Some(row) = decode(key, &value) {
                out.push((key, to_message(key, row)));
            }
        }
        Ok(out)
    }

    async fn locate(&self, owner: &BareJid, id: &str) -> StoreResult<Option<ArchiveKey>> {
        self.find_id(owner, id)
    }

    async fn get(&self, owner: &BareJid, key: ArchiveKey) -> StoreResult<Option<ArchivedMessage>> {
        let prefix = trees::owner_prefix(owner.as_str());
        Ok(self
            .messages
            .get(with_key(&prefix, key))
            .map_err(err("reading an archived message"))?
            .and_then(|v| decode(key, &v))
            .map(|row| to_message(key, row)))
    }

    async fn count(&self, owner: &BareJid, with: Option<&BareJid>) -> StoreResult<u64> {
        let span = match with {
            Some(w) => Self::span(&self.by_with, &with_prefix(owner, w.as_str()))?,
            None => Self::span(&self.messages, &trees::owner_prefix(owner.as_str()))?,
        };
        Ok(span.map_or(0, |(first, last)| last.saturating_sub(first) + 1))
    }

    async fn prefs(&self, owner: &BareJid) -> StoreResult<ArchivePrefs> {
        match self
            .prefs
            .get(owner.as_str())
            .map_err(err("reading archive preferences"))?
        {
            Some(v) => serde_json::from_slice(&v).map_err(|e| StoreError {
                context: "decoding archive preferences".into(),
                source: Box::new(e),
            }),
            None => Ok(ArchivePrefs::default()),
        }
    }

    async fn set_prefs(&self, owner: &BareJid, prefs: &ArchivePrefs) -> StoreResult<()> {
        let v = serde_json::to_vec(prefs).map_err(|e| StoreError {
            context: "encoding archive preferences".into(),
            source: Box::new(e),
        })?;
        self.prefs
            .insert(owner.as_str(), v)
            .map_err(err("writing archive preferences"))?;
        super::flush_tree(&self.db)
            .await
            .map_err(err("flushing archive preferences"))?;
        Ok(())
    }

    async fn size(&self, owner: &BareJid) -> StoreResult<(u64, u64)> {
        let prefix = trees::owner_prefix(owner.as_str());
        let (Some((_, first)), Some((_, last))) = (
            Self::first(&self.messages, &prefix)?,
            Self::last(&self.messages, &prefix)?,
        ) else {
            return Ok((0, 0));
        };
        let first_len = first.len() as u64;
        let count = ord_of(&last).saturating_sub(ord_of(&first)) + 1;
        let bytes = u64_at(&last, 8).saturating_sub(u64_at(&first, 8)) + first_len;
        Ok((count, bytes))
    }

    async fn prune(&self, owner: Option<&BareJid>, before_micros: u64) -> StoreResult<u64> {
        let owners = match owner {
            Some(o) => vec![o.clone()],
            None => self.owners()?,
        };
        let mut removed = 0;
        for owner in owners {
            let prefix = trees::owner_prefix(owner.as_str());
            let hi = with_key(
                &prefix,
                ArchiveKey {
                    ts_micros: before_micros,
                    seq: 0,
                },
            );
            // Collected first (bounded batches), deleted after, so no iterator spans the writes.
            loop {
                let batch: Vec<(ArchiveKey, sled::IVec)> = self
                    .messages
                    .range(prefix.clone()..hi.clone())
                    .take(1000)
                    .map(|kv| kv.map(|(k, v)| (key_from(&k[prefix.len()..]), v)))
                    .collect::<Result<_, _>>()
                    .map_err(err("scanning for expired archive entries"))?;
                if batch.is_empty() {
                    break;
                }
                for (key, value) in &batch {
                    self.delete(&owner, *key, value)?;
                    removed += 1;
                }
                // Yield between batches so delivery is never stalled behind a long prune.
                tokio::task::yield_now().await;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(s: &str) -> BareJid {
        BareJid::new(s).unwrap()
    }

    #[tokio::test]
    async fn append_scan_locate_count_prune() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let a = SledArchive::open(&db).unwrap();
        let (me, b, c) = (j("me@x"), j("b@x"), j("c@x"));
        let mut ids = Vec::new();
        for i in 0..10u64 {
            let with: Jid = if i % 2 == 0 {
                b.clone().into()
            } else {
                c.clone().into()
            };
            ids.push(
                a.append(&me, &with, 1000 + i, &format!("<m n='{i}'/>"))
                    .await
                    .unwrap(),
            );
        }
        a.append(&j("other@x"), &b.clone().into(), 5, "<x/>")
            .await
            .unwrap();
        assert_eq!(a.count(&me, None).await.unwrap(), 10);
        assert_eq!(a.count(&me, Some(&b)).await.unwrap(), 5);
        let all = a
            .scan(&me, None, KeyRange::default(), false, 100)
            .await
            .unwrap();
        assert_eq!(all.len(), 10, "other owners' rows are not included");
        assert_eq!(all[0].1.stanza, "<m n='0'/>");
        let last3 = a
            .scan(&me, None, KeyRange::default(), true, 3)
            .await
            .unwrap();
        assert_eq!(
            last3
                .iter()
                .map(|(_, m)| m.stanza.as_str())
                .collect::<Vec<_>>(),
            vec!["<m n='9'/>", "<m n='8'/>", "<m n='7'/>"]
        );
        let k3 = a.locate(&me, &ids[3]).await.unwrap().unwrap();
        let k7 = a.locate(&me, &ids[7]).await.unwrap().unwrap();
        let mid = a
            .scan(
                &me,
                None,
                KeyRange {
                    after: Some(k3),
                    before: Some(k7),
                },
                false,
                100,
            )
            .await
            .unwrap();
        assert_eq!(mid.len(), 3);
        let withb = a
            .scan(
                &me,
                Some(&b),
                KeyRange {
                    after: Some(k3),
                    before: None,
                },
                false,
                100,
            )
            .await
            .unwrap();
        assert_eq!(
            withb
                .iter()
                .map(|(_, m)| m.stanza.as_str())
                .collect::<Vec<_>>(),
            vec!["<m n='4'/>", "<m n='6'/>", "<m n='8'/>"]
        );
        assert_eq!(a.get(&me, k3).await.unwrap().unwrap().id, ids[3]);
        assert!(a.locate(&me, "nope").await.unwrap().is_none());
        assert_eq!(a.prune(Some(&me), 1005).await.unwrap(), 5);
        assert_eq!(a.count(&me, None).await.unwrap(), 5);
        assert!(a.locate(&me, &ids[0]).await.unwrap().is_none());
        assert_eq!(a.prune(None, u64::MAX).await.unwrap(), 6);
        assert_eq!(a.size(&me).await.unwrap(), (0, 0));
    }

    #[tokio::test]
    async fn rows_compress_ids_locate_and_time_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let a = SledArchive::open(&db).unwrap();
        let (me, b) = (j("me@x"), j("b@x"));
        let long = format!(
            "<message xmlns='jabber:client' type='chat' to='b@x' id='1'><body>{}</body></message>",
            "see you at the station tonight ".repeat(8)
        );
        let id1 = a.append(&me, &b.clone().into(), 500, &long).await.unwrap();
        // The clock stepped back: the row still goes after the last one.
        let id2 = a.append(&me, &b.clone().into(), 100, "<m/>").await.unwrap();
        let k1 = a.locate(&me, &id1).await.unwrap().unwrap();
        let k2 = a.locate(&me, &id2).await.unwrap().unwrap();
        assert!(k2 > k1 && k2.ts_micros == 500);
        let raw = a
            .messages
            .get(with_key(&trees::owner_prefix("me@x"), k1))
            .unwrap()
            .unwrap();
        assert!(
            raw.len() < long.len() / 2,
            "stored compressed: {} bytes",
            raw.len()
        );
        assert_eq!(a.get(&me, k1).await.unwrap().unwrap().stanza, long);
        // A guessed id with the right key but another random part finds nothing.
        let mut forged = id1.clone().into_bytes();
        forged[29] = if forged[29] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(a.locate(&me, &forged).await.unwrap().is_none());
        assert!(a.locate(&j("other@x"), &id1).await.unwrap().is_none());
        // An imported id is mapped, found, and removed with its message.
        let k3 = ArchiveKey {
            ts_micros: 900,
            seq: 10_000,
        };
        {
            let mut g = a.lock(&me);
            let (run, _) = a.next_running(&mut g, &me, "b@x").unwrap();
            assert_eq!((run.ord, run.with_ord), (2, 2));
            g.forget(&me);
            a.write_rows(&me, k3, "their-id-7", "b@x", "<m/>", run)
                .unwrap();
        }
        assert_eq!(a.locate(&me, "their-id-7").await.unwrap(), Some(k3));
        assert_eq!(a.count(&me, Some(&b)).await.unwrap(), 3);
        let (count, bytes) = a.size(&me).await.unwrap();
        let stored: u64 = a.messages.iter().map(|r| r.unwrap().1.len() as u64).sum();
        assert_eq!((count, bytes), (3, stored));
        assert_eq!(a.prune(Some(&me), 600).await.unwrap(), 2);
        assert_eq!(a.count(&me, None).await.unwrap(), 1);
        assert_eq!(a.count(&me, Some(&b)).await.unwrap(), 1);
        assert_eq!(a.prune(Some(&me), 1000).await.unwrap(), 1);
        assert!(a.locate(&me, "their-id-7").await.unwrap().is_none());
        assert!(a.ids.is_empty() && a.by_with.is_empty());
    }
}
