//! What each command does once a runtime is up: the node commands, and the
//! client verbs, each family in its own function.
//!
//! A family's function matches only its own commands, and `dispatch` sends
//! each command to its family, so that the arms of one family read
//! together (the client verbs mirror the files of `client/`). The commands
//! that need no runtime (`new`, `check`, `test`, `types`) never come here:
//! `main` runs them before it builds one.

use anyhow::Result;

use crate::args::{Command, TokenAction};
use crate::client::{self, Client};
use crate::{datadir, node};

/// Runs one command that needs the async runtime.
pub(crate) async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::New { .. }
        | Command::Check { .. }
        | Command::Test { .. }
        | Command::Types { .. } => {
            unreachable!("handled without a runtime")
        }
        Command::Run { .. } | Command::Serve { .. } | Command::Backup { .. } => {
            node_command(command).await
        }
        Command::Call { .. }
        | Command::Cast { .. }
        | Command::Ps { .. }
        | Command::State { .. }
        | Command::Eval { .. } => process_verb(command).await,
        Command::Reload { .. } | Command::Versions { .. } | Command::Rollback { .. } => {
            module_verb(command).await
        }
        Command::Events {
            sandbox,
            kinds,
            follow,
            conn,
        } => {
            Client::new(&conn)?
                .events(sandbox.as_deref(), &kinds, follow)
                .await
        }
        Command::Token { .. } | Command::Audit { .. } => admin_verb(command).await,
    }
}

/// `run`, `serve` and `backup`: the commands that open a node's data.
async fn node_command(command: Command) -> Result<()> {
    match command {
        Command::Run {
            dir,
            listen,
            caps,
            storage,
            no_watch,
            debounce_ms,
            discard,
        } => {
            let data = node::DataChoice::from_flags(
                storage.data,
                storage.ephemeral,
                dir.join(".graft"),
                storage.checkpoint_ms,
            );
            node::run(
                &dir,
                listen.checked("run"),
                caps.checked("run"),
                data,
                (!no_watch).then_some(debounce_ms),
                &discard,
            )
            .await
        }
        Command::Serve {
            listen,
            caps,
            storage,
        } => {
            let data = node::DataChoice::from_flags(
                storage.data,
                storage.ephemeral,
                datadir::default_data_dir().ok_or_else(|| {
                    anyhow::anyhow!("cannot find the default data directory: set HOME or XDG_DATA_HOME, or pass --data DIR")
                })?,
                storage.checkpoint_ms,
            );
            node::serve(listen.checked("serve"), caps.checked("serve"), data).await
        }
        Command::Backup { dest, data } => node::backup(data, &dest),
        _ => unreachable!("not a node command"),
    }
}

/// `call`, `cast`, `ps`, `state` and `eval`: a sandbox's processes and code.
async fn process_verb(command: Command) -> Result<()> {
    match command {
        Command::Call {
            sandbox,
            target,
            request,
            timeout_ms,
            conn,
        } => {
            Client::new(&conn)?
                .call(&sandbox, &target, request, timeout_ms)
                .await
        }
        Command::Cast {
            sandbox,
            target,
            message,
            conn,
        } => Client::new(&conn)?.cast(&sandbox, &target, message).await,
        Command::Ps { sandbox, conn } => Client::new(&conn)?.ps(&sandbox).await,
        Command::State {
            sandbox,
            target,
            conn,
        } => Client::new(&conn)?.state(&sandbox, &target).await,
        Command::Eval {
            sandbox,
            code,
            file,
            timeout_ms,
            conn,
        } => {
            let source = match (code, file) {
                (_, Some(path)) => std::fs::read_to_string(&path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
                (Some(code), None) if code == "-" => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                        .map_err(|e| anyhow::anyhow!("cannot read standard input: {e}"))?;
                    s
                }
                (Some(code), None) => code,
                (None, None) => unreachable!("clap requires one"),
            };
            Client::new(&conn)?
                .eval(&sandbox, &source, timeout_ms)
                .await
        }
        _ => unreachable!("not a process verb"),
    }
}

/// `reload`, `versions` and `rollback`: a sandbox's modules.
async fn module_verb(command: Command) -> Result<()> {
    match command {
        Command::Reload {
            sandbox,
            files,
            dry_run,
            extra,
            state_handler,
            canary_ms,
            canary_crashes,
            conn,
        } => {
            let opts = client::ReloadArgs {
                dry_run,
                extra,
                state_handler,
                canary_ms,
                canary_crashes,
            };
            Client::new(&conn)?.reload(&sandbox, &files, opts).await
        }
        Command::Versions {
            sandbox,
            module,
            conn,
        } => Client::new(&conn)?.versions(&sandbox, &module).await,
        Command::Rollback {
            sandbox,
            module,
            version,
            conn,
        } => {
            Client::new(&conn)?
                .rollback(&sandbox, &module, version)
                .await
        }
        _ => unreachable!("not a module verb"),
    }
}

/// `token` and `audit`: the node's tokens and audit log (admin).
async fn admin_verb(command: Command) -> Result<()> {
    match command {
        Command::Token { action } => match action {
            TokenAction::Create {
                role,
                sandboxes,
                label,
                conn,
            } => {
                Client::new(&conn)?
                    .token_create(&role, sandboxes, label)
                    .await
            }
            TokenAction::List { conn } => Client::new(&conn)?.token_list().await,
            TokenAction::Revoke { id, conn } => Client::new(&conn)?.token_revoke(&id).await,
        },
        Command::Audit {
            token_id,
            sandbox,
            outcome,
            since_ms,
            before,
            limit,
            conn,
        } => {
            let filters = client::AuditFilters {
                token: token_id,
                sandbox,
                outcome,
                since_ms,
                before,
                limit,
            };
            Client::new(&conn)?.audit(filters).await
        }
        _ => unreachable!("not an admin verb"),
    }
}
