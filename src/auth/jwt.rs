//! JWT verification with `jsonwebtoken`: an HMAC secret (HS256/384/512), a
//! PEM public key (RS256, ES256, EdDSA) and a JWKS file (keys chosen by
//! `kid`), any of them at once; re-read on SIGHUP.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use super::{Denied, GrantsConfig};

/// `[auth.jwt]`: how tokens are verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// File holding the HMAC secret (HS256/384/512); a trailing newline is
    /// ignored. At least 32 bytes.
    pub secret_file: Option<PathBuf>,
    /// Name of an environment variable holding the HMAC secret instead.
    pub secret_env: Option<String>,
    /// PEM public key file (RSA → RS256, EC P-256 → ES256, Ed25519 → EdDSA).
    pub public_key_file: Option<PathBuf>,
    /// JWKS file (`{"keys": [...]}`); a token's `kid` picks the key.
    pub jwks_file: Option<PathBuf>,
    /// Algorithms accepted; empty = those of the configured keys.
    pub algorithms: Vec<String>,
    /// Required `iss`; empty = not checked.
    pub issuer: String,
    /// Required `aud` (one of the token's); empty = not checked.
    pub audience: String,
    /// Refuse tokens without `exp` (a token that never expires cannot be
    /// revoked short of rotating the key).
    pub require_exp: bool,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            secret_file: None,
            secret_env: None,
            public_key_file: None,
            jwks_file: None,
            algorithms: Vec::new(),
            issuer: String::new(),
            audience: String::new(),
            require_exp: true,
        }
    }
}

impl JwtConfig {
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        if self.secret_file.is_some() && self.secret_env.is_some() {
            return Err((
                "secret_env".into(),
                "set secret_file or secret_env, not both".into(),
            ));
        }
        if self.secret_file.is_none()
            && self.secret_env.is_none()
            && self.public_key_file.is_none()
            && self.jwks_file.is_none()
        {
            return Err((
                "secret_file".into(),
                "[auth.jwt] needs a key: secret_file, secret_env, public_key_file or jwks_file"
                    .into(),
            ));
        }
        for (i, a) in self.algorithms.iter().enumerate() {
            match Algorithm::from_str(a) {
                Ok(alg) if SUPPORTED.contains(&alg) => {}
                _ => {
                    return Err((
                        format!("algorithms[{i}]"),
                        format!("{a:?} is not supported (HS256 HS384 HS512 RS256 ES256 EdDSA)"),
                    ))
                }
            }
        }
        Ok(())
    }

    fn allowed(&self, alg: Algorithm) -> bool {
        self.algorithms.is_empty()
            || self
                .algorithms
                .iter()
                .any(|a| Algorithm::from_str(a).ok() == Some(alg))
    }
}

const SUPPORTED: [Algorithm; 6] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

/// The claims ringcast reads; others are ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: substituted for `{sub}` in patterns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ringcast: Option<ClaimGrants>,
}

/// The `ringcast` claim: `{"publish": [...], "subscribe": [...], "admin": bool | [...]}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClaimGrants {
    /// Topic patterns the bearer may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic patterns the bearer may read.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// `true` = admin on every topic; a list = admin on those patterns.
    #[serde(default)]
    pub admin: AdminClaim,
}

/// `admin` in the claim: a flag or patterns.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AdminClaim {
    /// `true`: every topic; `false`: none.
    All(bool),
    /// These patterns.
    Patterns(Vec<String>),
}

impl Default for AdminClaim {
    fn default() -> Self {
        AdminClaim::All(false)
    }
}

impl Claims {
    pub(crate) fn grants(&self) -> GrantsConfig {
        let Some(g) = &self.ringcast else {
            return GrantsConfig::default();
        };
        GrantsConfig {
            publish: g.publish.clone(),
            subscribe: g.subscribe.clone(),
            admin: match &g.admin {
                AdminClaim::All(true) => vec!["*".into()],
                AdminClaim::All(false) => vec![],
                AdminClaim::Patterns(p) => p.clone(),
            },
        }
    }
}

/// Whether a credential has the shape of a JWS compact token.
pub fn looks_like_jwt(credential: &str) -> bool {
    let mut parts = credential.split('.');
    let shaped = parts.by_ref().take(3).filter(|p| !p.is_empty()).count() == 3;
    shaped && parts.next().is_none() && credential.starts_with("eyJ")
}

/// The keys tokens are checked against.
#[derive(Default)]
pub struct KeySet {
    secret: Option<DecodingKey>,
    public: Option<(DecodingKey, Algorithm)>,
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
}

