//! Extractors whose rejections are the API's own errors, so a malformed
//! request gets the contract's JSON body and never axum's plain text.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::auth::Subject;
use crate::error::ApiError;

/// A JSON body. An empty body reads as `{}` (every field of the seed's
/// request bodies is optional); a `Content-Type` other than JSON is refused.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
            let essence = ct.split(';').next().unwrap_or_default().trim();
            if !(essence == "application/json" || essence.ends_with("+json")) {
                return Err(ApiError::InvalidRequest(format!(
                    "Content-Type must be application/json, not '{essence}' (curl: -H 'Content-Type: application/json')"
                )));
            }
        }
        let limit = req.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|rejection| body_error(rejection, limit))?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::InvalidRequest(format!("malformed JSON body: {e}")))
    }
}

/// The configured body limit, as a request extension, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

fn body_error(rejection: BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit }
    } else {
        ApiError::InvalidRequest(format!("could not read the request body: {}", rejection.body_text()))
    }
}

/// The result of checking the request's token, put in the request's
/// extensions by the guard middleware.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Result<Subject, String>);

/// The verified caller; 401 when the token was missing or invalid.
#[derive(Debug, Clone)]
pub struct Auth(pub Subject);

impl<S: Send + Sync> FromRequestParts<S> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Authenticated>() {
            Some(Authenticated(Ok(subject))) => Ok(Auth(subject.clone())),
            Some(Authenticated(Err(message))) => Err(ApiError::Unauthorized(message.clone())),
            None => Err(ApiError::Unauthorized("missing bearer token".into())),
        }
    }
}

impl Auth {
    /// 403 unless the token has `scope`.
    pub fn require(&self, scope: &str) -> Result<(), ApiError> {
        if self.0.has(scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!("token lacks scope '{scope}'")))
        }
    }
}
