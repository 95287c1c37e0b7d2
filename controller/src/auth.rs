//! JWT bearer tokens: verifying them on every request, issuing them for the
//! `token` subcommand, and the scopes they carry.
//!
//! Tokens are HS256 only (the algorithm is pinned; `alg: none` and every
//! other algorithm are refused). `exp` and `sub` are required; `iss` and
//! `aud` are checked when configured. The `scope` claim is a space-separated
//! string as in OAuth 2.0, or an array of strings.

use secrecy::ExposeSecret;
use std::io::Write;
use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::AuthArgs;
use fnrt_core::language::Language;

/// Scope that lists and reads functions.
pub const READ_FUNCTIONS: &str = "read:functions";
/// Scope that registers, updates and deletes functions (an extension).
pub const WRITE_FUNCTIONS: &str = "write:functions";
/// Scope that manages every function (an extension, an operator's): with
/// `write:functions` it updates and deletes any, and it reads their logs.
/// The bundled functions (no owner) are managed by it alone: one serves
/// every caller, so an ordinary writer must not put code of its own in
/// front of them or read what they send. Anyone's function may also need
/// taking down.
pub const ADMIN_FUNCTIONS: &str = "admin:functions";
/// Scope that executes every language.
pub const EXECUTE_ALL: &str = "execute:all";

/// The claims the controller reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default)]
    pub iat: Option<u64>,
    #[serde(default, deserialize_with = "scope_string_or_array")]
    pub scope: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

fn scope_string_or_array<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scope {
        Text(String),
        List(Vec<String>),
    }
    Ok(match Scope::deserialize(d)? {
        Scope::Text(s) => s.split_whitespace().map(str::to_owned).collect(),
        Scope::List(v) => v,
    })
}

/// When a token [`Authenticator::verify_until`] accepts until `until`
/// (Unix seconds) stops being accepted, on tokio's clock: where what
/// outlives one request (a WebSocket, an event stream) ends.
pub fn expiry(until: u64) -> tokio::time::Instant {
    let left = until.saturating_sub(jsonwebtoken::get_current_timestamp());
    // A second more: `until` is the last whole second still accepted. An
    // `exp` centuries away would overflow the clock: a year is as good.
    let left = std::time::Duration::from_secs(left.saturating_add(1).min(365 * 24 * 3600));
    tokio::time::Instant::now() + left
}

/// The caller of a request, once its token has been verified.
#[derive(Debug, Clone)]
pub struct Subject {
    pub sub: String,
    pub scopes: Vec<String>,
}

impl Subject {
    pub fn has(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// `execute:all` or `execute:{language}`.
    pub fn can_execute(&self, language: Language) -> bool {
        self.scopes
            .iter()
            .any(|s| s == EXECUTE_ALL || s.strip_prefix("execute:") == Some(language.as_str()))
    }

    /// Whether the token grants any execute scope at all.
    pub fn can_execute_something(&self) -> bool {
        self.scopes.iter().any(|s| s.starts_with("execute:"))
    }
}

/// Why a token was refused. The message is safe to show to the client.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send 'Authorization: Bearer <token>'")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Bytes of the tokens verified lately, at most (weighed by their text:
/// a token's claims may be large, so the whole is bounded, not a count).
const VERIFIED_BYTES: u64 = 4 << 20;

/// Verifies and issues tokens with one secret.
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
    /// Tokens that passed, by their exact text, with their `exp`: a client
    /// sends the same token with every request, and decoding it and
    /// checking its signature again was about 3 µs of a cached hit's CPU.
    /// Nothing else about a token changes with time; its `exp` is checked
    /// again at every use. Refused tokens are never kept.
    verified: moka::sync::Cache<String, (Subject, u64)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Builds from `JWT_SECRET`, or from the secret kept in the data dir
    /// (generated on first use).
    pub fn from_args(args: &AuthArgs) -> anyhow::Result<Self> {
        let secret = match &args.jwt_secret {
            Some(s) if !s.expose_secret().is_empty() => s.expose_secret().as_bytes().to_vec(),
            _ => local_secret(&args.data_dir)?,
        };
        Ok(Self::new(&secret, args.jwt_issuer.clone(), args.jwt_audience.clone()).with_leeway(args.jwt_leeway_secs))
    }

