//! A minimal, fast XMPP client for load generation: TCP from a chosen loopback source address,
//! STARTTLS (rustls), SASL (SCRAM-SHA-256, SCRAM-SHA-1, PLAIN), resource binding, and a read
//! path that splits the stream into top-level elements without parsing them.
//!
//! Why no XML parser on the read path: the tool reads tens of thousands of small stanzas per
//! second from servers that send well-formed XML, and needs from each at most its name, one or
//! two attributes and the body text. A full parser (rxml/minidom) builds a tree and allocates per
//! element and attribute; here a byte scanner tracks nesting depth to find where each top-level
//! element ends ([`Splitter`]) and a few substring searches pick out what a scenario needs. It
//! does not validate, decode entities or resolve namespace prefixes — fine for a benchmark's own
//! traffic, wrong for a general client.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use memchr::memmem;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

use crate::scram::{Hash, SaltCache, ScramClient};

/// What the splitter found.
#[derive(Debug, PartialEq, Eq, Clone)]
pub enum Event {
    /// `<stream:stream …>` (the range of its start tag).
    StreamOpen(Range<usize>),
    /// A complete top-level element (a stanza, features, SASL or TLS element, stream error).
    Element(Range<usize>),
    /// `</stream:stream>`.
    StreamClose,
}

/// Finds complete top-level elements in a byte stream by tracking element depth.
///
/// Depth 0 is outside the stream, 1 inside `<stream:stream>`, 2+ inside a stanza. Start tags
/// are scanned quote-aware (`>` may appear in attribute values); comments, processing
/// instructions and CDATA are skipped. Incomplete input leaves the scan position at the start of
/// the unfinished tag, so each byte of a stanza's content is scanned once.
#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    pos: usize,
    depth: u32,
    elem_start: usize,
}

/// Largest buffered unfinished element; a longer one is an error (a runaway stream).
const MAX_BUFFER: usize = 16 << 20;

impl Splitter {
    pub fn new() -> Self {
        Splitter::default()
    }

    /// The bytes of an element returned by [`Splitter::next_event`] (valid until more input
    /// is read).
    pub fn get(&self, r: Range<usize>) -> &[u8] {
        self.buf.get(r).unwrap_or(&[])
    }

    /// Bytes read but not yet consumed (used at STARTTLS: there must be none).
    pub fn pending(&self) -> usize {
        self.buf.len() - self.keep_from()
    }

    fn keep_from(&self) -> usize {
        if self.depth >= 2 {
            self.elem_start
        } else {
            self.pos
        }
    }

