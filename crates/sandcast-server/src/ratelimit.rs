//! Request limits that protect without locking the operator out.
//!
//! Whose budget a request spends is decided before any is charged: a request
//! to the general API carrying the operator's key spends the key's budget
//! (high, meant for a backend); any other spends its client address's budget
//! (low), so nobody sharing the operator's address, or its reverse proxy, can
//! use up the operator's requests. Signaling and the viewer have their own,
//! much higher per-address limit and never touch the general ones.
//!
//! The client address is the TCP peer, or, when the peer is a configured
//! trusted proxy, the nearest untrusted hop of `Forwarded` (RFC 7239) or
//! `X-Forwarded-For`. IPv6 clients are counted per /64, the block one host
//! usually holds. Idle per-address state is trimmed by [`Limiters::trim_every`].

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

use crate::config::RateLimits;
use crate::error::ApiError;

/// How often idle per-address state is dropped.
pub const TRIM: Duration = Duration::from_secs(60);

/// The limiters and what decides between them.
pub struct Limiters {
    /// General API requests without a valid key, per client address.
    anonymous: DefaultKeyedRateLimiter<IpAddr>,
    /// General API requests with the operator key (one key: one budget).
    key: DefaultDirectRateLimiter,
    /// Signaling and viewer requests, per client address.
    signaling: DefaultKeyedRateLimiter<IpAddr>,
    trusted_proxies: Vec<IpNet>,
    api_key: Arc<String>,
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

/// Whose budget a request spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payer {
    /// The holder of the operator key.
    Key,
    /// A client address, grouped by [`group`].
    Address(IpAddr),
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

/// The address a limit counts: IPv4 as it is (IPv4-mapped IPv6 as IPv4),
/// IPv6 by its /64, since one host or customer usually holds a whole /64.
pub fn group(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// One address of a forwarding header: a bare IP, `IP:port`, `[IPv6]` or
/// `[IPv6]:port`, optionally quoted. None for `unknown`, obfuscated
/// identifiers (`_hidden`) and anything else.
fn parse_node(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.split(']').next()) {
        return inner.parse().ok();
    }
    None
}

/// Splits on `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter()
}

/// The hops a proxy chain recorded, client first, nearest proxy's peer
/// last: from `Forwarded` (RFC 7239 `for=`) when present, else from
/// `X-Forwarded-For`. None for a hop whose address is not given.
pub fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let values = |name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
    };
    let forwarded = values(header::FORWARDED);
    if !forwarded.is_empty() {
        return forwarded
            .into_iter()
            .flat_map(|v| split_unquoted(v, ','))
            .map(|element| {
                split_unquoted(element, ';').find_map(|pair| {
                    let (name, value) = pair.split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| parse_node(value))
                        .flatten()
                })
            })
            .collect();
    }
    values(header::HeaderName::from_static("x-forwarded-for"))
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(parse_node)
        .collect()
}

impl Limiters {
    /// Limiters from the configuration; `api_key` tells whose budget a
    /// request spends.
    pub fn new(cfg: &RateLimits, api_key: Arc<String>) -> Limiters {
        Limiters {
            anonymous: RateLimiter::keyed(quota(
                cfg.api_requests,
                Duration::from_secs(cfg.api_window_seconds),
            )),
            key: RateLimiter::direct(quota(
                cfg.key_requests,
                Duration::from_secs(cfg.key_window_seconds),
            )),
            signaling: RateLimiter::keyed(quota(cfg.webrtc_per_minute, Duration::from_secs(60))),
            trusted_proxies: cfg.trusted_proxies.clone(),
            api_key,
        }
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The client's address, grouped: the TCP peer, or behind trusted
    /// proxies the nearest hop that is not one. Forwarding headers from an
    /// untrusted peer are ignored (anyone can write them); a hop without an
    /// address stops the walk at the last trusted one.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer;
        if self.trusted(peer) {
            for hop in forwarded_chain(headers).into_iter().rev() {
                let Some(ip) = hop else { break };
                client = ip;
                if !self.trusted(ip) {
                    break;
                }
            }
        }
        group(client)
    }

