//! `beit-cli pretrain`.

use anyhow::Result;
use clap::Args;

/// Arguments of `beit-cli pretrain`.
#[derive(Args, Debug)]
pub struct PretrainArgs {}

/// Run the command.
pub fn run(_args: PretrainArgs) -> Result<()> {
    anyhow::bail!("`pretrain` is not available in this build yet")
}
