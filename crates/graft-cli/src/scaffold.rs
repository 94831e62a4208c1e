//! `graft new DIR`: a project that runs as is.

use std::path::Path;

use anyhow::{anyhow, bail, Result};

const APP: &str = r#"-- The app: this sandbox's root supervisor (SPEC §2). It starts `counter`
-- and restarts it when it crashes; more than 3 restarts within 5 seconds
-- and the supervisor gives up.
return {
  behaviour = "supervisor",
  init = function(args)
    return {
      strategy = "one_for_one",
      intensity = 3, period = 5,
      children = {
        { id = "counter", module = "counter", args = { start = 0 },
          name = "counter", restart = "permanent", shutdown = 5000 },
      },
    }
  end,
}
"#;

const COUNTER: &str = r#"-- A server (GenServer semantics). Its state survives hot reloads: while
-- `graft run` watches this project, change STEP below and save; the next
-- "inc" runs the new code on the same count.
local counter = {}

local STEP = 1

function counter.init(args)
  return { count = (args and args.start) or 0 }
end

-- graft call <sandbox> counter inc    -> the count after adding STEP
-- graft call <sandbox> counter get    -> the count
function counter.handle_call(req, from, state)
  if req == "inc" then
    state.count += STEP
  end
  return state.count, state
end

-- graft cast <sandbox> counter 5      -> adds 5
function counter.handle_cast(msg, state)
  if type(msg) == "number" then
    state.count += msg
  end
  return state
end

function counter.handle_info(msg, state)
  return state
end

-- Runs for every live counter when a new version of this file goes live.
-- old_vsn is the version the state comes from ({ down = n } on a rollback).
function counter.code_change(old_vsn, state, extra)
  return state
end

function counter.terminate(reason, state)
  graft.log.info("counter stopping at " .. tostring(state.count))
end

return counter
"#;

const TEST: &str = r#"-- Tests for `counter`, run by `graft test` (docs/testing.md). Each function
-- runs in a fresh sandbox built from this project exactly as `graft run`
-- builds it, app started, and gets `t`, the test library:
--   t.call t.cast t.send t.state t.start t.eval   talk to the sandbox
--   t.reload t.rollback t.versions t.source       upgrade it
--   t.advance(ms)                                 move its test clock (timers)
--   t.eq t.deep_eq t.ok t.raises t.matches        assertions (file:line on failure)
local tests = {}

function tests.inc_adds_one(t)
  local before = t.call("counter", "get")
  t.eq(t.call("counter", "inc"), before + 1)
end

function tests.cast_adds_the_number(t)
  t.cast("counter", 10)
  t.eq(t.call("counter", "get"), 10)
end

function tests.the_state_is_the_count(t)
  t.call("counter", "inc")
  t.deep_eq(t.state("counter"), { count = 1 })
end

function tests.a_reload_keeps_the_count(t)
  t.call("counter", "inc")
  local source = t.source("src/counter.luau"):gsub("local STEP = 1\n", "local STEP = 10\n")
  t.reload("counter", source)
  t.eq(t.call("counter", "inc"), 11, "the new STEP runs on the old count")
  t.rollback("counter", 1)
  t.eq(t.call("counter", "inc"), 12, "back to STEP = 1")
end

function tests.unknown_processes_are_errors(t)
  t.raises(function()
    t.call("nobody", "get")
  end, "nobody")
end

return tests
"#;

fn graft_toml(id: &str) -> String {
    format!(
        r#"# A Graft project: one sandbox. Every key is optional but `id`.
[sandbox]
id = "{id}"
entry = "app"          # the root supervisor module (src/app.luau)

[limits]
memory_bytes = 67108864   # Luau heap of the sandbox
handler_ms = 1000         # CPU time one callback may take
max_processes = 100000
max_mailbox = 10000
max_versions = 10         # versions kept per module, for rollback

# [capabilities]
# grant = ["clock", "random"]
"#
    )
}

