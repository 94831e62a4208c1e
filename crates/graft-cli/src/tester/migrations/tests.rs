//! Unit tests of the migration checker's pure parts: token comparison,
//! perturbation and shrinking.

use super::states::*;
use super::*;

#[test]
fn code_change_is_compared_by_tokens_not_text() {
    let a = "local m = {}\nfunction m.code_change(o, s) return s end\nreturn m\n";
    let b = "local m = {}\n-- a comment\nfunction m.code_change(o, s)\n  return s -- same\nend\nfunction m.other() end\nreturn m\n";
    let c = "local m = {}\nfunction m.code_change(o, s) s.n = 1 return s end\nreturn m\n";
    let d = "local m = {}\nm.code_change = function(o, s) return s end\nreturn m\n";
    let e = "return { init = function() return 1 end, code_change = function(o, s) return s end }";
    assert!(code_change_tokens(a).is_some());
    assert_eq!(code_change_tokens(a), code_change_tokens(b));
    assert_ne!(code_change_tokens(a), code_change_tokens(c));
    assert!(code_change_tokens(d).is_some());
    assert!(code_change_tokens(e).is_some());
    assert_eq!(code_change_tokens("return {}"), None);
    // Unparseable: compared as raw text, never a panic.
    assert_eq!(
        code_change_tokens("function ("),
        Some(vec!["function (".to_string()])
    );
}

#[test]
fn perturbations_are_deterministic_and_change_the_state() {
    let base = json!({ "n": 3, "items": ["a", "b"], "name": "x", "on": true });
    let run = |seed| {
        let mut rng = Rng(seed);
        (0..20)
            .map(|_| {
                let mut s = base.clone();
                perturb(&mut s, &mut rng);
                s
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
    assert!(run(7).iter().any(|s| s != &base));
}

#[test]
fn smaller_states_are_smaller() {
    let v = json!({ "n": 10, "items": ["ab", "c"] });
    let all = smaller(&v);
    assert!(!all.is_empty());
    assert!(all.iter().all(|c| size(c) < size(&v)), "{all:?}");
    assert!(all.contains(&json!({ "items": ["ab", "c"] })));
    assert!(all.contains(&json!({ "n": 5, "items": ["ab", "c"] })));
    assert!(all.contains(&json!({ "n": 10, "items": ["c"] })));
    assert!(smaller(&json!({})).is_empty());
}

#[test]
fn shrinking_a_large_state_stays_bounded() {
    // 3,000 elements: unbounded, one round made 6,000+ full copies.
    let big = Value::Array((0..3000).map(|i| json!({ "n": i })).collect());
    let all = smaller(&big);
    assert!(!all.is_empty());
    assert!(all.len() <= MAX_CANDIDATES, "{} candidates", all.len());
    assert!(all.iter().all(|c| size(c) < size(&big)));
    // Halves come first, so a shrink needs log2(n) steps, not n.
    assert!(all.contains(&Value::Array(big.as_array().unwrap()[..1500].to_vec())));
    let wide = Value::Object((0..3000).map(|i| (format!("k{i}"), json!(i))).collect());
    assert!(smaller(&wide).len() <= MAX_CANDIDATES);
}
