//! Real tokens and keys for the access-control tests: an HS256 secret in a
//! temp file, token minting, API keys, and configs that turn auth on.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ringcast::auth::jwt::JwtConfig;
use ringcast::auth::{api_key_hash, unix_now, ApiKeyConfig, AuthConfig};
use ringcast::config::Config;
use serde_json::{json, Value};

/// The HMAC secret the tests sign with (48 bytes).
pub const SECRET: &str = "test-secret-test-secret-test-secret-test-secret!";
/// The audience `hs256_config` requires.
pub const AUDIENCE: &str = "ringcast-tests";
/// An API key `hs256_config` lists (by hash) with publish on `orders.*`.
pub const BACKEND_KEY: &str = "rk_test_orders_backend_0123456789";

/// Test-only key pairs (`rsa`, `rsa2`, `ec`, `ed`; `.key` private, `.pub` public).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name)
}

/// Turns auth on in `config`: HS256 tokens with [`SECRET`] (written under
/// `dir`) and audience [`AUDIENCE`], zero leeway, and [`BACKEND_KEY`].
pub fn hs256_config(mut config: Config, dir: &Path) -> Config {
    let secret = dir.join("jwt.secret");
    std::fs::write(&secret, SECRET).unwrap();
    config.auth = AuthConfig {
        leeway: Duration::ZERO,
        jwt: Some(JwtConfig {
            secret_file: Some(secret),
            audience: AUDIENCE.into(),
            ..JwtConfig::default()
        }),
        keys: vec![ApiKeyConfig {
            name: "orders-backend".into(),
            sha256: api_key_hash(BACKEND_KEY),
            publish: vec!["orders.*".into()],
            subscribe: vec!["orders.*".into()],
            admin: vec![],
        }],
        ..AuthConfig::default()
    };
    config
}

/// Claims for subject `sub` valid for `ttl_secs` (negative: already
/// expired), with audience [`AUDIENCE`] and the given grants.
pub fn claims(
    sub: &str,
    ttl_secs: i64,
    publish: &[&str],
    subscribe: &[&str],
    admin: bool,
) -> Value {
    json!({
        "sub": sub,
        "aud": AUDIENCE,
        "exp": unix_now() as i64 + ttl_secs,
        "ringcast": {"publish": publish, "subscribe": subscribe, "admin": admin},
    })
}

/// Signs `claims` with HS256 and [`SECRET`].
pub fn hs256(claims: &Value) -> String {
    sign_hs256(SECRET.as_bytes(), claims)
}

/// Signs `claims` with HS256 and another secret.
pub fn sign_hs256(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

/// A token for `sub` that may subscribe to and publish on `patterns`, valid for `ttl_secs`.
pub fn token(sub: &str, patterns: &[&str], ttl_secs: i64) -> String {
    hs256(&claims(sub, ttl_secs, patterns, patterns, false))
}

/// Signs `claims` with RS256 and the private key `fixture(key)`, naming `kid`.
pub fn rs256(key: &str, kid: Option<&str>, claims: &Value) -> String {
    let pem = std::fs::read(fixture(key)).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

/// Writes a JWKS holding the public halves of the RSA `keys` (`(kid, fixture)`).
pub fn write_jwks(path: &Path, keys: &[(&str, &str)]) {
    let keys: Vec<_> = keys
        .iter()
        .map(|(kid, key)| {
            let pem = std::fs::read(fixture(key)).unwrap();
            let enc = EncodingKey::from_rsa_pem(&pem).unwrap();
            let mut jwk =
                jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::RS256).unwrap();
            jwk.common.key_id = Some(kid.to_string());
            jwk
        })
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&json!({ "keys": keys })).unwrap()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}
