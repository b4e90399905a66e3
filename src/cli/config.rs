//! `config check`: a config file validated offline.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use piiwall::config::Config;

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
    /// Validate a config file with the PIIWALL_* environment overrides applied, without connecting anywhere;
    /// print the effective configuration with secrets masked. Exit 2 when it is not valid.
    Check { file: PathBuf },
}

pub(crate) fn exec(command: &ConfigCommand) -> anyhow::Result<ExitCode> {
    let ConfigCommand::Check { file } = command;
    let config = Config::load(Some(file))?;
    let problems = config.check_offline();
    println!("{}", config.describe());
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("piiwall: config: {problem}");
        }
        return Ok(ExitCode::from(2));
    }
    eprintln!("{}: valid", file.display());
    Ok(ExitCode::SUCCESS)
}
