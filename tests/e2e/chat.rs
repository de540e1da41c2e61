//! Real-time chat between real clients over STARTTLS and Direct TLS.

use super::client::{self, Mode};
use super::common::*;

#[tokio::test]
async fn tokio_xmpp_clients_chat_over_starttls_and_direct_tls() {
    let s = TestServer::start().await;
    s.add_user("alice", "pw-alice").await;
    s.add_user("bob", "pw-bob").await;
    let (mut alice, alice_jid) =
        client::online(s.c2s, Mode::StartTls, "alice@localhost/phone", "pw-alice").await;
    let (mut bob, bob_jid) =
        client::online(s.c2s_tls, Mode::DirectTls, "bob@localhost/laptop", "pw-bob").await;
    assert_eq!(alice_jid.to_string(), "alice@localhost/phone");

    let m = client::stanza(&format!("<message xmlns='jabber:client' to='{bob_jid}' type='chat' id='m1'><body>hello bob</body></message>"));
    alice.send_stanza(m).await.expect("send");

    let got = client::next_stanza(&mut bob).await;
    assert_eq!(got.name(), "message");
    assert_eq!(
        got.attr("from"),
        Some("alice@localhost/phone"),
        "server stamps the sender's full JID"
    );
    assert_eq!(
        got.get_child("body", NS_CLIENT)
            .map(|b| b.text())
            .as_deref(),
        Some("hello bob")
    );
    let _ = alice_jid;
    drop(bob);
    drop(alice);
    s.stop().await;
}
