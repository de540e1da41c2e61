//! Server side of the SASL SCRAM mechanisms: SCRAM-SHA-1 (RFC 5802), SCRAM-SHA-256
//! (RFC 7677) and SCRAM-SHA-512, each also as `-PLUS` with the `tls-exporter` (RFC 9266)
//! and `tls-server-end-point` (RFC 5929) channel bindings.
//!
//! Written here rather than taken from the `sasl` crate because that crate's server fails
//! every client that sends `n,,` on a stream without channel binding (it accepts only `y`),
//! and with channel binding it knows only `tls-unique`, which TLS 1.3 does not define
//! (RFC 9266 §1); tokio-xmpp sends `p=tls-exporter,,` on TLS 1.3 and `n,,` otherwise.
//!
//! Only the SCRAM messages are handled here. The XMPP framing (base64 of the whole payload,
//! `<failure/>`), the account store, and which mechanisms to offer stay with the caller, who
//! offers the `-PLUS` variants exactly when [`ChannelBindings::offers_plus`] says so, since
//! the downgrade check for `y,,` relies on that.

use std::fmt;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine};
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Digest;
use subtle::ConstantTimeEq;

/// Lowest iteration count [`derive()`] accepts (RFC 7677 §4 asks for at least 4096).
pub const MIN_ITERATIONS: u32 = 4096;
/// Length of the salts [`generate_salt`] makes, and of the fake salts given for unknown
/// users: the two must be alike or a salt's length would tell whether an account exists.
pub const SALT_LEN: usize = 16;
const SERVER_NONCE_LEN: usize = 24;

/// Decodes the base64 inside SCRAM attributes. Missing padding is accepted: what is decoded
/// is either compared with what we expect or covered by the proof, so strictness would only
/// cost interoperability.
const B64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// An authentication failure, with the RFC 6120 §6.5 condition it is reported as.
///
/// The texts never hold secrets, and a wrong password and an unknown user are both
/// [`SaslError::NotAuthorized`] so that no reply tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// The message breaks the mechanism's grammar.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The payload is not valid base64; for the caller's decoding of the XMPP element, since
    /// base64 errors inside SCRAM attributes are grammar errors ([`SaslError::Malformed`]).
    #[error("incorrect encoding: {0}")]
    IncorrectEncoding(&'static str),
    /// Wrong password or unknown user.
    #[error("authentication failed")]
    NotAuthorized,
    /// The channel-binding flag or data is not acceptable (downgrade, unsupported type,
    /// mismatching data).
    #[error("channel binding: {0}")]
    ChannelBinding(&'static str),
    /// The authorization identity is not allowed; for the caller, who decides about authzids.
    #[error("invalid authzid: {0}")]
    InvalidAuthzid(&'static str),
    /// The mechanism needs an encrypted stream; for the caller (e.g. PLAIN without TLS).
    #[error("encryption required")]
    EncryptionRequired,
    /// A username or password that SASLprep (RFC 4013) prohibits or maps to nothing.
    #[error("SASLprep: {0}")]
    Prep(&'static str),
    /// The server's own parameters are unusable (e.g. too few iterations); not the client's fault.
    #[error("server configuration: {0}")]
    Config(&'static str),
}

impl SaslError {
    /// The RFC 6120 §6.5 defined condition, i.e. the child element name of `<failure/>`.
    pub fn condition(&self) -> &'static str {
        match self {
            SaslError::Malformed(_) | SaslError::Prep(_) => "malformed-request",
            SaslError::IncorrectEncoding(_) => "incorrect-encoding",
            SaslError::NotAuthorized | SaslError::ChannelBinding(_) => "not-authorized",
            SaslError::InvalidAuthzid(_) => "invalid-authzid",
            SaslError::EncryptionRequired => "encryption-required",
            SaslError::Config(_) => "temporary-auth-failure",
        }
    }

    /// A short description for the `<text/>` of `<failure/>`.
    pub fn text(&self) -> &'static str {
        match self {
            SaslError::Malformed(t)
            | SaslError::IncorrectEncoding(t)
            | SaslError::ChannelBinding(t)
            | SaslError::InvalidAuthzid(t)
            | SaslError::Prep(t)
            | SaslError::Config(t) => t,
            SaslError::NotAuthorized => "authentication failed",
            SaslError::EncryptionRequired => "this mechanism requires an encrypted stream",
        }
    }
}

/// The hash function of a SCRAM mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hash {
    Sha1,
    Sha256,
    Sha512,
}

/// Runs `$body` with `$d` bound to the digest type of `$hash`, so each primitive below is
/// written once for all three hashes.
macro_rules! with_digest {
    ($hash:expr, $d:ident => $body:expr) => {
        match $hash {
            Hash::Sha1 => {
                type $d = sha1::Sha1;
                $body
            }
            Hash::Sha256 => {
                type $d = sha2::Sha256;
                $body
            }
            Hash::Sha512 => {
                type $d = sha2::Sha512;
                $body
            }
        }
    };
}

impl Hash {
    /// The IANA mechanism name, e.g. `SCRAM-SHA-256-PLUS`.
    pub fn mechanism(self, plus: bool) -> &'static str {
        match (self, plus) {
            (Hash::Sha1, false) => "SCRAM-SHA-1",
            (Hash::Sha1, true) => "SCRAM-SHA-1-PLUS",
            (Hash::Sha256, false) => "SCRAM-SHA-256",
            (Hash::Sha256, true) => "SCRAM-SHA-256-PLUS",
            (Hash::Sha512, false) => "SCRAM-SHA-512",
            (Hash::Sha512, true) => "SCRAM-SHA-512-PLUS",
        }
    }

    /// Strongest first, the order in which to advertise them.
    pub fn all() -> [Hash; 3] {
        [Hash::Sha512, Hash::Sha256, Hash::Sha1]
    }

    /// Length in bytes of the hash output, and so of every key and proof.
    pub fn output_len(self) -> usize {
        with_digest!(self, D => <D as Digest>::output_size())
    }

    pub(crate) fn h(self, data: &[u8]) -> Vec<u8> {
        with_digest!(self, D => D::digest(data).to_vec())
    }

    pub(crate) fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        with_digest!(self, D => {
            // HMAC takes keys of any length (long ones are hashed), so this cannot fail.
            let mut mac = <Hmac<D> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        })
    }

    /// `Hi()` of RFC 5802 §2.2, which is PBKDF2 with HMAC and one output block.
    pub(crate) fn hi(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        with_digest!(self, D => {
            let mut out = vec![0u8; <D as Digest>::output_size()];
            pbkdf2::pbkdf2_hmac::<D>(password, salt, iterations, &mut out);
            out
        })
    }
}

