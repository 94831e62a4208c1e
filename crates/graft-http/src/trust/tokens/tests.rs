//! Tests of tokens and the admin token file: shapes, and which file a
//! start keeps, adopts or replaces.

use super::*;

#[test]
fn token_shape_is_checked_before_hashing() {
    let t = generate_token().unwrap();
    assert!(well_formed_token(&t));
    assert_ne!(t, generate_token().unwrap());
    assert!(!well_formed_token(&t[..t.len() - 1]));
    assert!(!well_formed_token(&t.to_uppercase()));
    assert!(!well_formed_token(&t.replace("graft_", "graff_")));
    assert!(!well_formed_token(&format!("{t}0")));
    assert!(!well_formed_token(""));
    // Multi-byte text of the right byte length is not hex.
    let odd = format!("graft_{}", "é".repeat(32));
    assert_eq!(odd.len(), TOKEN_LEN);
    assert!(!well_formed_token(&odd));
}

#[test]
fn the_token_file_is_private_and_survives_restarts() {
    let dir = std::env::temp_dir().join(format!("graft-token-file-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = graft::store::Store::in_memory().unwrap();
    let first = ensure_admin_token_file(&dir, &store).unwrap();
    assert!(first.created);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&first.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let secret = std::fs::read_to_string(&first.path).unwrap();
    assert!(well_formed_token(secret.trim()));
    let again = ensure_admin_token_file(&dir, &store).unwrap();
    assert!(!again.created);
    assert_eq!(again.token_id, first.token_id);
    // Only the hash is stored.
    let stored = store.tokens().unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].hash, hash_secret(secret.trim()));
    // A revoked file token is replaced at the next start.
    store
        .write(vec![WriteOp::RevokeToken {
            id: first.token_id.clone(),
            at_ms: 1.0,
        }])
        .unwrap();
    let third = ensure_admin_token_file(&dir, &store).unwrap();
    assert!(third.created);
    assert_ne!(third.token_id, first.token_id);
    assert_eq!(
        std::fs::read_to_string(dir.join(".gitignore"))
            .unwrap()
            .lines()
            .last(),
        Some("*")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh data directory (mode 0700, as a node makes it) for one test.
fn data_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("graft-token-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    create_private_dir(&dir).unwrap();
    dir
}

/// Writes `secret` as the token file, as a node does (0600).
fn plant(dir: &Path, secret: &str) -> Vec<u8> {
    write_private(&dir.join(TOKEN_FILE), &format!("{secret}\n")).unwrap();
    std::fs::read(dir.join(TOKEN_FILE)).unwrap()
}

fn trust_of(store: &Arc<graft::store::Store>) -> Trust {
    Trust::new(store.clone(), Default::default()).unwrap()
}

#[test]
fn an_unknown_token_file_is_adopted_untouched() {
    // Another node on this directory (or an earlier, ephemeral, database)
    // wrote the file; this store has never seen its token.
    let dir = data_dir("adopt");
    let secret = generate_token().unwrap();
    let bytes = plant(&dir, &secret);
    let store = Arc::new(graft::store::Store::in_memory().unwrap());
    let file = ensure_admin_token_file(&dir, &store).unwrap();
    assert!(!file.created);
    assert_eq!(
        std::fs::read(&file.path).unwrap(),
        bytes,
        "the file was rewritten"
    );
    // The token now authenticates as an unscoped admin, and only its hash
    // is stored.
    let caller = trust_of(&store).caller_for_token(&secret).unwrap();
    assert_eq!(caller.role, Role::Admin);
    assert!(caller.sandboxes.is_none());
    assert_eq!(*caller.token_id, *file.token_id);
    let stored = store.tokens().unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].hash, hash_secret(&secret));
    assert_eq!(
        stored[0].label.as_deref(),
        Some("admin token file (adopted)")
    );
    // The next start knows it: kept, not adopted twice.
    let again = ensure_admin_token_file(&dir, &store).unwrap();
    assert!(!again.created);
    assert_eq!(again.token_id, file.token_id);
    assert_eq!(store.tokens().unwrap().len(), 1);
    // A second store (an ephemeral node beside a persistent one) adopts
    // the same file: both accept it.
    let other = Arc::new(graft::store::Store::in_memory().unwrap());
    assert!(!ensure_admin_token_file(&dir, &other).unwrap().created);
    assert_eq!(std::fs::read(&file.path).unwrap(), bytes);
    assert!(trust_of(&other).caller_for_token(&secret).is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Asserts that the file at `dir` now holds a new admin token that the
/// store knows, and not `old`.
#[track_caller]
fn replaced(dir: &Path, store: &Arc<graft::store::Store>, old: &[u8]) {
    let file = ensure_admin_token_file(dir, store).unwrap();
    assert!(file.created);
    let bytes = std::fs::read(&file.path).unwrap();
    assert_ne!(bytes, old, "the file was kept");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let secret = String::from_utf8(bytes).unwrap();
    let caller = trust_of(store).caller_for_token(secret.trim()).unwrap();
    assert_eq!(caller.role, Role::Admin);
    assert_eq!(*caller.token_id, *file.token_id);
}

#[test]
fn a_revoked_token_file_is_replaced_not_adopted() {
    let dir = data_dir("revoked");
    let store = Arc::new(graft::store::Store::in_memory().unwrap());
    let trust = trust_of(&store);
    let old = trust.create_token(Role::Admin, None, None).unwrap();
    trust.revoke_token(&old.record.id).unwrap();
    let bytes = plant(&dir, &old.secret);
    replaced(&dir, &store, &bytes);
    assert!(trust_of(&store).caller_for_token(&old.secret).is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_token_file_of_another_role_is_replaced_not_adopted() {
    let dir = data_dir("viewer");
    let store = Arc::new(graft::store::Store::in_memory().unwrap());
    let viewer = trust_of(&store)
        .create_token(Role::Viewer, None, None)
        .unwrap();
    let bytes = plant(&dir, &viewer.secret);
    replaced(&dir, &store, &bytes);
    // Still the viewer it was: not promoted.
    let caller = trust_of(&store).caller_for_token(&viewer.secret).unwrap();
    assert_eq!(caller.role, Role::Viewer);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_malformed_token_file_is_replaced() {
    let dir = data_dir("malformed");
    let store = Arc::new(graft::store::Store::in_memory().unwrap());
    let token = generate_token().unwrap();
    for bad in [
        token.to_uppercase(),
        token[..token.len() - 1].to_owned(),
        "not a token".into(),
        String::new(),
    ] {
        let bytes = plant(&dir, &bad);
        replaced(&dir, &store, &bytes);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(unix)]
#[test]
fn a_token_file_another_user_could_have_written_is_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let set_mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let dir = data_dir("not-private");
    let store = Arc::new(graft::store::Store::in_memory().unwrap());
    // A file others may read or write.
    let secret = generate_token().unwrap();
    let bytes = plant(&dir, &secret);
    set_mode(&dir.join(TOKEN_FILE), 0o644);
    replaced(&dir, &store, &bytes);
    assert!(trust_of(&store).caller_for_token(&secret).is_none());
    // A private file in a directory others may write.
    let secret = generate_token().unwrap();
    let bytes = plant(&dir, &secret);
    set_mode(&dir, 0o770);
    replaced(&dir, &store, &bytes);
    set_mode(&dir, 0o700);
    // A symlink to a private file.
    let target = dir.join("elsewhere");
    let secret = generate_token().unwrap();
    write_private(&target, &format!("{secret}\n")).unwrap();
    std::fs::remove_file(dir.join(TOKEN_FILE)).unwrap();
    std::os::unix::fs::symlink(&target, dir.join(TOKEN_FILE)).unwrap();
    let link = std::fs::read(dir.join(TOKEN_FILE)).unwrap();
    replaced(&dir, &store, &link);
    assert!(trust_of(&store).caller_for_token(&secret).is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_remembered_token_is_refused_as_soon_as_it_is_revoked() {
    let store = Arc::new(graft::store::Store::in_memory().unwrap());
    let trust = Trust::new(store, Default::default()).unwrap();
    let kept = trust.create_token(Role::Viewer, None, None).unwrap();
    let doomed = trust.create_token(Role::Operator, None, None).unwrap();
    // Verified twice: the second answer comes from this thread's memo.
    for _ in 0..2 {
        let c = trust.caller_for_token(&doomed.secret).expect("live");
        assert_eq!(
            (&*c.token_id, c.role),
            (doomed.record.id.as_str(), Role::Operator)
        );
        assert!(trust.caller_for_token(&kept.secret).is_some());
    }
    trust.revoke_token(&doomed.record.id).unwrap();
    assert!(trust.caller_for_token(&doomed.secret).is_none(), "revoked");
    assert!(
        trust.caller_for_token(&kept.secret).is_some(),
        "others still pass"
    );
    // Another trust state on the same thread never answers from this one's
    // memo, even for a secret this thread verified.
    let other = Trust::new(
        Arc::new(graft::store::Store::in_memory().unwrap()),
        Default::default(),
    )
    .unwrap();
    assert!(other.caller_for_token(&kept.secret).is_none());
}

#[test]
fn the_memo_of_verified_tokens_stays_small() {
    let store = Arc::new(graft::store::Store::in_memory().unwrap());
    let trust = Trust::new(store, Default::default()).unwrap();
    let tokens: Vec<_> = (0..3 * Memo::CAP)
        .map(|_| trust.create_token(Role::Viewer, None, None).unwrap())
        .collect();
    for t in &tokens {
        assert!(trust.caller_for_token(&t.secret).is_some());
    }
    assert!(MEMO.with(|m| m.borrow().len()) <= Memo::CAP);
    // The oldest were dropped from the memo, not from the table.
    assert!(trust.caller_for_token(&tokens[0].secret).is_some());
}

#[test]
fn hashes_are_equal_only_when_every_byte_is() {
    let a = hash_secret("graft_a");
    assert!(same_hash(&a, &a));
    for i in [0, 7, 8, 31] {
        let mut b = a;
        b[i] ^= 0x80;
        assert!(!same_hash(&a, &b), "byte {i} differs");
    }
    assert!(!same_hash(&a, &hash_secret("graft_b")));
}
