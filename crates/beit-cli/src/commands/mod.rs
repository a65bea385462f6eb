//! One module per subcommand: each has its clap `Args` and a `run` function.

pub mod attention;
pub mod bench;
pub mod demo;
pub mod eval;
pub mod eval_seg;
pub mod finetune;
pub mod finetune_seg;
pub mod linear_probe;
pub mod mask;
pub mod predict;
pub mod pretrain;
pub mod segment;
pub mod tokenizer;
pub mod verify;
