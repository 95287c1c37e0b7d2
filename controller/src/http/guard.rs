//! The guard in front of the `/api/v1` resources: check the token (if any),
//! then count the request against its rate limit. The limit runs first in
//! effect: a request over the limit is refused with 429 whatever its token;
//! a request without a valid token is limited per client address and then
//! refused with 401 by the handler's `Auth` extractor.
//!
//! An execute request's session is read while its limit is counted (with
//! Redis, two round trips at once instead of one after the other); the
//! handler gets it as [`Prefetched`].

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::extract::Authenticated;
use crate::error::{ApiError, WithRequestId};
use crate::ratelimit::{LimitClass, RateKey};
use crate::sessions::SessionRecord;

/// The session an execute request names, as read beside its rate limit;
/// `None` when there is none (or no valid token).
#[derive(Debug, Clone)]
pub(super) struct Prefetched(pub Option<SessionRecord>);

pub(super) async fn guard(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let class = if path.starts_with("/api/v1/functions") {
        LimitClass::Functions
    } else {
        LimitClass::Execute
    };
    // Execute's errors carry the request ID in the body.
    let execute_id = path.strip_prefix("/api/v1/execute/").map(str::to_owned);
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let verified = state.auth.verify_header(authorization).map_err(|e| e.to_string());
    let key = match &verified {
        Ok(subject) => RateKey::Subject(subject.sub.clone()),
        Err(_) => {
            let ip = req
                .extensions()
                .get::<ConnectInfo<super::conn::ClientAddr>>()
                .map_or([0, 0, 0, 0].into(), |c| c.0.0.ip());
            RateKey::Client(ip)
        }
    };
    let executes = req.method() == Method::POST;
    let prefetch = async {
        match (&execute_id, &verified) {
            (Some(id), Ok(subject)) if executes => Some(state.engine.session(subject, id).await.ok()),
            _ => None,
        }
    };
    let (limited, prefetched) = tokio::join!(state.limiter.check(class, &key), prefetch);
    if let Err(retry_after_secs) = limited {
        state.metrics.record_rate_limited(class.as_str());
        let err = ApiError::RateLimited { retry_after_secs };
        return match execute_id {
            Some(id) => WithRequestId(id, err).into_response(),
            None => err.into_response(),
        };
    }
    req.extensions_mut().insert(Authenticated(verified));
    if let Some(session) = prefetched {
        req.extensions_mut().insert(Prefetched(session));
    }
    next.run(req).await
}