fn readme(id: &str, dir: &str) -> String {
    format!(
        r#"# {id}

A Graft project: supervised Luau processes whose code is upgraded while they
run.

```
graft.toml              sandbox id, entry module, limits
src/app.luau            the root supervisor: starts `counter`
src/counter.luau        a server holding a count
test/counter_test.luau  tests, run by `graft test`
```

## The edit-and-watch loop

Start the project. It serves the HTTP API on 127.0.0.1:7878 and watches `src/`:

```
graft run {dir}
```

In another terminal, talk to it:

```
graft call {id} counter inc      # 1
graft call {id} counter inc      # 2
graft ps {id}                    # the supervisor and the counter
graft state {id} counter         # {{ "count": 2 }}
```

Now edit `src/counter.luau`: set `local STEP = 10` and save. `graft run` prints

```
✓ counter v1 → v2  0.4 ms  1 process migrated
```

and the next call runs the new code on the same state:

```
graft call {id} counter inc      # 12
```

Save a mistake (say `local STEP = = 10`) and `graft run` prints the error with
`src/counter.luau:LINE:COLUMN` and a code frame; the old code keeps running.
Fix it, save, and the fix goes live.

History and rollback:

```
graft versions {id} counter
graft rollback {id} counter 1
```

Run the tests (each in a fresh sandbox, with a test clock; see
`test/counter_test.luau`), and check every module without running the app:

```
graft test {dir}
graft check {dir}
```

## Editor

`graft.d.luau` declares the `graft` global and the test library (`t`) for
luau-lsp; `.vscode/settings.json` points the luau-lsp extension at it and
`.luaurc` sets the language mode. Regenerate it after upgrading Graft:

```
graft types {dir}
```

Annotate a test's argument to get completion: `function tests.x(t: GraftTest)`.

Reload files by hand (without the watcher) with `graft reload {id} src/counter.luau`.
Every client command takes `--url` (or `GRAFT_URL`) and `--json`.
Stop `graft run` with Ctrl-C: `terminate` callbacks run, then it exits.
"#
    )
}

/// A sandbox id from a directory name: lowercase, `[a-z0-9_-]`, at most 64.
fn id_from_dir(dir: &Path) -> String {
    let name = std::path::absolute(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let mut id: String = name
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    id = id.trim_start_matches(['-', '_']).chars().take(64).collect();
    if graft::config::validate_sandbox_id(&id).is_ok() {
        id
    } else {
        "app".into()
    }
}

pub fn new_project(dir: &Path, id: Option<&str>) -> Result<()> {
    let id = match id {
        Some(id) => {
            graft::config::validate_sandbox_id(id)?;
            id.to_owned()
        }
        None => id_from_dir(dir),
    };
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .map_err(|e| anyhow!("{} exists and cannot be read: {e}", dir.display()))?
            .next()
            .is_none();
        if !empty {
            bail!(
                "{} exists and is not empty; pick a new directory",
                dir.display()
            );
        }
    }
    let write = |rel: &str, text: &str| -> Result<()> {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| anyhow!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
    };
    let shown = dir.display().to_string();
    write("graft.toml", &graft_toml(&id))?;
    write("src/app.luau", APP)?;
    write("src/counter.luau", COUNTER)?;
    write("test/counter_test.luau", TEST)?;
    write("README.md", &readme(&id, &shown))?;
    // `graft run` keeps the node's database in DIR/.graft/ (SPEC §8).
    write(
        ".gitignore",
        "# the node's data: graft run keeps it here\n.graft/\n",
    )?;
    write(crate::types::FILE, &crate::types::definitions())?;
    write(".luaurc", crate::types::LUAURC)?;
    write(".vscode/settings.json", crate::types::VSCODE_SETTINGS)?;
    println!("✓ created {shown} (sandbox `{id}`)");
    println!();
    println!("  graft run {shown}");
    println!("  graft call {id} counter inc");
    println!();
    println!("then edit {shown}/src/counter.luau and save: the change goes live.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_directory_names() {
        assert_eq!(id_from_dir(Path::new("/tmp/myapp")), "myapp");
        assert_eq!(id_from_dir(Path::new("/tmp/My App")), "my-app");
        assert_eq!(id_from_dir(Path::new("/tmp/_x")), "x");
        assert_eq!(id_from_dir(Path::new("/tmp/ü")), "app");
    }

    #[test]
    fn scaffold_sources_compile_and_run() {
        let node = graft::Node::with_threads(1);
        let spec = graft::SandboxSpec::new("scaffold")
            .module("app", APP)
            .module("counter", COUNTER);
        let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
        graft::block_on(sb.wait_app_started()).unwrap();
        assert_eq!(
            graft::block_on(sb.call("counter", serde_json::json!("inc"), None)).unwrap(),
            1
        );
        toml_parses(&graft_toml("scaffold"));
    }

    fn toml_parses(text: &str) {
        let dir = std::env::temp_dir().join(format!("graft-scaffold-unit-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(dir.join("graft.toml"), text).unwrap();
        std::fs::write(dir.join("src/app.luau"), APP).unwrap();
        std::fs::write(dir.join("src/counter.luau"), COUNTER).unwrap();
        let spec = graft::SandboxSpec::from_dir(&dir).unwrap();
        assert_eq!(spec.id, "scaffold");
        assert_eq!(spec.limits, graft::Limits::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
