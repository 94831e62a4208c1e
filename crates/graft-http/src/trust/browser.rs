//! The browser rules of SPEC §9, checked by the middleware before anything
//! else: `Host` must be a loopback name or an `--allow-host` (DNS
//! rebinding), `Origin`, when sent, must be the node's own (cross-site
//! requests), and a mutating request must say `Content-Type:
//! application/json` (cross-site forms and `text/plain` posts skip the CORS
//! preflight).
//!
//! Invariant: every refusal is a 403 or 415 that quotes request text only
//! cut short and escaped ([`super::middleware::shown`]).

use axum::http::{header, HeaderMap, Method, StatusCode};

use super::middleware::shown;
use super::Trust;
use crate::errors::ApiError;

/// The host name of a `Host` value (no port, no IPv6 brackets), as sent:
/// compare it without case.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    }
}

fn is_loopback_name(name: &str) -> bool {
    const SUFFIX: &str = ".localhost";
    name.eq_ignore_ascii_case("localhost")
        || (name.len() > SUFFIX.len()
            && name
                .get(name.len() - SUFFIX.len()..)
                .is_some_and(|end| end.eq_ignore_ascii_case(SUFFIX)))
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The browser rules: `Host` (DNS rebinding), `Origin` (cross-site
/// requests) and, for mutating methods, `Content-Type` (cross-site forms
/// and `text/plain` posts, which skip the CORS preflight).
pub(crate) fn browser_rules(
    trust: &Trust,
    method: &Method,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            "more than one Host header",
        ));
    }
    let host = match host {
        // Every browser sends Host (HTTP/1.1 requires it); a request without
        // it cannot be checked against DNS rebinding, so it is refused like
        // a foreign one.
        None => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_host",
                "the request has no Host header; send `Host: localhost` (or the node's name)",
            ))
        }
        Some(v) => {
            let h = v.to_str().map_err(|_| {
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden_host",
                    "the Host header is not text",
                )
            })?;
            let name = host_name(h);
            let allowed = is_loopback_name(name)
                || trust
                    .config()
                    .allow_hosts
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(name) || a.eq_ignore_ascii_case(h));
            if !allowed {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden_host",
                    format!(
                        "Host `{}` is not a loopback name or an allowed host; start the node with --allow-host {}",
                        shown(h),
                        shown(&name.to_ascii_lowercase())
                    ),
                ));
            }
            Some(h)
        }
    };
    if let Some(origin) = headers.get(header::ORIGIN) {
        let scheme = if trust.config().tls { "https" } else { "http" };
        let own = host.is_some_and(|h| {
            origin.to_str().is_ok_and(|o| {
                o.strip_prefix(scheme)
                    .and_then(|r| r.strip_prefix("://"))
                    .is_some_and(|r| r.eq_ignore_ascii_case(h))
            })
        });
        if !own {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                "cross-origin requests are refused: Origin is not this node's own",
            ));
        }
    }
    if !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.split(';')
                    .next()
                    .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "this request changes something: send it with Content-Type: application/json",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert_eq!(host_name("127.0.0.1:7878"), "127.0.0.1");
        assert_eq!(host_name("[::1]:80"), "::1");
        assert_eq!(host_name("LocalHost:1"), "LocalHost");
        assert_eq!(host_name("evil.com:7878"), "evil.com");
        assert!(is_loopback_name("localhost"));
        assert!(is_loopback_name("LocalHost"));
        assert!(is_loopback_name("app.localhost"));
        assert!(is_loopback_name("App.LOCALHOST"));
        assert!(!is_loopback_name(".localhost"));
        assert!(!is_loopback_name("xlocalhost"));
        assert!(!is_loopback_name("é.localhos"));
        assert!(is_loopback_name("127.9.9.9"));
        assert!(is_loopback_name("::1"));
        assert!(!is_loopback_name("localhost.evil.com"));
        assert!(!is_loopback_name("10.0.0.1"));
    }
}
