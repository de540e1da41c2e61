//! Stream framing: bytes → stanzas (the c2s reader, and `parse_element` for WebSocket and BOSH
//! bodies) and stanza → bytes (the writer), with chat messages of a realistic size.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use halyard::stream::reader::{parse_element, Limits};
use halyard::stream::writer;
use halyard::stream::{StreamEvent, XmlReader};
use minidom::Element;

/// The server's defaults (`c2s.max_stanza_bytes`, `c2s.max_depth`).
fn limits() -> Limits {
    let c2s = halyard::config::Config::default().c2s;
    Limits {
        max_stanza_bytes: c2s.max_stanza_bytes,
        max_depth: c2s.max_depth,
        max_attributes: c2s.max_attributes,
        max_attribute_bytes: c2s.max_attribute_bytes,
    }
}

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0' xml:lang='en'>";

/// Stanzas per buffer in the reader bench; the figure per stanza is the time / this.
const STANZAS: usize = 1000;

/// Size of the c2s transport's read buffer (`READ_BUF` in src/c2s/transport.rs): the reader is
/// fed what one socket read returns at most.
const READ_CHUNK: usize = 2048;

/// A chat message as a client sends it on a c2s stream (namespace inherited from the stream
/// header): ~60-byte body, a UUID id, `to`, `type`, a XEP-0359 origin-id. `xmlns` adds the
/// namespace declaration each WebSocket message carries (RFC 7395 §3.4).
fn message(i: usize, xmlns: bool) -> String {
    let ns = if xmlns { " xmlns='jabber:client'" } else { "" };
    format!(
        "<message{ns} to='juliet@example.org' id='5e1c7a2b-3f4d-4c8e-9a61-{i:012}' type='chat'>\
         <body>Are you coming to the station tonight? The train is late, ok</body>\
         <origin-id xmlns='urn:xmpp:sid:0' id='b7f3e2a1-6c5d-4e9f-8a7b-{i:012}'/></message>"
    )
}

fn reader(c: &mut Criterion) {
    let mut stream = String::new();
    for i in 0..STANZAS {
        stream.push_str(&message(i, false));
    }
    let bytes = stream.into_bytes();
    let mut g = c.benchmark_group("c2s_reader");
    g.throughput(Throughput::Elements(STANZAS as u64));
    g.bench_function("1000_messages_in_2KiB_reads", |b| {
        b.iter_batched(
            || {
                // A reader that has read the stream header, as after a stream restart.
                let mut r = XmlReader::new(limits());
                let mut h = HEADER.as_bytes();
                match r.next(&mut h) {
                    Ok(Some(StreamEvent::Open(_))) => {}
                    other => panic!("stream header not read: {other:?}"),
                }
                r
            },
            |mut r| {
                let mut n = 0;
                for chunk in bytes.chunks(READ_CHUNK) {
                    let mut input = chunk;
                    while let Some(ev) = r.next(&mut input).expect("stanzas parse") {
                        black_box(&ev);
                        n += 1;
                    }
                }
                assert_eq!(n, STANZAS);
                r
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn parse(c: &mut Criterion) {
    let msg = message(1, true);
    let limits = limits();
    let mut g = c.benchmark_group("parse_element");
    g.throughput(Throughput::Elements(1));
    g.bench_function("message", |b| {
        b.iter(|| parse_element(black_box(msg.as_bytes()), limits).expect("message parses"))
    });
    g.finish();
}

fn write(c: &mut Criterion) {
    // The message as a recipient's session gets it: `from` stamped by the router, a XEP-0359
    // stanza-id added by the archive.
    let el: Element = message(1, true)
        .replacen(
            "<message ",
            "<message from='romeo@example.org/orchard' ",
            1,
        )
        .replacen(
            "</message>",
            "<stanza-id xmlns='urn:xmpp:sid:0' by='juliet@example.org' id='AAAAAAAAAAEAAAAAAAAAAQ'/></message>",
            1,
        )
        .parse()
        .expect("message parses");
    let len = writer::to_bytes(&el).len();
    let mut g = c.benchmark_group("writer");
    g.throughput(Throughput::Elements(1));
    g.bench_function(format!("message_to_bytes_{len}B"), |b| {
        b.iter(|| writer::to_bytes(black_box(&el)))
    });
    g.finish();
}

criterion_group!(benches, reader, parse, write);
criterion_main!(benches);