    /// Drops consumed bytes and returns the buffer to read more into.
    pub fn buffer_for_read(&mut self) -> anyhow::Result<&mut Vec<u8>> {
        let keep = self.keep_from();
        if keep > 0 {
            self.buf.drain(..keep);
            self.pos -= keep;
            self.elem_start = self.elem_start.saturating_sub(keep);
        }
        if self.buf.len() > MAX_BUFFER {
            bail!("an element longer than {MAX_BUFFER} bytes");
        }
        // Start small and double: an idle session keeps ~1 KiB, a busy one grows to its
        // largest read, so 100k held sessions do not cost the tool gigabytes.
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(self.buf.capacity().max(1024));
        }
        Ok(&mut self.buf)
    }

    #[cfg(test)]
    pub fn feed(&mut self, data: &[u8]) {
        if let Ok(b) = self.buffer_for_read() {
            b.extend_from_slice(data);
        }
    }

    /// The next complete event, or `None` when more input is needed.
    pub fn next_event(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            let Some(off) = memchr::memchr(b'<', &self.buf[self.pos..]) else {
                // Text (whitespace keepalives between stanzas, or character data inside one).
                self.pos = self.buf.len();
                return Ok(None);
            };
            let lt = self.pos + off;
            let rest = &self.buf[lt..];
            if rest.len() < 2 {
                self.pos = lt;
                return Ok(None);
            }
            match rest[1] {
                b'?' => match memmem::find(&rest[2..], b"?>") {
                    Some(e) => self.pos = lt + 2 + e + 2,
                    None => {
                        self.pos = lt;
                        return Ok(None);
                    }
                },
                b'!' => {
                    let (open, close): (&[u8], &[u8]) = if rest.starts_with(b"<!--") {
                        (b"<!--", b"-->")
                    } else if rest.starts_with(b"<![CDATA[") {
                        (b"<![CDATA[", b"]]>")
                    } else if b"<![CDATA[".starts_with(&rest[..rest.len().min(9)])
                        || b"<!--".starts_with(&rest[..rest.len().min(4)])
                    {
                        self.pos = lt;
                        return Ok(None);
                    } else {
                        bail!("unexpected markup (DTD?) in the stream");
                    };
                    match memmem::find(&rest[open.len()..], close) {
                        Some(e) => self.pos = lt + open.len() + e + close.len(),
                        None => {
                            self.pos = lt;
                            return Ok(None);
                        }
                    }
                }
                b'/' => {
                    let Some(e) = memchr::memchr(b'>', rest) else {
                        self.pos = lt;
                        return Ok(None);
                    };
                    self.pos = lt + e + 1;
                    match self.depth {
                        0 => bail!("end tag outside the stream"),
                        1 => {
                            self.depth = 0;
                            return Ok(Some(Event::StreamClose));
                        }
                        2 => {
                            self.depth = 1;
                            return Ok(Some(Event::Element(self.elem_start..self.pos)));
                        }
                        _ => self.depth -= 1,
                    }
                }
                _ => {
                    let Some(e) = tag_end(rest) else {
                        self.pos = lt;
                        return Ok(None);
                    };
                    let end = lt + e + 1;
                    let self_closing = self.buf[end - 2] == b'/';
                    self.pos = end;
                    match self.depth {
                        0 => {
                            if self_closing {
                                bail!("the stream header closes itself");
                            }
                            self.depth = 1;
                            return Ok(Some(Event::StreamOpen(lt..end)));
                        }
                        1 if self_closing => return Ok(Some(Event::Element(lt..end))),
                        1 => {
                            self.elem_start = lt;
                            self.depth = 2;
                        }
                        _ if self_closing => {}
                        _ => self.depth += 1,
                    }
                }
            }
        }
    }

    /// Forgets all state (after STARTTLS and SASL the stream restarts).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.depth = 0;
        self.elem_start = 0;
    }
}

/// Offset of the `>` closing the start tag at the beginning of `tag`, skipping quoted values.
fn tag_end(tag: &[u8]) -> Option<usize> {
    let mut i = 1;
    loop {
        let off = memchr::memchr3(b'>', b'\'', b'"', &tag[i..])?;
        let at = i + off;
        match tag[at] {
            b'>' => return Some(at),
            q => {
                let close = memchr::memchr(q, &tag[at + 1..])?;
                i = at + 1 + close + 1;
            }
        }
    }
}

/// The element name of the start tag at the beginning of `el` (with its prefix, if any).
pub fn name(el: &[u8]) -> &[u8] {
    let s = el.strip_prefix(b"<").unwrap_or(el);
    let end = s
        .iter()
        .position(|&c| c == b' ' || c == b'>' || c == b'/' || c.is_ascii_whitespace())
        .unwrap_or(s.len());
    &s[..end]
}

/// The element name without its namespace prefix: top-level stream elements arrive as
/// `<stream:features>` or `<features xmlns='http://etherx.jabber.org/streams'>` depending on the
/// server.
pub fn local_name(el: &[u8]) -> &[u8] {
    let n = name(el);
    match memchr::memchr(b':', n) {
        Some(i) => &n[i + 1..],
        None => n,
    }
}

