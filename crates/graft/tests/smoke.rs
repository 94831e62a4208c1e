use graft::{block_on, Node, SandboxSpec};
use serde_json::json;

const COUNTER: &str = r#"
local counter = {}
function counter.init(args) return { count = args.start or 0 } end
function counter.handle_call(req, from, state)
  if req == "inc" then state.count += 1 end
  return state.count, state
end
function counter.handle_cast(msg, state) state.count += msg return state end
return counter
"#;

#[test]
fn spawn_and_call() {
    let node = Node::with_threads(2);
    let sb = graft::block_on(
        node.create_sandbox(
            SandboxSpec::new("s1")
                .entry(None)
                .module("counter", COUNTER),
        ),
    )
    .unwrap();
    let pid = block_on(sb.spawn("counter", json!({"start": 41}), Some("c"))).unwrap();
    assert_eq!(pid, "<counter.1>");
    assert_eq!(
        block_on(sb.call("c", json!("inc"), None)).unwrap(),
        json!(42)
    );
    block_on(sb.cast("c", json!(10))).unwrap();
    assert_eq!(
        block_on(sb.call("c", json!("get"), None)).unwrap(),
        json!(52)
    );
    assert_eq!(block_on(sb.state("c")).unwrap(), json!({"count": 52}));
}

const APP: &str = r#"
return {
  behaviour = "supervisor",
  init = function(args)
    return {
      strategy = "one_for_one", intensity = 3, period = 5,
      children = {
        { id = "counter", module = "counter", args = { start = 0 }, name = "counter" },
        { id = "proxy", module = "proxy", args = {}, name = "proxy" },
      },
    }
  end,
}
"#;

const PROXY: &str = r#"
return {
  init = function() return { calls = 0 } end,
  handle_call = function(req, from, state)
    state.calls += 1
    local r = graft.call("counter", req)
    return { via = graft.self(), reply = r }, state
  end,
}
"#;

#[test]
fn supervisor_app_and_process_to_process_call() {
    let node = Node::with_threads(2);
    let spec = SandboxSpec::new("s2")
        .module("app", APP)
        .module("counter", COUNTER)
        .module("proxy", PROXY);
    let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    block_on(sb.wait_app_started()).unwrap();
    let r = block_on(sb.call("proxy", json!("inc"), None)).unwrap();
    assert_eq!(r["reply"], json!(1));
    let ps = block_on(sb.processes()).unwrap();
    assert_eq!(ps.len(), 3, "{ps:?}");
    // crash the counter: the supervisor restarts it with fresh state
    block_on(sb.cast("counter", json!("not a number"))).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        block_on(sb.call("counter", json!("get"), None)).unwrap(),
        json!(0)
    );
    let events = block_on(sb.events()).unwrap();
    assert!(events.iter().any(|e| e.kind == "crash"), "{events:?}");
    let stopped = block_on(sb.stop_app()).unwrap();
    assert_eq!(stopped, json!("shutdown"));
    assert_eq!(block_on(sb.processes()).unwrap().len(), 0);
}
