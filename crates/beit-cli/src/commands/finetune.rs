//! `beit-cli finetune`.

use anyhow::Result;
use clap::Args;

/// Arguments of `beit-cli finetune`.
#[derive(Args, Debug)]
pub struct FinetuneArgs {}

/// Run the command.
pub fn run(_args: FinetuneArgs) -> Result<()> {
    anyhow::bail!("`finetune` is not available in this build yet")
}
