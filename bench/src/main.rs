//! `bench`: the load generator for the gateway and the servers it is
//! compared with (the baseline, nginx + nchan, Bun). Each scenario is a
//! subcommand that prints progress on stderr, a human table on stdout and
//! then one JSON line with the same figures. With several servers
//! (`--server gateway,baseline,nchan,bun`, `both`, `all`) it measures them
//! one after the other and adds the ratio first server / each other one of
//! each figure.
//!
//! `bench idle --gateway target/release/gateway --connections 10000 --transport ws`
//! `bench fanout --server both --gateway target/release/gateway --baseline target/release/baseline`
//! `bench storm --server gateway,nchan,bun --gateway target/release/gateway --bun BUN`
//! `bench roundtrip --server both --gateway target/release/gateway --baseline target/release/baseline`
//! `bench grpc --server both --gateway target/release/gateway --baseline target/release/baseline`
//! `bench idle --transport grpc --server both --gateway target/release/gateway --baseline target/release/baseline`
//! `bench idle --tls --server gateway,nchan --gateway target/release/gateway`
//! `bench storm --tls --server gateway,nchan --gateway target/release/gateway`

#![recursion_limit = "256"]

mod cli;
mod fanout;
mod gateway;
mod grpc;
mod grpc_fanout;
mod handshake;
mod http;
mod hub;
mod idle;
mod peers;
mod procfs;
mod publish;
mod report;
mod roundtrip;
mod sse;
mod storm;
mod sys;
mod target;
mod tls;
mod util;
mod ws;

use clap::{CommandFactory, Parser};
use serde_json::{json, Value};

use crate::cli::{Cli, Scenario, Server, ServerArgs, ServerKind, Transport};

/// What one run against one server gave: its table, its JSON, whether it is
/// clean.
struct Run {
    table: String,
    json: Value,
    ok: bool,
}

/// Runs `one` against each server `args` names, one after the other,
/// prints each table, the comparison of the first with each other one when
/// there are several, and the one JSON line; returns the exit code (0
/// clean, 1 a run with errors, 2 a run that failed). A server `can_serve`
/// refuses (a transport it lacks, no two-way contract) is refused before
/// any run.
fn run_all(
    scenario: &str,
    args: &ServerArgs,
    can_serve: impl Fn(ServerKind) -> Result<(), String>,
    compared: &[(&str, &str)],
    mut one: impl FnMut(ServerKind, &Server) -> Result<Run, String>,
) -> i32 {
    let servers = match args.servers() {
        Ok(s) => s,
        Err(e) => Cli::command()
            .error(clap::error::ErrorKind::MissingRequiredArgument, e)
            .exit(),
    };
    if let Some(e) = servers.iter().find_map(|(k, _)| can_serve(*k).err()) {
        Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, e)
            .exit()
    }
    let mut runs = Vec::new();
    let mut code = 0;
    for (kind, server) in &servers {
        match one(*kind, server) {
            Ok(run) => {
                print!("{}", run.table);
                if !run.ok {
                    code = code.max(1);
                }
                runs.push((*kind, run.json));
            }
            Err(e) => {
                eprintln!("bench: {scenario} {}: {e}", kind.name());
                println!("{scenario} {}: FAILED: {e}", kind.name());
                code = 2;
                runs.push((
                    *kind,
                    json!({"scenario": scenario, "server": kind.name(), "ok": false, "errors": [e]}),
                ));
            }
        }
    }
    let ratios = if runs.len() >= 2 {
        let (table, ratios) = report::compare(&runs, compared);
        print!("{table}");
        Some(ratios)
    } else {
        None
    };
    println!("{}", report::combined_json(scenario, &runs, ratios));
    code
}

/// The certificate and client of a `--tls` run (`None` without `--tls`);
/// a certificate that cannot be made ends the bench (exit 2).
fn tls_setup(scenario: &str, tls: bool) -> Option<tls::TlsSetup> {
    if !tls {
        return None;
    }
    match tls::TlsSetup::generate() {
        Ok(setup) => Some(setup),
        Err(e) => {
            eprintln!("bench: {scenario}: {e}");
            std::process::exit(2);
        }
    }
}

/// Whether `kind` can be measured as asked: over `transport`, and over
/// TLS when `tls`.
fn can_serve(kind: ServerKind, transport: Transport, tls: bool) -> Result<(), String> {
    kind.check_transport(transport)?;
    if tls {
        kind.check_tls()?;
    }
    Ok(())
}

/// Where the servers and the bench run (`--server-cpus`, `--client-cpus`),
/// set before anything starts.
fn place(args: &ServerArgs) {
    let fail = |flag: &str, e: std::io::Error| -> ! {
        Cli::command()
            .error(clap::error::ErrorKind::InvalidValue, format!("{flag}: {e}"))
            .exit()
    };
    if let Some(cpus) = &args.server_cpus {
        if let Err(e) = sys::set_server_cpus(cpus.0.clone()) {
            fail("--server-cpus", e);
        }
    }
    if let Some(cpus) = &args.client_cpus {
        if let Err(e) = sys::pin_self(&cpus.0) {
            fail("--client-cpus", e);
        }
    }
}

fn main() {
    let cli = Cli::parse();
    place(match &cli.scenario {
        Scenario::Idle(args) => &args.server,
        Scenario::Fanout(args) => &args.server,
        Scenario::Storm(args) => &args.server,
        Scenario::Roundtrip(args) => &args.server,
        Scenario::Grpc(args) => &args.server,
    });
    let code = match &cli.scenario {
        Scenario::Idle(args) => {
            let transport = args.transport;
            let tls = tls_setup("idle", args.tls);
            run_all(
                "idle",
                &args.server,
                |k| can_serve(k, transport, args.tls),
                report::IDLE_COMPARED,
                |k, s| {
                    idle::run(args, k, s, tls.as_ref()).map(|r| Run {
                        table: r.table(),
                        json: r.json(),
                        ok: r.errors().is_empty(),
                    })
                },
            )
        }
        Scenario::Fanout(args) => {
            let transport = args.transport;
            run_all(
                "fanout",
                &args.server,
                |k| k.check_transport(transport),
                fanout::COMPARED,
                |k, s| {
                    fanout::run_one(args, k, s).map(|r| Run {
                        table: r.table(),
                        json: r.json(),
                        ok: r.errors().is_empty(),
                    })
                },
            )
        }
        Scenario::Storm(args) => {
            let transport = args.transport;
            let tls = tls_setup("storm", args.tls);
            run_all(
                "storm",
                &args.server,
                |k| can_serve(k, transport, args.tls),
                storm::COMPARED,
                |k, s| {
                    storm::run_one(args, k, s, tls.as_ref()).map(|r| Run {
                        table: r.table(),
                        json: r.json(),
                        ok: r.errors().is_empty(),
                    })
                },
            )
        }
        Scenario::Roundtrip(args) => run_all(
            "roundtrip",
            &args.server,
            ServerKind::check_two_way,
            roundtrip::COMPARED,
            |k, s| {
                roundtrip::run_one(args, k, s).map(|r| Run {
                    table: r.table(),
                    json: r.json(),
                    ok: r.errors().is_empty(),
                })
            },
        ),
        Scenario::Grpc(args) => run_all(
            "grpc",
            &args.server,
            |k| k.check_transport(Transport::Grpc),
            grpc_fanout::COMPARED,
            |k, s| {
                grpc_fanout::run_one(args, k, s).map(|r| Run {
                    table: r.table(),
                    json: r.json(),
                    ok: r.errors().is_empty(),
                })
            },
        ),
    };
    std::process::exit(code);
}
