#!/usr/bin/env python3
"""Writes the hand-made seed files of fuzz/corpus/<target>/ (see docs/fuzzing.md).

Run from the repository root: python3 fuzz/seeds/make_seeds.py. Files are named after a hash of
their content, as libFuzzer names what it adds, so re-running is harmless.
"""
import hashlib
import os
import shutil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")


def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


HDR = ("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
       "xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0' xml:lang='en'>")
HDR2 = ("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
        "to='example.com' version='1.0'>")
SESSION = (
    HDR
    + "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>biwsbj11c2VyLHI9ZnlrbytkMmxiYkZnT05Sdjlxa3hkYXdM</auth>\n"
    + HDR2
    + "<iq type='set' id='bind_1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>balcony</resource></bind></iq>"
    + "<enable xmlns='urn:xmpp:sm:3' resume='true'/><r xmlns='urn:xmpp:sm:3'/><a xmlns='urn:xmpp:sm:3' h='3'/>"
    + "<presence><show>away</show><status>Wherefore art thou?</status><priority>1</priority>"
    + "<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='http://psi-im.org' ver='q07IKJEyjvHSyhy//CH0CxmKi8w='/></presence>"
    + " \n\t "
    + "<message to='romeo@example.net' type='chat' xml:lang='en' id='m1'><body>Art thou not Romeo, and a Montague?</body>"
    + "<active xmlns='http://jabber.org/protocol/chatstates'/></message>"
    + "<inactive xmlns='urn:xmpp:csi:0'/>"
    + "</stream:stream>"
)

# stream_reader: [limits selector][n & 15][n chunk lengths - 1][stream]
for prefix in [b"\x00\x00", b"\x00\x01\x00", b"\x00\x02\x06\x0c", b"\x00\x03\xff\x01\x1f"]:
    put("stream_reader", prefix + SESSION.encode())
put("stream_reader", b"\x00\x00" + (HDR + "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" + HDR2 + "<presence/>").encode())
put("stream_reader", b"\x00\x00" + (HDR + "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>Yz1iaXdzLHI9</response>\r\n" + HDR2).encode())
put("stream_reader", b"\x01\x00" + (HDR + "<message><body>" + "x" * 100 + "</body></message>").encode())
put("stream_reader", b"\x04\x00" + (HDR + "<message><body><b>deep</b></body></message>").encode())
put("stream_reader", b"\x08\x01\x02" + (HDR + "<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>").encode())
for bad in ["<!DOCTYPE x [<!ENTITY a 'b'>]>", "<?pi x?>", "<!-- c -->", "<message><body>&lol;</body></message>",
            "hello<presence/>", "<message><![CDATA[x]]></message>", "<a xmlns:p='urn:x'><p:b p:c='1'/></a>",
            "<p:b/>", "<message><body>&#x1F600;&amp;&lt;&#0;</body></message>", "</stream:stream>",
            "<message a='1' a='2'/>", "<message xmlns='urn:other'/>"]:
    put("stream_reader", b"\x00\x00" + (HDR + bad).encode())
put("stream_reader", b"\x00\x00" + "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>".encode())
put("stream_reader", b"\x00\x00" + "<stream:stream xmlns='jabber:client' xmlns:stream='urn:wrong'>".encode())
put("stream_reader", b"\x00\x00" + "<stream xmlns='http://etherx.jabber.org/streams'>".encode())
put("stream_reader", b"\x00\x00" + (HDR + "<message><body>café ☃ 𝄞</body></message>").encode())
put("stream_reader", b"\x00\x00" + HDR.encode() + b"<message><body>\xff\xfe</body></message>")
put("stream_reader", b"\x02\x00" + ("\n\n" + HDR + "<message>" + "<a>" * 5 + "</a>" * 5 + "</message>").encode())

# framing: [bit 0: BOSH; bit 1: small limits][message]
WS = [
    "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='example.com' version='1.0'/>",
    "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>",
    "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing' see-other-uri='wss://otherendpoint.example/xmpp-bind'/>",
    "<message xmlns='jabber:client' to='juliet@example.com' type='chat'><body>hi</body></message>",
    "<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>",
    "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGp1bGlldAByMG0zMA==</auth>",
    "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>",
    "  \r\n ",
    "<?xml version='1.0'?><open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='example.com' version='1.0'/>",
    "<message xmlns='jabber:client'><body>a</body></message><presence/>",
    "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing'",
]
for m in WS:
    put("framing", b"\x00" + m.encode())
