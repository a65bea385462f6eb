//! Print the sample order of every epoch that a single-process loader uses (`sampler::epoch_indices`
//! with shuffling), as JSON: a list of `EPOCHS` lists of `LEN` dataset indices. The PyTorch peer
//! can train in exactly this order (`scripts/peers/train_peer.py --order-file`), which takes the data
//! order out of a comparison (docs/training-parity.md).
//!
//! ```sh
//! cargo run --release -p beit-data --example epoch_orders -- LEN SEED EPOCHS > orders.json
//! ```

use anyhow::{bail, Context, Result};
use beit_data::sampler::epoch_indices;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 3 {
        bail!("usage: epoch_orders LEN SEED EPOCHS");
    }
    let len: usize = args[0].parse().context("LEN")?;
    let seed: u64 = args[1].parse().context("SEED")?;
    let epochs: u64 = args[2].parse().context("EPOCHS")?;
    let orders = (0..epochs)
        .map(|e| epoch_indices(len, true, seed, e, 0, 1))
        .collect::<beit_data::error::Result<Vec<_>>>()?;
    println!("{}", serde_json::to_string(&orders)?);
    Ok(())
}