/// Parses a mechanism name into (hash, plus). Names are matched exactly: SASL mechanism
/// names are upper case (RFC 4422 §3.1).
pub fn parse_mechanism(name: &str) -> Option<(Hash, bool)> {
    Hash::all()
        .into_iter()
        .flat_map(|h| [(h, false), (h, true)])
        .find(|&(h, plus)| h.mechanism(plus) == name)
}

/// What is stored per hash per account (RFC 5802 §3): never the password or SaltedPassword.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredCredentials {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

/// A fresh random salt of [`SALT_LEN`] bytes for [`derive()`].
pub fn generate_salt() -> Vec<u8> {
    let mut salt = vec![0u8; SALT_LEN];
    OsRng.fill_bytes(&mut salt);
    salt
}

/// SASLprep (RFC 4013) of a username or password.
///
/// The `stringprep` crate prepares "stored strings", so code points unassigned in
/// Unicode 3.2 (e.g. emoji) are refused even where RFC 4013 would let a query through; that
/// keeps one rule for what may be stored and what may be presented.
pub fn saslprep(s: &str) -> Result<String, SaslError> {
    stringprep::saslprep(s)
        .map(|prepared| prepared.into_owned())
        .map_err(|_| SaslError::Prep("string prohibited by SASLprep"))
}

/// Derives what to store for `password` (SASLprep is applied here).
pub fn derive(
    hash: Hash,
    password: &str,
    salt: &[u8],
    iterations: u32,
) -> Result<StoredCredentials, SaslError> {
    if iterations < MIN_ITERATIONS {
        return Err(SaslError::Config("iteration count below 4096"));
    }
    if salt.is_empty() {
        return Err(SaslError::Config("empty salt"));
    }
    let prepared = saslprep(password)?;
    if prepared.is_empty() {
        return Err(SaslError::Prep("empty password"));
    }
    Ok(derive_prepared(hash, &prepared, salt, iterations))
}

/// [`derive()`] without its policy checks, for verifying against credentials that are already
/// stored (which may predate a stricter policy).
pub(crate) fn derive_prepared(
    hash: Hash,
    prepared: &str,
    salt: &[u8],
    iterations: u32,
) -> StoredCredentials {
    let salted = hash.hi(prepared.as_bytes(), salt, iterations);
    StoredCredentials {
        salt: salt.to_vec(),
        iterations,
        stored_key: hash.h(&hash.hmac(&salted, b"Client Key")),
        server_key: hash.hmac(&salted, b"Server Key"),
    }
}

/// Credentials for a user that does not exist, so that the exchange runs its full course and
/// fails like a wrong password would.
///
/// The salt is the same on every attempt for a given name, hash and secret (a salt that
/// changed between attempts would reveal the account does not exist); the keys are
/// derived the same way and match no password anyone knows. Use this for PLAIN too, with
/// [`crate::sasl::plain::verify`], so that unknown users cost the same PBKDF2 time.
pub fn fake_credentials(
    hash: Hash,
    fake_secret: &[u8],
    username: &str,
    iterations: u32,
) -> StoredCredentials {
    let part = |label: &str| {
        let input = [hash.mechanism(false), "\0", label, "\0", username].concat();
        hash.hmac(fake_secret, input.as_bytes())
    };
    let mut salt = part("salt");
    salt.truncate(SALT_LEN);
    StoredCredentials {
        salt,
        iterations,
        stored_key: part("stored key"),
        server_key: part("server key"),
    }
}

/// Channel-binding data the TLS layer can give (both are None on a plaintext stream).
#[derive(Debug, Clone, Default)]
pub struct ChannelBindings {
    /// RFC 9266: the 32-byte TLS exporter with label "EXPORTER-Channel-Binding" and no
    /// context. Only safe on TLS 1.3, or TLS 1.2 with extended master secret.
    pub tls_exporter: Option<Vec<u8>>,
    /// RFC 5929 §4.1: the hash of the server's certificate, with the hash of its signature
    /// algorithm, or SHA-256 where that is MD5 or SHA-1.
    pub tls_server_end_point: Option<Vec<u8>>,
    /// Whether the stream is TLS.
    pub tls: bool,
}

impl ChannelBindings {
    /// Whether `-PLUS` mechanisms are offered on this stream.
    pub fn offers_plus(&self) -> bool {
        self.tls && (self.tls_exporter.is_some() || self.tls_server_end_point.is_some())
    }

    /// Channel-binding type names to advertise (XEP-0440), most preferred first.
    pub fn types(&self) -> Vec<&'static str> {
        ["tls-exporter", "tls-server-end-point"]
            .into_iter()
            .filter(|name| self.data(name).is_some())
            .collect()
    }

    fn data(&self, name: &str) -> Option<&[u8]> {
        if !self.tls {
            return None;
        }
        match name {
            "tls-exporter" => self.tls_exporter.as_deref(),
            "tls-server-end-point" => self.tls_server_end_point.as_deref(),
            _ => None,
        }
    }
}

/// What the client-first-message says about who is authenticating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFirst {
    /// Authentication identity: SCRAM-unescaped and SASLprep'd, never empty.
    pub username: String,
    /// Authorization identity from the GS2 header, unescaped; the caller decides if it is allowed.
    pub authzid: Option<String>,
}

enum State {
    Start,
    GotClientFirst {
        /// What `c=` must decode to: the GS2 header as sent, plus the binding data for `p=`.
        cbind_input: Vec<u8>,
        client_first_bare: String,
        client_nonce: String,
        username: String,
    },
    SentServerFirst {
        cbind_input: Vec<u8>,
        nonce: String,
        /// `client-first-message-bare "," server-first-message ","`: AuthMessage minus its tail.
        auth_message_head: String,
        stored_key: Vec<u8>,
        server_key: Vec<u8>,
        known_user: bool,
    },
    Finished,
}

/// One SCRAM exchange on the server side. Any error ends it: every later step then fails.
pub struct ScramServer {
    hash: Hash,
    plus: bool,
    cb: ChannelBindings,
    server_nonce: String,
    state: State,
}

impl fmt::Debug for ScramServer {
    // Keys and nonces stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let step = match self.state {
            State::Start => "start",
            State::GotClientFirst { .. } => "client-first",
            State::SentServerFirst { .. } => "server-first",
            State::Finished => "finished",
        };
        f.debug_struct("ScramServer")
            .field("mechanism", &self.hash.mechanism(self.plus))
            .field("step", &step)
            .finish_non_exhaustive()
    }
}

impl ScramServer {
    /// Starts an exchange for the mechanism `hash.mechanism(plus)` on a stream whose TLS
    /// layer gave `cb`.
    pub fn new(hash: Hash, plus: bool, cb: ChannelBindings) -> Self {
        let mut raw = [0u8; SERVER_NONCE_LEN];
        OsRng.fill_bytes(&mut raw);
        Self::with_server_nonce(hash, plus, cb, STANDARD.encode(raw))
    }

