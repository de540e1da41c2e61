//! Incremental stream reader with limits.
//!
//! Feed it bytes as they arrive; it returns one [`StreamEvent`] at a time and leaves the rest of
//! the input for the next call, so a stream restart (after STARTTLS or SASL) can hand the
//! remaining bytes to a fresh reader. The byte budget is charged as the parser consumes input, so
//! an oversized stanza is refused as soon as it crosses the limit, not after it has been read.

use minidom::tree_builder::TreeBuilder;
use minidom::Element;
use rxml::error::EndOrError;
use rxml::parser::{Parse, RawEvent, RawParser, WithOptions};

use super::{StreamError, StreamErrorKind};
use halyard_xep::ns;
use halyard_xep::stanza::forget_prefixes;

#[derive(Debug)]
pub enum StreamEvent {
    /// The stream header: an `<stream:stream>` element with the peer's attributes and no
    /// children. For WebSocket framing, the `<open/>` element.
    Open(Element),
    /// A complete first-level element (stanza or nonza).
    Element(Element),
    /// The peer closed its stream (`</stream:stream>`).
    Close,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_stanza_bytes: usize,
    pub max_depth: usize,
    /// Most attributes on one element, namespace declarations included.
    pub max_attributes: usize,
    /// Longest attribute value, in bytes.
    pub max_attribute_bytes: usize,
}

impl Limits {
    /// Checks one attribute: `count` is how many the element has with this one.
    fn check_attribute(&self, count: usize, value: &str) -> Result<(), StreamError> {
        if count > self.max_attributes {
            return Err(StreamError::new(
                StreamErrorKind::PolicyViolation,
                format!(
                    "an element has more than {} attributes (c2s.max_attributes)",
                    self.max_attributes
                ),
            ));
        }
        if value.len() > self.max_attribute_bytes {
            return Err(StreamError::new(
                StreamErrorKind::PolicyViolation,
                format!(
                    "an attribute value is longer than {} bytes (c2s.max_attribute_bytes)",
                    self.max_attribute_bytes
                ),
            ));
        }
        Ok(())
    }
}

pub struct XmlReader {
    parser: RawParser,
    builder: TreeBuilder,
    limits: Limits,
    /// Bytes charged to the first-level element being read.
    stanza_bytes: usize,
    opened: bool,
    /// Whether the stream header declared `jabber:client` as the default namespace.
    default_ns_ok: bool,
    /// A header element has been read but not yet reported.
    header_pending: bool,
    /// Any non-whitespace input has been seen since the last reset.
    started: bool,
    /// The header declared a namespace prefix besides `stream`, which stanzas may use.
    header_other_prefixes: bool,
    /// Attributes seen on the element whose head is being read.
    attributes: usize,
    /// The parser stopped right after the header or a stanza, and has taken no input since but
    /// whitespace: it holds nothing that [`Self::after_header`] would not rebuild.
    clean: bool,
    /// The last byte the parser took (a `>` when it stopped at the end of a tag).
    last_byte: u8,
}

/// A parser and tree builder inside a minimal stream element: `jabber:client` as the default
/// namespace and the `stream` prefix, as a validated c2s header declares them.
fn after_minimal_header(limits: &Limits) -> Result<(RawParser, TreeBuilder), StreamError> {
    const HEADER: &[u8] = b"<stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams'>";
    let mut parser = parser_for(limits);
    let mut builder = TreeBuilder::new();
    let mut input = HEADER;
    loop {
        match parser.parse(&mut input, false) {
            Ok(Some(ev)) => builder.process_event(ev).map_err(not_well_formed)?,
            Ok(None) | Err(EndOrError::NeedMoreData) => break,
            Err(EndOrError::Error(e)) => return Err(map_rxml_error(e)),
        }
    }
    if builder.depth() != 1 {
        return Err(not_well_formed("internal: the stanza builder did not open"));
    }
    Ok((parser, builder))
}

fn parser_for(limits: &Limits) -> RawParser {
    let mut opts = rxml::parser::Options::default();
    // Attribute values and names are single tokens; never let one exceed the stanza budget.
    opts.max_token_length = opts.max_token_length.min(limits.max_stanza_bytes);
    RawParser::with_options(opts)
}

fn not_well_formed(e: impl std::fmt::Display) -> StreamError {
    StreamError::new(StreamErrorKind::NotWellFormed, e.to_string())
}