    /// Seconds a token stays accepted past its `exp` (clock skew between
    /// the issuer and the controllers); 5 unless set.
    pub fn with_leeway(mut self, secs: u64) -> Self {
        self.validation.leeway = secs;
        self
    }

    pub fn new(secret: &[u8], issuer: Option<String>, audience: Option<String>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        if let Some(iss) = &issuer {
            validation.set_issuer(&[iss]);
        }
        match &audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Authenticator {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer,
            audience,
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_BYTES)
                .weigher(|token: &String, _| u32::try_from(token.len()).unwrap_or(u32::MAX))
                .initial_capacity(64)
                .build(),
        }
    }

    /// Checks an `Authorization` header value.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Subject, AuthError> {
        self.verify_header_until(header).map(|(subject, _)| subject)
    }

    /// [`Self::verify_header`] with [`Self::verify_until`]'s end.
    pub fn verify_header_until(&self, header: Option<&str>) -> Result<(Subject, u64), AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(AuthError::Missing)?
            .trim();
        self.verify_until(token)
    }

    pub fn verify(&self, token: &str) -> Result<Subject, AuthError> {
        self.verify_until(token).map(|(subject, _)| subject)
    }

    /// [`Self::verify`], and the last second (Unix time) the token is
    /// accepted: what outlives one request (a WebSocket) ends there.
    pub fn verify_until(&self, token: &str) -> Result<(Subject, u64), AuthError> {
        if let Some((subject, exp)) = self.verified.get(token) {
            // As jsonwebtoken decides it: expired once `exp` is more than
            // the leeway behind the clock (then decoded again, for its error).
            let now = jsonwebtoken::get_current_timestamp();
            if exp >= now.saturating_sub(self.validation.leeway) {
                return Ok((subject, exp.saturating_add(self.validation.leeway)));
            }
            self.verified.invalidate(token);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::Invalid(describe(&e)))?;
        if data.claims.sub.is_empty() {
            return Err(AuthError::Invalid("empty 'sub' claim".into()));
        }
        let subject = Subject {
            sub: data.claims.sub,
            scopes: data.claims.scope,
        };
        self.verified
            .insert(token.to_owned(), (subject.clone(), data.claims.exp));
        Ok((subject, data.claims.exp.saturating_add(self.validation.leeway)))
    }

    /// A signed token for `sub` with `scopes`, valid for `ttl_secs`.
    pub fn issue(&self, sub: &str, scopes: &[String], ttl_secs: u64) -> anyhow::Result<String> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as u64;
        let claims = Claims {
            sub: sub.to_owned(),
            exp: now + ttl_secs,
            iat: Some(now),
            scope: scopes.to_vec(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        // The scope goes out as the OAuth 2.0 space-separated string.
        let mut value = serde_json::to_value(&claims)?;
        value["scope"] = serde_json::Value::String(scopes.join(" "));
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &value,
            &self.encoding,
        )?)
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "token has expired; get a new one (`controller token` issues local ones)".into(),
        ErrorKind::InvalidSignature => {
            "signature does not match: the token was signed with another secret than this controller's JWT_SECRET"
                .into()
        }
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => "algorithm not allowed (HS256 only)".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing required claim '{c}'"),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::ImmatureSignature => "token not valid yet".into(),
        _ => "malformed token".into(),
    }
}

