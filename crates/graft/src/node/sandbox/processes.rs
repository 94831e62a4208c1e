//! Requests to a sandbox's processes: calls (queued, or inline for a
//! blocking caller), casts, plain messages, spawns, one-off evals, and the
//! process list and states.
//!
//! Invariant: a target that addresses no process fails with `NoProcess`;
//! a full mailbox fails the cast with `MailboxFull`, never drops it.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use super::Sandbox;
use crate::block_on;
use crate::error::{Error, Result};
use crate::kernel::HostSlot;
use crate::node::runtime::Runtime;
use crate::node::ProcessInfo;
use crate::pid::{Pid, Target};
use crate::upgrade;

impl Sandbox {
    /// Calls a process (`handle_call`) and waits for its reply. `target` is a
    /// [`Pid`](crate::Pid) or a registered name (any [`Target`]); one that
    /// addresses no process fails with [`Error::NoProcess`]. Default timeout 5 s.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// let node = Node::new();
    /// let spec = SandboxSpec::new("demo").entry(None).module("echo", r#"
    ///     return { init = function() return {} end,
    ///              handle_call = function(req, from, s) return req, s end }
    /// "#);
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// let pid = graft::block_on(sb.spawn("echo", serde_json::json!(null), Some("e"))).unwrap();
    /// // By pid or by name.
    /// assert_eq!(graft::block_on(sb.call(&pid, "a".into(), None)).unwrap(), "a");
    /// assert_eq!(graft::block_on(sb.call("e", "b".into(), None)).unwrap(), "b");
    /// let err = graft::block_on(sb.call("nobody", "c".into(), None)).unwrap_err();
    /// assert_eq!(err.kind(), "no_process");
    /// ```
    pub async fn call(
        &self,
        target: impl Into<Target>,
        request: Json,
        timeout_ms: Option<u64>,
    ) -> Result<Json> {
        let target = target.into();
        let ms = timeout_ms.unwrap_or(crate::kernel::DEFAULT_CALL_TIMEOUT_MS);
        self.ask_slot(move |rt, slot| rt.host_call(target, request, ms, slot))
            .await
    }

    /// Calls a process like [`Sandbox::call`], blocking the calling thread
    /// until the reply arrives or `timeout_ms` (default 5 s) passes.
    ///
    /// When the sandbox is idle (neither queued nor running), the handler
    /// runs on the calling thread: no scheduler thread is woken, and the
    /// reply is usually ready when the slice ends. Otherwise the request
    /// queues like [`Sandbox::call`]'s. Requests from one thread keep their
    /// order either way. For threads that may block; in async code use
    /// [`Sandbox::call`], which never holds an executor thread for a slice.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// let node = Node::new();
    /// let spec = SandboxSpec::new("demo").entry(None).module("echo", r#"
    ///     local echo = {}
    ///     function echo.init() return {} end
    ///     function echo.handle_call(req, from, state) return req, state end
    ///     return echo
    /// "#);
    /// let sandbox = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// graft::block_on(sandbox.spawn("echo", serde_json::json!({}), Some("e"))).unwrap();
    /// let reply = sandbox.call_blocking("e", serde_json::json!("hi"), None).unwrap();
    /// assert_eq!(reply, serde_json::json!("hi"));
    /// ```
    pub fn call_blocking(
        &self,
        target: impl Into<Target>,
        request: Json,
        timeout_ms: Option<u64>,
    ) -> Result<Json> {
        let target = target.into();
        let ms = timeout_ms.unwrap_or(crate::kernel::DEFAULT_CALL_TIMEOUT_MS);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let slot = HostSlot::new(tx);
        self.run_here(move |rt: &mut Runtime| rt.host_call_now(target, request, ms, slot))?;
        match rx.try_recv() {
            Ok(answer) => answer,
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                block_on(rx).map_err(|_| self.gone())?
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Err(self.gone()),
        }
    }

    /// Casts a message (`handle_cast`). Fails with `MailboxFull` rather than dropping it.
    pub async fn cast(&self, target: impl Into<Target>, message: Json) -> Result<()> {
        let target = target.into();
        self.ask(move |rt| rt.host_send(&target, &message, true))
            .await?
    }

    /// Sends a plain message (`handle_info`).
    pub async fn send(&self, target: impl Into<Target>, message: Json) -> Result<()> {
        let target = target.into();
        self.ask(move |rt| rt.host_send(&target, &message, false))
            .await?
    }

    /// Spawns a process of `module` with `args`; returns its pid once `init` succeeded.
    ///
    /// ```
    /// use graft::{Node, SandboxSpec};
    /// let node = Node::new();
    /// let spec = SandboxSpec::new("demo").entry(None)
    ///     .module("w", "return { init = function(args) return args end }");
    /// let sb = graft::block_on(node.create_sandbox(spec)).unwrap();
    /// let pid = graft::block_on(sb.spawn("w", serde_json::json!({}), None)).unwrap();
    /// assert_eq!(pid.module(), "w");
    /// assert_eq!(pid.to_string(), format!("<w.{}>", pid.serial()));
    /// ```
    pub async fn spawn(&self, module: &str, args: Json, name: Option<&str>) -> Result<Pid> {
        let module = module.to_owned();
        let name = name.map(str::to_owned);
        let pid = self
            .ask_slot(move |rt, slot| rt.host_spawn(&module, &args, name.as_deref(), slot))
            .await?;
        // The kernel answers with the pid's text; module names are checked
        // when modules load, so it always parses (an error, never a panic,
        // if that ever broke).
        let text = pid.as_str().unwrap_or_default();
        text.parse::<Pid>().map_err(|e| {
            Error::Luau(format!(
                "internal error: spawn answered `{}`, not a pid: {e}",
                text.escape_debug()
            ))
        })
    }

    /// Runs a Luau chunk as a short-lived process under the sandbox's limits.
    pub async fn eval(&self, source: &str) -> Result<Json> {
        let cx = upgrade::PrepareContext {
            known_globals: &self.shared.known_globals,
            max_source_bytes: self.shared.spec.limits.max_source_bytes,
            files: &BTreeMap::new(),
        };
        let mut sources = BTreeMap::new();
        sources.insert("eval".to_owned(), source.to_owned());
        let prepared = upgrade::prepare(&sources, &cx)?;
        let bytecode = prepared[0].bytecode.clone();
        self.ask_slot(move |rt, slot| rt.host_eval(&bytecode, slot))
            .await
    }

    /// The process list.
    pub async fn processes(&self) -> Result<Vec<ProcessInfo>> {
        self.ask(|rt| rt.processes()).await
    }

    /// A process's state as JSON. `target` as for [`Sandbox::call`].
    pub async fn state(&self, target: impl Into<Target>) -> Result<Json> {
        let target = target.into();
        self.ask(move |rt| rt.state(&target)).await?
    }
}
