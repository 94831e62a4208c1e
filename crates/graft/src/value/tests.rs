//! Unit tests of pids, exit reasons and the JSON mapping.

use mlua::{Lua, Value};
use serde_json::Value as Json;

use super::to_json::{int_len, Writer, ROOT};
use super::*;

pub(super) fn names(p: VmPid) -> String {
    format!("<m.{}>", p.serial())
}

#[test]
fn pid_round_trips_through_lua_value_and_string() {
    let pid = VmPid::new(5, 1234);
    assert_eq!(VmPid::from_lua(&pid.to_lua()), Some(pid));
    assert_eq!(VmPid::parse_serial("<counter.1234>"), Some(1234));
    assert_eq!(VmPid::parse_serial("<chat.room.9>"), Some(9));
    assert_eq!(VmPid::parse_serial("counter.9"), None);
    assert_eq!(VmPid::parse_serial("<counter.0>"), None);
    assert_eq!(VmPid::parse_serial("<counter.x>"), None);
}

const CAP: usize = 1 << 20;

fn eval(lua: &Lua, src: &str) -> Value {
    lua.load(src).eval().unwrap()
}

fn convert(v: &Value) -> Result<Json, ValueError> {
    lua_to_json(v, "reply", CAP, &names)
}

fn not_plain(r: Result<Json, ValueError>) -> String {
    match r {
        Err(ValueError::NotPlainData(m)) => m,
        other => panic!("expected NotPlainData, got {other:?}"),
    }
}

#[test]
fn json_round_trip_keeps_arrays_objects_and_numbers() {
    let lua = Lua::new();
    let v = serde_json::json!({"a": [1, 2.5, "x", true], "b": {"c": null}, "e": {}});
    let lv = json_to_lua(&lua, &v).unwrap();
    let back = convert(&lv).unwrap();
    // null values vanish inside tables (Luau has no null), everything else survives
    assert_eq!(
        back,
        serde_json::json!({"a": [1, 2.5, "x", true], "b": {}, "e": {}})
    );
}

#[test]
fn functions_are_not_plain_data_named_by_path() {
    let lua = Lua::new();
    let f = eval(&lua, "return { list = { 1, function() end } }");
    let msg = not_plain(convert(&f));
    assert!(
        msg.starts_with("reply.list[2]: a function is not plain data"),
        "{msg}"
    );
    let k = eval(&lua, "return { [{}] = 1 }");
    let msg = not_plain(convert(&k));
    assert!(msg.contains("a table key of type table"), "{msg}");
}

#[test]
fn a_table_that_holds_itself_is_cyclic_with_its_path() {
    let lua = Lua::new();
    let state = eval(
        &lua,
        "local s = {} for i = 1, 8 do s['k'..i] = s end return s",
    );
    match lua_to_json(&state, "state", CAP, &names) {
        Err(ValueError::Cyclic(path)) => {
            assert!(
                path.starts_with("state.k") && path.ends_with(" → state"),
                "{path}"
            )
        }
        other => panic!("expected Cyclic, got {other:?}"),
    }
    let deeper = eval(
        &lua,
        "local a = {} local t = { a = { b = { ['odd key'] = a } } } a.up = t.a return t",
    );
    // The cycle is a → t.a.b["odd key"] → a.up = t.a: found where it closes.
    assert_eq!(
        convert(&deeper),
        Err(ValueError::Cyclic(
            r#"reply.a.b["odd key"].up → reply.a"#.into()
        ))
    );
}

#[test]
fn shared_subtables_are_written_once_per_reference() {
    let lua = Lua::new();
    let v = eval(
        &lua,
        "local leaf = { 1, 2 } return { a = leaf, b = { c = leaf } }",
    );
    assert_eq!(
        convert(&v).unwrap(),
        serde_json::json!({"a": [1, 2], "b": {"c": [1, 2]}})
    );
}

