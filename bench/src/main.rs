//! `bench`: the gateway's load generator. Each scenario is a subcommand that
//! prints a human table and then one JSON line with the same figures.
//!
//! `bench idle --gateway target/release/gateway --connections 10000 --transport ws`

mod cli;
mod gateway;
mod http;
mod idle;
mod procfs;
mod report;
mod sys;

use clap::Parser;
use serde_json::json;

use crate::cli::{Cli, Scenario};

fn main() {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Idle(args) => match idle::run(&args) {
            Ok(report) => {
                print!("{}", report.table());
                println!("{}", report.json());
                if !report.errors().is_empty() {
                    std::process::exit(1);
                }
            }
            Err(e) => {
                eprintln!("bench: {e}");
                println!(
                    "{}",
                    json!({"scenario": "idle", "transport": args.transport.name(), "ok": false, "errors": [e]})
                );
                std::process::exit(2);
            }
        },
    }
}
