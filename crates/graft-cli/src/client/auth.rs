//! The token a client presents, and what it says when the node refuses it.
//!
//! The token is found once, in `Client::new` (`datadir::resolve_token`:
//! `--token`/`GRAFT_TOKEN`, else the token file of the project or the
//! default data directory), and kept with where it came from, so that a 401
//! can name that place instead of leaving the user to guess which token was
//! sent. A token that cannot be a header value is refused here, before any
//! request leaves, rather than sent mangled.

use anyhow::{anyhow, Result};

use super::Client;
use crate::datadir::{token_places, TokenSource};

impl Client {
    /// Adds the token this client found (if any) as `Authorization: Bearer`.
    pub(super) fn authorize(
        &self,
        req: hyper::http::request::Builder,
    ) -> Result<hyper::http::request::Builder> {
        let Some((token, _)) = &self.token else {
            return Ok(req);
        };
        let value = hyper::header::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            anyhow!("the token holds characters a header cannot carry; check --token or GRAFT_TOKEN")
        })?;
        Ok(req.header("authorization", value))
    }

    /// Where the token came from (or was looked for), after a 401.
    pub(super) fn token_hint(&self) -> String {
        match &self.token {
            Some((_, TokenSource::Given)) => {
                "  = note: the token came from --token or GRAFT_TOKEN".into()
            }
            Some((_, TokenSource::File(f))) => format!(
                "  = note: the token came from {}; is this the node that wrote it?",
                f.display()
            ),
            None => {
                let cwd = std::env::current_dir().unwrap_or_default();
                let places: Vec<String> = token_places(&cwd)
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                format!(
                    "  = note: no token found: pass --token or set GRAFT_TOKEN (looked in {})",
                    if places.is_empty() {
                        "no token file".into()
                    } else {
                        places.join(", ")
                    }
                )
            }
        }
    }
}