impl XmlReader {
    pub fn new(limits: Limits) -> Self {
        XmlReader {
            parser: parser_for(&limits),
            builder: TreeBuilder::new(),
            limits,
            stanza_bytes: 0,
            opened: false,
            default_ns_ok: false,
            header_pending: false,
            started: false,
            header_other_prefixes: false,
            attributes: 0,
            clean: false,
            last_byte: 0,
        }
    }

    /// A reader inside an open stream, between stanzas, as [`Self::releasable`] leaves one: what
    /// a session rebuilds when input arrives after it released its reader while idle.
    pub fn after_header(limits: Limits) -> Result<Self, StreamError> {
        let (parser, builder) = after_minimal_header(&limits)?;
        Ok(XmlReader {
            parser,
            builder,
            limits,
            stanza_bytes: 0,
            opened: true,
            default_ns_ok: true,
            header_pending: false,
            started: true,
            header_other_prefixes: false,
            attributes: 0,
            clean: true,
            last_byte: b'>',
        })
    }

    /// Whether this reader holds nothing but what [`Self::after_header`] rebuilds: the stream is
    /// open with the usual header (only the `stream` prefix declared), and the parser stopped at
    /// the end of the header or of a stanza with no input since but whitespace (keepalives,
    /// which may be dropped). An idle session can then drop its reader (~1.5 KB with what the
    /// parser and builder allocate) and rebuild it when input arrives.
    pub fn releasable(&self) -> bool {
        self.clean
            && self.opened
            && !self.header_other_prefixes
            && !self.header_pending
            && self.builder.depth() == 1
            && self.stanza_bytes == 0
    }

    /// A reader for one self-contained document (a WebSocket message): the root element itself is
    /// the event, depth counting starts at it.
    pub fn is_open(&self) -> bool {
        self.opened
    }

    /// Drops parser state and buffers: a stream restart, or releasing memory while idle between
    /// stanzas (the parser keeps only what an unfinished token needs).
    pub fn reset(&mut self) {
        *self = XmlReader::new(self.limits);
    }

    /// Frees scratch buffers while idle (between stanzas).
    pub fn shrink(&mut self) {
        if self.builder.depth() <= 1 && self.stanza_bytes == 0 {
            self.parser.release_temporaries();
        }
    }

