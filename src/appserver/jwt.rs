//! The two JSON Web Tokens the providers want: RS256 (FCM's OAuth2 JWT-bearer grant, RFC 7523)
//! and ES256 (APNs provider tokens).
//!
//! Hand-written on `ring` rather than the `jsonwebtoken` crate: signing a compact JWS is a few
//! lines (RFC 7515 §3.1: base64url(header) "." base64url(claims) "." base64url(signature)),
//! `ring` is already in the tree through rustls, and current `jsonwebtoken` releases want
//! aws-lc-rs or a RustCrypto stack, which would add a second crypto library for this alone. We
//! only ever sign, with fixed algorithms, so none of JWT's verification pitfalls apply here.

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, RsaKeyPair};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("no PKCS#8 private key (-----BEGIN PRIVATE KEY-----) in the PEM text")]
    NoKey,
    #[error("the private key is not a usable {0} key: {1}")]
    BadKey(&'static str, String),
    #[error("signing failed")]
    Sign,
}

pub fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn pkcs8_der(pem: &str) -> Result<Vec<u8>, JwtError> {
    match rustls_pemfile::private_key(&mut pem.as_bytes()) {
        Ok(Some(rustls::pki_types::PrivateKeyDer::Pkcs8(k))) => Ok(k.secret_pkcs8_der().to_vec()),
        _ => Err(JwtError::NoKey),
    }
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// RS256 (RSASSA-PKCS1-v1_5 with SHA-256).
pub struct Rs256 {
    key: RsaKeyPair,
    rng: SystemRandom,
}

impl Rs256 {
    pub fn from_pem(pem: &str) -> Result<Rs256, JwtError> {
        let der = pkcs8_der(pem)?;
        let key =
            RsaKeyPair::from_pkcs8(&der).map_err(|e| JwtError::BadKey("RSA", e.to_string()))?;
        Ok(Rs256 {
            key,
            rng: SystemRandom::new(),
        })
    }

    pub fn sign(&self, header: &Value, claims: &Value) -> Result<String, JwtError> {
        let input = signing_input(header, claims);
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &self.rng,
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| JwtError::Sign)?;
        Ok(format!("{input}.{}", b64url(&sig)))
    }
}

/// ES256 (ECDSA P-256 with SHA-256, the signature as the fixed 64-byte `r ‖ s` of RFC 7518
/// §3.4).
pub struct Es256 {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl Es256 {
    pub fn from_pem(pem: &str) -> Result<Es256, JwtError> {
        let der = pkcs8_der(pem)?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
            .map_err(|e| JwtError::BadKey("P-256", e.to_string()))?;
        Ok(Es256 { key, rng })
    }

    pub fn sign(&self, header: &Value, claims: &Value) -> Result<String, JwtError> {
        let input = signing_input(header, claims);
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .map_err(|_| JwtError::Sign)?;
        Ok(format!("{input}.{}", b64url(sig.as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::UnparsedPublicKey;
    use serde_json::json;

    fn split(jwt: &str) -> (Value, Value, Vec<u8>, String) {
        let d = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .unwrap()
        };
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        (
            serde_json::from_slice(&d(parts[0])).unwrap(),
            serde_json::from_slice(&d(parts[1])).unwrap(),
            d(parts[2]),
            format!("{}.{}", parts[0], parts[1]),
        )
    }

    #[test]
    fn appserver_es256_verifies_with_the_public_key() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let s = Es256::from_pem(&kp.serialize_pem()).unwrap();
        let jwt = s
            .sign(
                &json!({"alg": "ES256", "kid": "K1"}),
                &json!({"iss": "T", "iat": 1}),
            )
            .unwrap();
        let (h, c, sig, input) = split(&jwt);
        assert_eq!(h["kid"], "K1");
        assert_eq!(c["iss"], "T");
        assert_eq!(sig.len(), 64);
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, kp.public_key_raw())
            .verify(input.as_bytes(), &sig)
            .expect("valid ES256 signature");
    }

    #[test]
    fn appserver_rs256_verifies_with_the_public_key() {
        let sa: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/fcm-test-service-account.json"
        ))
        .unwrap();
        let s = Rs256::from_pem(sa["private_key"].as_str().unwrap()).unwrap();
        let jwt = s
            .sign(&json!({"alg": "RS256"}), &json!({"iss": "x"}))
            .unwrap();
        let (_, c, sig, input) = split(&jwt);
        assert_eq!(c["iss"], "x");
        let public = s.key.public().as_ref().to_vec();
        UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, public)
            .verify(input.as_bytes(), &sig)
            .expect("valid RS256 signature");
    }

    #[test]
    fn appserver_jwt_rejects_non_pkcs8() {
        assert!(matches!(Es256::from_pem("nope"), Err(JwtError::NoKey)));
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(matches!(
            Rs256::from_pem(&kp.serialize_pem()),
            Err(JwtError::BadKey(..))
        ));
    }
}