/// The raw (not entity-decoded) value of attribute `attr` on the start tag at the beginning of
/// `el`.
pub fn attr<'a>(el: &'a [u8], attr: &[u8]) -> Option<&'a [u8]> {
    let end = tag_end(el)?;
    let tag = &el[..end];
    let mut i = name(el).len() + 1;
    while i < tag.len() {
        while i < tag.len() && (tag[i].is_ascii_whitespace() || tag[i] == b'/') {
            i += 1;
        }
        let eq = i + memchr::memchr(b'=', &tag[i..])?;
        let key = tag[i..eq].trim_ascii();
        let mut v = eq + 1;
        while v < tag.len() && tag[v].is_ascii_whitespace() {
            v += 1;
        }
        let q = *tag.get(v)?;
        if q != b'\'' && q != b'"' {
            return None;
        }
        let close = v + 1 + memchr::memchr(q, &tag[v + 1..])?;
        if key == attr {
            return Some(&tag[v + 1..close]);
        }
        i = close + 1;
    }
    None
}

/// The text directly inside the first `<tag>` / `<tag …>` element in `el`, up to the next `<`.
pub fn child_text<'a>(el: &'a [u8], tag: &[u8]) -> Option<&'a [u8]> {
    let at = find_tag(el, tag)?;
    let start = at + tag_end(&el[at..])? + 1;
    let len = memchr::memchr(b'<', &el[start..])?;
    Some(&el[start..start + len])
}

/// Offset of the first start tag named `tag` in `el` (`<tag>`, `<tag/>` or `<tag …`).
pub fn find_tag(el: &[u8], tag: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(off) = memmem::find(&el[from..], tag) {
        let at = from + off;
        if at > 0 && el[at - 1] == b'<' {
            if let Some(b'>' | b'/' | b' ' | b'\t' | b'\n' | b'\r') = el.get(at + tag.len()) {
                return Some(at - 1);
            }
        }
        from = at + 1;
    }
    None
}

/// The text content of a top-level element (`<challenge …>TEXT</challenge>`); empty for a
/// self-closing one.
pub fn inner_text(el: &[u8]) -> &[u8] {
    let Some(e) = tag_end(el) else { return &[] };
    if e > 0 && el[e - 1] == b'/' {
        return &[];
    }
    let body = &el[e + 1..];
    match memchr::memrchr(b'<', body) {
        Some(l) => &body[..l],
        None => body,
    }
}

pub fn contains(el: &[u8], needle: &[u8]) -> bool {
    memmem::find(el, needle).is_some()
}

/// Connection settings shared by every scenario.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub domain: String,
    pub user_pattern: String,
    pub password: String,
    pub tls: bool,
    pub mech: Option<Mech>,
    pub sources: Vec<IpAddr>,
    pub resource: String,
    pub tls_config: Arc<rustls::ClientConfig>,
    pub cache: Arc<SaltCache>,
}

impl Target {
    /// The localpart of account `n` (`--user` with `{n}` replaced).
    pub fn user(&self, n: u64) -> String {
        self.user_pattern.replace("{n}", &n.to_string())
    }

    pub fn bare_jid(&self, n: u64) -> String {
        format!("{}@{}", self.user(n), self.domain)
    }

    /// The source address connection `n` binds to (round robin over `--sources`).
    pub fn source(&self, n: u64) -> IpAddr {
        self.sources
            .get((n % self.sources.len().max(1) as u64) as usize)
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
}

/// `--sources N`: 127.0.0.2 … 127.0.0.(N+1) (the whole 127/8 is loopback on Linux, so each is a
/// separate set of ~28k ephemeral ports towards the server). 0: let the kernel choose (one
/// address, the default route's).
pub fn loopback_sources(n: u32) -> anyhow::Result<Vec<IpAddr>> {
    if n > 65_000 {
        bail!("--sources {n}: at most 65000");
    }
    Ok((0..n)
        .map(|i| {
            let k = i + 2;
            IpAddr::V4(Ipv4Addr::new(127, 0, (k >> 8) as u8, (k & 0xff) as u8))
        })
        .collect())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mech {
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[value(name = "SCRAM-SHA-1")]
    ScramSha1,
    #[value(name = "PLAIN")]
    Plain,
}

impl Mech {
    pub fn name(self) -> &'static str {
        match self {
            Mech::ScramSha256 => "SCRAM-SHA-256",
            Mech::ScramSha1 => "SCRAM-SHA-1",
            Mech::Plain => "PLAIN",
        }
    }
}

/// Where a login failed: the error kinds the reports count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Stream,
    Tls,
    Auth,
    Bind,
}