    /// Parses from `input`, consuming bytes until one event is complete. Returns `Ok(None)` when
    /// all of `input` was consumed without completing an event.
    pub fn next(&mut self, input: &mut &[u8]) -> Result<Option<StreamEvent>, StreamError> {
        if !self.started {
            // Whitespace the peer sent after its last element of the previous stream (e.g. a
            // newline after `</auth>`) reaches a fresh reader after a restart; XML would refuse
            // it before the declaration, so it is skipped here.
            let ws = input
                .iter()
                .take_while(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
                .count();
            *input = &input[ws..];
            if input.is_empty() {
                return Ok(None);
            }
            self.started = true;
        }
        loop {
            if self.header_pending {
                self.header_pending = false;
                return self.header_event().map(Some);
            }
            let start = *input;
            let ev = self.parser.parse(input, false);
            let consumed = &start[..start.len() - input.len()];
            if !consumed
                .iter()
                .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
            {
                // The parser may now hold part of a token (set again below when this ends the
                // header or a stanza exactly).
                self.clean = false;
            }
            if let Some(b) = consumed.last() {
                self.last_byte = *b;
            }
            let ev = match ev {
                Ok(Some(ev)) => ev,
                Ok(None) => return Ok(None),
                Err(EndOrError::NeedMoreData) => {
                    self.charge(consumed.len())?;
                    return Ok(None);
                }
                Err(EndOrError::Error(e)) => return Err(map_rxml_error(e)),
            };
            self.charge(consumed.len())?;
            if let Some(out) = self.process(ev)? {
                if matches!(out, StreamEvent::Open(_) | StreamEvent::Element(_)) {
                    // The parser returns an event as soon as the tag that completes it ends,
                    // without reading ahead: when it last took a `>`, nothing is pending.
                    self.clean = self.last_byte == b'>';
                }
                return Ok(Some(out));
            }
        }
    }

    /// Charges consumed bytes to the current first-level element.
    fn charge(&mut self, n: usize) -> Result<(), StreamError> {
        if self.builder.depth() >= 2
            || (self.opened && self.builder.depth() == 1 && self.stanza_bytes > 0)
        {
            self.stanza_bytes += n;
            if self.stanza_bytes > self.limits.max_stanza_bytes {
                return Err(StreamError::new(
                    StreamErrorKind::PolicyViolation,
                    format!(
                        "stanza exceeds the limit of {} bytes",
                        self.limits.max_stanza_bytes
                    ),
                ));
            }
        }
        Ok(())
    }

    fn process(&mut self, ev: RawEvent) -> Result<Option<StreamEvent>, StreamError> {
        let depth = self.builder.depth();
        if let RawEvent::Attribute(_, _, value) = &ev {
            self.attributes += 1;
            self.limits
                .check_attribute(self.attributes, value.as_str())?;
        }
        match &ev {
            RawEvent::XmlDeclaration(..) => return Ok(None),
            RawEvent::ElementHeadOpen(..) if depth == 0 => self.attributes = 0,
            RawEvent::ElementHeadOpen(m, _) => {
                self.attributes = 0;
                if depth == 1 {
                    self.stanza_bytes = m.len();
                }
                // Depth counts from the stanza (the stream element is depth 0).
                if depth > self.limits.max_depth {
                    return Err(StreamError::new(
                        StreamErrorKind::PolicyViolation,
                        format!(
                            "elements nested deeper than {} levels",
                            self.limits.max_depth
                        ),
                    ));
                }
            }
            RawEvent::Attribute(_, (None, name), value)
                if depth == 0 && name.as_str() == "xmlns" =>
            {
                self.default_ns_ok = value.as_str() == ns::CLIENT;
            }
            RawEvent::Attribute(_, (Some(prefix), name), _)
                if depth == 0 && prefix.as_str() == "xmlns" && name.as_str() != "stream" =>
            {
                self.header_other_prefixes = true;
            }
            RawEvent::Text(_, text) if depth == 1 => {
                // Whitespace between stanzas is a keepalive (RFC 6120 §4.6.1); anything else is
                // character data where the grammar allows none.
                if text
                    .as_str()
                    .bytes()
                    .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
                {
                    return Ok(None);
                }
                return Err(StreamError::new(
                    StreamErrorKind::NotWellFormed,
                    "text outside any stanza",
                ));
            }
            _ => {}
        }
        let is_head_close = matches!(ev, RawEvent::ElementHeadClose(_));
        let is_foot = matches!(ev, RawEvent::ElementFoot(_));
        self.builder.process_event(ev).map_err(|e| match e {
            minidom::Error::MissingNamespace => StreamError::new(
                StreamErrorKind::NotWellFormed,
                "element or attribute prefix without a namespace",
            ),
            other => not_well_formed(other),
        })?;
        let new_depth = self.builder.depth();
        if is_head_close && depth == 0 && new_depth == 1 {
            // The stream header is complete.
            self.opened = true;
            let header = self.header_event()?;
            if !self.header_other_prefixes {
                // The builder keeps the header element open for the stream's life, with its
                // attributes and namespace maps (~2 KiB per session). Stanzas need only the two
                // namespaces, so continue with a builder that holds just those.
                self.builder = after_minimal_header(&self.limits)?.1;
            }
            return Ok(Some(header));
        }
        if is_foot {
            if depth == 1 && new_depth == 0 {
                return Ok(Some(StreamEvent::Close));
            }
            if new_depth == 1 {
                self.stanza_bytes = 0;
                return match self.builder.unshift_child() {
                    Some(mut el) => {
                        forget_prefixes(&mut el);
                        Ok(Some(StreamEvent::Element(el)))
                    }
                    None => Ok(None),
                };
            }
        }
        Ok(None)
    }

    fn header_event(&mut self) -> Result<StreamEvent, StreamError> {
        let top = self
            .builder
            .top()
            .ok_or_else(|| not_well_formed("no stream header"))?;
        if top.name() != "stream" || !top.has_ns(ns::STREAM) {
            return Err(StreamError::new(
                StreamErrorKind::InvalidNamespace,
                "the stream header must be <stream:stream xmlns:stream='http://etherx.jabber.org/streams'>",
            ));
        }
        if !self.default_ns_ok {
            return Err(StreamError::new(
                StreamErrorKind::InvalidNamespace,
                "the default namespace must be jabber:client",
            ));
        }
        let mut header = Element::bare("stream", ns::STREAM);
        for ((ns_, name), value) in top.attrs().iter() {
            header
                .attrs_mut()
                .insert(ns_.clone(), name.clone(), value.clone());
        }
        Ok(StreamEvent::Open(header))
    }
}

fn map_rxml_error(e: rxml::Error) -> StreamError {
    let msg = e.to_string();
    if msg.contains("token length") || msg.contains("too long") {
        return StreamError::new(
            StreamErrorKind::PolicyViolation,
            "an XML name or attribute value is too long",
        );
    }
    if msg.contains("restricted xml") || msg.contains("entity") {
        // DTDs, entity declarations and references, processing instructions and comments:
        // RFC 6120 §11.1 says the stream is closed with `restricted-xml`.
        return StreamError::new(StreamErrorKind::RestrictedXml, msg);
    }
    not_well_formed(msg)
}

/// Parses one complete element from `bytes` (a WebSocket message, a test fixture).
pub fn parse_element(bytes: &[u8], limits: Limits) -> Result<Element, StreamError> {
    if bytes.len() > limits.max_stanza_bytes {
        return Err(StreamError::new(
            StreamErrorKind::PolicyViolation,
            format!(
                "stanza exceeds the limit of {} bytes",
                limits.max_stanza_bytes
            ),
        ));
    }
    let mut opts = rxml::parser::Options::default();
    opts.max_token_length = opts.max_token_length.min(limits.max_stanza_bytes);
    let mut parser = RawParser::with_options(opts);
    let mut builder = TreeBuilder::new();
    let mut input = bytes;
    let mut attributes = 0;
    loop {
        match parser.parse(&mut input, true) {
            Ok(Some(ev)) => {
                match &ev {
                    RawEvent::ElementHeadOpen(..) => {
                        attributes = 0;
                        if builder.depth() >= limits.max_depth {
                            return Err(StreamError::new(
                                StreamErrorKind::PolicyViolation,
                                format!("elements nested deeper than {} levels", limits.max_depth),
                            ));
                        }
                    }
                    RawEvent::Attribute(_, _, value) => {
                        attributes += 1;
                        limits.check_attribute(attributes, value.as_str())?;
                    }
                    _ => {}
                }
                builder.process_event(ev).map_err(not_well_formed)?;
            }
            Ok(None) => break,
            Err(EndOrError::NeedMoreData) => return Err(not_well_formed("incomplete element")),
            Err(EndOrError::Error(e)) => return Err(map_rxml_error(e)),
        }
    }
    let mut el = builder
        .root
        .take()
        .ok_or_else(|| not_well_formed("no element"))?;
    forget_prefixes(&mut el);
    Ok(el)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_stanza_bytes: 1000,
        max_depth: 8,
        max_attributes: 10,
        max_attribute_bytes: 100,
    };
    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='x' version='1.0'>";

