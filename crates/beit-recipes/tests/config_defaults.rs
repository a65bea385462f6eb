//! A recipe file that names a table but sets nothing in it resolves to the command's defaults.
//!
//! Command defaults are serialised to a TOML table, the file is merged over it, and the result
//! is deserialised with each struct's own `Default` filling what is absent. A `None` default of
//! a command is absent from that table, so the struct default must agree with it: were
//! `TrainSection::default()` to carry a `Some`, every `pretrain` recipe with a `[train]` table
//! would silently get it (this once gave pre-training the fine-tuning layer decay).

use beit_recipes::config::parse_config;
use beit_recipes::{
    FinetuneConfig, FinetuneSegConfig, LinearProbeConfig, PretrainConfig, TokenizerConfig,
};
use serde::{de::DeserializeOwned, Serialize};

fn resolves_to_defaults<T: DeserializeOwned + Serialize + Default>(name: &str, tables: &[&str]) {
    let defaults = toml::Table::try_from(T::default()).unwrap();
    for table in tables {
        let text = format!("[{table}]\n");
        let got: T = parse_config(Some((&text, "empty.toml")), &[], &[]).unwrap();
        assert_eq!(
            toml::Table::try_from(got).unwrap(),
            defaults,
            "{name}: an empty [{table}] changed the defaults"
        );
    }
}

#[test]
fn empty_tables_keep_every_command_default() {
    resolves_to_defaults::<FinetuneConfig>("finetune", &["train", "aug", "data", "architecture"]);
    resolves_to_defaults::<FinetuneSegConfig>("finetune-seg", &["train", "data"]);
    resolves_to_defaults::<PretrainConfig>(
        "pretrain",
        &[
            "train",
            "aug",
            "data",
            "masking",
            "architecture",
            "objective",
        ],
    );
    resolves_to_defaults::<LinearProbeConfig>("linear-probe", &["train", "data"]);
    resolves_to_defaults::<TokenizerConfig>(
        "tokenizer",
        &["train", "data", "architecture", "objective"],
    );
}

#[test]
fn pretraining_has_no_layer_decay_and_fine_tuning_has_unilms() {
    let p: PretrainConfig =
        parse_config(Some(("[train]\nepochs = 3\n", "p.toml")), &[], &[]).unwrap();
    assert_eq!(p.train.layer_decay, None);
    let f: FinetuneConfig =
        parse_config(Some(("[train]\nepochs = 3\n", "f.toml")), &[], &[]).unwrap();
    assert_eq!(f.train.layer_decay, Some(0.65));
}