impl Stage {
    pub fn kind(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Stream => "stream",
            Stage::Tls => "tls",
            Stage::Auth => "auth",
            Stage::Bind => "bind",
        }
    }
}

#[derive(Debug)]
pub struct LoginError {
    pub stage: Stage,
    pub error: anyhow::Error,
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {:#}", self.stage.kind(), self.error)
    }
}

impl std::error::Error for LoginError {}

trait At<T> {
    fn at(self, stage: Stage) -> Result<T, LoginError>;
}

impl<T, E: Into<anyhow::Error>> At<T> for Result<T, E> {
    fn at(self, stage: Stage) -> Result<T, LoginError> {
        self.map_err(|e| LoginError {
            stage,
            error: e.into(),
        })
    }
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An authenticated, bound session.
pub struct Session {
    io: Box<dyn Io>,
    pub sp: Splitter,
    /// The full JID the server bound.
    pub jid: String,
}

/// A stream during login, before it is boxed.
struct Conn<S> {
    io: S,
    sp: Splitter,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn next(&mut self) -> anyhow::Result<Event> {
        loop {
            if let Some(ev) = self.sp.next_event()? {
                return Ok(ev);
            }
            let buf = self.sp.buffer_for_read()?;
            if self.io.read_buf(buf).await.context("reading")? == 0 {
                bail!("the server closed the connection");
            }
        }
    }

    /// The next top-level element (its bytes copied: login is not the hot path).
    async fn element(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            match self.next().await? {
                Event::StreamOpen(_) => {}
                Event::Element(r) => {
                    let el = self.sp.get(r).to_vec();
                    if local_name(&el) == b"error" {
                        bail!("stream error: {}", String::from_utf8_lossy(&el));
                    }
                    return Ok(el);
                }
                Event::StreamClose => bail!("the server closed the stream"),
            }
        }
    }

    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.io.write_all(data).await.context("writing")?;
        self.io.flush().await.context("flushing")
    }

    /// Sends a stream header and returns the `<stream:features/>` that follow.
    async fn open(&mut self, domain: &str) -> anyhow::Result<Vec<u8>> {
        self.sp.reset();
        let header = format!("<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>");
        self.send(header.as_bytes()).await?;
        let el = self.element().await?;
        if local_name(&el) != b"features" {
            bail!(
                "expected <stream:features/>, got {}",
                String::from_utf8_lossy(&el)
            );
        }
        Ok(el)
    }
}

/// Logs account `n` in: connect from its source address, STARTTLS if asked, SASL, bind.
/// Sends initial presence when `presence` is set.
pub async fn login(t: &Target, n: u64, presence: bool) -> Result<Session, LoginError> {
    let sock = TcpSocket::new_v4().at(Stage::Connect)?;
    let src = t.source(n);
    if !src.is_unspecified() {
        sock.bind(SocketAddr::new(src, 0))
            .with_context(|| format!("binding to {src}"))
            .at(Stage::Connect)?;
    }
    let tcp = sock
        .connect(t.addr)
        .await
        .with_context(|| format!("connecting to {} from {src}", t.addr))
        .at(Stage::Connect)?;
    tcp.set_nodelay(true).at(Stage::Connect)?;
    let mut c = Conn {
        io: tcp,
        sp: Splitter::new(),
    };
    let features = c.open(&t.domain).await.at(Stage::Stream)?;
    let (mut c, features) = if t.tls {
        if !contains(&features, b"urn:ietf:params:xml:ns:xmpp-tls") {
            return Err(anyhow!("the server does not offer STARTTLS")).at(Stage::Tls);
        }
        c.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await
            .at(Stage::Tls)?;
        let el = c.element().await.at(Stage::Tls)?;
        if name(&el) != b"proceed" {
            return Err(anyhow!(
                "STARTTLS refused: {}",
                String::from_utf8_lossy(&el)
            ))
            .at(Stage::Tls);
        }
        if c.sp.pending() > 0 {
            return Err(anyhow!("data after <proceed/>")).at(Stage::Tls);
        }
        let tls = starttls(t, c.io).await.at(Stage::Tls)?;
        let mut c = Conn {
            io: Box::new(tls) as Box<dyn Io>,
            sp: c.sp,
        };
        let features = c.open(&t.domain).await.at(Stage::Stream)?;
        (c, features)
    } else {
        (
            Conn {
                io: Box::new(c.io) as Box<dyn Io>,
                sp: c.sp,
            },
            features,
        )
    };
    authenticate(t, n, &mut c, &features)
        .await
        .at(Stage::Auth)?;
    let features = c.open(&t.domain).await.at(Stage::Stream)?;
    let jid = bind(t, &mut c, &features).await.at(Stage::Bind)?;
    if presence {
        c.send(b"<presence/>").await.at(Stage::Bind)?;
    }
    Ok(Session {
        io: c.io,
        sp: c.sp,
        jid,
    })
}

