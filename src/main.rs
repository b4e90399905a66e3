//! The `piiwall` command: parses the arguments and hands them to [`cli::run`].

mod cli;

use std::io;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // The demo prints its own story; the pipeline's routine log lines would only crowd it.
    let default_level = if matches!(cli.command, cli::Command::Demo) {
        "piiwall=warn"
    } else {
        "piiwall=info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(io::stderr)
        .init();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("piiwall: {e:#}");
            ExitCode::from(2)
        }
    }
}
