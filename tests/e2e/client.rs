//! tokio-xmpp as a real client, with a connector that trusts the test certificate (its own TLS
//! setup only trusts system roots) and computes tls-exporter channel binding as its STARTTLS and
//! Direct TLS connectors do.

use std::borrow::Cow;
use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use sasl::common::ChannelBinding;
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_xmpp::connect::ServerConnector;
use tokio_xmpp::parsers::jid::Jid;
use tokio_xmpp::xmlstream::{
    initiate_stream, PendingFeaturesRecv, StreamHeader, Timeouts, XmppStreamElement,
};
use tokio_xmpp::{Client, Event};

use super::common::{client_tls, DOMAIN, TIMEOUT};

#[derive(Debug, Clone, Copy)]
pub enum Mode {
    StartTls,
    DirectTls,
}

#[derive(Debug, Clone)]
pub struct TestConnector {
    pub addr: SocketAddr,
    pub mode: Mode,
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

fn header(jid: &Jid) -> StreamHeader<'_> {
    StreamHeader {
        to: Some(Cow::Borrowed(jid.domain().as_str())),
        from: None,
        id: None,
    }
}

async fn tls_over(tcp: TcpStream) -> Result<(Tls, ChannelBinding), tokio_xmpp::Error> {
    let name = rustls::pki_types::ServerName::try_from(DOMAIN)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(client_tls())
        .connect(name, tcp)
        .await?;
    let conn = tls.get_ref().1;
    let cb = if conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
        let out = conn
            .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", None)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        ChannelBinding::TlsExporter(out.to_vec())
    } else {
        ChannelBinding::None
    };
    Ok((tls, cb))
}

impl ServerConnector for TestConnector {
    type Stream = BufStream<Tls>;

    async fn connect(
        &self,
        jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<(PendingFeaturesRecv<Self::Stream>, ChannelBinding), tokio_xmpp::Error> {
        let tcp = TcpStream::connect(self.addr).await?;
        let (tls, cb) = match self.mode {
            Mode::DirectTls => tls_over(tcp).await?,
            Mode::StartTls => {
                let pending =
                    initiate_stream(BufStream::new(tcp), ns, header(jid), timeouts).await?;
                let (_features, mut xs) = pending.recv_features::<XmppStreamElement>().await?;
                xs.send(&XmppStreamElement::Starttls(
                    tokio_xmpp::parsers::starttls::Nonza::Request(
                        tokio_xmpp::parsers::starttls::Request,
                    ),
                ))
                .await?;
                loop {
                    match xs.next().await {
                        Some(Ok(XmppStreamElement::Starttls(
                            tokio_xmpp::parsers::starttls::Nonza::Proceed(_),
                        ))) => break,
                        Some(Ok(_)) => continue,
                        _ => return Err(tokio_xmpp::Error::Disconnected),
                    }
                }
                tls_over(xs.into_inner().into_inner()).await?
            }
        };
        Ok((
            initiate_stream(BufStream::new(tls), ns, header(jid), timeouts).await?,
            cb,
        ))
    }
}

/// A tokio-xmpp client, waited on until it is online.
pub async fn online(addr: SocketAddr, mode: Mode, jid: &str, password: &str) -> (Client, Jid) {
    let jid: Jid = jid.parse().expect("jid");
    let mut client = Client::new_with_connector(
        jid,
        password,
        TestConnector { addr, mode },
        Timeouts::tight(),
    );
    let ev = tokio::time::timeout(TIMEOUT, async {
        loop {
            match client.next().await {
                Some(Event::Online { bound_jid, .. }) => return Ok(bound_jid),
                Some(Event::Disconnected(e)) => return Err(format!("disconnected: {e}")),
                Some(_) => continue,
                None => return Err("client stream ended".to_string()),
            }
        }
    })
    .await
    .expect("client online within the timeout");
    let bound = ev.expect("client came online");
    (client, bound)
}

/// The next stanza a client receives, as an element.
pub async fn next_stanza(client: &mut Client) -> minidom::Element {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            match client.next().await {
                Some(Event::Stanza(s)) => return minidom::Element::from(s),
                Some(Event::Disconnected(e)) => panic!("disconnected: {e}"),
                Some(_) => continue,
                None => panic!("client stream ended"),
            }
        }
    })
    .await
    .expect("stanza within the timeout")
}

/// A stanza for tokio-xmpp from XML text.
pub fn stanza(xml: &str) -> tokio_xmpp::Stanza {
    let el: minidom::Element = xml.parse().expect("test stanza parses");
    tokio_xmpp::Stanza::try_from(el).expect("a stanza")
}
