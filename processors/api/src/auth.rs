//! Bearer JWT verification, shared by REST and gRPC.
//!
//! Keys come from the environment (secrets never live in topology.yaml):
//! - `STREAMOASIS_JWT_HS256_SECRET`, or `STREAMOASIS_JWT_HS256_SECRET_FILE` (file content, one
//!   trailing newline trimmed): tokens signed HS256 with that secret;
//! - `STREAMOASIS_JWT_JWKS_FILE`: a JWKS document; RS256 tokens are checked against its RSA keys
//!   (by `kid`; a token without `kid` is accepted only when the set holds one key);
//! - `STREAMOASIS_JWT_ISSUER`, `STREAMOASIS_JWT_AUDIENCE` (optional): then `iss` / `aud` must be
//!   present and match. `exp` is always required and checked (no leeway beyond 30 s of skew).
//!
//! With none of the key variables set the API refuses to start, unless it is started with
//! `--insecure-no-auth` ([`Auth::disabled`]).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Environment variable: the HS256 shared secret.
pub const ENV_HS256_SECRET: &str = "STREAMOASIS_JWT_HS256_SECRET";
/// Environment variable: a file holding the HS256 shared secret.
pub const ENV_HS256_SECRET_FILE: &str = "STREAMOASIS_JWT_HS256_SECRET_FILE";
/// Environment variable: a JWKS file with the RS256 public keys.
pub const ENV_JWKS_FILE: &str = "STREAMOASIS_JWT_JWKS_FILE";
/// Environment variable: the required issuer (`iss`).
pub const ENV_ISSUER: &str = "STREAMOASIS_JWT_ISSUER";
/// Environment variable: the required audience (`aud`).
pub const ENV_AUDIENCE: &str = "STREAMOASIS_JWT_AUDIENCE";

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// Subject (caller identity), if present.
    #[serde(default)]
    pub sub: Option<String>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