impl KeySet {
    /// Reads every configured key file; errors name the key and the file.
    pub fn load(config: &JwtConfig) -> anyhow::Result<Self> {
        let mut keys = KeySet::default();
        let secret = match (&config.secret_file, &config.secret_env) {
            (Some(path), _) => Some(super::read_key_file("secret_file", path)?),
            (None, Some(var)) => Some(
                std::env::var(var)
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "auth.jwt.secret_env: the environment variable {var} is not set"
                        )
                    })?
                    .into_bytes(),
            ),
            (None, None) => None,
        };
        if let Some(mut secret) = secret {
            while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                secret.pop();
            }
            if secret.len() < 32 {
                anyhow::bail!(
                    "auth.jwt.secret_file/secret_env: the HMAC secret has {} bytes; use at least 32 (e.g. openssl rand -base64 48)",
                    secret.len()
                );
            }
            keys.secret = Some(
                DecodingKey::from_secret(&secret)
                    .map_err(|e| anyhow::anyhow!("auth.jwt: unusable HMAC secret: {e}"))?,
            );
        }
        if let Some(path) = &config.public_key_file {
            let pem = super::read_key_file("public_key_file", path)?;
            keys.public = Some(parse_pem(&pem).ok_or_else(|| {
                anyhow::anyhow!(
                    "auth.jwt.public_key_file: {} is not a PEM RSA, EC P-256 or Ed25519 public key",
                    path.display()
                )
            })?);
        }
        if let Some(path) = &config.jwks_file {
            let text = super::read_key_file("jwks_file", path)?;
            let set: JwkSet = serde_json::from_slice(&text).map_err(|e| {
                anyhow::anyhow!("auth.jwt.jwks_file: {} is not a JWKS: {e}", path.display())
            })?;
            for jwk in &set.keys {
                let Some(kid) = jwk.common.key_id.clone() else {
                    anyhow::bail!(
                        "auth.jwt.jwks_file: {}: every key needs a \"kid\"",
                        path.display()
                    );
                };
                let alg = match jwk.common.key_algorithm {
                    Some(a) => Algorithm::from_str(&a.to_string()).ok(),
                    None => match &jwk.algorithm {
                        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
                        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                            Some(Algorithm::ES256)
                        }
                        AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
                        _ => None,
                    },
                }
                .filter(|a| SUPPORTED.contains(a) && a.family() != AlgorithmFamily::Hmac);
                let Some(alg) = alg else {
                    anyhow::bail!(
                        "auth.jwt.jwks_file: {}: key {kid:?} has an unsupported type or algorithm (RS256, ES256, EdDSA)",
                        path.display()
                    );
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|e| {
                    anyhow::anyhow!("auth.jwt.jwks_file: {}: key {kid:?}: {e}", path.display())
                })?;
                keys.by_kid.insert(kid, (key, alg));
            }
        }
        Ok(keys)
    }

    /// Verifies `token`'s signature and registered claims; returns its claims.
    pub(crate) fn verify(
        &self,
        token: &str,
        config: Option<&JwtConfig>,
        leeway: Duration,
    ) -> Result<Claims, Denied> {
        let Some(config) = config else {
            return Err(Denied::Invalid(
                "JWTs are not accepted by this broker".into(),
            ));
        };
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Denied::Invalid(format!("malformed token: {e}")))?;
        let alg = header.alg;
        if !SUPPORTED.contains(&alg) || !config.allowed(alg) {
            return Err(Denied::Invalid(format!(
                "algorithm {alg:?} is not accepted"
            )));
        }
        let key = match header.kid.as_deref().and_then(|kid| self.by_kid.get(kid)) {
            Some((key, key_alg)) if *key_alg == alg => key,
            Some(_) => {
                return Err(Denied::Invalid(format!(
                    "algorithm {alg:?} does not match the key's"
                )))
            }
            None => match alg.family() {
                AlgorithmFamily::Hmac => self.secret.as_ref(),
                _ => self
                    .public
                    .as_ref()
                    .filter(|(_, a)| *a == alg)
                    .map(|(k, _)| k),
            }
            .ok_or_else(|| match &header.kid {
                Some(kid) if !self.by_kid.is_empty() => {
                    Denied::Invalid(format!("unknown key id {kid:?}"))
                }
                _ => Denied::Invalid(format!("no key configured for {alg:?}")),
            })?,
        };
        let mut validation = Validation::new(alg);
        validation.leeway = leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_exp = true;
        let required: &[&str] = if config.require_exp { &["exp"] } else { &[] };
        validation.set_required_spec_claims(required);
        if config.issuer.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&[&config.issuer]);
        }
        if config.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&config.audience]);
        }
        match jsonwebtoken::decode::<Claims>(token, key, &validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                Err(match e.kind() {
                    K::ExpiredSignature => Denied::Expired("the token has expired".into()),
                    K::InvalidSignature => Denied::Invalid("bad token signature".into()),
                    K::InvalidAudience => Denied::Invalid("wrong token audience".into()),
                    K::InvalidIssuer => Denied::Invalid("wrong token issuer".into()),
                    K::ImmatureSignature => {
                        Denied::Invalid("the token is not valid yet (nbf)".into())
                    }
                    K::MissingRequiredClaim(c) => {
                        Denied::Invalid(format!("the token has no {c:?} claim"))
                    }
                    _ => Denied::Invalid(format!("invalid token: {e}")),
                })
            }
        }
    }
}

