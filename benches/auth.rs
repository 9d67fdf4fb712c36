//! What access control costs, side by side in one run: one 128 B publish
//! to the memory engine (awaiting its ack), the checks a front end adds to
//! each publish request (`Principal::may` on three patterns; the publish
//! rate limit when `[auth.rate] publish_per_second` is set), and the
//! per-connection credential check (HS256 JWT, API key).
//!
//! Run with `cargo bench --bench auth`; `per_request/*` over `publish/bare`
//! (per event) is the share of a publish that auth costs.

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ringcast::auth::jwt::JwtConfig;
use ringcast::auth::{api_key_hash, unix_now, Action, ApiKeyConfig, Auth, AuthConfig, RateConfig};
use ringcast::engine::{Engine, EngineOptions, NewEvent};
use serde_json::json;

const SECRET: &str = "bench-secret-bench-secret-bench-secret-bench!!";
const KEY: &str = "rk_bench_0123456789abcdef";
/// Publishes per iteration (sequential, each awaited).
const BATCH: u64 = 256;

fn auth(dir: &std::path::Path) -> Auth {
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    Auth::new(&AuthConfig {
        jwt: Some(JwtConfig {
            secret_file: Some(secret),
            ..JwtConfig::default()
        }),
        keys: vec![ApiKeyConfig {
            name: "bench".into(),
            sha256: api_key_hash(KEY),
            publish: vec!["orders.*".into(), "user:{sub}".into(), "bench*".into()],
            subscribe: vec![],
            admin: vec![],
        }],
        // A limit far above what the bench reaches: the check runs in full.
        rate: RateConfig {
            publish_per_second: 1_000_000_000,
            ..RateConfig::default()
        },
        ..AuthConfig::default()
    })
    .unwrap()
}

fn token() -> String {
    let claims = json!({
        "sub": "u1",
        "exp": unix_now() + 3600,
        "ringcast": {"publish": ["orders.*", "user:{sub}", "bench*"], "subscribe": ["*"]},
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn publish(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let auth = auth(dir.path());
    let principal = auth.authenticate(Some(&token()), None).unwrap();
    let engine = Engine::open(EngineOptions::memory()).unwrap();
    let payload = Bytes::from(vec![0xAB_u8; 128]);
    let mut group = c.benchmark_group("publish");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(BATCH));
    group.bench_function("bare", |b| {
        b.to_async(&rt).iter(|| async {
            for _ in 0..BATCH {
                engine
                    .publish("bench", NewEvent::new("b", payload.clone()))
                    .await
                    .unwrap();
            }
        });
    });
    group.finish();

    // What a front end adds to each publish request, alone (the engine's
    // own noise would hide it in the row above).
    let mut group = c.benchmark_group("per_request");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("grant_check", |b| {
        b.iter(|| principal.may(Action::Publish, std::hint::black_box("bench")))
    });
    group.bench_function("publish_rate_check", |b| {
        b.iter(|| auth.limits().check_publish(&principal, 1))
    });
    group.finish();

    let mut group = c.benchmark_group("per_connection");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    let jwt = token();
    group.bench_function("authenticate_hs256_jwt", |b| {
        b.iter(|| auth.authenticate(Some(&jwt), None).unwrap())
    });
    group.bench_function("authenticate_api_key", |b| {
        b.iter(|| auth.authenticate(Some(KEY), None).unwrap())
    });
    group.finish();
}

criterion_group!(benches, publish);
criterion_main!(benches);
