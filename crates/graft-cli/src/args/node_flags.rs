//! The flags of the node commands (`run`, `serve`): where they listen and
//! how they face the network, the node-wide caps, and where data is kept.
//!
//! `run` and `serve` share them (flattened into both), so that the two
//! commands cannot drift apart. A combination clap cannot express (a
//! non-loopback `--bind` without TLS or `--insecure-http`, a cap out of the
//! library's range) is still bad usage: it exits 2 with clap's message for
//! the subcommand, before any node is opened or any port bound.

use std::path::PathBuf;

use clap::{Args, CommandFactory};
use graft::NodeLimits;

use super::Cli;
use crate::node;

/// Where `run` and `serve` listen, and how they face the network (SPEC §9).
#[derive(Args, Clone)]
pub(crate) struct Listen {
    /// Port of the HTTP API (0 picks a free port and prints it)
    #[arg(long, default_value_t = 7878)]
    port: u16,
    /// Address to bind; anything but loopback needs --tls-cert/--tls-key
    /// or --insecure-http
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// A host name browsers may use to reach the node besides loopback
    /// names (repeat for several); other Host headers are refused
    #[arg(long = "allow-host", value_name = "NAME")]
    allow_hosts: Vec<String>,
    /// PEM certificate chain: serve https
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve plain http on a non-loopback --bind (tokens travel in clear)
    #[arg(long, conflicts_with = "tls_cert")]
    insecure_http: bool,
    /// Directory under which sandboxes may be created from a path (repeat
    /// for several; `graft run DIR` allows DIR)
    #[arg(long = "projects-root", value_name = "DIR")]
    projects_roots: Vec<PathBuf>,
    /// Also serve GET /metrics (only, viewer token) on this address, for
    /// scrapers, e.g. 127.0.0.1:9464 (the API's own /metrics stays)
    #[arg(long, value_name = "HOST:PORT")]
    metrics_bind: Option<String>,
    /// Also write an audit row for every allowed call, cast and send, ahead
    /// of it (failing closed; costs one commit per message). Refused
    /// messages are always recorded
    #[arg(long)]
    audit_messages: bool,
}

impl Listen {
    /// The serving settings, or a usage error (exit 2): a non-loopback
    /// address needs TLS or an explicit --insecure-http.
    pub(crate) fn checked(self, subcommand: &str) -> node::Serving {
        let loopback = self.bind == "localhost"
            || self
                .bind
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback && self.tls_cert.is_none() && !self.insecure_http {
            usage_error(
                subcommand,
                format!(
                    "--bind {} is not a loopback address: serve TLS with --tls-cert and --tls-key, \
                     or pass --insecure-http to send tokens in clear",
                    self.bind
                ),
            );
        }
        node::Serving {
            metrics_bind: self.metrics_bind,
            bind: self.bind,
            port: self.port,
            allow_hosts: self.allow_hosts,
            tls: self.tls_cert.zip(self.tls_key),
            projects_roots: self.projects_roots,
            audit_messages: self.audit_messages,
        }
    }
}

/// Exits with clap's usage error (exit 2) for `subcommand`.
fn usage_error(subcommand: &str, message: String) -> ! {
    let mut cli = Cli::command();
    cli.build();
    match cli.find_subcommand_mut(subcommand) {
        Some(sub) => sub.error(clap::error::ErrorKind::ArgumentConflict, message),
        None => cli.error(clap::error::ErrorKind::ArgumentConflict, message),
    }
    .exit()
}

/// Node-wide caps of `run` and `serve` (SPEC §7); out of range is bad usage.
#[derive(Args, Clone)]
pub(crate) struct Caps {
    /// The largest `memory_bytes` a sandbox may ask for (at least 2 MiB;
    /// `KiB`, `MiB`, `GiB` suffixes allowed)
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes,
          default_value_t = NodeLimits::default().max_sandbox_memory)]
    max_sandbox_memory: usize,
    /// Sandboxes on the node at most; creating one more is refused with
    /// 429 `node_limit` (1 to 1048576)
    #[arg(long, value_name = "N", default_value_t = NodeLimits::default().max_sandboxes)]
    max_sandboxes: usize,
    /// The largest JSON form of a reply, state, message or event; past it
    /// 422 `value_too_large` (1 KiB to 4 GiB; suffixes allowed)
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes,
          default_value_t = NodeLimits::default().max_value_bytes)]
    max_value_bytes: usize,
    /// Events each sandbox keeps, oldest dropped first (1 to 1000000)
    #[arg(long, value_name = "N", default_value_t = NodeLimits::default().max_events)]
    max_events: usize,
}

impl Caps {
    fn limits(&self) -> NodeLimits {
        NodeLimits {
            max_sandbox_memory: self.max_sandbox_memory,
            max_sandboxes: self.max_sandboxes,
            max_value_bytes: self.max_value_bytes,
            max_events: self.max_events,
            ..NodeLimits::default()
        }
    }

    /// The caps, or a usage error (exit 2) naming the flag and its range.
    pub(crate) fn checked(&self, subcommand: &str) -> NodeLimits {
        let limits = self.limits();
        let Err(e) = limits.validate() else {
            return limits;
        };
        let message = match e {
            graft::Error::LimitOutOfRange {
                field,
                value,
                min,
                max,
            } => {
                let flag = field.replace('_', "-");
                let range = if max == u64::MAX {
                    format!("at least {min}")
                } else {
                    format!("between {min} and {max}")
                };
                format!("invalid value '{value}' for '--{flag}': it must be {range}")
            }
            other => other.to_string(),
        };
        let mut cli = Cli::command();
        cli.build();
        match cli.find_subcommand_mut(subcommand) {
            Some(sub) => sub.error(clap::error::ErrorKind::ValueValidation, message),
            None => cli.error(clap::error::ErrorKind::ValueValidation, message),
        }
        .exit()
    }
}

/// Where `run` and `serve` keep the node's data (SPEC §8).
#[derive(Args, Clone)]
pub(crate) struct Storage {
    /// The data directory (default: DIR/.graft for `run`, $XDG_DATA_HOME/graft
    /// or ~/.local/share/graft for `serve`)
    #[arg(long, value_name = "DIR", conflicts_with = "ephemeral")]
    pub(crate) data: Option<PathBuf>,
    /// Keep everything in memory: nothing survives a restart
    #[arg(long)]
    pub(crate) ephemeral: bool,
    /// How often the changed states of registered processes are checkpointed
    /// (also after every reload and at shutdown; 0: only then)
    #[arg(long, value_name = "MS", default_value_t = graft::DEFAULT_CHECKPOINT_MS)]
    pub(crate) checkpoint_ms: u64,
}

/// A byte count: digits, optionally followed by `KiB`, `MiB` or `GiB`.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        other => return Err(format!("unknown unit `{other}`; use B, KiB, MiB or GiB")),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("expected a number of bytes like 512MiB, not `{s}`"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_bytes("1 GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("3KiB").unwrap(), 3 << 10);
        assert!(parse_bytes("2MB").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("GiB").is_err());
        assert!(parse_bytes(&format!("{}GiB", usize::MAX)).is_err());
    }
}
