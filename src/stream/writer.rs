//! Serialisation: stream headers, stream errors, and stanzas to bytes (once per stanza, however
//! many sessions receive it).

use bytes::Bytes;
use minidom::Element;

use super::StreamError;
use halyard_xep::ns;

use halyard_xep::stanza::escape as esc;

/// The server's stream header for TCP framing (RFC 6120 §4.7).
pub fn stream_header(id: &str, from: &str, to: Option<&str>) -> String {
    let to = to.map(|t| format!(" to='{}'", esc(t))).unwrap_or_default();
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' id='{}' from='{}'{to} version='1.0' xml:lang='en'>",
        ns::CLIENT,
        ns::STREAM,
        esc(id),
        esc(from)
    )
}

/// The server's `<open/>` for WebSocket framing (RFC 7395 §3.3.2).
pub fn ws_open(id: &str, from: &str, to: Option<&str>) -> String {
    let to = to.map(|t| format!(" to='{}'", esc(t))).unwrap_or_default();
    format!(
        "<open xmlns='{}' id='{}' from='{}'{to} version='1.0' xml:lang='en'/>",
        ns::FRAMING,
        esc(id),
        esc(from)
    )
}

pub const STREAM_FOOTER: &str = "</stream:stream>";

pub fn ws_close() -> String {
    format!("<close xmlns='{}'/>", ns::FRAMING)
}

/// `<stream:error>` with its condition and text, in the form for TCP framing (the `stream`
/// prefix is declared by the stream header).
pub fn stream_error(err: &StreamError) -> String {
    stream_error_with(err, "")
}

/// The same for WebSocket framing, where each message declares its namespaces.
pub fn ws_stream_error(err: &StreamError) -> String {
    stream_error_with(err, &format!(" xmlns:stream='{}'", ns::STREAM))
}

fn stream_error_with(err: &StreamError, decl: &str) -> String {
    let text = err
        .text
        .as_deref()
        .map(|t| {
            format!(
                "<text xmlns='{}' xml:lang='en'>{}</text>",
                ns::STREAMS,
                esc(t)
            )
        })
        .unwrap_or_default();
    format!(
        "<stream:error{decl}><{} xmlns='{}'/>{text}{}</stream:error>",
        err.kind.condition(),
        ns::STREAMS,
        err.app.as_deref().unwrap_or_default()
    )
}

/// Serialises an element once; the bytes are shared by every queue it goes to.
pub fn to_bytes(el: &Element) -> Bytes {
    let mut out = Vec::with_capacity(256);
    // Writing to a Vec cannot fail for I/O reasons, and minidom elements are well-formed by
    // construction, so an error here would be a bug in minidom.
    if let Err(e) = el.write_to(&mut out) {
        tracing::error!(error = %e, "serialising an element failed");
        out.clear();
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::StreamErrorKind;

    #[test]
    fn header_escapes_attributes() {
        let h = stream_header("a'b", "example.com", Some("x<y"));
        assert!(h.contains("id='a&apos;b'"));
        assert!(h.contains("to='x&lt;y'"));
    }

    #[test]
    fn stream_error_carries_condition_and_text() {
        let s = stream_error(&StreamError::new(
            StreamErrorKind::PolicyViolation,
            "too big",
        ));
        assert_eq!(
            s,
            "<stream:error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams' xml:lang='en'>too big</text></stream:error>"
        );
    }
}
