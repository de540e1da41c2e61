//! XML stream framing: bytes in, stream events out; elements in, bytes out.
//!
//! We own the framing instead of using tokio-xmpp's `xmlstream` responder because that layer has
//! no per-stanza byte budget or depth limit and keeps its buffers for the life of the stream,
//! while an idle session here must cost a few KiB. Parsing itself stays with rxml (restricted
//! XML: no DTDs, entities, processing instructions or comments) and minidom's tree builder.

pub mod reader;
pub mod writer;

pub use reader::{StreamEvent, XmlReader};

/// Stream-level error conditions (RFC 6120 §4.9.3) that Halyard sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamErrorKind {
    BadFormat,
    Conflict,
    ConnectionTimeout,
    HostUnknown,
    InternalServerError,
    InvalidNamespace,
    InvalidXml,
    NotAuthorized,
    NotWellFormed,
    PolicyViolation,
    ResourceConstraint,
    RestrictedXml,
    SystemShutdown,
    UndefinedCondition,
    UnsupportedStanzaType,
    UnsupportedVersion,
}

impl StreamErrorKind {
    pub fn condition(self) -> &'static str {
        use StreamErrorKind::*;
        match self {
            BadFormat => "bad-format",
            Conflict => "conflict",
            ConnectionTimeout => "connection-timeout",
            HostUnknown => "host-unknown",
            InternalServerError => "internal-server-error",
            InvalidNamespace => "invalid-namespace",
            InvalidXml => "invalid-xml",
            NotAuthorized => "not-authorized",
            NotWellFormed => "not-well-formed",
            PolicyViolation => "policy-violation",
            ResourceConstraint => "resource-constraint",
            RestrictedXml => "restricted-xml",
            SystemShutdown => "system-shutdown",
            UndefinedCondition => "undefined-condition",
            UnsupportedStanzaType => "unsupported-stanza-type",
            UnsupportedVersion => "unsupported-version",
        }
    }
}

/// A stream error to send before closing: the condition and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    pub kind: StreamErrorKind,
    pub text: Option<String>,
    /// An application-specific condition, serialised with its namespace (RFC 6120 §4.9.4),
    /// e.g. XEP-0198's `<handled-count-too-high/>`.
    pub app: Option<String>,
}

impl StreamError {
    pub fn new(kind: StreamErrorKind, text: impl Into<String>) -> Self {
        StreamError {
            kind,
            text: Some(text.into()),
            app: None,
        }
    }
    pub fn bare(kind: StreamErrorKind) -> Self {
        StreamError {
            kind,
            text: None,
            app: None,
        }
    }
}

impl StreamError {
    pub fn with_app(mut self, app: &minidom::Element) -> Self {
        self.app = Some(String::from(app));
        self
    }
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.text {
            Some(t) => write!(f, "{}: {t}", self.kind.condition()),
            None => f.write_str(self.kind.condition()),
        }
    }
}
