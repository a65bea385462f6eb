//! `beit-cli predict`.

use anyhow::Result;
use clap::Args;

/// Arguments of `beit-cli predict`.
#[derive(Args, Debug)]
pub struct PredictArgs {}

/// Run the command.
pub fn run(_args: PredictArgs) -> Result<()> {
    anyhow::bail!("`predict` is not available in this build yet")
}