    fn events(r: &mut XmlReader, mut input: &[u8]) -> Result<Vec<StreamEvent>, StreamError> {
        let mut out = Vec::new();
        while let Some(ev) = r.next(&mut input)? {
            out.push(ev);
        }
        assert!(input.is_empty());
        Ok(out)
    }

    #[test]
    fn stanzas_keep_namespaces_after_the_header_is_dropped() {
        // The usual header: the reader continues with a minimal builder.
        let mut r = XmlReader::new(LIMITS);
        let doc =
            format!("{HEADER}<message to='a@b'><x xmlns='urn:x' a='1'/></message><stream:error/>");
        let ev = events(&mut r, doc.as_bytes()).unwrap();
        assert!(matches!(&ev[1], StreamEvent::Element(m)
            if m.is("message", ns::CLIENT) && m.get_child("x", "urn:x").is_some()));
        assert!(matches!(&ev[2], StreamEvent::Element(e) if e.is("error", ns::STREAM)));
        // A header declaring another prefix keeps it for the stanzas.
        let mut r = XmlReader::new(LIMITS);
        let doc = "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' xmlns:p='urn:p' to='x' version='1.0'><message><p:x/></message>";
        let ev = events(&mut r, doc.as_bytes()).unwrap();
        assert!(matches!(&ev[1], StreamEvent::Element(m) if m.get_child("x", "urn:p").is_some()));
    }

