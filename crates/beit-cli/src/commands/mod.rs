//! One module per subcommand: each has its clap `Args` and a `run` function.

pub mod attention;
pub mod bench;
pub mod data;
pub mod demo;
pub mod embed;
pub mod eval;
pub mod eval_seg;
pub mod finetune;
pub mod finetune_seg;
pub mod knn;
pub mod linear_probe;
pub mod mask;
pub mod predict;
pub mod pretrain;
pub mod segment;
pub mod serve;
pub mod tokenizer;
pub mod verify;