    /// For the RFC test vectors and the fuzzer ([`crate::fuzzing`]), which fix the server nonce.
    pub(crate) fn with_fixed_nonce(
        hash: Hash,
        plus: bool,
        cb: ChannelBindings,
        nonce: &str,
    ) -> Self {
        Self::with_server_nonce(hash, plus, cb, nonce.to_owned())
    }

    fn with_server_nonce(
        hash: Hash,
        plus: bool,
        cb: ChannelBindings,
        server_nonce: String,
    ) -> Self {
        ScramServer {
            hash,
            plus,
            cb,
            server_nonce,
            state: State::Start,
        }
    }

    /// The mechanism's hash.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// Whether the mechanism is a `-PLUS` one.
    pub fn plus(&self) -> bool {
        self.plus
    }

    /// Parses client-first-message; returns the authentication identity (username after SCRAM
    /// unescaping of =2C / =3D and SASLprep) and the authzid if any.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<ClientFirst, SaslError> {
        if !matches!(
            std::mem::replace(&mut self.state, State::Finished),
            State::Start
        ) {
            return Err(SaslError::Malformed("unexpected client-first-message"));
        }
        let msg = std::str::from_utf8(msg).map_err(|_| SaslError::Malformed("not UTF-8"))?;
        let (gs2_header, bare) = split_gs2_header(msg)?;
        let (flag, authzid) = gs2_header
            .strip_suffix(',')
            .and_then(|h| h.split_once(','))
            .ok_or(SaslError::Malformed("bad GS2 header"))?;
        let cb_data: &[u8] = match (flag, self.plus) {
            ("n", false) => &[],
            // The client could bind but believes we cannot: if we offered -PLUS, someone
            // removed it from the list on the way (RFC 5802 §6).
            ("y", false) if self.cb.offers_plus() => {
                return Err(SaslError::ChannelBinding("server supports channel binding"))
            }
            ("y", false) => &[],
            ("n" | "y", true) => {
                return Err(SaslError::ChannelBinding(
                    "-PLUS mechanism without channel binding",
                ))
            }
            (flag, plus) => {
                let name = flag
                    .strip_prefix("p=")
                    .filter(|n| {
                        !n.is_empty()
                            && n.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                    })
                    .ok_or(SaslError::Malformed("bad channel binding flag"))?;
                if !plus {
                    return Err(SaslError::ChannelBinding(
                        "channel binding needs a -PLUS mechanism",
                    ));
                }
                self.cb.data(name).ok_or(SaslError::ChannelBinding(
                    "unsupported channel binding type",
                ))?
            }
        };
        let authzid = match authzid {
            "" => None,
            a => Some(
                a.strip_prefix("a=")
                    .ok_or(SaslError::Malformed("bad authzid"))
                    .and_then(unescape_saslname)?,
            ),
        };

        let mut attrs = bare.split(',');
        let first = attrs.next().unwrap_or_default();
        if first.starts_with("m=") {
            return Err(SaslError::Malformed(
                "mandatory extensions are not supported",
            ));
        }
        let username = attr(first, 'n')
            .ok_or(SaslError::Malformed("missing username"))
            .and_then(unescape_saslname)
            .and_then(|u| saslprep(&u))?;
        if username.is_empty() {
            return Err(SaslError::Malformed("empty username"));
        }
        let client_nonce = attrs
            .next()
            .and_then(|a| attr(a, 'r'))
            .ok_or(SaslError::Malformed("missing nonce"))?;
        if !is_printable(client_nonce) {
            return Err(SaslError::Malformed("bad nonce"));
        }
        check_extensions(attrs)?;