async fn starttls(
    t: &Target,
    tcp: TcpStream,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from(t.domain.clone())
        .with_context(|| format!("{:?} is not a TLS server name", t.domain))?;
    tokio_rustls::TlsConnector::from(t.tls_config.clone())
        .connect(name, tcp)
        .await
        .context("TLS handshake")
}

fn offered(features: &[u8], mech: Mech) -> bool {
    contains(
        features,
        format!("<mechanism>{}</mechanism>", mech.name()).as_bytes(),
    )
}

async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    t: &Target,
    n: u64,
    c: &mut Conn<S>,
    features: &[u8],
) -> anyhow::Result<()> {
    let mech = match t.mech {
        Some(m) => m,
        None => [Mech::ScramSha256, Mech::ScramSha1, Mech::Plain]
            .into_iter()
            .find(|&m| offered(features, m))
            .context("the server offers none of SCRAM-SHA-256, SCRAM-SHA-1, PLAIN")?,
    };
    let user = t.user(n);
    const NS: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
    let check_success = |el: &[u8]| -> anyhow::Result<Vec<u8>> {
        match name(el) {
            b"success" => B64
                .decode(inner_text(el).trim_ascii())
                .context("<success/> data is not base64"),
            b"failure" => bail!("{}", String::from_utf8_lossy(el)),
            _ => bail!("unexpected {}", String::from_utf8_lossy(el)),
        }
    };
    match mech {
        Mech::Plain => {
            let msg = B64.encode(format!("\0{user}\0{}", t.password));
            c.send(format!("<auth xmlns='{NS}' mechanism='PLAIN'>{msg}</auth>").as_bytes())
                .await?;
            check_success(&c.element().await?)?;
        }
        Mech::ScramSha256 | Mech::ScramSha1 => {
            let hash = if mech == Mech::ScramSha256 {
                Hash::Sha256
            } else {
                Hash::Sha1
            };
            let mut s = ScramClient::new(hash, &user, &t.password)?;
            let first = B64.encode(s.client_first());
            c.send(
                format!(
                    "<auth xmlns='{NS}' mechanism='{}'>{first}</auth>",
                    hash.mechanism()
                )
                .as_bytes(),
            )
            .await?;
            let el = c.element().await?;
            if name(&el) != b"challenge" {
                check_success(&el)?;
                bail!("<success/> without a challenge");
            }
            let server_first = B64
                .decode(inner_text(&el).trim_ascii())
                .context("challenge is not base64")?;
            let fin = B64.encode(s.client_final(&server_first, &t.cache)?);
            c.send(format!("<response xmlns='{NS}'>{fin}</response>").as_bytes())
                .await?;
            let el = c.element().await?;
            let server_final = check_success(&el)?;
            s.verify_server_final(&server_final)?;
        }
    }
    Ok(())
}

