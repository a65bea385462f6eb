//! `beit-cli verify`: run the parity fixtures on a device and precision and compare them with the
//! outputs `transformers` and timm computed (`beit_recipes::verify`); one JSON line per model.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `beit-cli verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// A folder of fixtures (`fixtures/model`, `fixtures/family` of the repository), or one
    /// fixture; repeat for several.
    #[arg(long, required = true)]
    pub fixtures: Vec<PathBuf>,
    /// `cpu`, `cuda[:N]`, `metal[:N]`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// `f32` (pass: max abs error <= 1e-4) or `bf16` (matrix products in bf16; pass: the top five
    /// logits of every row agree; features: max abs error within 2^-6 of their largest value).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Run the command: print one JSON line per fixture; fail when any fixture does not pass.
pub fn run(args: VerifyArgs) -> Result<()> {
    let dev = beit_recipes::parse_device(&args.device)?;
    let mut records = Vec::new();
    for root in &args.fixtures {
        records.extend(beit_recipes::verify::verify_fixtures(
            root,
            &dev,
            &args.dtype,
        )?);
    }
    for r in &records {
        println!("{}", serde_json::to_string(r)?);
    }
    let failed: Vec<&str> = records
        .iter()
        .filter(|r| !r.pass)
        .map(|r| r.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} fixtures failed in {}: {}",
            failed.len(),
            records.len(),
            args.dtype,
            failed.join(", ")
        );
    }
    Ok(())
}