        let mut cbind_input = gs2_header.as_bytes().to_vec();
        cbind_input.extend_from_slice(cb_data);
        self.state = State::GotClientFirst {
            cbind_input,
            client_first_bare: bare.to_owned(),
            client_nonce: client_nonce.to_owned(),
            username: username.clone(),
        };
        Ok(ClientFirst { username, authzid })
    }

    /// Builds server-first-message. `creds` is None for an unknown user: the exchange then
    /// goes on with [`fake_credentials`] (salt from HMAC(`fake_secret`, username), the
    /// `default_iterations`), so it fails only at the proof, like a wrong password.
    ///
    /// Called other than right after a successful [`ScramServer::client_first`], it returns
    /// an empty message and the exchange fails at [`ScramServer::client_final`].
    pub fn server_first(
        &mut self,
        creds: Option<&StoredCredentials>,
        fake_secret: &[u8],
        default_iterations: u32,
    ) -> Vec<u8> {
        let State::GotClientFirst {
            cbind_input,
            client_first_bare,
            client_nonce,
            username,
        } = std::mem::replace(&mut self.state, State::Finished)
        else {
            return Vec::new();
        };
        // Computed for known users too, so the time taken says nothing about existence.
        let fake = fake_credentials(self.hash, fake_secret, &username, default_iterations);
        let (creds, known_user) = match creds {
            Some(creds) => (creds, true),
            None => (&fake, false),
        };
        let nonce = client_nonce + &self.server_nonce;
        let server_first = format!(
            "r={nonce},s={},i={}",
            STANDARD.encode(&creds.salt),
            creds.iterations
        );
        self.state = State::SentServerFirst {
            cbind_input,
            auth_message_head: format!("{client_first_bare},{server_first},"),
            nonce,
            stored_key: creds.stored_key.clone(),
            server_key: creds.server_key.clone(),
            known_user,
        };
        server_first.into_bytes()
    }

    /// Verifies client-final-message (channel binding echo and proof, constant-time with `subtle`);
    /// on success returns server-final-message (`v=...`).
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, SaslError> {
        let State::SentServerFirst {
            cbind_input,
            nonce,
            auth_message_head,
            stored_key,
            server_key,
            known_user,
        } = std::mem::replace(&mut self.state, State::Finished)
        else {
            return Err(SaslError::Malformed("unexpected client-final-message"));
        };
        let msg = std::str::from_utf8(msg).map_err(|_| SaslError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(',')
            .ok_or(SaslError::Malformed("missing proof"))?;
        let proof = attr(proof, 'p').ok_or(SaslError::Malformed("missing proof"))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| attr(a, 'c'))
            .ok_or(SaslError::Malformed("missing channel binding"))?;
        let client_nonce = attrs
            .next()
            .and_then(|a| attr(a, 'r'))
            .ok_or(SaslError::Malformed("missing nonce"))?;
        check_extensions(attrs)?;

        let cbind = B64_LENIENT
            .decode(cbind)
            .map_err(|_| SaslError::Malformed("bad base64 in channel binding"))?;
        if !bool::from(cbind.ct_eq(&cbind_input)) {
            return Err(SaslError::ChannelBinding(
                "channel binding data does not match",
            ));
        }
        if client_nonce != nonce {
            return Err(SaslError::Malformed("nonce does not match"));
        }
        let proof = B64_LENIENT
            .decode(proof)
            .map_err(|_| SaslError::Malformed("bad base64 in proof"))?;
        if proof.len() != self.hash.output_len() {
            return Err(SaslError::Malformed("proof has the wrong length"));
        }

        let auth_message = [auth_message_head.as_str(), without_proof].concat();
        let client_signature = self.hash.hmac(&stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        let matches = self.hash.h(&client_key).ct_eq(&stored_key)
            & subtle::Choice::from(u8::from(known_user));
        if !bool::from(matches) {
            return Err(SaslError::NotAuthorized);
        }
        let server_signature = self.hash.hmac(&server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

/// Splits client-first-message after the GS2 header's second comma; the header is needed
/// verbatim for the `c=` check.
fn split_gs2_header(msg: &str) -> Result<(&str, &str), SaslError> {
    let first = msg
        .find(',')
        .ok_or(SaslError::Malformed("bad GS2 header"))?;
    let second = msg[first + 1..]
        .find(',')
        .ok_or(SaslError::Malformed("bad GS2 header"))?;
    Ok(msg.split_at(first + 1 + second + 1))
}

/// The value of `attr` if it is the attribute `name` with a non-empty value.
fn attr(attr: &str, name: char) -> Option<&str> {
    attr.strip_prefix(name)?
        .strip_prefix('=')
        .filter(|value| !value.is_empty())
}

/// RFC 5802 §7 says unknown extensions "MUST be ignored", so well-formed ones are; a
/// repeated or misplaced attribute defined by SCRAM, or the reserved `m`, is refused.
/// Names longer than the grammar's single letter pass too: the `sasl` crate lets clients
/// send such (e.g. `tokenauth=true`), and ignoring them is as safe as ignoring any other.
fn check_extensions<'a>(attrs: impl Iterator<Item = &'a str>) -> Result<(), SaslError> {
    for a in attrs {
        let (name, value) = a
            .split_once('=')
            .ok_or(SaslError::Malformed("bad attribute"))?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphabetic()) || value.is_empty() {
            return Err(SaslError::Malformed("bad attribute"));
        }
        if name.len() == 1 && "acimnprsv".contains(name) {
            return Err(SaslError::Malformed("unexpected attribute"));
        }
    }
    Ok(())
}

/// `printable` of RFC 5802 §7: %x21-7E except ",".
fn is_printable(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Reverses the `=2C` / `=3D` escaping of a `saslname`; any other `=` is an error (RFC 5802 §5.1).
fn unescape_saslname(s: &str) -> Result<String, SaslError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        let escape = rest.get(i..i + 3);
        out.push(match escape {
            Some("=2C") => ',',
            Some("=3D") => '=',
            _ => return Err(SaslError::Malformed("bad escape in name")),
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    if out.is_empty() || out.contains('\0') {
        return Err(SaslError::Malformed("bad name"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::SimpleHmac;
    use sha2::digest::core_api::BlockSizeUser;

    const SECRET: &[u8] = b"fake-salt secret";

    fn b64(data: &[u8]) -> String {
        STANDARD.encode(data)
    }

    fn unb64(s: &str) -> Vec<u8> {
        STANDARD.decode(s).unwrap()
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn exporter(data: &[u8]) -> ChannelBindings {
        ChannelBindings {
            tls_exporter: Some(data.to_vec()),
            tls_server_end_point: None,
            tls: true,
        }
    }

    /// Client proof and expected server signature, computed apart from the server code:
    /// `SimpleHmac` and pbkdf2's generic PRF path instead of `Hash::hmac` / `Hash::hi`.
    fn client_side<D: Digest + BlockSizeUser + Clone + Sync>(
        password: &str,
        salt: &[u8],
        iterations: u32,
        auth_message: &[u8],
    ) -> (Vec<u8>, Vec<u8>) {
        let mac = |key: &[u8], data: &[u8]| {
            let mut m = <SimpleHmac<D> as Mac>::new_from_slice(key).unwrap();
            m.update(data);
            m.finalize().into_bytes().to_vec()
        };
        let mut salted = vec![0u8; <D as Digest>::output_size()];
        pbkdf2::pbkdf2::<SimpleHmac<D>>(password.as_bytes(), salt, iterations, &mut salted)
            .unwrap();
        let client_key = mac(&salted, b"Client Key");
        let client_signature = mac(&D::digest(&client_key), auth_message);
        let proof = client_key
            .iter()
            .zip(&client_signature)
            .map(|(k, s)| k ^ s)
            .collect();
        (proof, mac(&mac(&salted, b"Server Key"), auth_message))
    }

    /// A test client: runs a whole exchange against `server` and checks the server's
    /// signature. `gs2_header` and `client_cb` are what the client sends and binds to.
    fn exchange(
        server: &mut ScramServer,
        creds: Option<&StoredCredentials>,
        password: &str,
        gs2_header: &str,
        client_cb: &[u8],
    ) -> Result<(), SaslError> {
        let bare = "n=user,r=Cl13ntN0nce/+";
        let first = server.client_first(format!("{gs2_header}{bare}").as_bytes())?;
        assert_eq!(first.username, "user");
        let server_first = String::from_utf8(server.server_first(creds, SECRET, 4096)).unwrap();
        let parts: Vec<&str> = server_first.split(',').collect();
        let [r, s, i] = parts[..] else {
            panic!("bad server-first {server_first}")
        };
        let nonce = r.strip_prefix("r=Cl13ntN0nce/+").map(|_| &r[2..]).unwrap();
        assert!(nonce.len() > "Cl13ntN0nce/+".len() && is_printable(nonce));
        let salt = unb64(s.strip_prefix("s=").unwrap());
        let iterations: u32 = i.strip_prefix("i=").unwrap().parse().unwrap();

        let cbind = [gs2_header.as_bytes(), client_cb].concat();
        let without_proof = format!("c={},r={nonce}", b64(&cbind));
        let auth_message = format!("{bare},{server_first},{without_proof}");
        let (proof, signature) = match server.hash() {
            Hash::Sha1 => {
                client_side::<sha1::Sha1>(password, &salt, iterations, auth_message.as_bytes())
            }
            Hash::Sha256 => {
                client_side::<sha2::Sha256>(password, &salt, iterations, auth_message.as_bytes())
            }
            Hash::Sha512 => {
                client_side::<sha2::Sha512>(password, &salt, iterations, auth_message.as_bytes())
            }
        };
        let server_final =
            server.client_final(format!("{without_proof},p={}", b64(&proof)).as_bytes())?;
        assert_eq!(server_final, format!("v={}", b64(&signature)).into_bytes());
        Ok(())
    }

    fn pencil(hash: Hash) -> StoredCredentials {
        derive(hash, "pencil", b"0123456789abcdef", 4096).unwrap()
    }

    #[test]
    fn rfc5802_sha1_example() {
        let creds = derive(Hash::Sha1, "pencil", &unb64("QSXCR+Q6sek8bf92"), 4096).unwrap();
        let mut server = ScramServer::with_fixed_nonce(
            Hash::Sha1,
            false,
            ChannelBindings::default(),
            "3rfcNHYJY1ZVvWVs7j",
        );
        let first = server
            .client_first(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL")
            .unwrap();
        assert_eq!(
            first,
            ClientFirst {
                username: "user".into(),
                authzid: None
            }
        );
        assert_eq!(
            server.server_first(Some(&creds), SECRET, 4096),
            b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
        );
        let server_final = server
            .client_final(b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=")
            .unwrap();
        assert_eq!(server_final, b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=");
    }

    fn rfc7677(client_final: &[u8]) -> Result<Vec<u8>, SaslError> {
        let creds = derive(
            Hash::Sha256,
            "pencil",
            &unb64("W22ZaJ0SNY7soEsUEjb6gQ=="),
            4096,
        )
        .unwrap();
        let mut server = ScramServer::with_fixed_nonce(
            Hash::Sha256,
            false,
            ChannelBindings::default(),
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        );
        let first = server
            .client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
            .unwrap();
        assert_eq!(first.username, "user");
        assert_eq!(
            server.server_first(Some(&creds), SECRET, 4096),
            &b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"[..]
        );
        server.client_final(client_final)
    }

    #[test]
    fn rfc7677_sha256_example() {
        let server_final = rfc7677(
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        );
        assert_eq!(
            server_final.unwrap(),
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn unpadded_base64_is_accepted() {
        let server_final = rfc7677(
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ",
        );
        assert_eq!(
            server_final.unwrap(),
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn rfc7677_wrong_proof() {
        let err = rfc7677(
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=eHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        );
        assert_eq!(err, Err(SaslError::NotAuthorized));
    }

    struct CrossVector {
        mechanism: &'static str,
        username: &'static str,
        password: &'static str,
        salt_b64: &'static str,
        iterations: u32,
        stored_key_b64: &'static str,
        server_key_b64: &'static str,
        tls_exporter_hex: &'static str,
        client_first: &'static str,
        server_nonce: &'static str,
        server_first: &'static str,
        client_final: &'static str,
        server_final: &'static str,
    }

    // Output of /tmp/scram-dev/cross.py (outside the repository): client and server from
    // Python's scramp, an implementation independent of this one, with fixed nonces.
    const CROSS_VECTORS: &[CrossVector] = &[
    // SHA512: generated by scramp 1.5.0 (cross.py)
    CrossVector {
        mechanism: "SCRAM-SHA-512",
        username: "us,er=x",
        password: "pen\u{a0}cil\u{ad}\u{2168}",
        salt_b64: "AAECAwQFBgcICQoLDA0ODw==",
        iterations: 4096,
        stored_key_b64: "0nbWKJldguAkIcHDPH6cgltevmElaTPHHrIKJNd7Fz1GDEa5JCGPXs2rhARBLwnycqLEZ7WLoAMZwz9tcjuihQ==",
        server_key_b64: "7U4l6ekWaU9Kw3MAt9Ncfd/RXYgyoMvel5VHb9bjGZSf+UCe1/qzb4oEmtEFw1Dhf6wTnPomzhdtFarpIIuBtg==",
        tls_exporter_hex: "",
        client_first: "n,,n=us=2Cer=3Dx,r=clientNONCE-512",
        server_nonce: "serverNONCE-512",
        server_first: "r=clientNONCE-512serverNONCE-512,s=AAECAwQFBgcICQoLDA0ODw==,i=4096",
        client_final: "c=biws,r=clientNONCE-512serverNONCE-512,p=zlUiKiTYKa6l4axT129wvDHphL5yXY9N+BTYYHAmINe13w0oQsOo763uXzm3v3ev/0GCGW6d5aBciUaSA7yTLw==",
        server_final: "v=xu7y4iHL/j1gdVIOnSwBXVInrffTmLq1QCa8LmEYje3oPhYhY0nJeF5gL3/Evol+AtFsHsNt9VYUVZiE7dzWdA==",
    },
    // SHA256_PLUS_EXPORTER: generated by scramp 1.5.0 (cross.py)
    CrossVector {
        mechanism: "SCRAM-SHA-256-PLUS",
        username: "juliet",
        password: "r0m30myr0m30",
        salt_b64: "aGFseWFyZC1zYWx0LTI1Ng==",
        iterations: 5000,
        stored_key_b64: "PfIEV5bSuqaZvr3TcHhmGxYzAW5ihFMPpIiacimc9Hk=",
        server_key_b64: "DXvjwwdrHdbb5CclioDR+oMOES/EtrJH4sVBBuyUOHo=",
        tls_exporter_hex: "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf",
        client_first: "p=tls-exporter,,n=juliet,r=c-nonce-256plus",
        server_nonce: "s-nonce-256plus",
        server_first: "r=c-nonce-256pluss-nonce-256plus,s=aGFseWFyZC1zYWx0LTI1Ng==,i=5000",
        client_final: "c=cD10bHMtZXhwb3J0ZXIsLKChoqOkpaanqKmqq6ytrq+wsbKztLW2t7i5uru8vb6/,r=c-nonce-256pluss-nonce-256plus,p=TjGeEipQDhLs6K93/avaWLo6mAj474eL+zJ0ATbKSRA=",
        server_final: "v=A2gBT2zmI64lYch2UVeUuUSrUB8Wt5g/DkNeqs/unEU=",
    },
    // SHA1_Y: generated by scramp 1.5.0 (cross.py)
    CrossVector {
        mechanism: "SCRAM-SHA-1",
        username: "romeo",
        password: "pencil",
        salt_b64: "c2hhMS1zYWx0LTEy",
        iterations: 4096,
        stored_key_b64: "WVlR6waqvPYwEo9aUoAVbU1JKIU=",
        server_key_b64: "O1gWbVgY3Hciwr46e0nknDhA6RM=",
        tls_exporter_hex: "",
        client_first: "y,,n=romeo,r=y-client-nonce",
        server_nonce: "y-server-nonce",
        server_first: "r=y-client-noncey-server-nonce,s=c2hhMS1zYWx0LTEy,i=4096",
        client_final: "c=eSws,r=y-client-noncey-server-nonce,p=vy0FenFQMDtxnNy0QNIS18rRdYQ=",
        server_final: "v=WiHD8Yp/5ZdrJCSiMAliPs9AeLE=",
    },
];

    #[test]
    fn scramp_transcripts() {
        for v in CROSS_VECTORS {
            let (hash, plus) = parse_mechanism(v.mechanism).unwrap();
            let creds = derive(hash, v.password, &unb64(v.salt_b64), v.iterations).unwrap();
            assert_eq!(b64(&creds.stored_key), v.stored_key_b64, "{}", v.mechanism);
            assert_eq!(b64(&creds.server_key), v.server_key_b64, "{}", v.mechanism);
            let cb = if v.tls_exporter_hex.is_empty() {
                ChannelBindings::default()
            } else {
                exporter(&hex(v.tls_exporter_hex))
            };
            let mut server = ScramServer::with_fixed_nonce(hash, plus, cb, v.server_nonce);
            let first = server.client_first(v.client_first.as_bytes()).unwrap();
            assert_eq!(first.username, v.username);
            assert_eq!(first.authzid, None);
            assert_eq!(
                server.server_first(Some(&creds), SECRET, 4096),
                v.server_first.as_bytes()
            );
            let server_final = server.client_final(v.client_final.as_bytes()).unwrap();
            assert_eq!(server_final, v.server_final.as_bytes(), "{}", v.mechanism);
        }
    }

    #[test]
    fn scramp_plus_transcript_fails_with_other_binding_data() {
        let v = &CROSS_VECTORS[1];
        assert_eq!(v.mechanism, "SCRAM-SHA-256-PLUS");
        let creds = derive(Hash::Sha256, v.password, &unb64(v.salt_b64), v.iterations).unwrap();
        let mut server = ScramServer::with_fixed_nonce(
            Hash::Sha256,
            true,
            exporter(&[0xa0; 32]),
            v.server_nonce,
        );
        server.client_first(v.client_first.as_bytes()).unwrap();
        server.server_first(Some(&creds), SECRET, 4096);
        let err = server.client_final(v.client_final.as_bytes()).unwrap_err();
        assert_eq!(err.condition(), "not-authorized");
    }

    #[test]
    fn sha512_round_trip() {
        let creds = pencil(Hash::Sha512);
        let mut server = ScramServer::new(Hash::Sha512, false, ChannelBindings::default());
        exchange(&mut server, Some(&creds), "pencil", "n,,", b"").unwrap();
    }

    #[test]
    fn random_server_nonces_differ() {
        let nonce = |_| {
            let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
            server.client_first(b"n,,n=user,r=abc").unwrap();
            server.server_first(None, SECRET, 4096)
        };
        let (a, b) = (nonce(0), nonce(1));
        assert_ne!(a, b);
        // "r=abc" + 32 base64 characters of 24 random bytes.
        assert_eq!(a.iter().position(|&c| c == b','), Some(5 + 32));
    }

    #[test]
    fn y_accepted_without_plus() {
        for cb in [
            ChannelBindings::default(),
            // TLS but no binding data: -PLUS was not offered either.
            ChannelBindings {
                tls: true,
                ..Default::default()
            },
        ] {
            let mut server = ScramServer::new(Hash::Sha256, false, cb);
            exchange(
                &mut server,
                Some(&pencil(Hash::Sha256)),
                "pencil",
                "y,,",
                b"",
            )
            .unwrap();
        }
    }

    #[test]
    fn y_rejected_when_plus_offered() {
        let end_point = ChannelBindings {
            tls_server_end_point: Some(vec![7; 32]),
            tls: true,
            ..Default::default()
        };
        for cb in [exporter(&[1; 32]), end_point] {
            let mut server = ScramServer::new(Hash::Sha256, false, cb);
            let err = server.client_first(b"y,,n=user,r=abc").unwrap_err();
            assert_eq!(
                err,
                SaslError::ChannelBinding("server supports channel binding")
            );
            assert_eq!(err.condition(), "not-authorized");
        }
    }

    #[test]
    fn n_over_tls_accepted() {
        let mut server = ScramServer::new(Hash::Sha256, false, exporter(&[1; 32]));
        exchange(
            &mut server,
            Some(&pencil(Hash::Sha256)),
            "pencil",
            "n,,",
            b"",
        )
        .unwrap();
    }

    #[test]
    fn tls_exporter_accepted() {
        let data = [0x42; 32];
        for hash in Hash::all() {
            let mut server = ScramServer::new(hash, true, exporter(&data));
            exchange(
                &mut server,
                Some(&pencil(hash)),
                "pencil",
                "p=tls-exporter,,",
                &data,
            )
            .unwrap();
        }
    }

    #[test]
    fn tls_exporter_mismatch_rejected() {
        let mut server = ScramServer::new(Hash::Sha256, true, exporter(&[0x42; 32]));
        let err = exchange(
            &mut server,
            Some(&pencil(Hash::Sha256)),
            "pencil",
            "p=tls-exporter,,",
            &[0x43; 32],
        )
        .unwrap_err();
        assert_eq!(
            err,
            SaslError::ChannelBinding("channel binding data does not match")
        );
        assert_eq!(err.condition(), "not-authorized");
    }

    #[test]
    fn tls_server_end_point() {
        let cb = ChannelBindings {
            tls_server_end_point: Some(vec![0x99; 32]),
            tls: true,
            ..Default::default()
        };
        let creds = pencil(Hash::Sha256);
        let mut server = ScramServer::new(Hash::Sha256, true, cb.clone());
        exchange(
            &mut server,
            Some(&creds),
            "pencil",
            "p=tls-server-end-point,,",
            &[0x99; 32],
        )
        .unwrap();

        let mut server = ScramServer::new(Hash::Sha256, true, cb.clone());
        let err = exchange(
            &mut server,
            Some(&creds),
            "pencil",
            "p=tls-server-end-point,,",
            &[0x98; 32],
        );
        assert_eq!(err.unwrap_err().condition(), "not-authorized");

        // Only the end-point binding is there: others are refused at client-first.
        for header in ["p=tls-exporter,,", "p=tls-unique,,"] {
            let mut server = ScramServer::new(Hash::Sha256, true, cb.clone());
            let err = server
                .client_first(format!("{header}n=user,r=abc").as_bytes())
                .unwrap_err();
            assert_eq!(
                err,
                SaslError::ChannelBinding("unsupported channel binding type")
            );
        }
    }

    #[test]
    fn binding_needs_tls() {
        // Data without the TLS flag is not offered.
        let cb = ChannelBindings {
            tls: false,
            ..exporter(&[1; 32])
        };
        assert!(!cb.offers_plus());
        assert!(cb.types().is_empty());
        let mut server = ScramServer::new(Hash::Sha256, true, cb);
        let err = server
            .client_first(b"p=tls-exporter,,n=user,r=abc")
            .unwrap_err();
        assert_eq!(err.condition(), "not-authorized");
    }

    #[test]
    fn advertised_types() {
        let cb = ChannelBindings {
            tls_exporter: Some(vec![1; 32]),
            tls_server_end_point: Some(vec![2; 32]),
            tls: true,
        };
        assert!(cb.offers_plus());
        assert_eq!(cb.types(), ["tls-exporter", "tls-server-end-point"]);
        assert!(!ChannelBindings::default().offers_plus());
    }

    #[test]
    fn plus_mechanism_requires_p() {
        for header in ["n,,", "y,,"] {
            let mut server = ScramServer::new(Hash::Sha256, true, exporter(&[1; 32]));
            let err = server
                .client_first(format!("{header}n=user,r=abc").as_bytes())
                .unwrap_err();
            assert_eq!(err.condition(), "not-authorized", "{header}");
        }
    }

    #[test]
    fn p_with_non_plus_mechanism_rejected() {
        let mut server = ScramServer::new(Hash::Sha256, false, exporter(&[1; 32]));
        let err = server
            .client_first(b"p=tls-exporter,,n=user,r=abc")
            .unwrap_err();
        assert_eq!(
            err,
            SaslError::ChannelBinding("channel binding needs a -PLUS mechanism")
        );
    }

    #[test]
    fn wrong_password_not_authorized() {
        for hash in Hash::all() {
            let mut server = ScramServer::new(hash, false, ChannelBindings::default());
            let err = exchange(&mut server, Some(&pencil(hash)), "pen", "n,,", b"").unwrap_err();
            assert_eq!(err, SaslError::NotAuthorized);
            assert_eq!(err.condition(), "not-authorized");
        }
    }

    #[test]
    fn unknown_user_looks_like_wrong_password() {
        let server_first = |username: &str, hash: Hash| {
            let mut server = ScramServer::new(hash, false, ChannelBindings::default());
            server
                .client_first(format!("n,,n={username},r=abc").as_bytes())
                .unwrap();
            let msg = String::from_utf8(server.server_first(None, SECRET, 8192)).unwrap();
            // Drop the random nonce, keep "s=...,i=...".
            msg.split_once(',').unwrap().1.to_owned()
        };
        let first = server_first("nobody", Hash::Sha256);
        assert_eq!(first, server_first("nobody", Hash::Sha256));
        assert!(first.ends_with(",i=8192"));
        let salt = unb64(first.strip_prefix("s=").unwrap().split(',').next().unwrap());
        assert_eq!(salt.len(), SALT_LEN);
        assert_ne!(first, server_first("somebody", Hash::Sha256));
        assert_ne!(first, server_first("nobody", Hash::Sha1));

        // Even the right password of some account fails: there is no account.
        for hash in Hash::all() {
            let mut server = ScramServer::new(hash, false, ChannelBindings::default());
            assert_eq!(
                exchange(&mut server, None, "pencil", "n,,", b""),
                Err(SaslError::NotAuthorized)
            );
        }
    }

    #[test]
    fn fake_credentials_are_stable() {
        let a = fake_credentials(Hash::Sha512, SECRET, "nobody", 4096);
        assert_eq!(a, fake_credentials(Hash::Sha512, SECRET, "nobody", 4096));
        assert_ne!(
            a,
            fake_credentials(Hash::Sha512, b"other secret", "nobody", 4096)
        );
        assert_eq!(a.stored_key.len(), Hash::Sha512.output_len());
    }

    #[test]
    fn authzid_and_escaped_username() {
        let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
        let first = server
            .client_first(b"n,a=ju=2Cliet=3D,n=ro=3Dme=2Co,r=abc")
            .unwrap();
        assert_eq!(first.username, "ro=me,o");
        assert_eq!(first.authzid.as_deref(), Some("ju,liet="));
    }

    #[test]
    fn username_is_saslprepped() {
        let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
        let first = server
            .client_first("n,,n=I\u{ad}X\u{2168},r=abc".as_bytes())
            .unwrap();
        assert_eq!(first.username, "IXIX");
    }

    #[test]
    fn authzid_is_covered_by_channel_binding_check() {
        // c= must echo the whole GS2 header, authzid included.
        let creds = pencil(Hash::Sha256);
        let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
        server.client_first(b"n,a=admin,n=user,r=abc").unwrap();
        let server_first =
            String::from_utf8(server.server_first(Some(&creds), SECRET, 4096)).unwrap();
        let nonce = &server_first[2..server_first.find(',').unwrap()];
        let msg = format!("c=biws,r={nonce},p={}", b64(&[0; 32]));
        assert_eq!(
            server.client_final(msg.as_bytes()),
            Err(SaslError::ChannelBinding(
                "channel binding data does not match"
            ))
        );
    }

    #[test]
    fn unknown_extensions_are_ignored() {
        let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
        assert!(server
            .client_first(b"n,,n=user,r=abc,x=ext,tokenauth=true")
            .is_ok());
    }

    #[test]
    fn malformed_client_first() {
        let cases: &[&[u8]] = &[
            b"",
            b"n",
            b"n,",
            b"n,,",
            b"n,,n=user",
            b"n,,n=user,",
            b"n,,n=user,r=",
            b"n,,n=,r=abc",
            b"n,,r=abc,n=user",
            b"n,,r=abc",
            b",,n=user,r=abc",
            b"x,,n=user,r=abc",
            b"F,,n=user,r=abc",
            b"nn,,n=user,r=abc",
            b"n,,,n=user,r=abc",
            b"n,,n=user,,r=abc",
            b"n,,n=user,r=abc,",
            b"n,,n=user,r=abc,,",
            b"n,,m=ext,n=user,r=abc",
            b"n,,n=user,r=abc,m=ext",
            b"n,,n=user,r=abc,n=again",
            b"n,,n=user,r=abc,r=again",
            b"n,,n=user,r=abc,=ext",
            b"n,,n=user,r=abc,1=ext",
            b"n,,n=user,r=abc,x1=ext",
            b"n,,n=user,r=abc,ext",
            b"n,,n=user,r=abc,x=",
            b"n,a=,n=user,r=abc",
            b"n,b=x,n=user,r=abc",
            b"n,a=ad=2xmin,n=user,r=abc",
            b"n,,n=us=2Xer,r=abc",
            b"n,,n=user=,r=abc",
            b"n,,n=user=3,r=abc",
            b"n,,n=us\x00er,r=abc",
            b"n,,n=us\x07er,r=abc",
            b"n,,n=user,r=ab\x01c",
            b"n,,n=user,r=ab c",
            b"n,,n=user,r=ab\xc3\xa9c",
            b"n,,n=us\xffer,r=abc",
            b"p=,,n=user,r=abc",
            b"p=tls exporter,,n=user,r=abc",
            b"p,,n=user,r=abc",
        ];
        for &msg in cases {
            let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
            let err = server.client_first(msg).unwrap_err();
            let shown = String::from_utf8_lossy(msg);
            assert_eq!(err.condition(), "malformed-request", "{shown:?}: {err}");
            if msg.starts_with(b"p") {
                // Syntax is checked before whether binding is possible.
                let mut server = ScramServer::new(Hash::Sha256, true, exporter(&[1; 32]));
                let err = server.client_first(msg).unwrap_err();
                assert_eq!(err.condition(), "malformed-request", "{shown:?}: {err}");
            }
        }
    }

    #[test]
    fn malformed_client_final() {
        let proof = b64(&[0; 32]);
        let cases = [
            String::new(),
            "c=biws".into(),
            "c=biws,r={n}".into(),
            "c=biws,r={n},p=".into(),
            "c=biws,r={n},p={p},".into(),
            "c=biws,r={n},,p={p}".into(),
            ",c=biws,r={n},p={p}".into(),
            "r={n},c=biws,p={p}".into(),
            "c=biws,p={p}".into(),
            "c=biws,r={n},p={p},p={p}".into(),
            "c=biws,r={n},c=biws,p={p}".into(),
            "c=biws,r={n},m=x,p={p}".into(),
            "c=bi!s,r={n},p={p}".into(),
            "c=biws,r={n},p=@@@@".into(),
            "c=biws,r={n},p=AAAA".into(),
            "c=biws,r={n}x,p={p}".into(),
            "c=biws,r=abc,p={p}".into(),
            "c=biws,r=,p={p}".into(),
            "c=,r={n},p={p}".into(),
            format!("c=biws,r={{n}},p={}", b64(&[0; 33])),
        ];
        for case in cases {
            let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
            server.client_first(b"n,,n=user,r=abc").unwrap();
            let server_first =
                String::from_utf8(server.server_first(Some(&pencil(Hash::Sha256)), SECRET, 4096))
                    .unwrap();
            let nonce = &server_first[2..server_first.find(',').unwrap()];
            let msg = case.replace("{n}", nonce).replace("{p}", &proof);
            let err = server.client_final(msg.as_bytes()).unwrap_err();
            assert_eq!(err.condition(), "malformed-request", "{msg}: {err}");
        }
        let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
        server.client_first(b"n,,n=user,r=abc").unwrap();
        server.server_first(None, SECRET, 4096);
        assert_eq!(
            server.client_final(b"c=biws,\xff").unwrap_err().condition(),
            "malformed-request"
        );
    }

    #[test]
    fn steps_out_of_order_fail() {
        let creds = pencil(Hash::Sha256);
        let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
        assert!(server.server_first(Some(&creds), SECRET, 4096).is_empty());
        assert!(server.client_final(b"c=biws,r=abc,p=AAAA").is_err());

        let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
        exchange(&mut server, Some(&creds), "pencil", "n,,", b"").unwrap();
        assert!(server.client_first(b"n,,n=user,r=abc").is_err());
        assert!(server.client_final(b"c=biws,r=abc,p=AAAA").is_err());

        // A failed step ends the exchange: no second guess at the proof.
        let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
        assert!(exchange(&mut server, Some(&creds), "wrong", "n,,", b"").is_err());
        assert!(server.client_final(b"c=biws,r=abc,p=AAAA").is_err());

        let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
        assert!(server.client_first(b"garbage").is_err());
        assert!(server.client_first(b"n,,n=user,r=abc").is_err());
    }

    #[test]
    fn derive_checks_its_input() {
        assert_eq!(
            derive(Hash::Sha256, "pencil", b"salt", 4095),
            Err(SaslError::Config("iteration count below 4096"))
        );
        assert_eq!(
            derive(Hash::Sha256, "pencil", b"", 4096),
            Err(SaslError::Config("empty salt"))
        );
        for password in ["", "\u{ad}", "pen\u{7}cil", "\u{5d0}a"] {
            let err = derive(Hash::Sha256, password, b"salt", 4096).unwrap_err();
            assert!(matches!(err, SaslError::Prep(_)), "{password:?}: {err}");
        }
        // SASLprep makes equivalent spellings derive alike.
        assert_eq!(
            derive(Hash::Sha1, "I\u{ad}X", b"salt", 4096),
            derive(Hash::Sha1, "\u{2168}", b"salt", 4096)
        );
        let creds = pencil(Hash::Sha512);
        assert_eq!(creds.iterations, 4096);
        assert_eq!(creds.salt, b"0123456789abcdef");
        assert_eq!((creds.stored_key.len(), creds.server_key.len()), (64, 64));
    }

    #[test]
    fn generated_salts() {
        assert_eq!(generate_salt().len(), SALT_LEN);
        assert_ne!(generate_salt(), generate_salt());
    }

    #[test]
    fn mechanism_names() {
        for hash in Hash::all() {
            for plus in [false, true] {
                assert_eq!(parse_mechanism(hash.mechanism(plus)), Some((hash, plus)));
            }
        }
        assert_eq!(
            parse_mechanism("SCRAM-SHA-256-PLUS"),
            Some((Hash::Sha256, true))
        );
        for name in [
            "scram-sha-256",
            "SCRAM-SHA-384",
            "SCRAM-SHA-1-PLUS ",
            "PLAIN",
            "",
        ] {
            assert_eq!(parse_mechanism(name), None, "{name}");
        }
    }

    #[test]
    fn conditions() {
        let cases = [
            (SaslError::Malformed("x"), "malformed-request"),
            (SaslError::IncorrectEncoding("x"), "incorrect-encoding"),
            (SaslError::NotAuthorized, "not-authorized"),
            (SaslError::ChannelBinding("x"), "not-authorized"),
            (SaslError::InvalidAuthzid("x"), "invalid-authzid"),
            (SaslError::EncryptionRequired, "encryption-required"),
            (SaslError::Prep("x"), "malformed-request"),
            (SaslError::Config("x"), "temporary-auth-failure"),
        ];
        for (err, condition) in cases {
            assert_eq!(err.condition(), condition);
            assert!(!err.text().is_empty());
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
        server.client_first(b"n,,n=user,r=abc").unwrap();
        server.server_first(Some(&pencil(Hash::Sha256)), SECRET, 4096);
        let debug = format!("{server:?}");
        assert!(
            debug.contains("SCRAM-SHA-256") && !debug.contains("abc"),
            "{debug}"
        );
    }
}