/// The generated local secret: read it, or create it (0600) on first use.
fn local_secret(data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    use std::os::unix::fs::OpenOptionsExt;

    let path = data_dir.join("jwt-secret");
    if let Ok(secret) = std::fs::read_to_string(&path) {
        let secret = secret.trim();
        if secret.len() >= 32 {
            return Ok(secret.as_bytes().to_vec());
        }
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(secret.as_bytes())?;
    eprintln!(
        "warning: JWT_SECRET is not set; generated a local secret in {} (for local use only)",
        path.display()
    );
    Ok(secret.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(b"0123456789abcdef0123456789abcdef", None, None)
    }

    #[test]
    fn issued_tokens_verify_with_their_scopes() {
        let a = auth();
        let t = a
            .issue("alice", &["execute:nodejs".into(), READ_FUNCTIONS.into()], 60)
            .unwrap();
        let s = a.verify(&t).unwrap();
        assert_eq!(s.sub, "alice");
        assert!(s.can_execute(Language::Nodejs));
        assert!(!s.can_execute(Language::Python));
        assert!(s.has(READ_FUNCTIONS));
    }

    #[test]
    fn scope_may_be_an_array() {
        let a = auth();
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as u64;
        let claims = serde_json::json!({"sub": "bob", "exp": now + 60, "scope": ["execute:all"]});
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert!(a.verify(&t).unwrap().can_execute(Language::Python));
    }

    #[tokio::test]
    async fn a_token_that_never_expires_ends_no_stream_and_panics_nothing() {
        use std::time::Duration;
        let now = tokio::time::Instant::now();
        assert!(expiry(u64::MAX) > now + Duration::from_secs(364 * 24 * 3600));
        let soon = expiry(jsonwebtoken::get_current_timestamp() + 10);
        assert!(soon > now + Duration::from_secs(9) && soon <= now + Duration::from_secs(12));
        assert!(
            expiry(0) <= tokio::time::Instant::now() + Duration::from_secs(1),
            "expired: at once"
        );
    }

    #[test]
    fn a_token_verified_before_is_refused_once_it_expires_or_is_altered() {
        let a = auth().with_leeway(0);
        let now = jsonwebtoken::get_current_timestamp();
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let claims = serde_json::json!({"sub": "carol", "exp": now + 1, "scope": "execute:all"});
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert_eq!(a.verify(&t).unwrap().sub, "carol");
        assert_eq!(a.verify(&t).unwrap().sub, "carol", "verified again, from what was kept");
        assert_eq!(a.verify_until(&t).unwrap().1, now + 1, "accepted until its exp");
        let lenient = auth().with_leeway(30);
        assert_eq!(lenient.verify_until(&t).unwrap().1, now + 31, "and the leeway");
        assert_eq!(lenient.verify_until(&t).unwrap().1, now + 31, "also when kept");
        // The same claims with another signature: not the token that passed.
        let mut altered = t.clone().into_bytes();
        let at = altered.len() - 5;
        altered[at] = if altered[at] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        assert!(a.verify(&altered).is_err());
        while jsonwebtoken::get_current_timestamp() <= now + 1 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let refused = a.verify(&t).unwrap_err().to_string();
        assert!(refused.contains("expired"), "{refused}");
    }

    #[test]
    fn refuses_expired_unsigned_and_foreign_tokens() {
        let a = auth();
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as u64;
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let expired = serde_json::json!({"sub": "a", "exp": now - 600, "scope": "execute:all"});
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &expired, &key).unwrap();
        assert!(a.verify(&t).is_err());

        let no_exp = serde_json::json!({"sub": "a", "scope": "execute:all"});
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &no_exp, &key).unwrap();
        assert!(a.verify(&t).is_err());

        // alg: none, hand-made.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(format!(r#"{{"sub":"a","exp":{}}}"#, now + 60));
        assert!(a.verify(&format!("{header}.{body}.")).is_err());

        let other = EncodingKey::from_secret(b"another secret, not ours at all!");
        let ok = serde_json::json!({"sub": "a", "exp": now + 60});
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &ok, &other).unwrap();
        assert!(a.verify(&t).is_err());
    }
}