put("framing", b"\x02" + ("<message xmlns='jabber:client'>" + "<a>" * 5 + "</a>" * 5 + "</message>").encode())
BOSH = [
    "<body content='text/xml; charset=utf-8' from='user@example.com' hold='1' rid='1573741820' to='example.com' "
    "route='xmpp:example.com:9999' secure='true' ver='1.6' wait='60' ack='1' xml:lang='en' "
    "xmpp:version='1.0' xmlns='http://jabber.org/protocol/httpbind' xmlns:xmpp='urn:xmpp:xbosh'/>",
    "<body rid='1573741821' sid='SomeSID' xmlns='http://jabber.org/protocol/httpbind'>"
    "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGp1bGlldAByMG0zMA==</auth></body>",
    "<body rid='1573741822' sid='SomeSID' to='example.com' xml:lang='en' xmpp:restart='true' "
    "xmlns='http://jabber.org/protocol/httpbind' xmlns:xmpp='urn:xmpp:xbosh'/>",
    "<body rid='1573741823' sid='SomeSID' xmlns='http://jabber.org/protocol/httpbind'>"
    "<iq id='bind_1' type='set' xmlns='jabber:client'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
    "<resource>httpclient</resource></bind></iq></body>",
    "<body rid='1573741824' sid='SomeSID' ack='1573741823' xmlns='http://jabber.org/protocol/httpbind'>"
    "<message to='contact@example.com'><body>inherits the wrapper namespace</body><x><y/></x></message>"
    "<presence xmlns='jabber:client'/></body>",
    "<body rid='1573741825' sid='SomeSID' type='terminate' xmlns='http://jabber.org/protocol/httpbind'>"
    "<presence type='unavailable' xmlns='jabber:client'/></body>",
    "<body rid='1573741826' sid='SomeSID' pause='60' xmlns='http://jabber.org/protocol/httpbind'/>",
    "<body rid='18446744073709551615' to=' EXAMPLE.COM ' ver='2.0' wait='99999999999999999999' hold='x' xmlns='http://jabber.org/protocol/httpbind'/>",
    "<body rid='-1' xmlns='http://jabber.org/protocol/httpbind'/>",
    "<body rid='1' xmlns='urn:wrong'/>",
    "<body rid='1' to='example.com' ver='1.x' content='te\x01xt' xmlns='http://jabber.org/protocol/httpbind'/>",
]
for m in BOSH:
    put("framing", b"\x01" + m.encode())
put("framing", b"\x03" + BOSH[3].encode())

# sasl: "<mechanism> <bindings>\n" then PLAIN's message, or SCRAM's client-first "\n" client-final
FINAL = "c={cb},r={nonce},p={proof}"
for mech in ["SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512"]:
    put("sasl", f"{mech} none\nn,,n=user,r=fyko+d2lbbFgONRv9qkxdawL\n{FINAL}")
