//! `cargo xtask`: project tasks.
//!
//! - `fetch-weights`: download Microsoft's published BEiT checkpoints into the Hugging Face cache
//!   (or report them as cached), and list them.
//! - `convert`: turn unilm/timm `.pth` checkpoints (and the DALL-E tokenizer pickles) into
//!   Hugging Face-layout safetensors.

mod convert;
mod fetch_weights;

use clap::{Parser, Subcommand};

/// Project tasks for beit-rs (run as `cargo xtask <task>`).
#[derive(Parser)]
#[command(name = "cargo xtask", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download published BEiT checkpoints into the Hugging Face cache (or list them).
    FetchWeights(fetch_weights::FetchWeightsArgs),
    /// Convert a unilm/timm `.pth` checkpoint (or DALL-E `encoder.pkl`/`decoder.pkl`) to safetensors.
    Convert(convert::ConvertArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::FetchWeights(args) => fetch_weights::run(args),
        Command::Convert(args) => convert::run(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
