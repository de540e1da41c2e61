//! SCRAM-SHA-256 on the server side: what a login costs the server once the account's stored
//! keys are loaded. The server stores StoredKey/ServerKey (never the password), so its work per
//! login is HMAC/SHA-256 and parsing; the client's PBKDF2 is done once, outside the timing.

use std::hint::black_box;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use halyard::sasl::scram::{derive, ChannelBindings, Hash, ScramServer};
use hmac::{Hmac, Mac};
use sha2::Sha256;

const PASSWORD: &str = "correct horse battery staple";
const ITERATIONS: u32 = 4096;
const CLIENT_FIRST_BARE: &str = "n=juliet,r=fyko+d2lbbFgONRv9qkxdawL";
const FAKE_SALT_SECRET: &[u8] = b"bench fake-salt secret";

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

/// The client's keys, from its PBKDF2 (done once).
struct Client {
    client_key: Vec<u8>,
    stored_key: Vec<u8>,
}

impl Client {
    fn new(salt: &[u8]) -> Self {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(PASSWORD.as_bytes(), salt, ITERATIONS, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = <Sha256 as sha2::Digest>::digest(&client_key).to_vec();
        Client {
            client_key,
            stored_key,
        }
    }

    /// client-final-message for this server-first-message: one HMAC, an XOR, base64.
    fn client_final(&self, server_first: &[u8]) -> Vec<u8> {
        let server_first = std::str::from_utf8(server_first).expect("server-first is UTF-8");
        let nonce = server_first
            .split(',')
            .next()
            .and_then(|r| r.strip_prefix("r="))
            .expect("server-first has a nonce");
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{CLIENT_FIRST_BARE},{server_first},{without_proof}");
        let signature = hmac(&self.stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = self
            .client_key
            .iter()
            .zip(&signature)
            .map(|(k, s)| k ^ s)
            .collect();
        format!("{without_proof},p={}", B64.encode(proof)).into_bytes()
    }
}

fn scram(c: &mut Criterion) {
    let salt = b"halyard-bench-salt";
    // What the account store holds (the server's own PBKDF2, at account creation).
    let creds = derive(Hash::Sha256, PASSWORD, salt, ITERATIONS).expect("credentials derive");
    let client = Client::new(salt);
    let client_first = format!("n,,{CLIENT_FIRST_BARE}");

    let mut g = c.benchmark_group("scram_sha256");
    // The server's side of a whole exchange: a new exchange (random server nonce), parsing
    // client-first (SASLprep of the name), server-first (incl. the fake-salt HMAC computed for
    // every user so timing does not reveal existence), verifying client-final and building
    // server-final. The client's share inside the loop is one HMAC to make its proof.
    g.bench_function("exchange_server_side", |b| {
        b.iter(|| {
            let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
            server
                .client_first(black_box(client_first.as_bytes()))
                .expect("client-first accepted");
            let server_first = server.server_first(Some(&creds), FAKE_SALT_SECRET, ITERATIONS);
            let client_final = client.client_final(&server_first);
            server
                .client_final(black_box(&client_final))
                .expect("proof verifies")
        })
    });
    // Verification alone: client-final parsed, proof checked against StoredKey, server
    // signature made; the exchange up to server-first and the client's proof are set up
    // outside the timing.
    g.bench_function("client_final_verify", |b| {
        b.iter_batched(
            || {
                let mut server = ScramServer::new(Hash::Sha256, false, ChannelBindings::default());
                server
                    .client_first(client_first.as_bytes())
                    .expect("client-first accepted");
                let server_first = server.server_first(Some(&creds), FAKE_SALT_SECRET, ITERATIONS);
                let client_final = client.client_final(&server_first);
                (server, client_final)
            },
            |(mut server, client_final)| {
                server
                    .client_final(black_box(&client_final))
                    .expect("proof verifies")
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, scram);
criterion_main!(benches);
