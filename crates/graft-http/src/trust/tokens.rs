//! Tokens: `graft_` followed by 64 hex digits (256 random bits), shown once,
//! stored as SHA-256 only; and the admin token file a node writes at first
//! start.
//!
//! Invariants:
//! * A presented token is checked for its shape (length, prefix, lowercase
//!   hex) before it is hashed, so a malformed or oversized one costs nothing.
//! * The token table in memory mirrors the store: every change is committed
//!   first, then applied to the table, under the table's write lock so that
//!   two changes cannot apply out of order.
//! * The token file is written whole (a temporary file with mode 0600,
//!   renamed into place) and is never readable by other users, not even for
//!   an instant.
//! * The token file is replaced only when its token is missing, malformed,
//!   revoked, of another role, or in a file another user could have written;
//!   a private well-formed token the store does not know is adopted (its
//!   hash stored), so two nodes on one data directory (one of them
//!   `--ephemeral`) never overwrite each other's file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use graft::store::{StoreError, TokenRecord, WriteOp};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Caller, Role, Trust};

/// Every token starts with this, so a leaked one is easy to grep for.
pub const TOKEN_PREFIX: &str = "graft_";

/// The admin token file's name inside a data directory.
pub const TOKEN_FILE: &str = "admin.token";

/// Secret bytes of a token or session.
const SECRET_BYTES: usize = 32;

/// Hex digits of a secret (a session cookie is exactly this).
pub(crate) const SECRET_HEX: usize = 2 * SECRET_BYTES;

/// Length of a well-formed token: the prefix and 64 hex digits.
pub(crate) const TOKEN_LEN: usize = TOKEN_PREFIX.len() + 2 * SECRET_BYTES;

/// Most labels are a few words.
pub(crate) const MAX_LABEL_CHARS: usize = 128;

/// Sandboxes one token may name.
pub(crate) const MAX_SCOPE: usize = 1024;

/// Random bytes as lowercase hex.
pub(crate) fn random_hex(bytes: usize) -> Result<String, getrandom::Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)?;
    Ok(hex(&buf))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// A new token secret: `graft_` and 64 hex digits from the OS's randomness.
///
/// ```
/// let t = graft_http::trust::generate_token().unwrap();
/// assert!(t.starts_with("graft_") && t.len() == 70);
/// ```
pub fn generate_token() -> Result<String, getrandom::Error> {
    Ok(format!("{TOKEN_PREFIX}{}", random_hex(SECRET_BYTES)?))
}

/// The SHA-256 of a secret, the only form in which it is kept.
///
/// ```
/// let h = graft_http::trust::hash_secret("graft_00");
/// assert_eq!(h.len(), 32);
/// ```
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether two token hashes are equal, in constant time: every byte is
/// compared whatever the others hold, and the one decision goes through
/// `subtle`. (`subtle`'s slice comparison takes an optimization barrier per
/// byte, which a request paid 32 times per memo entry.)
pub(crate) fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let differ = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    bool::from(differ.ct_eq(&0))
}

