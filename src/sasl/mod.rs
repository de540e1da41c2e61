//! SASL (RFC 6120 §6): SCRAM-SHA-1/256/512 with and without -PLUS, and PLAIN.
//!
//! Hand-written on the RustCrypto primitives because the `sasl` crate's server side rejects
//! `n,,` clients and knows only `tls-unique`, which rustls cannot provide (see scram.rs).

pub mod plain;
pub mod scram;

use std::collections::BTreeMap;

use crate::store::Account;
use scram::{ChannelBindings, Hash};

/// The mechanisms to offer on a stream, strongest first.
pub fn mechanisms(cb: &ChannelBindings, allow_plain: bool) -> Vec<&'static str> {
    let mut out = Vec::new();
    let plus = cb.offers_plus();
    for h in [Hash::Sha512, Hash::Sha256, Hash::Sha1] {
        if plus {
            out.push(h.mechanism(true));
        }
        out.push(h.mechanism(false));
    }
    if allow_plain && cb.tls {
        out.push("PLAIN");
    }
    out
}

/// The channel-binding types to advertise (XEP-0440).
pub fn binding_types(cb: &ChannelBindings) -> Vec<&'static str> {
    cb.types()
}

/// Derives the stored credentials for every hash from a password (SASLprep applied).
pub fn new_account(password: &str, iterations: u32) -> Result<Account, scram::SaslError> {
    let mut scram = BTreeMap::new();
    for h in Hash::all() {
        let salt = scram::generate_salt();
        scram.insert(
            h.mechanism(false).to_string(),
            scram::derive(h, password, &salt, iterations)?,
        );
    }
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Account { scram, created })
}
