//! The command line: the gateway's flags (each a setting of `Config`,
//! overriding the file's), and the other things the binary can be.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};

use crate::config::{parse_range, AuthKey, Config};

/// Real-time connection gateway: messages published over ZeroMQ are delivered
/// to WebSocket, Server-Sent Events and long-poll clients.
///
/// Settings come from built-in defaults, then the TOML file given with
/// --config (keys named like the flags, with underscores), then these flags.
/// With no arguments it serves 127.0.0.1:8080 and binds tcp://127.0.0.1:5560
/// for publishers.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML configuration file.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Config,
    /// An HS256 key, KID=SECRET (at least 32 bytes); repeatable. For
    /// development: the secret shows in the process list. Kept across
    /// SIGHUP reloads.
    #[arg(long, value_name = "KID=SECRET")]
    pub auth_hs256_secret: Vec<String>,
}

/// The other things the binary can be.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// A ZeroMQ forwarder (XSUB ↔ XPUB) between many publishers and many
    /// gateways: publishers connect to --publishers, gateways (with
    /// zmq_subscribe = demand) to --gateways, and each gateway receives
    /// only the channels its clients subscribe to.
    Forwarder(crate::forwarder::ForwarderArgs),
}

impl Cli {
    /// The command line, parsed, and which of its settings were given.
    pub fn parse_args() -> Result<(Cli, ArgMatches), clap::Error> {
        Self::from_args(std::env::args_os())
    }

    pub fn from_args<I, T>(args: I) -> Result<(Cli, ArgMatches), clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Cli::command().try_get_matches_from(args)?;
        let cli = Cli::from_arg_matches(&matches)?;
        Ok((cli, matches))
    }

    /// Defaults, overridden by the file, overridden by the flags given
    /// (`matches` says which were).
    pub fn resolve(self, matches: &ArgMatches) -> Result<Config, String> {
        let mut cfg = Config::from_file(self.config.as_deref())?;
        // Each setting the command line gave replaces the file's, whatever
        // its type: both are written out under the setting's name and the
        // flag's value taken over.
        let given: Vec<&str> = matches
            .ids()
            .map(|id| id.as_str())
            .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
            .collect();
        let flags = serde_json::to_value(&self.settings).map_err(|e| e.to_string())?;
        let mut merged = serde_json::to_value(&cfg).map_err(|e| e.to_string())?;
        let mut from_flags = false;
        for id in &given {
            if let (Some(value), Some(slot)) = (flags.get(id), merged.get_mut(id)) {
                *slot = value.clone();
                from_flags = true;
            }
        }
        if from_flags {
            cfg = serde_json::from_value(merged).map_err(|e| e.to_string())?;
        }
        cfg.auth_audience_from_cli = given.contains(&"auth_audience");
        cfg.tls_from_cli = given.contains(&"tls_cert");
        for arg in &self.auth_hs256_secret {
            let (kid, secret) = arg
                .split_once('=')
                .ok_or("--auth-hs256-secret takes KID=SECRET")?;
            cfg.auth_cli_keys.push(AuthKey {
                kid: kid.to_string(),
                alg: "HS256".to_string(),
                secret: Some(secret.to_string()),
                key_file: None,
            });
        }
        cfg.config_path = self.config.clone();
        cfg.proxy_trusted = cfg
            .proxy_protocol_from
            .iter()
            .map(|s| parse_range(s))
            .collect::<Result<_, _>>()?;
        cfg.origins =
            protocol::origin::Origins::new(&cfg.allowed_origins, cfg.cors_allow_credentials)
                .map_err(|e| e.to_string())?;
        cfg.ws_subprotocols_spoken = cfg.ws_subprotocols.clone();
        if !cfg
            .ws_subprotocols_spoken
            .iter()
            .any(|p| p == protocol::upstream::SUBPROTOCOL)
        {
            cfg.ws_subprotocols_spoken
                .push(protocol::upstream::SUBPROTOCOL.to_string());
        }
        cfg.validate()?;
        Ok(cfg)
    }
}