fn parse_pem(pem: &[u8]) -> Option<(DecodingKey, Algorithm)> {
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        return Some((k, Algorithm::RS256));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        return Some((k, Algorithm::ES256));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        return Some((k, Algorithm::EdDSA));
    }
    None
}

/// Mints an HS256 token (for `ringcast token`-style tooling and tests).
pub fn mint_hs256(
    secret: &[u8],
    claims: &serde_json::Value,
) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Action, Auth, AuthConfig};
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/auth");

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(FIXTURES).join(name)
    }

    fn sign(
        alg: Algorithm,
        kid: Option<&str>,
        key: &EncodingKey,
        claims: serde_json::Value,
    ) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    fn claims(exp_in: i64) -> serde_json::Value {
        let exp = super::super::unix_now() as i64 + exp_in;
        json!({"sub": "u1", "exp": exp, "aud": "ringcast", "ringcast": {"subscribe": ["user:{sub}"], "admin": true}})
    }

    fn auth(jwt: JwtConfig) -> Auth {
        Auth::new(&AuthConfig {
            jwt: Some(jwt),
            leeway: Duration::ZERO,
            ..AuthConfig::default()
        })
        .unwrap()
    }

    /// An `Auth` taking HS tokens signed with a 40-byte secret, and that key.
    fn hmac_auth() -> (Auth, EncodingKey, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "k".repeat(40)).unwrap();
        let a = auth(JwtConfig {
            secret_file: Some(secret),
            ..JwtConfig::default()
        });
        let key = EncodingKey::from_secret("k".repeat(40).as_bytes()).unwrap();
        (a, key, dir)
    }

    #[test]
    fn every_public_key_kind_verifies_its_own_tokens_only() {
        for (public, private, alg) in [
            ("rsa.pub", "rsa.key", Algorithm::RS256),
            ("ec.pub", "ec.key", Algorithm::ES256),
            ("ed.pub", "ed.key", Algorithm::EdDSA),
        ] {
            let a = auth(JwtConfig {
                public_key_file: Some(fixture(public)),
                ..JwtConfig::default()
            });
            let pem = std::fs::read(fixture(private)).unwrap();
            let key = match alg {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
                Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
                _ => EncodingKey::from_ed_pem(&pem),
            }
            .unwrap();
            let p = a
                .authenticate(Some(&sign(alg, None, &key, claims(60))), None)
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert!(p.may(Action::Subscribe, "user:u1"));
            assert!(!p.may(Action::Subscribe, "user:u2"));
            assert!(p.may(Action::Admin, "anything"));
            assert!(p.remaining().unwrap() <= Duration::from_secs(60));
            // An HMAC token "signed" with the public key bytes is refused.
            let forged = sign(
                Algorithm::HS256,
                None,
                &EncodingKey::from_secret(&std::fs::read(fixture(public)).unwrap()).unwrap(),
                claims(60),
            );
            assert_eq!(
                a.authenticate(Some(&forged), None).unwrap_err().code(),
                "unauthorized"
            );
        }
    }

    #[test]
    fn hmac_tokens_are_checked_for_signature_expiry_audience_and_issuer() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, format!("{}\n", "k".repeat(40))).unwrap();
        let a = auth(JwtConfig {
            secret_file: Some(secret),
            audience: "ringcast".into(),
            issuer: "https://id.example".into(),
            ..JwtConfig::default()
        });
        let key = EncodingKey::from_secret("k".repeat(40).as_bytes()).unwrap();
        let mut good = claims(60);
        good["iss"] = json!("https://id.example");
        assert!(a
            .authenticate(
                Some(&sign(Algorithm::HS512, None, &key, good.clone())),
                None
            )
            .is_ok());
        let mut expired = good.clone();
        expired["exp"] = json!(super::super::unix_now() - 5);
        let e = a
            .authenticate(Some(&sign(Algorithm::HS256, None, &key, expired)), None)
            .unwrap_err();
        assert_eq!(e.code(), "token_expired");
        let mut aud = good.clone();
        aud["aud"] = json!("other");
        let e = a
            .authenticate(Some(&sign(Algorithm::HS256, None, &key, aud)), None)
            .unwrap_err();
        assert!(e.to_string().contains("audience"), "{e}");
        let mut iss = good.clone();
        iss["iss"] = json!("https://evil.example");
        let e = a
            .authenticate(Some(&sign(Algorithm::HS256, None, &key, iss)), None)
            .unwrap_err();
        assert!(e.to_string().contains("issuer"), "{e}");
        let bad = EncodingKey::from_secret("x".repeat(40).as_bytes()).unwrap();
        let e = a
            .authenticate(
                Some(&sign(Algorithm::HS256, None, &bad, good.clone())),
                None,
            )
            .unwrap_err();
        assert!(e.to_string().contains("signature"), "{e}");
        let mut no_exp = good;
        no_exp.as_object_mut().unwrap().remove("exp");
        let e = a
            .authenticate(Some(&sign(Algorithm::HS256, None, &key, no_exp)), None)
            .unwrap_err();
        assert!(e.to_string().contains("exp"), "{e}");
    }

    #[test]
    fn a_token_is_refused_from_the_instant_its_session_ends() {
        let (a, key, _dir) = hmac_auth();
        // exp = now (whole seconds): jsonwebtoken alone would accept it for
        // the rest of this second; the session ended at exp.
        let e = a
            .authenticate(Some(&sign(Algorithm::HS256, None, &key, claims(0))), None)
            .unwrap_err();
        assert_eq!(e.code(), "token_expired");
    }

    #[test]
    fn an_absurdly_distant_expiry_never_ends_and_never_panics() {
        let (a, key, _dir) = hmac_auth();
        for exp in [u64::MAX, i64::MAX as u64, 1 << 40] {
            let mut c = claims(0);
            c["exp"] = json!(exp);
            let p = a
                .authenticate(Some(&sign(Algorithm::HS256, None, &key, c)), None)
                .unwrap_or_else(|e| panic!("exp {exp}: {e}"));
            let _ = p.deadline();
        }
    }

    #[test]
    fn a_short_secret_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "short").unwrap();
        let e = Auth::new(&AuthConfig {
            jwt: Some(JwtConfig {
                secret_file: Some(secret),
                ..JwtConfig::default()
            }),
            ..AuthConfig::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("at least 32"), "{e}");
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        let rsa = EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa.key")).unwrap()).unwrap();
        let rsa2 = EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa2.key")).unwrap()).unwrap();
        let write = |keys: &[(&str, &EncodingKey)]| {
            let keys: Vec<_> = keys
                .iter()
                .map(|(kid, k)| {
                    let mut jwk =
                        jsonwebtoken::jwk::Jwk::from_encoding_key(k, Algorithm::RS256).unwrap();
                    jwk.common.key_id = Some(kid.to_string());
                    jwk
                })
                .collect();
            std::fs::write(&jwks, serde_json::to_vec(&JwkSet { keys }).unwrap()).unwrap();
        };
        write(&[("one", &rsa)]);
        let a = auth(JwtConfig {
            jwks_file: Some(jwks.clone()),
            ..JwtConfig::default()
        });
        let t1 = sign(Algorithm::RS256, Some("one"), &rsa, claims(60));
        let t2 = sign(Algorithm::RS256, Some("two"), &rsa2, claims(60));
        assert!(a.authenticate(Some(&t1), None).is_ok());
        assert!(a
            .authenticate(Some(&t2), None)
            .unwrap_err()
            .to_string()
            .contains("unknown key id"));
        write(&[("two", &rsa2)]);
        a.reload().unwrap();
        assert!(a.authenticate(Some(&t2), None).is_ok());
        assert!(a.authenticate(Some(&t1), None).is_err());
        // A broken file keeps the keys in use.
        std::fs::write(&jwks, "not json").unwrap();
        assert!(a.reload().unwrap_err().to_string().contains("jwks_file"));
        assert!(a.authenticate(Some(&t2), None).is_ok());
    }
}