    /// Whose budget a request with these headers spends.
    pub fn payer(&self, class: Class, peer: IpAddr, headers: &HeaderMap) -> Payer {
        if class == Class::Api && crate::auth::is_operator(headers, &self.api_key) {
            Payer::Key
        } else {
            Payer::Address(self.client(peer, headers))
        }
    }

    /// None if allowed, else how long to wait.
    pub fn check(&self, class: Class, payer: Payer) -> Option<Duration> {
        let result = match (class, payer) {
            (Class::None, _) => return None,
            (Class::Api, Payer::Key) => self.key.check(),
            (Class::Api, Payer::Address(ip)) => self.anonymous.check_key(&ip),
            (Class::Signaling, Payer::Address(ip)) => self.signaling.check_key(&ip),
            // Signaling is never keyed; `payer` does not make this.
            (Class::Signaling, Payer::Key) => return None,
        };
        result
            .err()
            .map(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets addresses whose budget is full again, and frees the memory.
    pub fn trim(&self) {
        for l in [&self.anonymous, &self.signaling] {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Addresses currently remembered (both per-address limiters).
    pub fn tracked(&self) -> usize {
        self.anonymous.len() + self.signaling.len()
    }

    /// Trims every `period`, for as long as the limiters are in use.
    pub async fn trim_every(self: Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(&self);
        drop(self);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            match weak.upgrade() {
                Some(l) => l.trim(),
                None => return,
            }
        }
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
    let payer = limiters.payer(class, addr.ip(), req.headers());
    if let Some(wait) = limiters.check(class, payer) {
        let secs = wait.as_secs() + 1;
        let message = match payer {
            Payer::Key => "too many requests with this API key",
            Payer::Address(_) => "too many requests from this address",
        };
        let mut resp = ApiError::new(StatusCode::TOO_MANY_REQUESTS, message)
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

    const KEY: &str = "the-operator-key";

    fn limits(api: u32, key: u32, proxies: &[&str]) -> Limiters {
        Limiters::new(
            &RateLimits {
                api_requests: api,
                api_window_seconds: 900,
                key_requests: key,
                key_window_seconds: 60,
                webrtc_per_minute: 10_000,
                trusted_proxies: proxies.iter().map(|p| p.parse().unwrap()).collect(),
            },
            Arc::new(KEY.into()),
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

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
        let l = limits(3, 1000, &[]);
        let a = Payer::Address(ip("10.0.0.1"));
        for _ in 0..3 {
            assert_eq!(l.check(Class::Api, a), None);
        }
        let wait = l.check(Class::Api, a).expect("fourth request limited");
        assert!(wait > Duration::from_secs(200), "{wait:?}");
        assert_eq!(l.check(Class::Signaling, a), None);
        assert_eq!(
            l.check(Class::Api, Payer::Address(ip("10.0.0.2"))),
            None,
            "per client"
        );
    }

    #[test]
    fn the_key_has_its_own_budget() {
        let l = limits(2, 5, &[]);
        let peer = ip("192.0.2.7");
        let keyed = headers(&[("authorization", &format!("Bearer {KEY}"))]);
        let wrong = headers(&[("authorization", "Bearer not-the-key")]);
        assert_eq!(l.payer(Class::Api, peer, &keyed), Payer::Key);
        assert_eq!(
            l.payer(Class::Api, peer, &wrong),
            Payer::Address(peer),
            "a wrong key is anonymous"
        );
        assert_eq!(
            l.payer(Class::Signaling, peer, &keyed),
            Payer::Address(peer)
        );
        // Exhaust the address; the key is untouched.
        let anon = l.payer(Class::Api, peer, &HeaderMap::new());
        while l.check(Class::Api, anon).is_none() {}
        for i in 0..5 {
            assert_eq!(l.check(Class::Api, Payer::Key), None, "keyed request {i}");
        }
        assert!(l.check(Class::Api, Payer::Key).is_some(), "the key's limit");
    }

    #[test]
    fn ipv6_is_grouped_by_64() {
        assert_eq!(
            group(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(group(ip("2001:db8:1:2::1")), group(ip("2001:db8:1:2::2")));
        assert_ne!(group(ip("2001:db8:1:2::1")), group(ip("2001:db8:1:3::1")));
        assert_eq!(group(ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(group(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        let l = limits(1, 10, &[]);
        let a = Payer::Address(l.client(ip("2001:db8::1"), &HeaderMap::new()));
        let b = Payer::Address(l.client(ip("2001:db8::ffff:1"), &HeaderMap::new()));
        assert_eq!(l.check(Class::Api, a), None);
        assert!(l.check(Class::Api, b).is_some(), "same /64, same budget");
    }

    #[test]
    fn forwarding_headers_are_parsed() {
        let h = headers(&[(
            "forwarded",
            "for=192.0.2.60;proto=http;by=203.0.113.43, For=\"[2001:db8:cafe::17]:4711\"",
        )]);
        assert_eq!(
            forwarded_chain(&h),
            [Some(ip("192.0.2.60")), Some(ip("2001:db8:cafe::17"))]
        );
        let h = headers(&[
            ("forwarded", "for=unknown, for=\"_hidden\""),
            ("forwarded", "for=\"198.51.100.1:80\";by=\"a,b\""),
        ]);
        assert_eq!(forwarded_chain(&h), [None, None, Some(ip("198.51.100.1"))]);
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.9, 10.0.0.2"),
            ("x-forwarded-for", "nonsense"),
        ]);
        assert_eq!(
            forwarded_chain(&h),
            [Some(ip("203.0.113.9")), Some(ip("10.0.0.2")), None]
        );
        let both = headers(&[("forwarded", "for=1.1.1.1"), ("x-forwarded-for", "2.2.2.2")]);
        assert_eq!(forwarded_chain(&both), [Some(ip("1.1.1.1"))]);
        assert!(forwarded_chain(&HeaderMap::new()).is_empty());
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let l = limits(1, 10, &["10.0.0.0/8", "::1/128"]);
        let xff = headers(&[("x-forwarded-for", "203.0.113.9, 10.1.1.1")]);
        // Through two trusted proxies: the first untrusted hop from the right.
        assert_eq!(l.client(ip("10.0.0.1"), &xff), ip("203.0.113.9"));
        assert_eq!(l.client(ip("::1"), &xff), ip("203.0.113.9"));
        // A client writing the header itself is its own peer.
        assert_eq!(l.client(ip("198.51.100.4"), &xff), ip("198.51.100.4"));
        // A spoofed left part cannot skip the untrusted hop a proxy added.
        let spoof = headers(&[("x-forwarded-for", "1.2.3.4, 198.51.100.4")]);
        assert_eq!(l.client(ip("10.0.0.1"), &spoof), ip("198.51.100.4"));
        // No address for the client: counted as the proxy.
        let unknown = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(l.client(ip("10.0.0.1"), &unknown), ip("10.0.0.1"));
        // No header: the proxy itself.
        assert_eq!(l.client(ip("10.0.0.1"), &HeaderMap::new()), ip("10.0.0.1"));
        // IPv6 clients behind a proxy are grouped too.
        let v6 = headers(&[("forwarded", "for=\"[2001:db8::5]\"")]);
        assert_eq!(l.client(ip("10.0.0.1"), &v6), ip("2001:db8::"));
    }

    #[test]
    fn trim_forgets_idle_addresses() {
        // 1000 a second: a used budget is full again after a millisecond.
        let l = Limiters::new(
            &RateLimits {
                api_requests: 1000,
                api_window_seconds: 1,
                ..RateLimits::default()
            },
            Arc::new(KEY.into()),
        );
        for i in 0..200u32 {
            let a = Payer::Address(IpAddr::from(i.to_be_bytes()));
            assert_eq!(l.check(Class::Api, a), None);
        }
        assert_eq!(l.tracked(), 200);
        // Wait out the millisecond (time passing is what is tested).
        std::thread::sleep(Duration::from_millis(20));
        l.trim();
        assert_eq!(l.tracked(), 0);
    }
}
