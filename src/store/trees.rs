//! Every sled tree, with its key and value layout. Keys that are scanned by prefix put the owner
//! first, followed by a 0 byte (JIDs cannot contain NUL).

/// Normalised bare JID → JSON [`crate::store::Account`].
pub const ACCOUNTS: &str = "accounts";
/// `owner_bare \0 contact_bare` → JSON [`halyard_xep::host::RosterItem`].
pub const ROSTER: &str = "roster";
/// Owner bare JID → roster version, u64 big-endian (bumped on every roster change).
pub const ROSTER_VERSION: &str = "roster_version";
/// Bare JID → JSON [`halyard_xep::host::LastActivity`] (last logout and status, XEP-0012).
pub const LAST_ACTIVITY: &str = "last_activity";

/// Every tree an account owns rows in, keyed or prefixed by its bare JID (used by removal).
pub const OWNED_BY_ACCOUNT: &[&str] = &[
    ROSTER,
    ROSTER_VERSION,
    LAST_ACTIVITY,
    OFFLINE,
    OFFLINE_META,
    ARCHIVE,
    ARCHIVE_WITH,
    ARCHIVE_IDS,
    ARCHIVE_PREFS,
    PUSH_REGISTRATIONS,
    PUSH_QUEUE,
    PUSH_DUE,
    UPLOADS,
    API_TOKEN_OWNERS,
];

/// `owner \0` — the prefix of an owner's rows in a prefixed tree.
pub fn owner_prefix(owner: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + 1);
    k.extend_from_slice(owner.as_bytes());
    k.push(0);
    k
}

/// `owner \0 item`.
pub fn owner_key(owner: &str, item: &str) -> Vec<u8> {
    let mut k = owner_prefix(owner);
    k.extend_from_slice(item.as_bytes());
    k
}

/// `owner \0 seq_be` → `ts_micros_be ‖ stanza XML` (XEP-0160 offline queue, oldest first).
pub const OFFLINE: &str = "offline";
/// Owner bare JID → `next_seq_be ‖ count_be`.
pub const OFFLINE_META: &str = "offline_meta";

/// `owner \0 ts_be seq_be` → `ord ‖ cum_bytes ‖ id ‖ with ‖ stanza (LZ4)` (XEP-0313; exact
/// layout in archive.rs).
pub const ARCHIVE: &str = "archive";
/// `owner \0 with \0 ts_be seq_be` → `with_ord_be`: the per-contact index of `archive`.
pub const ARCHIVE_WITH: &str = "archive_with";
/// `owner \0 stable_id` → `ts_be seq_be`, only for ids imported from another server (ours
/// carry their key).
pub const ARCHIVE_IDS: &str = "archive_ids";
/// Owner bare JID → JSON `ArchivePrefs`.
pub const ARCHIVE_PREFS: &str = "archive_prefs";

/// `owner \0 service_jid \0 node` → JSON [`halyard_xep::host::PushRegistration`] (XEP-0357).
pub const PUSH_REGISTRATIONS: &str = "push_registrations";
/// `owner \0 service_jid \0 node` → JSON [`halyard_xep::host::PushJob`]: the durable
/// notification queue, one row per registration with something owed or counted.
pub const PUSH_QUEUE: &str = "push_queue";
/// `due_be ‖ owner \0 service_jid \0 node` → empty: `push_queue` by due time. Not prefixed by
/// owner: its entries are removed with their queue rows.
pub const PUSH_DUE: &str = "push_due";
/// `owner \0 device_id` → JSON [`crate::store::appserver::Registration`]: devices registered
/// with the XEP-0357 app server by the account `owner` (bare JID).
pub const APPSERVER_DEVICES: &str = "appserver_devices";
/// Push node → `owner \0 device_id`: the index publishes are looked up by.
pub const APPSERVER_NODES: &str = "appserver_nodes";
/// `owner \0 id` → JSON [`crate::store::upload::Upload`]: XEP-0363 slots and uploaded files
/// (the files themselves are in `<data_dir>/uploads/<id>`).
pub const UPLOADS: &str = "uploads";
/// Upload id → owner bare JID: the index the HTTP routes look ids up by.
pub const UPLOAD_IDS: &str = "upload_ids";
/// `due_be ‖ id` → empty: uploads by the time they expire (slots and files that expire).
pub const UPLOAD_DUE: &str = "upload_due";
/// SHA-256 of an HTTP API bearer token → JSON [`crate::store::tokens::TokenRecord`]. Not
/// prefixed by owner: a user's rows are found through `api_token_owners`.
pub const API_TOKENS: &str = "api_tokens";
/// `owner \0 token_sha256` → empty: the user tokens an account holds (removed with it).
pub const API_TOKEN_OWNERS: &str = "api_token_owners";
