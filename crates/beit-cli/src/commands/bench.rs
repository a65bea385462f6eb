//! `beit-cli bench`.

use anyhow::Result;
use clap::Args;

/// Arguments of `beit-cli bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {}

/// Run the command.
pub fn run(_args: BenchArgs) -> Result<()> {
    anyhow::bail!("`bench` is not available in this build yet")
}