    #[test]
    fn header_stanzas_keepalives_and_close() {
        let mut r = XmlReader::new(LIMITS);
        let doc = format!(
            "{HEADER}<message to='a@b'><body>hi</body></message> \n <presence/></stream:stream>"
        );
        let ev = events(&mut r, doc.as_bytes()).unwrap();
        assert!(matches!(&ev[0], StreamEvent::Open(h) if h.attr("to") == Some("x")));
        assert!(
            matches!(&ev[1], StreamEvent::Element(e) if e.name() == "message" && e.has_ns(ns::CLIENT))
        );
        assert!(matches!(&ev[2], StreamEvent::Element(e) if e.name() == "presence"));
        assert!(matches!(&ev[3], StreamEvent::Close));
    }

    /// Feeds `doc` in `chunk`-byte pieces, replacing the reader by a rebuilt one whenever it is
    /// releasable (as an idle session does); the events, serialised.
    fn events_released(doc: &str, chunk: usize, release: bool) -> (Vec<String>, usize) {
        let mut r = XmlReader::new(LIMITS);
        let mut got = Vec::new();
        let mut released = 0;
        for piece in doc.as_bytes().chunks(chunk) {
            let mut input = piece;
            loop {
                match r.next(&mut input) {
                    Ok(Some(StreamEvent::Element(el))) => got.push(String::from(&el)),
                    Ok(Some(StreamEvent::Open(_))) => got.push("open".into()),
                    Ok(Some(StreamEvent::Close)) => got.push("close".into()),
                    Ok(None) => break,
                    Err(e) => {
                        got.push(format!("error {:?}", e.kind));
                        return (got, released);
                    }
                }
            }
            if release && r.releasable() {
                r = XmlReader::after_header(LIMITS).unwrap();
                released += 1;
            }
        }
        (got, released)
    }

    #[test]
    fn a_released_reader_gives_the_same_events() {
        let doc = format!(
            "{HEADER} <presence/>\n<message to='a@b' type='chat'><body>hi &amp; bye</body>\
             <x xmlns='urn:x'><y/></x></message>  \n\n<iq type='get' id='1'><ping \
             xmlns='urn:xmpp:ping'/></iq><r xmlns='urn:xmpp:sm:3'/> </stream:stream>"
        );
        let (whole, _) = events_released(&doc, doc.len(), false);
        assert_eq!(whole.len(), 6, "{whole:?}");
        for chunk in 1..40 {
            let (got, released) = events_released(&doc, chunk, true);
            assert_eq!(got, whole, "{chunk}-byte pieces");
            if chunk == 1 {
                // After every stanza, and after whitespace following one.
                assert!(released >= 6, "released {released} times");
            }
        }
        // Errors are found the same way: a tag left open, and text between stanzas.
        for bad in ["<message><body></message>", "<presence/>text"] {
            let doc = format!("{HEADER}{bad}");
            let (whole, _) = events_released(&doc, doc.len(), false);
            for chunk in 1..12 {
                assert_eq!(
                    events_released(&doc, chunk, true).0,
                    whole,
                    "{bad} in {chunk}"
                );
            }
        }
    }

    #[test]
    fn releasable_only_between_stanzas_of_a_usual_header() {
        let mut r = XmlReader::new(LIMITS);
        assert!(!r.releasable());
        assert!(events(&mut r, HEADER.as_bytes()).unwrap().len() == 1);
        assert!(r.releasable());
        assert!(events(&mut r, b"  \n").unwrap().is_empty());
        assert!(r.releasable(), "whitespace keepalives may be dropped");
        assert!(events(&mut r, b"<mess").unwrap().is_empty());
        assert!(!r.releasable(), "part of a tag");
        assert!(events(&mut r, b"age><body>x</body>").unwrap().is_empty());
        assert!(!r.releasable(), "inside a stanza");
        assert_eq!(events(&mut r, b"</message>").unwrap().len(), 1);
        assert!(r.releasable());
        // Another prefix declared on the header: stanzas may use it, so the reader stays.
        let mut r = XmlReader::new(LIMITS);
        let header = HEADER.replace("to='x'", "xmlns:x='urn:x' to='x'");
        assert_eq!(events(&mut r, header.as_bytes()).unwrap().len(), 1);
        assert!(!r.releasable());
    }

