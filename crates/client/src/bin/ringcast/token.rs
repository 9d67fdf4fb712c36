//! `ringcast token`: mints an HS256 token the broker accepts with
//! `[auth.jwt] secret_file`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::args::TokenArgs;

/// Shortest HMAC secret accepted, as the broker requires.
const MIN_SECRET: usize = 32;

/// The signed token for `args`, issued at `now`.
pub fn mint(args: &TokenArgs, now: SystemTime) -> anyhow::Result<String> {
    let secret = read_secret(&args.secret_file)?;
    let claims = claims(args, now)?;
    let key = EncodingKey::from_secret(&secret).map_err(|e| {
        anyhow!(
            "unusable HMAC secret in {}: {e}",
            args.secret_file.display()
        )
    })?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
        .map_err(|e| anyhow!("cannot sign the token: {e}"))
}

/// The secret file's bytes without trailing newlines (as the broker reads it).
fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut secret =
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.len() < MIN_SECRET {
        bail!(
            "the HMAC secret in {} has {} bytes; use at least {MIN_SECRET} (e.g. openssl rand -base64 48 > {})",
            path.display(),
            secret.len(),
            path.display()
        );
    }
    Ok(secret)
}

/// `{sub, iat, exp, aud?, iss?, ringcast: {publish, subscribe, admin}}`.
fn claims(args: &TokenArgs, now: SystemTime) -> anyhow::Result<Value> {
    if args.sub.is_empty() {
        bail!("--sub must not be empty");
    }
    let iat = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let exp = iat
        .checked_add(args.ttl.as_secs())
        .ok_or_else(|| anyhow!("--ttl is too long"))?;
    let mut claims = json!({
        "sub": args.sub,
        "iat": iat,
        "exp": exp,
        "ringcast": {
            "publish": args.publish,
            "subscribe": args.subscribe,
            "admin": args.admin,
        },
    });
    if let Some(aud) = &args.aud {
        claims["aud"] = json!(aud);
    }
    if let Some(iss) = &args.iss {
        claims["iss"] = json!(iss);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};
    use std::path::PathBuf;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-cli-test";

    fn args(secret_file: PathBuf) -> TokenArgs {
        TokenArgs {
            secret_file,
            sub: "u1".into(),
            subscribe: vec!["user:{sub}".into()],
            publish: vec!["orders.*".into()],
            admin: true,
            ttl: Duration::from_secs(3600),
            aud: Some("ringcast".into()),
            iss: Some("https://id.example".into()),
        }
    }

    fn secret_file(dir: &Path, content: &str) -> PathBuf {
        let path = dir.join("jwt.secret");
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn a_minted_token_verifies_with_the_secret_and_carries_the_grants() {
        let dir = tempfile::tempdir().unwrap();
        let path = secret_file(dir.path(), &format!("{SECRET}\n"));
        let token = mint(&args(path), SystemTime::now()).unwrap();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&["ringcast"]);
        validation.set_issuer(&["https://id.example"]);
        let data = jsonwebtoken::decode::<Value>(
            &token,
            &DecodingKey::from_secret(SECRET.as_bytes()).unwrap(),
            &validation,
        )
        .unwrap();
        let c = data.claims;
        assert_eq!(c["sub"], "u1");
        assert_eq!(
            c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
            3600
        );
        assert_eq!(
            c["ringcast"],
            json!({"publish": ["orders.*"], "subscribe": ["user:{sub}"], "admin": true})
        );
    }

    #[test]
    fn a_short_secret_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = secret_file(dir.path(), "short\n");
        let e = mint(&args(path), SystemTime::now())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has 5 bytes") && e.contains("at least 32"),
            "{e}"
        );
    }

    #[test]
    fn optional_claims_are_left_out() {
        let mut a = args(PathBuf::from("unused"));
        a.aud = None;
        a.iss = None;
        a.admin = false;
        let c = claims(&a, UNIX_EPOCH + Duration::from_secs(100)).unwrap();
        assert_eq!(c["iat"], 100);
        assert_eq!(c["exp"], 3700);
        assert!(c.get("aud").is_none() && c.get("iss").is_none());
        assert_eq!(c["ringcast"]["admin"], false);
    }
}
