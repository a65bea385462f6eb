//! `beit-cli data`: pack an ImageFolder into tar shards, and show what a `--data` source holds.

use std::path::PathBuf;

use anyhow::{Context, Result};
use beit_data::{describe_source, pack_image_folder, parse_size, PackOptions};
use clap::{Args, Subcommand};

/// Subcommands of `beit-cli data`.
#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Pack an ImageFolder (`train/`, `val/` or a single folder) into tar shards with a manifest.
    Pack(PackArgs),
    /// Print what a `--data` source holds (splits, images, classes, shards).
    Inspect(InspectArgs),
}

/// Arguments of `beit-cli data pack`.
#[derive(Args, Debug)]
pub struct PackArgs {
    /// ImageFolder root: `DIR/train/<class>/...` and `DIR/val/<class>/...`, or `DIR/<class>/...`.
    #[arg(long)]
    pub data: PathBuf,
    /// Output root: one folder of shards per split (`OUT/train/shard-000000.tar`, ...).
    #[arg(long)]
    pub out: PathBuf,
    /// Target shard size (`1GB`, `500MB`, `256MiB`, or bytes).
    #[arg(long, default_value = "1GB")]
    pub shard_size: String,
    /// Seed of the order in which samples are written.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Arguments of `beit-cli data inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A `--data` source: a folder, a brace pattern of tar shards, `fashion-mnist`.
    #[arg(long)]
    pub data: String,
}

/// Run a `data` subcommand.
pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Pack(a) => {
            let opts = PackOptions {
                shard_bytes: parse_size(&a.shard_size)?,
                seed: a.seed,
            };
            let splits = pack_image_folder(&a.data, &a.out, &opts)
                .with_context(|| format!("packing {}", a.data.display()))?;
            for (name, m) in splits {
                println!(
                    "{name}: {} images, {} classes, {} shards in {}",
                    m.samples,
                    m.classes.len(),
                    m.shards.len(),
                    a.out.join(&name).display()
                );
            }
        }
        DataCommand::Inspect(a) => println!("{}", describe_source(&a.data)?),
    }
    Ok(())
}
