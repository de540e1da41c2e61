//! Server side of SASL PLAIN (RFC 4616): parsing the message, and checking the password
//! against the SCRAM credentials of [`crate::sasl::scram`].
//!
//! Written here rather than taken from the `sasl` crate because the check has to run
//! against StoredKey: accounts keep only SCRAM credentials (RFC 5802 §3), never a password
//! or a hash of their own for PLAIN, so PLAIN recomputes StoredKey from the presented
//! password. Whether PLAIN is offered at all (only over TLS) is the caller's decision.

use std::fmt;

use subtle::ConstantTimeEq;

use crate::sasl::scram::{self, Hash, SaslError, StoredCredentials};

/// A parsed PLAIN message.
#[derive(Clone, PartialEq, Eq)]
pub struct PlainCredentials {
    /// Authorization identity, None when the client left it empty; unprepared, since it is
    /// a JID and JIDs have their own preparation.
    pub authzid: Option<String>,
    /// Authentication identity, SASLprep'd and never empty.
    pub authcid: String,
    /// SASLprep'd and never empty.
    pub password: String,
}

impl fmt::Debug for PlainCredentials {
    // The password must not reach a log through a `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlainCredentials")
            .field("authzid", &self.authzid)
            .field("authcid", &self.authcid)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Parses a PLAIN message `[authzid] NUL authcid NUL passwd`; SASLprep is applied to
/// authcid and password (RFC 4616 §2).
pub fn parse(msg: &[u8]) -> Result<PlainCredentials, SaslError> {
    let msg = std::str::from_utf8(msg).map_err(|_| SaslError::Malformed("not UTF-8"))?;
    let mut parts = msg.split('\0');
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed(
            "expected [authzid] NUL authcid NUL password",
        ));
    };
    // RFC 4616 §2 makes both 1*SAFE; an empty one is a syntax error, not a wrong password.
    if authcid.is_empty() {
        return Err(SaslError::Malformed("empty authcid"));
    }
    if password.is_empty() {
        return Err(SaslError::Malformed("empty password"));
    }
    let authcid = scram::saslprep(authcid)?;
    let password = scram::saslprep(password)?;
    if authcid.is_empty() || password.is_empty() {
        return Err(SaslError::Prep("string maps to nothing under SASLprep"));
    }
    Ok(PlainCredentials {
        authzid: (!authzid.is_empty()).then(|| authzid.to_owned()),
        authcid,
        password,
    })
}

