//! Building a client: the `--url` checked, and the connection pool behind
//! every request.
//!
//! The URL is checked before anything is sent, so that a typo is reported
//! as a bad `--url` rather than as an unreachable node; `--cacert` with a
//! plain-http URL is refused, since it would silently protect nothing. The
//! connect timeout is short (5 s) so that a node that is not running is
//! reported quickly; the answer's own wait is the verb's.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;

use super::tls::{tls_config, tls_config_empty};
use super::Client;
use crate::args::Conn;
use crate::datadir::resolve_token;

impl Client {
    pub fn new(conn: &Conn) -> Result<Client> {
        let url = conn.url.trim_end_matches('/');
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| anyhow!("invalid --url `{url}`: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => {
                bail!("invalid --url `{url}`: use http:// or https://, not {other}://")
            }
            None => bail!("invalid --url `{url}`: expected http://HOST:PORT or https://HOST:PORT"),
        };
        if uri.host().is_none() {
            bail!("invalid --url `{url}`: expected http://HOST:PORT or https://HOST:PORT");
        }
        if conn.cacert.is_some() && !https {
            bail!("--cacert is for https:// URLs; `{url}` is plain http");
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.enforce_http(false);
        // The system's roots are read only when they may be needed.
        let tls = if https {
            tls_config(conn.cacert.as_deref())?
        } else {
            tls_config_empty()?
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let http = HyperClient::builder(TokioExecutor::new()).build(connector);
        let cwd = std::env::current_dir().unwrap_or_default();
        Ok(Client {
            base: url.to_owned(),
            json: conn.json,
            http,
            token: resolve_token(conn.token.as_deref(), &cwd),
        })
    }
}
