#!/usr/bin/env python3
"""Writes the seed corpora: fuzz/seeds/reload_source (the example modules)
and fuzz/seeds/api_body (valid request bodies from crates/graft-http/tests/api.rs,
each prefixed by the byte that selects its endpoint). Run from fuzz/."""
import glob, hashlib, json, os

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(ROOT)

COUNTER = open(os.path.join(ROOT, "src", "api_body.rs")).read().split('pub const COUNTER: &str = r#"', 1)[1].split('"#;', 1)[0]
APP = open(os.path.join(ROOT, "src", "api_body.rs")).read().split('pub const APP: &str = r#"', 1)[1].split('"#;', 1)[0]

# Same order as ENDPOINTS in src/api_body.rs.
CREATE, CALL, CAST, SEND, SPAWN, RELOAD, ROLLBACK, EVAL, BATCH = range(9)

def counter_v(n):
    return COUNTER.replace("state.count += 1", f"state.count += {n}")

API = [
    (CREATE, {"id": "one", "modules": {"app": APP, "counter": COUNTER}}),
    (CREATE, {"id": "two", "modules": {"counter": COUNTER}}),
    (CREATE, {"id": "e", "modules": {"counter": COUNTER}, "entry": "main"}),
    (CREATE, {"id": "l", "modules": {"counter": COUNTER}, "limits": {"memory_bytes": 10}}),
    (CREATE, {"id": "n", "modules": "/definitely/not/here"}),
    (CREATE, {"id": "x", "modules": {"counter": COUNTER}, "limits": {"handler_ms": 5, "max_mailbox": 2}, "capabilities": ["clock"]}),
    (CALL, {"to": "counter", "request": "inc"}),
    (CALL, {"to": "counter", "request": {"sleep": 400}, "timeout_ms": 50}),
    (CALL, {"to": "counter", "request": "crash"}),
    (CAST, {"to": "counter", "message": 10}),
    (SEND, {"to": "counter", "message": {"set": 100}}),
    (SPAWN, {"module": "counter", "args": {"start": 7}, "name": "c7"}),
    (SPAWN, {"module": "counter", "args": {"fail": True}}),
    (RELOAD, {"modules": {"counter": counter_v(10)}}),
    (RELOAD, {"modules": {"counter": counter_v(1000)}, "dry_run": True}),
    (RELOAD, {"modules": {"counter": counter_v(2)}, "state_handler": "return function(old, state, extra) state.count += extra.bonus return state end", "extra": {"bonus": 100}}),
    (RELOAD, {"modules": {"counter": COUNTER}, "canary_ms": 100, "canary_crashes": 1}),
    (ROLLBACK, {"version": 1}),
    (ROLLBACK, {"version": 1, "dry_run": True, "extra": {"a": 1}}),
    (EVAL, {"source": "return { n = graft.call(\"counter\", \"inc\") }"}),
    (EVAL, {"source": "local t = graft.now() while graft.now() - t < 300 do end return 1", "timeout_ms": 30}),
    (BATCH, {"sandboxes": ["fz"], "modules": {"counter": counter_v(3)}, "max_concurrency": 1, "rolling": True}),
    (BATCH, {"sandboxes": ["fz", "fz"], "modules": {"counter": COUNTER}}),
]

def write(dir, data):
    os.makedirs(dir, exist_ok=True)
    with open(os.path.join(dir, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)

for path in sorted(glob.glob(os.path.join(REPO, "examples", "*", "src", "**", "*.luau"), recursive=True)):
    write(os.path.join(ROOT, "seeds", "reload_source"), open(path, "rb").read())
write(os.path.join(ROOT, "seeds", "reload_source"), counter_v(5).encode())
for endpoint, body in API:
    write(os.path.join(ROOT, "seeds", "api_body"), bytes([endpoint]) + json.dumps(body).encode())