#[test]
fn a_dag_30_levels_deep_stops_at_the_cap_after_linear_work() {
    let lua = Lua::new();
    let dag = eval(
        &lua,
        "local t = {} for i = 1, 30 do t = { a = t, b = t } end return t",
    );
    let cap = 64 * 1024;
    let mut w = Writer::new("reply", cap, &names);
    match w.value(&dag, ROOT) {
        Err(ValueError::TooLarge { limit, what }) => {
            assert_eq!(limit, cap);
            assert!(what.starts_with("reply (stopped at reply."), "{what}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(w.steps <= cap + 1, "{} steps for a cap of {cap}", w.steps);
}

#[test]
fn table_pack_with_a_hole_is_an_object_with_string_keys() {
    let lua = Lua::new();
    let v = eval(&lua, "return table.pack(1, nil, 3)");
    assert_eq!(
        convert(&v).unwrap(),
        serde_json::json!({"1": 1, "3": 3, "n": 3})
    );
    let holes = eval(&lua, "return { 1, nil, 3 }");
    assert_eq!(
        convert(&holes).unwrap(),
        serde_json::json!({"1": 1, "3": 3})
    );
}

#[test]
fn odd_keys_are_written_as_strings() {
    let lua = Lua::new();
    let v = eval(
        &lua,
        "return { [true] = 1, [2.5] = 2, [1e300] = 3, [-7] = 4 }",
    );
    assert_eq!(
        convert(&v).unwrap(),
        serde_json::json!({"true": 1, "2.5": 2, "1e+300": 3, "-7": 4})
    );
    let pid = VmPid::new(1, 7);
    let t = lua.create_table().unwrap();
    t.raw_set(pid.to_lua(), "x").unwrap();
    assert_eq!(
        convert(&Value::Table(t)).unwrap(),
        serde_json::json!({"<m.7>": "x"})
    );
    // keys 1..n in any order are an array
    let shuffled = eval(
        &lua,
        "local t = {} t[3] = 'c' t[1] = 'a' t[2] = 'b' return t",
    );
    assert_eq!(
        convert(&shuffled).unwrap(),
        serde_json::json!(["a", "b", "c"])
    );
}

#[test]
fn two_keys_with_one_json_name_are_not_plain_data() {
    let lua = Lua::new();
    let v = eval(&lua, "return { x = { [1] = 'a', ['1'] = 'b', [3] = 'c' } }");
    let msg = not_plain(convert(&v));
    assert!(
        msg.starts_with("reply.x: two keys are both written as \"1\""),
        "{msg}"
    );
}

#[test]
fn nan_and_infinities_are_not_plain_data() {
    let lua = Lua::new();
    let nan = eval(&lua, "return { x = 0/0 }");
    assert!(not_plain(convert(&nan)).starts_with("reply.x: the number NaN has no JSON form"));
    let inf = eval(&lua, "return { math.huge }");
    assert!(not_plain(convert(&inf)).contains("the number inf has no JSON form"));
    let key = eval(&lua, "return { [-math.huge] = 1 }");
    assert!(not_plain(convert(&key)).contains("the key -inf has no JSON form"));
}

#[test]
fn nesting_past_64_levels_is_not_plain_data() {
    let lua = Lua::new();
    let nest = |n: usize| {
        eval(
            &lua,
            &format!("local t = 1 for i = 1, {n} do t = {{ t }} end return t"),
        )
    };
    assert!(convert(&nest(MAX_DEPTH)).is_ok());
    let msg = not_plain(convert(&nest(MAX_DEPTH + 1)));
    assert!(msg.ends_with("nested more than 64 levels deep"), "{msg}");
    let mut deep = serde_json::json!(1);
    for _ in 0..100 {
        deep = serde_json::json!([deep]);
    }
    assert!(json_to_lua(&lua, &deep).is_err());
    assert_eq!(check_json_depth(&deep, 64), Err(65));
}

#[test]
fn counted_bytes_are_the_compact_json_length() {
    let lua = Lua::new();
    let v = eval(
        &lua,
        r#"return { s = "q\"\\\n\1é", n = { 1, -2.5, 1e-7, 2^60 }, b = false, [4] = true }"#,
    );
    let json = convert(&v).unwrap();
    let len = serde_json::to_vec(&json).unwrap().len();
    assert!(lua_to_json(&v, "reply", len, &names).is_ok());
    assert!(matches!(
        lua_to_json(&v, "reply", len - 1, &names),
        Err(ValueError::TooLarge { .. })
    ));
    for i in [0, 7, -1, 10, -10, 99, i64::MAX, i64::MIN] {
        assert_eq!(int_len(i), i.to_string().len(), "{i}");
    }
    // a string past the cap is refused before it is copied
    let big = eval(&lua, "return string.rep('x', 100000)");
    assert!(matches!(
        lua_to_json(&big, "reply", 1000, &names),
        Err(ValueError::TooLarge { limit: 1000, .. })
    ));
}

#[test]
fn errors_become_their_graft_kinds() {
    let kinds = [
        (ValueError::NotPlainData("x".into()), "not_plain_data"),
        (ValueError::Cyclic("x".into()), "cyclic_value"),
        (
            ValueError::TooLarge {
                limit: 1,
                what: "x".into(),
            },
            "value_too_large",
        ),
    ];
    for (e, kind) in kinds {
        let text = e.to_string();
        let err = crate::Error::from(e);
        assert_eq!(err.kind(), kind);
        assert_eq!(err.to_string(), text);
    }
}

#[test]
fn memory_estimate_counts_each_table_once() {
    let lua = Lua::new();
    let selfish = eval(
        &lua,
        "local s = {} for i = 1, 8 do s['k'..i] = s end return s",
    );
    assert_eq!(estimate_size(&selfish, 1000), (56 + 8 * (32 + 24 + 2), 8));
    let dag = eval(
        &lua,
        "local t = {} for i = 1, 30 do t = { a = t, b = t } end return t",
    );
    let (bytes, read) = estimate_size(&dag, 1000);
    assert_eq!(read, 60, "two entries per level, each level once");
    assert_eq!(bytes, 31 * 56 + 60 * (32 + 25));
    // past the budget the figure is a lower bound
    let wide = eval(
        &lua,
        "local t = {} for i = 1, 5000 do t[i] = { i } end return t",
    );
    let (partial, read) = estimate_size(&wide, 100);
    assert_eq!(read, 100);
    assert!(partial < estimate_size(&wide, usize::MAX).0);
}

#[test]
fn exit_reasons_read_from_guest_values() {
    assert_eq!(
        ExitReason::from_json(serde_json::json!("normal")),
        ExitReason::Normal
    );
    assert_eq!(
        ExitReason::from_json(serde_json::json!("shutdown")),
        ExitReason::Shutdown
    );
    // The limits are the kernel's to report: a guest naming one gives `other`.
    for limit in ["out_of_memory", "timeout", "stack_overflow"] {
        let given = ExitReason::from_json(serde_json::json!(limit));
        assert_eq!(
            given,
            ExitReason::Other {
                value: serde_json::json!(limit)
            }
        );
    }
    let other = ExitReason::from_json(serde_json::json!({"why": "bored"}));
    assert_eq!(other.kind(), "other");
    assert!(!other.is_normal());
}
