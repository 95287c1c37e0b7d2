//! The guard in front of the `/api/v1` resources: check the token (if any),
//! then count the request against its rate limit. The limit runs first in
//! effect: a request over the limit is refused with 429 whatever its token;
//! a request without a valid token is limited per client address and then
//! refused with 401 by the handler's `Auth` extractor.
//!
//! An execute request's limit is left to its handler, as [`Unadmitted`]:
//! the session layer counts it together with what else the execute needs
//! from Redis (the session, the cached result), in one round trip (see
//! [`crate::admission`]).

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::extract::Authenticated;
use crate::admission::Gate;
use crate::error::{ApiError, WithRequestId};
use crate::ratelimit::{LimitClass, RateKey};

/// An execute request's limit, not counted yet: its handler makes it a
/// [`Gate`] and passes it before it answers.
#[derive(Debug, Clone)]
pub(super) struct Unadmitted(RateKey);

impl Unadmitted {
    pub(super) fn gate(self, state: &AppState) -> Gate<'_> {
        Gate::new(&*state.admission, &state.metrics, LimitClass::Execute, self.0)
    }
}

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
    req.extensions_mut().insert(Authenticated(verified));
    if execute_id.is_some() && req.method() == Method::POST {
        req.extensions_mut().insert(Unadmitted(key));
        return next.run(req).await;
    }
    if let Err(retry_after_secs) = state.limiter.check(class, &key).await {
        state.metrics.record_rate_limited(class.as_str());
        let err = ApiError::RateLimited { retry_after_secs };
        return match execute_id {
            Some(id) => WithRequestId(id, err).into_response(),
            None => err.into_response(),
        };
    }
    next.run(req).await
}
