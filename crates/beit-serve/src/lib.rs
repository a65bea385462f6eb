//! An HTTP server for BEiT checkpoints (`beit-cli serve`): classification, embeddings and semantic
//! segmentation behind dynamic batching, with every queue and input bounded.
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/classify?top_k=K` | top-k classes per image, as `beit-cli predict --json` |
//! | `POST /v1/embed?pool=mean\|cls&layer=N` | pooled block features (JSON, or safetensors on `Accept`) |
//! | `POST /v1/segment` | a class per pixel per image, as `beit-cli segment --json` (or a label PNG on `Accept`) |
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 once the model is loaded and warmed up, 503 before |
//! | `GET /metrics` | Prometheus text: requests, latency, batch sizes, queue depth |
//!
//! A request's images are decoded and prepared on the blocking pool ([`input`]), so a bad image
//! fails its own request only; prepared pixels wait in a bounded queue ([`batcher`]) from which
//! one dedicated thread runs batches of up to `max_batch` images through the model ([`model`]).
//! `docs/serving.md` describes the limits and how to run it.

pub mod api;
pub mod batcher;
pub mod config;
pub mod error;
pub mod infer;
pub mod input;
pub mod metrics;
pub mod model;
pub mod routes;
pub mod segment;
mod serve;
pub mod state;

pub use config::ServeConfig;
pub use error::{Result, ServeError};
pub use state::{AppState, Service};
