//! The `mint` command line: plugin tooling and a demonstration of the engine.
//!
//! Exit codes: 0 success; 1 a plugin call failed (trap, timeout, refusal, invalid answer);
//! 2 bad usage or input; 3 a plugin could not be loaded.

mod demo;
mod plugin_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "mint", version, about = "Mint image instances up front, deploy them on nodes, scale out from the pool.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with plugins: run one call, inspect, list the bundled ones.
    #[command(subcommand)]
    Plugin(plugin_cmd::PluginCommand),
    /// Run every bundled plugin through the engine on example inputs and show the results.
    Demo(demo::DemoArgs),
}

/// A failure with the exit code it maps to.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self { code: 2, error: error.into() }
    }
    pub fn load(error: impl Into<anyhow::Error>) -> Self {
        Self { code: 3, error: error.into() }
    }
    pub fn call(error: impl Into<anyhow::Error>) -> Self {
        Self { code: 1, error: error.into() }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MINT_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Plugin(cmd) => plugin_cmd::run(cmd).await,
            Command::Demo(args) => demo::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