    #[test]
    fn byte_at_a_time_gives_the_same_events() {
        let mut r = XmlReader::new(LIMITS);
        let doc = format!("{HEADER}<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>");
        let mut got = Vec::new();
        for b in doc.as_bytes() {
            let mut one: &[u8] = std::slice::from_ref(b);
            while let Some(ev) = r.next(&mut one).unwrap() {
                got.push(ev);
            }
        }
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn leading_whitespace_after_a_restart_is_skipped() {
        let mut r = XmlReader::new(LIMITS);
        let doc = format!("\n  {HEADER}");
        assert!(matches!(
            events(&mut r, doc.as_bytes()).unwrap()[0],
            StreamEvent::Open(_)
        ));
    }

    #[test]
    fn oversized_stanza_is_refused_before_its_end() {
        let mut r = XmlReader::new(LIMITS);
        events(&mut r, HEADER.as_bytes()).unwrap();
        let mut input = "<message><body>".to_string();
        input.push_str(&"x".repeat(2000));
        let err = events(&mut r, input.as_bytes()).unwrap_err();
        assert_eq!(err.kind, StreamErrorKind::PolicyViolation);
    }

    #[test]
    fn depth_limit() {
        let mut r = XmlReader::new(LIMITS);
        events(&mut r, HEADER.as_bytes()).unwrap();
        let deep = "<a>".repeat(20);
        let err = events(&mut r, format!("<message>{deep}").as_bytes()).unwrap_err();
        assert_eq!(err.kind, StreamErrorKind::PolicyViolation);
    }

    #[test]
    fn restricted_xml_is_refused() {
        for bad in [
            "<!DOCTYPE x [<!ENTITY a 'b'>]>",
            "<?pi x?>",
            "<!-- c -->",
            "<message><body>&lol;</body></message>",
        ] {
            let mut r = XmlReader::new(LIMITS);
            events(&mut r, HEADER.as_bytes()).unwrap();
            let err = events(&mut r, bad.as_bytes()).unwrap_err();
            assert!(
                matches!(
                    err.kind,
                    StreamErrorKind::RestrictedXml | StreamErrorKind::NotWellFormed
                ),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn wrong_namespaces_are_invalid_namespace() {
        let mut r = XmlReader::new(LIMITS);
        let doc =
            "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>";
        assert_eq!(
            events(&mut r, doc.as_bytes()).unwrap_err().kind,
            StreamErrorKind::InvalidNamespace
        );
        let mut r = XmlReader::new(LIMITS);
        let doc = "<stream:stream xmlns='jabber:client' xmlns:stream='urn:wrong'>";
        assert_eq!(
            events(&mut r, doc.as_bytes()).unwrap_err().kind,
            StreamErrorKind::InvalidNamespace
        );
    }

    #[test]
    fn redeclared_prefixes_serialise() {
        // minidom's writer panicked on a prefix declared again below its declaration.
        let mut r = XmlReader::new(LIMITS);
        events(&mut r, HEADER.as_bytes()).unwrap();
        let doc = "<message xmlns:p='urn:x'><b xmlns:p='urn:x' p:c='1'><p:d xmlns:stream='urn:y'/></b></message>";
        let ev = events(&mut r, doc.as_bytes()).unwrap();
        let StreamEvent::Element(el) = &ev[0] else {
            panic!("{ev:?}")
        };
        let out = String::from(el);
        // What the server wrote is read back as is (archive, offline storage) and written again.
        let stored: Element = out.parse().unwrap();
        assert_eq!(String::from(&stored), out);
        let b = stored.get_child("b", ns::CLIENT).unwrap();
        assert_eq!(b.attr_ns("urn:x", "c"), Some("1"));
        assert!(b.has_child("d", "urn:x"));
        // The same for a single element (WebSocket, BOSH).
        let doc = doc.replacen("<message", "<message xmlns='jabber:client'", 1);
        let single = parse_element(doc.as_bytes(), LIMITS).unwrap();
        assert_eq!(String::from(&single), out);
    }

    #[test]
    fn text_between_stanzas_is_not_well_formed() {
        let mut r = XmlReader::new(LIMITS);
        events(&mut r, HEADER.as_bytes()).unwrap();
        assert_eq!(
            events(&mut r, b"hello<presence/>").unwrap_err().kind,
            StreamErrorKind::NotWellFormed
        );
    }
}
