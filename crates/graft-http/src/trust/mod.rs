//! Trust (SPEC §9): who may do what on a node, and the record of what was done.
//!
//! A [`Trust`] holds the node's tokens (their SHA-256 only, loaded from the
//! store and kept in memory), the dashboard's sessions, the browser rules
//! (allowed hosts, whether the node speaks TLS), the projects roots of path
//! sandboxes, the rate limit of failed authentication and the audit log's
//! store. The router's one middleware ([`middleware`]) applies it to every
//! routed request, following the one table of [`routes::ROUTES`].
//!
//! Invariants:
//! * Secrets never leave this module: a token or session secret is hashed on
//!   arrival and only its SHA-256 is kept (in memory and in the store); no
//!   error message, log line or audit row contains a presented secret.
//! * A token change (create, revoke) is durable in the store before the
//!   in-memory table changes, and the table changes before the request that
//!   made it is answered: a revoked token is refused from the next request on.
//! * Secrets are compared in constant time ([`subtle`]); the map lookup that
//!   precedes the comparison is keyed by a SHA-256 the caller cannot steer.
//! * No audited effect without its row: a durable effect (create, reload,
//!   rollback, tokens) commits its row in its own transaction; any other
//!   audited request has its row committed before its handler runs, and
//!   when that write fails the handler does not run (503
//!   `audit_unavailable`). See [`routes::RowCommit`].
//! * Every request, known route or not, goes through the middleware: an
//!   unknown path is 401 before it is 404, and a request without `Host` is
//!   refused (403 `forbidden_host`).

pub(crate) mod audit;
pub(crate) mod browser;
pub(crate) mod limiter;
pub(crate) mod middleware;
pub(crate) mod projects;
pub mod routes;
pub(crate) mod session;
pub(crate) mod tokens;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use graft::store::{Store, StoreError, TokenRecord};
use parking_lot::{Mutex, RwLock};

pub use limiter::RateLimit;
pub use tokens::{
    ensure_admin_token_file, generate_token, hash_secret, NewToken, TokenError, TokenFile,
    TOKEN_FILE, TOKEN_PREFIX,
};

/// A role (SPEC §9). Ordered: each role may do everything the ones below it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads everything but process state.
    Viewer,
    /// Also call, cast, send, spawn, reload, rollback, restart.
    Operator,
    /// Everything: create and delete sandboxes, eval, state, tokens, audit.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The role's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The role of a name, if it is one.
    ///
    /// ```
    /// use graft_http::trust::Role;
    /// assert_eq!(Role::parse("operator"), Some(Role::Operator));
    /// assert_eq!(Role::parse("root"), None);
    /// ```
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Who made a request: the token (directly or through a session), its role
/// and its sandboxes. Put in the request's extensions by the middleware.
#[derive(Clone, Debug, PartialEq)]
pub struct Caller {
    /// The token's public id (shared: the middleware hands a caller to
    /// every request, so a copy must not allocate).
    pub token_id: Arc<str>,
    /// Its role.
    pub role: Role,
    /// The sandboxes it is limited to (`None`: all).
    pub sandboxes: Option<Arc<[String]>>,
    /// When the session expires (ms since the Unix epoch), for a session.
    pub session_expires_ms: Option<f64>,
}

impl Caller {
    /// Whether the caller may see sandbox `id` (a scoped token sees only its own).
    pub fn may_see(&self, id: &str) -> bool {
        self.sandboxes
            .as_deref()
            .is_none_or(|list| list.iter().any(|s| s == id))
    }

    /// Whether the token is limited to some sandboxes.
    pub fn is_scoped(&self) -> bool {
        self.sandboxes.is_some()
    }
}

/// The peer's address (when the server knows it), put in the request's
/// extensions by the middleware for the handlers that authenticate
/// themselves (the sign-in).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer(pub Option<IpAddr>);

/// How a node applies trust: browser rules, path sandboxes, sessions and the
/// rate limit of failed authentication.
///
/// ```
/// let config = graft_http::trust::TrustConfig {
///     allow_hosts: vec!["graft.example.com".into()],
///     tls: true,
///     ..Default::default()
/// };
/// assert_eq!(config.session_ttl, std::time::Duration::from_secs(12 * 3600));
/// ```
#[derive(Clone, Debug)]
pub struct TrustConfig {
    /// Host names (without port) accepted in `Host` besides loopback names
    /// (`--allow-host`), compared without case.
    pub allow_hosts: Vec<String>,
    /// Directories under which sandboxes may be created from a path
    /// (`--projects-root`; `graft run DIR` gives DIR). Empty: none.
    pub projects_roots: Vec<PathBuf>,
    /// Whether the node is served over TLS: the node's own `Origin` is
    /// `https://…`, and the session cookie is `Secure`.
    pub tls: bool,
    /// How long a dashboard session lasts.
    pub session_ttl: Duration,
    /// Failed authentications allowed per peer.
    pub auth_failures: RateLimit,
    /// Whether allowed messages to processes (call, cast, send) write an
    /// audit row too, ahead of the message, failing closed like every
    /// audited request (`--audit-messages`; off by default, see
    /// [`routes::AuditClass`]). Refused messages are recorded either way.
    pub audit_messages: bool,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            allow_hosts: Vec::new(),
            projects_roots: Vec::new(),
            tls: false,
            session_ttl: Duration::from_secs(12 * 3600),
            auth_failures: RateLimit::default(),
            audit_messages: false,
        }
    }
}

/// A node's trust state (see the module doc). Share it in an `Arc`.
pub struct Trust {
    store: Arc<Store>,
    config: TrustConfig,
    /// Canonical projects roots (symlinks resolved once, at start).
    roots: Vec<PathBuf>,
    /// Tokens by the SHA-256 of their secret.
    tokens: RwLock<HashMap<[u8; 32], Arc<TokenRecord>>>,
    /// This trust state's identity and the version of `tokens` (bumped
    /// under its write lock by every change), for the per-thread memo of
    /// verified tokens (`tokens::Memo`).
    memo_key: (u64, std::sync::atomic::AtomicU64),
    sessions: Mutex<session::Sessions>,
    limiter: limiter::Limiter,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("store", &self.store.path())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Trust {
    /// The trust state of a node whose tokens and audit log live in `store`
    /// (the node's database). Loads every token.
    ///
    /// ```
    /// # fn main() -> Result<(), graft::store::StoreError> {
    /// let store = std::sync::Arc::new(graft::store::Store::in_memory()?);
    /// let trust = graft_http::trust::Trust::new(store, Default::default())?;
    /// assert!(trust.tokens()?.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn new(store: Arc<Store>, config: TrustConfig) -> Result<Trust, StoreError> {
        let mut tokens = HashMap::new();
        for t in store.tokens()? {
            tokens.insert(t.hash, Arc::new(t));
        }
        let roots = config
            .projects_roots
            .iter()
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .collect();
        Ok(Trust {
            limiter: limiter::Limiter::new(config.auth_failures),
            sessions: Mutex::new(session::Sessions::default()),
            tokens: RwLock::new(tokens),
            memo_key: (
                tokens::next_trust_id(),
                std::sync::atomic::AtomicU64::new(0),
            ),
            roots,
            store,
            config,
        })
    }

    /// The store holding tokens and the audit log.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &TrustConfig {
        &self.config
    }

    /// The canonical projects roots.
    pub(crate) fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Whether `path`, after resolving symlinks, is under a projects root.
    pub fn path_allowed(&self, path: &Path) -> bool {
        projects::is_under(&self.roots, path)
    }
}