/// Whether `s` has the shape of a token (checked before any hashing).
pub(crate) fn well_formed_token(s: &str) -> bool {
    s.len() == TOKEN_LEN
        && s.starts_with(TOKEN_PREFIX)
        && s.as_bytes()[TOKEN_PREFIX.len()..]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// What `Trust::create_token` made: the secret (shown once) and its record.
#[derive(Clone, Debug)]
pub struct NewToken {
    /// The secret: give it to its user; it is not stored.
    pub secret: String,
    /// The stored record (hash, role, scope).
    pub record: TokenRecord,
}

/// Why a token could not be made or changed.
#[derive(Debug)]
#[non_exhaustive]
pub enum TokenError {
    /// A bad request: label, scope.
    Invalid(String),
    /// No token with this id.
    NotFound(String),
    /// The OS gave no randomness.
    Random(getrandom::Error),
    /// The store refused the write.
    Store(StoreError),
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::Invalid(m) => f.write_str(m),
            TokenError::NotFound(id) => write!(f, "no token with id `{id}`"),
            TokenError::Random(e) => write!(f, "the OS gave no randomness: {e}"),
            TokenError::Store(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for TokenError {}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

pub(crate) fn check_label(label: &str) -> Result<(), String> {
    if label.chars().count() > MAX_LABEL_CHARS {
        return Err(format!(
            "label: at most {MAX_LABEL_CHARS} characters, not {}",
            label.chars().count()
        ));
    }
    if label.chars().any(char::is_control) {
        return Err("label: control characters are not allowed".into());
    }
    Ok(())
}

impl Trust {
    /// Makes a token with `role`, limited to `sandboxes` if given, durable
    /// before it is returned. Its secret is in the answer only.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use graft_http::trust::{Role, Trust};
    /// let store = std::sync::Arc::new(graft::store::Store::in_memory()?);
    /// let trust = Trust::new(store, Default::default())?;
    /// let t = trust.create_token(Role::Viewer, Some(vec!["demo".into()]), None)?;
    /// assert!(t.secret.starts_with("graft_"));
    /// # Ok(()) }
    /// ```
    pub fn create_token(
        &self,
        role: Role,
        sandboxes: Option<Vec<String>>,
        label: Option<String>,
    ) -> Result<NewToken, TokenError> {
        self.create_token_attached(role, sandboxes, label, None)
    }

    /// [`Trust::create_token`] that commits the operations of `attached`
    /// (its audit row) in the token's transaction: both or neither.
    pub fn create_token_attached(
        &self,
        role: Role,
        sandboxes: Option<Vec<String>>,
        label: Option<String>,
        attached: Option<&graft::store::Attached>,
    ) -> Result<NewToken, TokenError> {
        if let Some(label) = &label {
            check_label(label).map_err(TokenError::Invalid)?;
        }
        if let Some(list) = &sandboxes {
            if list.len() > MAX_SCOPE {
                return Err(TokenError::Invalid(format!(
                    "sandboxes: at most {MAX_SCOPE}, not {}",
                    list.len()
                )));
            }
            for id in list {
                graft::config::validate_sandbox_id(id)
                    .map_err(|e| TokenError::Invalid(format!("sandboxes: {e}")))?;
            }
        }
        let secret = generate_token().map_err(TokenError::Random)?;
        let id = format!("tok_{}", random_hex(6).map_err(TokenError::Random)?);
        let record = TokenRecord {
            id,
            hash: hash_secret(&secret),
            role: role.as_str().to_owned(),
            sandboxes,
            label,
            created_ms: now_ms(),
            revoked_ms: None,
        };
        let mut table = self.tokens.write();
        self.store
            .write_attached(vec![WriteOp::PutToken(record.clone())], attached)
            .map_err(TokenError::Store)?;
        table.insert(record.hash, Arc::new(record.clone()));
        self.tokens_changed();
        Ok(NewToken { secret, record })
    }

    /// Every token, revoked ones included, oldest first.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut list: Vec<TokenRecord> =
            self.tokens.read().values().map(|t| (**t).clone()).collect();
        list.sort_by(|a, b| a.created_ms.total_cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        Ok(list)
    }

    /// Revokes token `id`: durable, then refused from the next request on.
    pub fn revoke_token(&self, id: &str) -> Result<TokenRecord, TokenError> {
        self.revoke_token_attached(id, None)
    }

    /// [`Trust::revoke_token`] that commits the operations of `attached`
    /// (its audit row) in the revocation's transaction: both or neither.
    pub fn revoke_token_attached(
        &self,
        id: &str,
        attached: Option<&graft::store::Attached>,
    ) -> Result<TokenRecord, TokenError> {
        let mut table = self.tokens.write();
        let Some(hash) = table.values().find(|t| t.id == id).map(|t| t.hash) else {
            return Err(TokenError::NotFound(id.to_owned()));
        };
        let at = now_ms();
        self.store
            .write_attached(
                vec![WriteOp::RevokeToken {
                    id: id.to_owned(),
                    at_ms: at,
                }],
                attached,
            )
            .map_err(TokenError::Store)?;
        let mut record = table
            .get(&hash)
            .map(|t| (**t).clone())
            .ok_or_else(|| TokenError::NotFound(id.to_owned()))?;
        record.revoked_ms.get_or_insert(at);
        table.insert(hash, Arc::new(record.clone()));
        self.tokens_changed();
        Ok(record)
    }

    /// The live (not revoked) token whose secret hashes to `hash`.
    pub(crate) fn token_for_hash(&self, hash: &[u8; 32]) -> Option<Arc<TokenRecord>> {
        let table = self.tokens.read();
        let found = table.get(hash)?;
        // The lookup above is keyed by a SHA-256 an attacker cannot steer
        // towards a stored one; the comparison that decides is constant-time.
        if !same_hash(&found.hash, hash) || found.revoked_ms.is_some() {
            return None;
        }
        Some(found.clone())
    }

    /// The caller a well-formed token secret stands for, if it is live.
    pub(crate) fn caller_for_token(&self, secret: &str) -> Option<Caller> {
        if !well_formed_token(secret) {
            return None;
        }
        let hash = hash_secret(secret);
        let (trust, version) = (self.memo_key.0, self.memo_key.1.load(Ordering::Acquire));
        if let Some(caller) = Memo::get(trust, version, &hash) {
            return Some(caller);
        }
        let caller = self
            .token_for_hash(&hash)
            .and_then(|t| caller_of(&t, None))?;
        Memo::put(trust, version, hash, caller.clone());
        Some(caller)
    }

    /// Marks the token table changed (call with its write lock held, after
    /// the change): every memo of a verified token is stale from now on.
    fn tokens_changed(&self) {
        self.memo_key.1.fetch_add(1, Ordering::Release);
    }
}

/// A fresh identity for a [`Trust`] (the key of its memo entries).
pub(crate) fn next_trust_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The tokens this thread verified lately, so that a token used again
/// costs its SHA-256 and a constant-time comparison, not the shared token
/// table's lock and record (whose reference counts every server thread
/// would otherwise write on every request).
///
/// Invariant: an entry answers only for the trust state and the version of
/// its token table it was made from; any change to the table (a token
/// created or revoked) bumps the version, so a revoked token is refused
/// from the next request on, as without the memo. At most [`Memo::CAP`]
/// entries per thread; the oldest goes first. An entry holds the token's
/// hash and its caller (id, role, scope), never the secret.
struct Memo;

struct MemoEntry {
    trust: u64,
    version: u64,
    hash: [u8; 32],
    caller: Caller,
}

thread_local! {
    static MEMO: std::cell::RefCell<std::collections::VecDeque<MemoEntry>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}

impl Memo {
    const CAP: usize = 8;

    fn get(trust: u64, version: u64, hash: &[u8; 32]) -> Option<Caller> {
        MEMO.with(|m| {
            m.borrow()
                .iter()
                .find(|e| e.trust == trust && e.version == version && same_hash(&e.hash, hash))
                .map(|e| e.caller.clone())
        })
    }

    fn put(trust: u64, version: u64, hash: [u8; 32], caller: Caller) {
        MEMO.with(|m| {
            let mut m = m.borrow_mut();
            m.retain(|e| e.trust != trust || (e.version == version && e.hash != hash));
            if m.len() >= Self::CAP {
                m.pop_front();
            }
            m.push_back(MemoEntry {
                trust,
                version,
                hash,
                caller,
            });
        })
    }
}

/// The caller of a token record (`None` for a role this build does not know:
/// refused rather than guessed).
pub(crate) fn caller_of(t: &TokenRecord, session_expires_ms: Option<f64>) -> Option<Caller> {
    Some(Caller {
        token_id: Arc::from(t.id.as_str()),
        role: Role::parse(&t.role)?,
        sandboxes: t.sandboxes.as_ref().map(|s| Arc::from(s.as_slice())),
        session_expires_ms,
    })
}

/// The admin token file of a data directory, after [`ensure_admin_token_file`].
#[derive(Clone, Debug)]
pub struct TokenFile {
    /// Where it is.
    pub path: PathBuf,
    /// The token's public id.
    pub token_id: String,
    /// Whether this start wrote it (first start, or the old token was
    /// revoked, of another role, malformed or not private); false when the
    /// file was kept or adopted, untouched.
    pub created: bool,
}

/// Makes sure `data_dir/admin.token` holds a live admin token (SPEC §9's
/// first start), and that `store` knows it. The file's token decides:
///
/// * **known, live and admin**: kept as it is;
/// * **unknown** to the store, well-formed, in a file only its owner can
///   read or write (no group or other permission bits, not a symlink) in a
///   directory only its owner can write: **adopted**: its SHA-256 (never the
///   secret) is stored as an admin token labelled `admin token file
///   (adopted)` and the file is left untouched (`created` is false). An
///   ephemeral node, whose store is new at each start, and a persistent node
///   sharing its data directory thus accept the same file, and neither
///   overwrites the other's; so does a node whose database was replaced;
/// * **known but revoked, or known with another role**: never adopted, so
///   revoking the file's token and restarting still rotates it;
/// * otherwise (missing, malformed, not private): a new admin token is
///   minted and the file written with mode 0600 (a temporary file renamed
///   into place): `created` is true.
///
/// Adopting trusts whoever can write the file: the node's own user, who can
/// replace the database just as well. The permission checks refuse a file
/// another user could have planted (a shared `--data` directory).
///
/// `data_dir` is created (0700) if missing and gets a `.gitignore` of `*` so
/// a project's token is never committed.
///
/// Call it before [`Trust::new`] so the table sees the token.
///
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// let dir = std::path::Path::new("/var/lib/graft");
/// let store = std::sync::Arc::new(graft::store::Store::open(dir.join("graft.db"))?);
/// let file = graft_http::trust::ensure_admin_token_file(dir, &store)?;
/// println!("admin token in {}", file.path.display());
/// # Ok(()) }
/// ```
pub fn ensure_admin_token_file(
    data_dir: &Path,
    store: &graft::store::Store,
) -> std::io::Result<TokenFile> {
    let io = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::other(format!("{what} {}: {e}", data_dir.display()))
    };
    create_private_dir(data_dir)?;
    let path = data_dir.join(TOKEN_FILE);
    if let Some(secret) = read_token_file(&path) {
        let hash = hash_secret(&secret);
        let known = store
            .token_by_hash(&hash)
            .map_err(|e| io("reading the tokens of", &e))?;
        let kept = match known {
            Some(t) if t.revoked_ms.is_none() && t.role == Role::Admin.as_str() => Some(t.id),
            // Revoked, or another role: the file is replaced below.
            Some(_) => None,
            None if private_file(data_dir, &path) => {
                let record = admin_record(hash, "admin token file (adopted)")
                    .map_err(|e| io("making a token id for", &e))?;
                let id = record.id.clone();
                store
                    .write(vec![WriteOp::PutToken(record)])
                    .map_err(|e| io("storing the admin token of", &e))?;
                Some(id)
            }
            None => None,
        };
        if let Some(token_id) = kept {
            return Ok(TokenFile {
                path,
                token_id,
                created: false,
            });
        }
    }
    let secret = generate_token().map_err(|e| io("making a token for", &e))?;
    let record = admin_record(hash_secret(&secret), "admin token file")
        .map_err(|e| io("making a token for", &e))?;
    let id = record.id.clone();
    store
        .write(vec![WriteOp::PutToken(record)])
        .map_err(|e| io("storing the admin token of", &e))?;
    write_private(&path, &format!("{secret}\n"))?;
    Ok(TokenFile {
        path,
        token_id: id,
        created: true,
    })
}

/// The well-formed token in the file at `path`, if there is one.
fn read_token_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let secret = text.trim();
    well_formed_token(secret).then(|| secret.to_owned())
}

/// An unscoped admin token record for the secret hashing to `hash`, with a
/// new id.
fn admin_record(hash: [u8; 32], label: &str) -> Result<TokenRecord, getrandom::Error> {
    Ok(TokenRecord {
        id: format!("tok_{}", random_hex(6)?),
        hash,
        role: Role::Admin.as_str().to_owned(),
        sandboxes: None,
        label: Some(label.to_owned()),
        created_ms: now_ms(),
        revoked_ms: None,
    })
}

/// Whether `file` is as private as [`write_private`] makes it — a regular
/// file (not a symlink) with no group or other permission bits, in a
/// directory that neither group nor others may write — so that no other
/// user can have written the token in it. (A file with no group or other
/// bits that this process could read is its user's own, or it runs as root;
/// the directory check covers root.)
#[cfg(unix)]
fn private_file(dir: &Path, file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let (Ok(d), Ok(f)) = (std::fs::metadata(dir), std::fs::symlink_metadata(file)) else {
        return false;
    };
    f.file_type().is_file()
        && f.permissions().mode() & 0o077 == 0
        && d.permissions().mode() & 0o022 == 0
}

/// Without Unix permission bits there is nothing more to check than the
/// directory's own access rules.
#[cfg(not(unix))]
fn private_file(_dir: &Path, file: &Path) -> bool {
    std::fs::symlink_metadata(file).is_ok_and(|f| f.file_type().is_file())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if !dir.is_dir() {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir)?;
    }
    let ignore = dir.join(".gitignore");
    if !ignore.exists() {
        std::fs::write(
            &ignore,
            "# Graft's data: tokens and the database. Never commit.\n*\n",
        )?;
    }
    Ok(())
}

/// Writes `text` to `path` through a 0600 temporary file renamed into place.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("token.partial");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests;