/// Why a request was not authenticated (always answered 401 / UNAUTHENTICATED).
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum AuthError {
    /// No `Authorization: Bearer` header / metadata.
    #[error("missing bearer token: send `Authorization: Bearer <JWT>`")]
    Missing,
    /// The header is not `Bearer <token>`.
    #[error("malformed Authorization header: expected `Bearer <JWT>`")]
    Malformed,
    /// The token failed verification (signature, expiry, issuer, audience, algorithm).
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Why the auth configuration cannot be used (start-up error).
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct AuthConfigError {
    /// The variable at fault.
    pub var: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// The verifier.
#[derive(Clone)]
pub struct Auth {
    hs256: Option<DecodingKey>,
    rs256: HashMap<String, DecodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    enabled: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.enabled)
            .field("hs256", &self.hs256.is_some())
            .field("rs256_keys", &self.rs256.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl Auth {
    /// No authentication at all (`--insecure-no-auth`): every request passes.
    pub fn disabled() -> Auth {
        Auth { hs256: None, rs256: HashMap::new(), issuer: None, audience: None, enabled: false }
    }

    /// True unless [`Auth::disabled`].
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Build from explicit settings: an HS256 secret, a JWKS document, issuer, audience.
    pub fn new(hs256_secret: Option<&[u8]>, jwks: Option<&str>, issuer: Option<String>, audience: Option<String>) -> Result<Auth, AuthConfigError> {
        let mut rs256 = HashMap::new();
        if let Some(doc) = jwks {
            let set: JwkSet = serde_json::from_str(doc).map_err(|e| AuthConfigError { var: ENV_JWKS_FILE, message: format!("not a JWKS document: {e}") })?;
            for (i, k) in set.keys.iter().enumerate() {
                if !matches!(k.algorithm, AlgorithmParameters::RSA(_)) {
                    continue;
                }
                let key = DecodingKey::from_jwk(k).map_err(|e| AuthConfigError { var: ENV_JWKS_FILE, message: format!("key {i}: {e}") })?;
                rs256.insert(k.common.key_id.clone().unwrap_or_default(), key);
            }
            if rs256.is_empty() {
                return Err(AuthConfigError { var: ENV_JWKS_FILE, message: "holds no RSA key (RS256 needs `kty: RSA` keys with n and e)".into() });
            }
        }
        if let Some(s) = hs256_secret {
            if s.len() < 32 {
                return Err(AuthConfigError { var: ENV_HS256_SECRET, message: format!("{} bytes is too short for HS256: use at least 32 random bytes", s.len()) });
            }
        }
        Ok(Auth { hs256: hs256_secret.map(DecodingKey::from_secret), rs256, issuer, audience, enabled: true })
    }

    /// Read the `STREAMOASIS_JWT_*` variables through `var` (the process environment in the
    /// binary). `Ok(None)` when no key variable is set: the caller must refuse to start unless
    /// told to run without auth.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Auth>, AuthConfigError> {
        let nonempty = |k: &str| var(k).filter(|v| !v.is_empty());
        let secret = streamoasis_pipeline::secret::from_vars(ENV_HS256_SECRET, &var)
            .map_err(|e| AuthConfigError { var: if e.path.ends_with("_FILE") { ENV_HS256_SECRET_FILE } else { ENV_HS256_SECRET }, message: e.message })?
            .map(|s| s.expose().as_bytes().to_vec());
        let jwks = match nonempty(ENV_JWKS_FILE) {
            Some(f) => Some(std::fs::read_to_string(&f).map_err(|e| AuthConfigError { var: ENV_JWKS_FILE, message: format!("cannot read {f}: {e}") })?),
            None => None,
        };
        if secret.is_none() && jwks.is_none() {
            return Ok(None);
        }
        Auth::new(secret.as_deref(), jwks.as_deref(), nonempty(ENV_ISSUER), nonempty(ENV_AUDIENCE)).map(Some)
    }

    /// Verify an `Authorization` header value (`Bearer <JWT>`).
    pub fn check_header(&self, header: Option<&str>) -> Result<Option<Claims>, AuthError> {
        if !self.enabled {
            return Ok(None);
        }
        let h = header.ok_or(AuthError::Missing)?;
        let (scheme, token) = h.trim().split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(AuthError::Malformed);
        }
        self.verify(token.trim()).map(Some)
    }

    /// Verify a compact JWT.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let invalid = |m: String| AuthError::Invalid(m);
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("unreadable header ({e})")))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref().ok_or_else(|| invalid("HS256 tokens are not accepted here (no HS256 secret configured)".into()))?,
            Algorithm::RS256 => match &header.kid {
                Some(kid) => self.rs256.get(kid).ok_or_else(|| invalid(format!("unknown key id '{kid}'")))?,
                None if self.rs256.len() == 1 => self.rs256.values().next().expect("one key"),
                None => return Err(invalid("RS256 token without kid".into())),
            },
            other => return Err(invalid(format!("algorithm {other:?} not accepted (HS256 or RS256)"))),
        };
        let mut v = Validation::new(header.alg);
        v.leeway = 30;
        let mut required = vec!["exp"];
        match &self.issuer {
            Some(i) => {
                v.set_issuer(&[i]);
                required.push("iss");
            }
            None => v.iss = None,
        }
        match &self.audience {
            Some(a) => {
                v.set_audience(&[a]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        v.set_required_spec_claims(&required);
        jsonwebtoken::decode::<Claims>(token, key, &v).map(|d| d.claims).map_err(|e| invalid(e.to_string()))
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Mint an HS256 token (the `streamoasis api token` helper and the tests).
pub fn mint_hs256(secret: &[u8], subject: &str, ttl: Duration, issuer: Option<&str>, audience: Option<&str>) -> Result<String, jsonwebtoken::errors::Error> {
    let mut claims = serde_json::json!({"sub": subject, "iat": now_secs(), "exp": now_secs() + ttl.as_secs()});
    if let Some(i) = issuer {
        claims["iss"] = i.into();
    }
    if let Some(a) = audience {
        claims["aud"] = a.into();
    }
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn hs256_checks_signature_expiry_issuer_audience() {
        let auth = Auth::new(Some(SECRET), None, Some("iss-a".into()), Some("aud-a".into())).unwrap();
        let good = mint_hs256(SECRET, "u", Duration::from_secs(60), Some("iss-a"), Some("aud-a")).unwrap();
        assert_eq!(auth.verify(&good).unwrap().sub.as_deref(), Some("u"));
        assert!(auth.check_header(Some(&format!("Bearer {good}"))).is_ok());
        let wrong_aud = mint_hs256(SECRET, "u", Duration::from_secs(60), Some("iss-a"), Some("aud-b")).unwrap();
        assert!(matches!(auth.verify(&wrong_aud), Err(AuthError::Invalid(m)) if m.contains("udience")));
        let no_aud = mint_hs256(SECRET, "u", Duration::from_secs(60), Some("iss-a"), None).unwrap();
        assert!(auth.verify(&no_aud).is_err());
        let wrong_key = mint_hs256(b"another-secret-another-secret-xx", "u", Duration::from_secs(60), Some("iss-a"), Some("aud-a")).unwrap();
        assert!(matches!(auth.verify(&wrong_key), Err(AuthError::Invalid(m)) if m.contains("ignature")));
        assert_eq!(auth.check_header(None), Err(AuthError::Missing));
        assert_eq!(auth.check_header(Some("Basic abc")), Err(AuthError::Malformed));
    }

    #[test]
    fn config_from_env_refuses_nothing_and_short_secrets() {
        assert!(Auth::from_env(|_| None).unwrap().is_none());
        let e = Auth::from_env(|k| (k == ENV_HS256_SECRET).then(|| "short".to_string())).unwrap_err();
        assert_eq!(e.var, ENV_HS256_SECRET);
        let ok = Auth::from_env(|k| (k == ENV_HS256_SECRET).then(|| String::from_utf8(SECRET.to_vec()).unwrap())).unwrap().unwrap();
        assert!(ok.enabled());
    }
}
