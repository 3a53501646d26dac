//! Per-client request limits: one for the general API, a separate, much
//! higher one for signaling and the viewer, which must never be starved by
//! API traffic.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::RateLimits;
use crate::error::ApiError;

/// The two limiters.
pub struct Limiters {
    api: DefaultKeyedRateLimiter<IpAddr>,
    signaling: DefaultKeyedRateLimiter<IpAddr>,
}

/// Which limit a path falls under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `/api/*` but signaling.
    Api,
    /// `/api/webrtc/*`, `/viewer/*`, `/assets/*`.
    Signaling,
    /// Health and metrics.
    None,
}

/// Classifies a request path.
pub fn classify(path: &str) -> Class {
    if path.starts_with("/api/webrtc/")
        || path.starts_with("/viewer/")
        || path.starts_with("/assets/")
    {
        Class::Signaling
    } else if path.starts_with("/api/") || path == "/api" {
        Class::Api
    } else {
        Class::None
    }
}

fn quota(requests: u32, window: Duration) -> Quota {
    let n = NonZeroU32::new(requests.max(1)).unwrap();
    let period = window / n.get();
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .expect("non-zero period")
        .allow_burst(n)
}

impl Limiters {
    /// Limiters from the configuration.
    pub fn new(cfg: &RateLimits) -> Limiters {
        Limiters {
            api: RateLimiter::keyed(quota(
                cfg.api_requests,
                Duration::from_secs(cfg.api_window_seconds),
            )),
            signaling: RateLimiter::keyed(quota(cfg.webrtc_per_minute, Duration::from_secs(60))),
        }
    }

    /// None if allowed, else how long to wait.
    pub fn check(&self, class: Class, ip: IpAddr) -> Option<Duration> {
        let limiter = match class {
            Class::Api => &self.api,
            Class::Signaling => &self.signaling,
            Class::None => return None,
        };
        limiter
            .check_key(&ip)
            .err()
            .map(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// Middleware applying the limits.
pub async fn middleware(
    State(limiters): State<Arc<Limiters>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let class = classify(req.uri().path());
    if let Some(wait) = limiters.check(class, addr.ip()) {
        let secs = wait.as_secs() + 1;
        let mut resp = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too many requests")
            .detail(serde_json::json!({ "retry_after_seconds": secs }))
            .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return resp;
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_classified() {
        assert_eq!(classify("/api/sessions"), Class::Api);
        assert_eq!(classify("/api/auth/start"), Class::Api);
        assert_eq!(classify("/api/webrtc/ice-servers"), Class::Signaling);
        assert_eq!(classify("/viewer/abc/vnc"), Class::Signaling);
        assert_eq!(classify("/health"), Class::None);
    }

    #[test]
    fn api_limit_does_not_touch_signaling() {
        let l = Limiters::new(&RateLimits {
            api_requests: 3,
            api_window_seconds: 900,
            webrtc_per_minute: 10_000,
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.check(Class::Api, ip), None);
        }
        let wait = l.check(Class::Api, ip).expect("fourth request limited");
        assert!(wait > Duration::from_secs(200), "{wait:?}");
        assert_eq!(l.check(Class::Signaling, ip), None);
        assert_eq!(
            l.check(Class::Api, "10.0.0.2".parse().unwrap()),
            None,
            "per client"
        );
    }
}