put("sasl", "SCRAM-SHA-256-PLUS exporter\np=tls-exporter,,n=user,r=rOprNGfwEbeRWgbNEkqO\n" + FINAL)
put("sasl", "SCRAM-SHA-1-PLUS both\np=tls-server-end-point,,n=user,r=rOprNGfwEbeRWgbNEkqO\n" + FINAL)
put("sasl", "SCRAM-SHA-256 both\ny,,n=user,r=abc\n" + FINAL)
put("sasl", "SCRAM-SHA-256 tls\ny,,n=user,r=abc\n" + FINAL)
put("sasl", "SCRAM-SHA-256 tls\nn,a=user@example.com,n=user,r=abc\n" + FINAL)
put("sasl", "SCRAM-SHA-256 none\nn,a=us=2Cer,n=us=3Der,r=abc\n" + FINAL)
put("sasl", "SCRAM-SHA-256 none\nn,,n=nobody,r=abc\n" + FINAL)
put("sasl", "SCRAM-SHA-256 none\nn,,n=user,r=abc\nc={cb},r={nonce},p=dGhpcyBpcyBub3QgdGhlIHByb29mIGF0IGFsbCEhISE=")
put("sasl", "SCRAM-SHA-256 none\nn,,n=user,r=abc\nc={cb},r=abc,p={proof}")
put("sasl", "SCRAM-SHA-256 none\nn,,n=user,r=abc\nc=biws,r={nonce},ext=1,p={proof}")
put("sasl", "SCRAM-SHA-256-PLUS exporter\np=tls-exporter,,n=user,r=abc\nc=biws,r={nonce},p={proof}")
put("sasl", "SCRAM-SHA-256 none\nn,,n=user,r=abc,ext=1\n" + FINAL)
put("sasl", "SCRAM-SHA-256 none\nn,,m=x,n=user,r=abc\n" + FINAL)
put("sasl", "SCRAM-SHA-256 none\nn,,n=user,r=a,bc\n" + FINAL)
for t in ["n,", "n", "p=", "", ",,", "n,,", "n,,n=", "n,,n=user", "n,,n=user,r=", "p=tls-unique,,n=user,r=x", "x,,n=user,r=x"]:
    put("sasl", "SCRAM-SHA-1 none\n" + t)
put("sasl", "SCRAM-SHA-1 none\nn,,n=user,r=abc\n")
put("sasl", "SCRAM-SHA-1 none\nn,,n=user,r=abc\nc=biws")
put("sasl", "SCRAM-SHA-1 none\nn,,n=user,r=abc\nc=b!ws,r={nonce},p=====")
put("sasl", "PLAIN tls\n\x00user\x00pencil")
put("sasl", "PLAIN-1 tls\nuser@example.com\x00user\x00pencil")
put("sasl", "PLAIN-512 tls\n\x00user\x00pen\u00adcil")
put("sasl", "PLAIN tls\n\x00user\x00wrong")
put("sasl", "PLAIN tls\n\x00\x00")
put("sasl", b"PLAIN tls\n\x00us\xffer\x00pencil")

# jid: one string
for j in ["juliet@example.com/balcony", "example.com", "EXAMPLE.COM.", "Juliet@Example.Com/Balcony",
          "romeo@example.net", "user@[::1]/r", "user@192.168.0.1", "a@b/c/d", "user@xn--bcher-kva.example",
          "über@Bücher.example/Résource", "@example.com", "example.com@", "/r", "a@b@c", "x@y/",
          "ﬁ@example.com", "ς@example.com", "\u212b@example.com", "user@example.com/ with space ",
          "a" * 1100 + "@example.com", "example." + "b" * 64, "\u0661\u0662@example.com", "user@.",
          "user@example..com", "\"quoted\"@example.com", "user@exam\u00a0ple.com"]:
    put("jid", j)

# config: TOML
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "..", "..", "config.toml"), "rb") as f:
    put("config", f.read())
put("config", 'domains = ["example.com", "EXAMPLE.org"]\n')
put("config", 'domains = []\n[c2s]\nmax_stanza_bytes = 1\nmax_depth = 0\noutbound_queue = 0\n')
put("config", 'domains = ["example.com"]\n[archive]\nexpire_after = "30d"\n[upload]\nexpire_after = "off"\nmax_file_size = 18446744073709551615\n')
put("config", '[storage]\ncache_mb = 18446744073709551615\ngroup_commit_ms = 18446744073709551615\n')
put("config", '[appserver]\nenabled = true\ntimeout_secs = 18446744073709551615\n[appserver.webhook]\nurl = "http://x"\n')
put("config", '[c2s]\nidle_timeout_secs = 18446744073709551615\nping_timeout_secs = 0\n')
put("config", 'domains = ["a@b", "", "xn--"]\nunknown = 1\n')
put("config", '[listeners]\nc2s = ["[::]:5222", "127.0.0.1:0"]\nhttp = []\n')

# stanza: structure-aware, the bytes are decoded by `arbitrary`; a few arbitrary starting points
# (the fuzzer's minimised corpus does the rest).
import random
rnd = random.Random(7)
for _ in range(8):
    put("stanza", bytes(rnd.randrange(256) for _ in range(rnd.randrange(16, 200))))