/// Checks a password against stored SCRAM credentials: SaltedPassword, ClientKey and
/// StoredKey are recomputed with the stored salt and iterations and compared in constant
/// time. SASLprep is applied, as [`scram::derive()`] does, so a password prepared by
/// [`parse`] and a raw one verify alike.
///
/// For an unknown user, verify against [`scram::fake_credentials`] so that the reply takes
/// as long as for a wrong password.
pub fn verify(hash: Hash, stored: &StoredCredentials, password: &str) -> bool {
    let Ok(prepared) = scram::saslprep(password) else {
        return false;
    };
    if prepared.is_empty() {
        return false;
    }
    let computed = scram::derive_prepared(hash, &prepared, &stored.salt, stored.iterations);
    computed.stored_key.ct_eq(&stored.stored_key).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(hash: Hash, password: &str) -> StoredCredentials {
        scram::derive(hash, password, b"plain-test-salt!", 4096).expect("valid parameters")
    }

    #[test]
    fn parse_without_authzid() {
        let c = parse(b"\0juliet\0r0m30").unwrap();
        assert_eq!(c.authzid, None);
        assert_eq!(c.authcid, "juliet");
        assert_eq!(c.password, "r0m30");
    }

    #[test]
    fn parse_with_authzid() {
        let c = parse(b"juliet@example.com\0juliet\0r0m30").unwrap();
        assert_eq!(c.authzid.as_deref(), Some("juliet@example.com"));
        assert_eq!(c.authcid, "juliet");
        assert_eq!(c.password, "r0m30");
    }

    #[test]
    fn parse_applies_saslprep() {
        // U+00AD maps to nothing, U+00A0 to a space, U+2168 (ROMAN NUMERAL NINE) to "IX".
        let c = parse("\0I\u{ad}X\0pass\u{a0}word\u{2168}".as_bytes()).unwrap();
        assert_eq!(c.authcid, "IX");
        assert_eq!(c.password, "pass wordIX");
    }

    #[test]
    fn parse_nul_handling() {
        for msg in [
            &b""[..],
            b"juliet",
            b"juliet\0r0m30",
            b"\0juliet\0r0m30\0",
            b"a\0juliet\0r0\0m30",
            b"\0\0r0m30",
            b"\0\0",
            b"\0\0\0",
        ] {
            let err = parse(msg).unwrap_err();
            assert_eq!(err.condition(), "malformed-request", "{msg:?}");
        }
    }

    #[test]
    fn parse_rejects_empty_password() {
        assert_eq!(
            parse(b"\0juliet\0").unwrap_err(),
            SaslError::Malformed("empty password")
        );
        // A password that SASLprep maps to nothing is empty too.
        let err = parse("\0juliet\0\u{ad}".as_bytes()).unwrap_err();
        assert_eq!(err.condition(), "malformed-request");
    }

    #[test]
    fn parse_rejects_prohibited_and_non_utf8() {
        for msg in [
            &b"\0juliet\0pass\x07word"[..],
            b"\0jul\xffiet\0r0m30",
            b"\0juliet\0\xc3",
        ] {
            let err = parse(msg).unwrap_err();
            assert_eq!(err.condition(), "malformed-request", "{msg:?}");
        }
    }

    #[test]
    fn debug_hides_password() {
        let c = parse(b"\0juliet\0r0m30").unwrap();
        assert!(!format!("{c:?}").contains("r0m30"));
    }

    #[test]
    fn verify_right_and_wrong() {
        for hash in Hash::all() {
            let stored = creds(hash, "r0m30myr0m30");
            assert!(verify(hash, &stored, "r0m30myr0m30"), "{hash:?}");
            assert!(!verify(hash, &stored, "r0m30myr0m3"), "{hash:?}");
            assert!(!verify(hash, &stored, ""), "{hash:?}");
        }
        // Credentials of another hash never verify.
        let stored = creds(Hash::Sha256, "r0m30myr0m30");
        assert!(!verify(Hash::Sha1, &stored, "r0m30myr0m30"));
    }

    #[test]
    fn verify_prepares_like_derive() {
        let stored = creds(Hash::Sha256, "pass\u{a0}word");
        assert!(verify(Hash::Sha256, &stored, "pass word"));
        let parsed = parse("\0juliet\0pass\u{a0}word".as_bytes()).unwrap();
        assert!(verify(Hash::Sha256, &stored, &parsed.password));
        assert!(!verify(Hash::Sha256, &stored, "pass\u{7}word"));
    }

    #[test]
    fn verify_matches_rfc_5802_credentials() {
        // StoredKey of "pencil" with the RFC 5802 §5 salt, as derived by the SCRAM code.
        use base64::Engine;
        let salt = base64::engine::general_purpose::STANDARD
            .decode("QSXCR+Q6sek8bf92")
            .unwrap();
        let stored = scram::derive(Hash::Sha1, "pencil", &salt, 4096).unwrap();
        assert!(verify(Hash::Sha1, &stored, "pencil"));
        assert!(!verify(Hash::Sha1, &stored, "Pencil"));
    }

    #[test]
    fn verify_fails_against_fake_credentials() {
        let fake = scram::fake_credentials(Hash::Sha256, b"server secret", "nobody", 4096);
        assert!(!verify(Hash::Sha256, &fake, "anything"));
        assert!(!verify(Hash::Sha256, &fake, ""));
    }
}
