//! Generated states: deterministic perturbations of the real ones, and the
//! smaller candidates shrinking tries.
//!
//! Invariants:
//! * The same seed gives the same states on every machine (SplitMix64).
//! * A perturbation never nests deeper than its state plus one level;
//!   candidates are bounded in number ([`MAX_CANDIDATES`]) and bytes
//!   ([`CANDIDATE_BYTES`]).

use serde_json::{json, Value};

/// A small deterministic generator (SplitMix64): the same seed gives the
/// same states on every machine.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(super) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

pub(super) fn random_scalar(rng: &mut Rng) -> Value {
    match rng.below(3) {
        0 => json!(rng.below(2001) as i64 - 1000),
        1 => Value::String(format!("s{}", rng.below(1000))),
        _ => Value::Bool(rng.below(2) == 0),
    }
}

/// Every node of `v`, as paths of keys/indices (pre-order, bounded).
pub(super) fn paths(v: &Value, at: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    if out.len() >= 10_000 {
        return;
    }
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                at.push(PathStep::Key(k.clone()));
                paths(c, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                at.push(PathStep::Index(i));
                paths(c, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
pub(super) enum PathStep {
    Key(String),
    Index(usize),
}

pub(super) fn at_mut<'a>(v: &'a mut Value, path: &[PathStep]) -> Option<&'a mut Value> {
    let mut cur = v;
    for step in path {
        cur = match (step, cur) {
            (PathStep::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (PathStep::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// One random change somewhere in `v`.
pub(super) fn perturb(v: &mut Value, rng: &mut Rng) {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let path = all.swap_remove(rng.below(all.len()));
    let Some(node) = at_mut(v, &path) else {
        return;
    };
    match node {
        Value::Number(n) => {
            let delta = rng.below(201) as i64 - 100;
            *node = match n.as_i64() {
                Some(i) if rng.below(4) == 0 => json!(-i),
                Some(i) => json!(i.saturating_add(if delta == 0 { 1 } else { delta })),
                None => json!(n.as_f64().unwrap_or(0.0) + delta as f64 / 7.0),
            };
        }
        Value::String(s) => {
            *node = match rng.below(3) {
                0 => Value::String(String::new()),
                1 => Value::String(format!("{s}{}", rng.below(100))),
                _ => Value::String(s.chars().rev().collect()),
            };
        }
        Value::Bool(b) => *node = Value::Bool(!*b),
        Value::Null => *node = random_scalar(rng),
        Value::Object(m) => {
            if !m.is_empty() && rng.below(2) == 0 {
                let k = m
                    .keys()
                    .nth(rng.below(m.len()))
                    .cloned()
                    .unwrap_or_default();
                m.remove(&k);
            } else {
                m.insert(format!("x_{}", rng.below(1000)), random_scalar(rng));
            }
        }
        Value::Array(a) => match rng.below(3) {
            0 if !a.is_empty() => {
                a.pop();
            }
            1 if !a.is_empty() => {
                let i = rng.below(a.len());
                let copy = a[i].clone();
                a.push(copy);
            }
            _ => {
                let s = a.first().cloned().unwrap_or_else(|| random_scalar(rng));
                a.push(s);
            }
        },
    }
}

/// Candidates one shrink round considers at most.
pub(super) const MAX_CANDIDATES: usize = 200;
/// JSON bytes the candidates of one round may hold together: each is a
/// whole copy of the state, so a large state gets fewer of them.
pub(super) const CANDIDATE_BYTES: usize = 64 << 20;

/// States one step smaller than `v`: a half of a table or array kept, a
/// field or element dropped, a number or string made smaller. At most
/// [`MAX_CANDIDATES`] (fewer for a large state), halves first: without
/// the bound a failing state of 10,000 elements made 10,000 copies of
/// itself (10^8 values) before the first migration ran.
pub(super) fn smaller(v: &Value) -> Vec<Value> {
    let room = (CANDIDATE_BYTES / v.to_string().len().max(1)).clamp(4, MAX_CANDIDATES);
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let mut out = Vec::new();
    for path in all {
        if out.len() >= room {
            break;
        }
        let Some(node) = at(v, &path) else {
            continue;
        };
        for e in edits(node, room - out.len()) {
            let mut c = v.clone();
            if let Some(slot) = at_mut(&mut c, &path) {
                *slot = e;
                out.push(c);
            }
        }
    }
    out
}

pub(super) fn at<'a>(v: &'a Value, path: &[PathStep]) -> Option<&'a Value> {
    let mut cur = v;
    for step in path {
        cur = match (step, cur) {
            (PathStep::Key(k), Value::Object(m)) => m.get(k)?,
            (PathStep::Index(i), Value::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// At most `room` smaller replacements for one node of a state.
pub(super) fn edits(node: &Value, room: usize) -> Vec<Value> {
    let mut edits: Vec<Value> = Vec::new();
    match node {
        Value::Object(m) => {
            if m.len() > 3 {
                let half = m.len() / 2;
                let part = |skip: usize, take: usize| -> Value {
                    Value::Object(
                        m.iter()
                            .skip(skip)
                            .take(take)
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    )
                };
                edits.push(part(0, half));
                edits.push(part(half, m.len()));
            }
            for k in m.keys() {
                if edits.len() >= room {
                    break;
                }
                let mut c = m.clone();
                c.remove(k);
                edits.push(Value::Object(c));
            }
        }
        Value::Array(a) => {
            if a.len() > 3 {
                let half = a.len() / 2;
                edits.push(Value::Array(a[..half].to_vec()));
                edits.push(Value::Array(a[half..].to_vec()));
            }
            for i in (0..a.len()).rev() {
                if edits.len() >= room {
                    break;
                }
                let mut c = a.clone();
                c.remove(i);
                edits.push(Value::Array(c));
            }
        }
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                if i != 0 {
                    edits.push(json!(0));
                    edits.push(json!(i / 2));
                }
            } else if n.as_f64().is_some_and(|f| f != f.trunc()) {
                edits.push(json!(n.as_f64().unwrap_or(0.0).trunc()));
            }
        }
        Value::String(s) if !s.is_empty() => {
            edits.push(Value::String(String::new()));
            let half: String = s.chars().take(s.chars().count() / 2).collect();
            edits.push(Value::String(half));
        }
        _ => {}
    }
    edits.truncate(room);
    edits
}

/// How big a state is, for shrinking: its JSON length, then the sum of its
/// numbers' magnitudes (so `{"n":0}` is smaller than `{"n":5}`).
pub(super) fn size(v: &Value) -> (usize, u64) {
    pub(super) fn magnitude(v: &Value) -> u64 {
        match v {
            Value::Number(n) => n.as_f64().map_or(0, |f| f.abs().min(1e18) as u64),
            Value::Array(a) => a.iter().map(magnitude).fold(0, u64::saturating_add),
            Value::Object(m) => m.values().map(magnitude).fold(0, u64::saturating_add),
            _ => 0,
        }
    }
    (v.to_string().len(), magnitude(v))
}
