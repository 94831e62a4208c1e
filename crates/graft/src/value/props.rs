//! Property tests: any Luau-shaped graph (cycles, sharing, holes, odd keys,
//! NaN, deep chains, pids, functions) converts exactly as a plain recursive
//! model says, or fails with a typed error; never panics; and the work stays
//! within the byte cap.

use std::collections::HashSet;

use mlua::{Lua, Table, Value};
use serde_json::{Map, Number, Value as Json};

use super::tests::names;
use super::to_json::{Writer, MAX_SAFE_INT, ROOT};
use super::*;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum K {
    Int(i64),
    Str(&'static str),
    Float(f64),
    Bool(bool),
    VmPid(u64),
}

#[derive(Clone, Debug)]
enum V {
    Table(usize),
    Num(f64),
    Str(String),
    Bool(bool),
    VmPid(u64),
    Func,
}

/// Tables by index (entries may point at any table: sharing and
/// cycles), a chain of nested tables hung under table 0, and whether
/// only forward references are kept (a DAG).
#[derive(Clone, Debug)]
struct Graph {
    tables: Vec<Vec<(K, V)>>,
    chain: usize,
    acyclic: bool,
}

fn key() -> impl Strategy<Value = K> {
    prop_oneof![
        4 => (1i64..5).prop_map(K::Int),
        3 => prop::sample::select(vec!["a", "b", "1", "2", "q\"\\\n", "é", "", "true"])
            .prop_map(K::Str),
        1 => prop::sample::select(vec![0.5, -0.0, 1e300, f64::INFINITY, -3.0])
            .prop_map(K::Float),
        1 => any::<bool>().prop_map(K::Bool),
        1 => (1u64..4).prop_map(K::VmPid),
    ]
}

fn value(tables: usize) -> impl Strategy<Value = V> {
    let chars = prop::sample::select(vec!['a', '"', '\\', '\n', '\u{1}', 'é']);
    prop_oneof![
        5 => (0..tables).prop_map(V::Table),
        2 => prop::sample::select(vec![0.0, 1.0, -2.5, 1e-7, 2f64.powi(60), f64::NAN, f64::INFINITY])
            .prop_map(V::Num),
        2 => prop::collection::vec(chars, 0..6).prop_map(|c| V::Str(c.into_iter().collect())),
        1 => any::<bool>().prop_map(V::Bool),
        1 => (1u64..4).prop_map(V::VmPid),
        1 => Just(V::Func),
    ]
}

fn graph() -> impl Strategy<Value = Graph> {
    (1usize..7).prop_flat_map(|n| {
        let entries = prop::collection::vec((key(), value(n)), 0..5);
        (
            prop::collection::vec(entries, n),
            prop_oneof![4 => Just(0usize), 1 => 55usize..70],
            prop_oneof![1 => Just(false), 2 => Just(true)],
        )
            .prop_map(|(tables, chain, acyclic)| Graph {
                tables,
                chain,
                acyclic,
            })
    })
}

fn build(lua: &Lua, g: &Graph) -> Value {
    let tables: Vec<Table> = g
        .tables
        .iter()
        .map(|_| lua.create_table().unwrap())
        .collect();
    for (i, entries) in g.tables.iter().enumerate() {
        for (k, v) in entries {
            let key = match k {
                K::Int(n) => Value::Number(*n as f64),
                K::Str(s) => Value::String(lua.create_string(s).unwrap()),
                K::Float(f) => Value::Number(*f),
                K::Bool(b) => Value::Boolean(*b),
                K::VmPid(n) => VmPid::new(1, *n).to_lua(),
            };
            let val = match v {
                V::Table(j) if g.acyclic && *j <= i => Value::Boolean(true),
                V::Table(j) => Value::Table(tables[*j].clone()),
                V::Num(n) => Value::Number(*n),
                V::Str(s) => Value::String(lua.create_string(s).unwrap()),
                V::Bool(b) => Value::Boolean(*b),
                V::VmPid(n) => VmPid::new(1, *n).to_lua(),
                V::Func => Value::Function(lua.create_function(|_, ()| Ok(())).unwrap()),
            };
            tables[i].raw_set(key, val).unwrap();
        }
    }
    if g.chain > 0 {
        let mut inner = lua.create_table().unwrap();
        for _ in 1..g.chain {
            let outer = lua.create_table().unwrap();
            outer.raw_set(1, inner).unwrap();
            inner = outer;
        }
        tables[0].raw_set("deep", inner).unwrap();
    }
    Value::Table(tables[0].clone())
}

#[derive(Debug, PartialEq)]
enum Kind {
    NotPlain,
    Cyclic,
}

fn model_number(n: f64) -> Result<Json, Kind> {
    if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INT {
        Ok(Json::from(n as i64))
    } else {
        Number::from_f64(n).map(Json::Number).ok_or(Kind::NotPlain)
    }
}

fn model_key(k: &Value) -> Result<(Option<i64>, String), Kind> {
    Ok(match k {
        Value::String(s) => (None, s.to_string_lossy()),
        Value::Number(n) if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INT => {
            (Some(*n as i64), (*n as i64).to_string())
        }
        Value::Integer(i) => (Some(*i), i.to_string()),
        Value::Number(n) => (
            None,
            Number::from_f64(*n).ok_or(Kind::NotPlain)?.to_string(),
        ),
        Value::Boolean(b) => (None, b.to_string()),
        Value::LightUserData(_) => (None, names(VmPid::from_lua(k).ok_or(Kind::NotPlain)?)),
        _ => return Err(Kind::NotPlain),
    })
}

/// The mapping of docs/guest-api.md as a plain recursion: no cap, no
/// byte counting, exponential on DAGs (the graphs here are small).
fn model(v: &Value, path: &mut Vec<*const std::ffi::c_void>) -> Result<Json, Kind> {
    let t = match v {
        Value::Nil => return Ok(Json::Null),
        Value::Boolean(b) => return Ok(Json::Bool(*b)),
        Value::Integer(i) => return Ok(Json::from(*i)),
        Value::Number(n) => return model_number(*n),
        Value::String(s) => return Ok(Json::String(s.to_string_lossy())),
        Value::LightUserData(_) => {
            return VmPid::from_lua(v)
                .map(|p| Json::String(names(p)))
                .ok_or(Kind::NotPlain)
        }
        Value::Table(t) => t,
        _ => return Err(Kind::NotPlain),
    };
    if path.contains(&t.to_pointer()) {
        return Err(Kind::Cyclic);
    }
    if path.len() >= MAX_DEPTH {
        return Err(Kind::NotPlain);
    }
    path.push(t.to_pointer());
    let mut entries = Vec::new();
    for pair in t.pairs::<Value, Value>() {
        let (k, v) = pair.unwrap();
        let key = model_key(&k)?;
        entries.push((key, model(&v, path)?));
    }
    path.pop();
    let n = entries.len() as i64;
    if n > 0
        && entries
            .iter()
            .all(|((i, _), _)| matches!(i, Some(i) if (1..=n).contains(i)))
    {
        entries.sort_by_key(|((i, _), _)| *i);
        return Ok(Json::Array(entries.into_iter().map(|(_, v)| v).collect()));
    }
    let mut map = Map::new();
    for ((_, key), v) in entries {
        if map.insert(key, v).is_some() {
            return Err(Kind::NotPlain);
        }
    }
    Ok(Json::Object(map))
}

fn kind_of(e: &ValueError) -> Option<Kind> {
    match e {
        ValueError::NotPlainData(_) => Some(Kind::NotPlain),
        ValueError::Cyclic(_) => Some(Kind::Cyclic),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn any_graph_converts_as_the_model_or_fails_typed(g in graph(), cap in 8usize..3000) {
        let lua = Lua::new();
        let v = build(&lua, &g);
        let expected = model(&v, &mut Vec::new());

        // Room for every graph here: exactly the model's answer.
        let mut w = Writer::new("v", 1 << 24, &names);
        let got = w.value(&v, ROOT);
        match (&expected, &got) {
            (Ok(json), Ok(out)) => {
                prop_assert_eq!(json, out);
                prop_assert_eq!(w.used, serde_json::to_vec(json).unwrap().len());
            }
            (Err(kind), Err(e)) => {
                let k = kind_of(e);
                prop_assert_eq!(Some(kind), k.as_ref());
            }
            _ => prop_assert!(false, "model {:?}, codec {:?}", expected, got),
        }

        // A small cap: the same answer while it fits, else value_too_large,
        // and never more steps than bytes allowed.
        let mut w = Writer::new("v", cap, &names);
        let small = w.value(&v, ROOT);
        prop_assert!(w.steps <= cap + 1, "{} steps, cap {}", w.steps, cap);
        match (&got, &small) {
            (_, Err(ValueError::TooLarge { limit, .. })) => prop_assert_eq!(*limit, cap),
            (Ok(json), Ok(out)) => {
                prop_assert_eq!(json, out);
                prop_assert!(w.used <= cap);
            }
            (Err(a), Err(b)) => prop_assert_eq!(kind_of(a), kind_of(b)),
            _ => prop_assert!(false, "full {:?}, capped {:?}", got, small),
        }
        if let Ok(json) = &got {
            let len = serde_json::to_vec(json).unwrap().len();
            let fits = lua_to_json(&v, "v", len, &names);
            prop_assert!(fits.is_ok(), "cap = its length: {:?}", fits);
            let over = lua_to_json(&v, "v", len - 1, &names);
            prop_assert!(matches!(over, Err(ValueError::TooLarge { .. })), "{:?}", over);
        }
    }

    #[test]
    fn memory_estimate_reads_each_table_once_within_its_budget(g in graph(), budget in 1usize..40) {
        let lua = Lua::new();
        let v = build(&lua, &g);
        // every entry of every distinct reachable table, once
        let mut seen = HashSet::new();
        let mut todo = vec![v.clone()];
        let mut entries = 0;
        while let Some(Value::Table(t)) = todo.pop() {
            if !seen.insert(t.to_pointer()) {
                continue;
            }
            for pair in t.pairs::<Value, Value>() {
                let (k, x) = pair.unwrap();
                entries += 1;
                todo.extend([k, x].into_iter().filter(|x| x.is_table()));
            }
        }
        prop_assert_eq!(estimate_size(&v, usize::MAX).1, entries);
        let (partial, read) = estimate_size(&v, budget);
        prop_assert_eq!(read, entries.min(budget));
        prop_assert!(partial <= estimate_size(&v, usize::MAX).0);
    }
}
