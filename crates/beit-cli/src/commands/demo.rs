//! `beit-cli demo`.

use anyhow::Result;
use clap::Args;

/// Arguments of `beit-cli demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {}

/// Run the command.
pub fn run(_args: DemoArgs) -> Result<()> {
    anyhow::bail!("`demo` is not available in this build yet")
}
