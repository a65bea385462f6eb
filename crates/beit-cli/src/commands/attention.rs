//! `beit-cli attention`.

use anyhow::Result;
use clap::Args;

/// Arguments of `beit-cli attention`.
#[derive(Args, Debug)]
pub struct AttentionArgs {}

/// Run the command.
pub fn run(_args: AttentionArgs) -> Result<()> {
    anyhow::bail!("`attention` is not available in this build yet")
}
