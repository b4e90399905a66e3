//! `run`, `demo`, `samples` and `quarantine replay`: the verbs that run the pipeline.

use std::io;
use std::process::ExitCode;

use clap::Subcommand;
use piiwall::config::Config;

#[derive(Subcommand)]
pub(crate) enum QuarantineCommand {
    /// Re-run quarantined records through the firewall once their cause is fixed; exit 1 if some still fail.
    Replay,
}

/// The whole pipeline on an in-process mock cluster, printing what it does.
pub(crate) fn demo() -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(piiwall::demo::run(&mut io::stdout().lock()))?;
    Ok(ExitCode::SUCCESS)
}

/// Registers the example schemas and sends their sample events.
pub(crate) fn samples(brokers: &str, registry: &str) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let sent = runtime.block_on(piiwall::demo::produce_samples(brokers, registry))?;
    println!("registered the example schemas and sent {sent} sample events");
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn exec(config: Config, command: QuarantineCommand) -> anyhow::Result<ExitCode> {
    match command {
        QuarantineCommand::Replay => replay(config),
    }
}

fn replay(config: Config) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let summary = runtime.block_on(piiwall::stream::replay(config))?;
    println!(
        "replayed {} record(s); {} still failing; {} gone for good",
        summary.replayed,
        summary.still_failing.len(),
        summary.dropped.len()
    );
    for reason in &summary.still_failing {
        println!("  {reason}");
    }
    for reason in &summary.dropped {
        println!("  gone: {reason}");
    }
    Ok(if summary.still_failing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Runs the pipeline on a tokio runtime. The first SIGTERM or SIGINT drains and commits; a second exits at once.
pub(crate) fn run(config: Config) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(async {
        let shutdown = piiwall::stream::Shutdown::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!("signal received: draining (a second signal exits at once)");
            trigger.trigger();
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            eprintln!("piiwall: second signal: exiting without draining");
            std::process::exit(130);
        });
        let summary = piiwall::server::run(config, shutdown).await?;
        eprintln!(
            "piiwall: stopped: {} records sanitized, {} quarantined",
            summary.sanitized, summary.quarantined
        );
        Ok(ExitCode::SUCCESS)
    });
    // `run` has stopped: a task or blocking call still waiting on brokers that are gone must not keep the process.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
