//! `mint-sim`: runs simulated node agents against a daemon, or simulated Redfish BMCs, until
//! it is stopped (Ctrl-C or SIGTERM). See the library's documentation for what they do.

use clap::{Parser, Subcommand};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mint-sim",
    version,
    about = "Simulated mint agents and Redfish BMCs for load tests and benchmarks."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll and register COUNT simulated agents with a daemon, heartbeat, serve deploys.
    Agents {
        #[arg(long)]
        count: usize,
        /// The daemon's URL.
        #[arg(long, env = "MINT_SERVER")]
        engine: String,
        /// A file holding an admin token, to enroll the nodes.
        #[arg(long)]
        token_file: std::path::PathBuf,
        /// The daemon's certificate pin, for an https daemon.
        #[arg(long, env = "MINT_PIN")]
        pin: Option<String>,
        #[arg(long, default_value_t = 2000)]
        deploy_ms: u64,
        #[arg(long, default_value_t = 0.0)]
        failure_rate: f64,
        #[arg(long, default_value_t = 5000)]
        heartbeat_ms: u64,
        #[arg(long, default_value = "sim")]
        prefix: String,
    },
    /// Serve COUNT simulated Redfish BMCs and print each system's URL.
    Bmcs {
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 10_000)]
        power_on_ms: u64,
        #[arg(long, default_value_t = 0.0)]
        failure_rate: f64,
    },
}

fn rate(r: f64) -> anyhow::Result<f64> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&r),
        "--failure-rate {r}: give a share from 0 to 1"
    );
    Ok(r)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let stop = || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            Ok(())
        })
    };
    match cli.command {
        Command::Agents {
            count,
            engine,
            token_file,
            pin,
            deploy_ms,
            failure_rate,
            heartbeat_ms,
            prefix,
        } => {
            let token = std::fs::read_to_string(&token_file)
                .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", token_file.display()))?;
            let trust = mint_tls::Trust::from_flags(None, pin.as_deref(), &engine)?;
            let engine = mint_sim::agents::Engine {
                url: engine,
                admin_token: token.trim().to_string(),
                trust,
            };
            let options = mint_sim::agents::Options {
                deploy: Duration::from_millis(deploy_ms),
                failure_rate: rate(failure_rate)?,
                heartbeat: Duration::from_millis(heartbeat_ms.max(10)),
                prefix,
                ..Default::default()
            };
            let agents = mint_sim::agents::Agents::start(&engine, count, options)?;
            eprintln!(
                "mint-sim: {count} agents registered ({} to {})",
                agents.names[0],
                agents.names[count.saturating_sub(1)]
            );
            stop()?;
        }
        Command::Bmcs {
            count,
            power_on_ms,
            failure_rate,
        } => {
            let options = mint_sim::bmc::Options {
                power_on: Duration::from_millis(power_on_ms),
                failure_rate: rate(failure_rate)?,
                seed: 1,
            };
            let bmcs = mint_sim::bmc::Bmcs::start(count, options)?;
            for u in &bmcs.urls {
                println!("{u}");
            }
            stop()?;
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mint-sim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
