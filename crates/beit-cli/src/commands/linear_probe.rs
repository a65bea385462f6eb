//! `beit-cli linear-probe`.

use anyhow::Result;
use clap::Args;

/// Arguments of `beit-cli linear-probe`.
#[derive(Args, Debug)]
pub struct LinearProbeArgs {}

/// Run the command.
pub fn run(_args: LinearProbeArgs) -> Result<()> {
    anyhow::bail!("`linear-probe` is not available in this build yet")
}
