//! `beit-cli eval`.

use anyhow::Result;
use clap::Args;

/// Arguments of `beit-cli eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {}

/// Run the command.
pub fn run(_args: EvalArgs) -> Result<()> {
    anyhow::bail!("`eval` is not available in this build yet")
}