async fn bind<S: AsyncRead + AsyncWrite + Unpin>(
    t: &Target,
    c: &mut Conn<S>,
    features: &[u8],
) -> anyhow::Result<String> {
    if !contains(features, b"urn:ietf:params:xml:ns:xmpp-bind") {
        bail!("the server does not offer resource binding");
    }
    c.send(format!("<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{}</resource></bind></iq>", t.resource).as_bytes()).await?;
    let jid = loop {
        let el = c.element().await?;
        if name(&el) == b"iq" && attr(&el, b"id") == Some(b"bind1") {
            if attr(&el, b"type") != Some(b"result") {
                bail!("bind refused: {}", String::from_utf8_lossy(&el));
            }
            let jid = child_text(&el, b"jid").context("bind result has no <jid/>")?;
            break String::from_utf8_lossy(jid).into_owned();
        }
    };
    // RFC 3921 sessions: only where the server says they are not optional (old servers).
    if contains(features, b"urn:ietf:params:xml:ns:xmpp-session")
        && !contains(features, b"<optional")
    {
        c.send(b"<iq type='set' id='sess1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
            .await?;
        loop {
            let el = c.element().await?;
            if name(&el) == b"iq" && attr(&el, b"id") == Some(b"sess1") {
                if attr(&el, b"type") != Some(b"result") {
                    bail!("session refused: {}", String::from_utf8_lossy(&el));
                }
                break;
            }
        }
    }
    Ok(jid)
}

impl Session {
    /// The next event; cancel-safe (only the socket read awaits, and `read_buf` is cancel-safe).
    pub async fn next(&mut self) -> anyhow::Result<Event> {
        loop {
            if let Some(ev) = self.sp.next_event()? {
                return Ok(ev);
            }
            let buf = self.sp.buffer_for_read()?;
            if self.io.read_buf(buf).await.context("reading")? == 0 {
                bail!("the server closed the connection");
            }
        }
    }

    /// The next top-level element's range, answering XMPP pings (XEP-0199) on the way;
    /// stream errors and closes are errors.
    pub async fn next_element(&mut self) -> anyhow::Result<Range<usize>> {
        loop {
            match self.next().await? {
                Event::StreamOpen(_) => {}
                Event::StreamClose => bail!("the server closed the stream"),
                Event::Element(r) => {
                    let el = self.sp.get(r.clone());
                    match local_name(el) {
                        b"error" => {
                            bail!("stream error: {}", String::from_utf8_lossy(el))
                        }
                        b"iq"
                            if attr(el, b"type") == Some(b"get")
                                && contains(el, b"urn:xmpp:ping") =>
                        {
                            let reply = ping_reply(el);
                            self.send(&reply).await?;
                        }
                        _ => return Ok(r),
                    }
                }
            }
        }
    }

    pub fn get(&self, r: Range<usize>) -> &[u8] {
        self.sp.get(r)
    }

    pub async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.io.write_all(data).await.context("writing")?;
        self.io.flush().await.context("flushing")
    }

    /// Closes the stream politely (errors ignored: the run is over).
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.send(b"</stream:stream>").await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

fn ping_reply(el: &[u8]) -> Vec<u8> {
    let id = attr(el, b"id").unwrap_or_default();
    let mut out = b"<iq type='result' id='".to_vec();
    out.extend_from_slice(id);
    out.push(b'\'');
    if let Some(from) = attr(el, b"from") {
        out.extend_from_slice(b" to='");
        out.extend_from_slice(from);
        out.push(b'\'');
    }
    out.extend_from_slice(b"/>");
    out
}

/// A rustls client configuration that accepts ANY server certificate.
///
/// FOR BENCHMARKS ONLY: the tool talks to servers on loopback with self-signed certificates, and
/// measures the cost of TLS, not its trust. The handshake signature is still verified against the
/// presented certificate, so the crypto work matches a real client's. Session resumption is off
/// so every login pays a full handshake, as a client's first connection does.
pub fn insecure_tls_config() -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        // Benchmark only: any certificate is accepted (see insecure_tls_config).
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(sp: &mut Splitter) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(ev) = sp.next_event().unwrap() {
            out.push(match ev {
                Event::StreamOpen(r) => format!("open:{}", String::from_utf8_lossy(sp.get(r))),
                Event::Element(r) => String::from_utf8_lossy(sp.get(r)).into_owned(),
                Event::StreamClose => "close".into(),
            });
        }
        out
    }

    const STREAM: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' from='x' id='a>b' version='1.0'>\
<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-1</mechanism></mechanisms><ver/></stream:features> \n\
<message from=\"a@x/r\" to='b@x'><body>t1s2 &lt;3</body><!-- <not a tag> --><x><![CDATA[</message>]]></x></message>\
<presence/><iq type='result' id='q>1'/></stream:stream>";

    #[test]
    fn splits_a_whole_stream() {
        let mut sp = Splitter::new();
        sp.feed(STREAM.as_bytes());
        let ev = events(&mut sp);
        assert_eq!(ev.len(), 6, "{ev:#?}");
        assert!(ev[0].starts_with("open:<stream:stream"));
        assert!(ev[0].ends_with("version='1.0'>"));
        assert!(ev[1].starts_with("<stream:features>") && ev[1].ends_with("</stream:features>"));
        assert!(ev[2].starts_with("<message") && ev[2].ends_with("]]></x></message>"));
        assert_eq!(ev[3], "<presence/>");
        assert_eq!(ev[4], "<iq type='result' id='q>1'/>");
        assert_eq!(ev[5], "close");
    }

    #[test]
    fn byte_by_byte_gives_the_same_events() {
        let whole = {
            let mut sp = Splitter::new();
            sp.feed(STREAM.as_bytes());
            events(&mut sp)
        };
        let mut sp = Splitter::new();
        let mut got = Vec::new();
        for b in STREAM.as_bytes() {
            sp.feed(&[*b]);
            got.extend(events(&mut sp));
        }
        assert_eq!(got, whole);
    }

    #[test]
    fn consumed_bytes_are_dropped() {
        let mut sp = Splitter::new();
        sp.feed(b"<stream:stream><a>1</a><b>");
        assert_eq!(events(&mut sp).len(), 2);
        assert_eq!(sp.pending(), 3);
        sp.feed(b"2</b>");
        assert_eq!(sp.buf.len(), 8);
        assert_eq!(events(&mut sp), vec!["<b>2</b>".to_string()]);
    }

    #[test]
    fn errors_on_garbage() {
        let mut sp = Splitter::new();
        sp.feed(b"</x>");
        assert!(sp.next_event().is_err());
        let mut sp = Splitter::new();
        sp.feed(b"<!DOCTYPE x>");
        assert!(sp.next_event().is_err());
    }

    #[test]
    fn attributes_and_text() {
        let el = b"<iq type='result' id=\"b 1\" from='x'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>u0@localhost/r</jid></bind></iq>";
        assert_eq!(name(el), b"iq");
        assert_eq!(local_name(b"<stream:features>"), b"features");
        assert_eq!(local_name(b"<features xmlns='x'>"), b"features");
        assert_eq!(attr(el, b"type"), Some(&b"result"[..]));
        assert_eq!(attr(el, b"id"), Some(&b"b 1"[..]));
        assert_eq!(attr(el, b"to"), None);
        assert_eq!(child_text(el, b"jid"), Some(&b"u0@localhost/r"[..]));
        assert_eq!(child_text(el, b"ji"), None);
        assert_eq!(
            inner_text(b"<challenge xmlns='x'>abc=</challenge>"),
            b"abc="
        );
        assert_eq!(inner_text(b"<success xmlns='x'/>"), b"");
        assert_eq!(find_tag(b"<a><bodyx/><body>", b"body"), Some(11));
        let ping = b"<iq type='get' id='p1' from='localhost'><ping xmlns='urn:xmpp:ping'/></iq>";
        assert_eq!(
            ping_reply(ping),
            b"<iq type='result' id='p1' to='localhost'/>".to_vec()
        );
    }

    #[test]
    fn sources_and_users() {
        let s = loopback_sources(300).unwrap();
        assert_eq!(s[0].to_string(), "127.0.0.2");
        assert_eq!(s[254].to_string(), "127.0.1.0");
        assert!(loopback_sources(70_000).is_err());
    }
}
