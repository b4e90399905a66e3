//! `api digest`, and `--server`: operator commands sent to a running instance's subject-rights API.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;

use super::read_stdin;

#[derive(Subcommand)]
pub(crate) enum ApiCommand {
    /// Print the SHA-256 digest of a bearer token read from standard input: what api.principals.token_sha256 holds.
    Digest,
}

pub(crate) fn exec(command: ApiCommand) -> anyhow::Result<ExitCode> {
    match command {
        ApiCommand::Digest => digest(),
    }
}

fn digest() -> anyhow::Result<ExitCode> {
    let token = read_stdin()?;
    let token = token.trim();
    if token.is_empty() {
        bail!("api digest reads the bearer token from standard input, and it was empty");
    }
    println!("{}", piiwall::api::token_digest_hex(token));
    Ok(ExitCode::SUCCESS)
}

/// Where an operator command acts: the local key store, or a running instance's API.
#[derive(clap::Args)]
pub(crate) struct Remote {
    /// Send the request to a running instance (its http.listen URL) instead of acting on the local key store.
    #[arg(long, requires = "token_file")]
    pub(crate) server: Option<String>,
    /// The file holding the bearer token for --server.
    #[arg(long, requires = "server")]
    pub(crate) token_file: Option<PathBuf>,
    /// Why the call is made: recorded in the audit event; with --server, required and checked against the caller's
    /// role.
    #[arg(long)]
    pub(crate) purpose: Option<String>,
}

impl Remote {
    /// The API client and the stated purpose, when --server is given.
    pub(crate) fn client(&self) -> anyhow::Result<Option<(piiwall::api::client::Client, String)>> {
        let (Some(server), Some(token_file)) = (&self.server, &self.token_file) else {
            return Ok(None);
        };
        let purpose = self
            .purpose
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--server needs --purpose: say why the call is made"))?;
        Ok(Some((piiwall::api::client::Client::new(server, token_file)?, purpose)))
    }
}

/// Runs one API call on a fresh runtime.
pub(crate) fn remote_call(
    client: &piiwall::api::client::Client,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(runtime.block_on(client.call(path, &body))?)
}
