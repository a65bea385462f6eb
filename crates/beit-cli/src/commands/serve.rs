//! `beit-cli serve`: an HTTP endpoint for a checkpoint (classify, embed, segment), with dynamic
//! batching.

use std::time::Duration;

use anyhow::{Context, Result};
use beit_serve::{ServeConfig, Service};
use clap::Args;

use beit_recipes::parse_device;

/// Serve a checkpoint over HTTP: `POST /v1/classify`, `POST /v1/embed`, `POST /v1/segment`
/// (segmentation checkpoints), `GET /healthz`, `GET /readyz`, `GET /metrics` (docs/serving.md).
///
/// Concurrent requests are batched (up to `--max-batch` images, waiting at most
/// `--max-wait-ms`) into one forward pass. SIGTERM or Ctrl-C stops accepting connections,
/// answers what is queued, and exits 0.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model directory (config.json + weights) or hub id, as for `predict`.
    #[arg(long)]
    pub model: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the chosen address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most images in one forward pass (and in one request).
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Longest a request waits for others to join its batch, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Most requests waiting for the model; more are answered 503 with `Retry-After`.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Largest decoded image, in pixels (the decompression-bomb guard).
    #[arg(long, default_value_t = 40_000_000)]
    pub max_pixels: u64,
    /// Per-request time limit, in milliseconds (504 after).
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// Threads of the HTTP runtime (the model runs on its own thread).
    #[arg(long, default_value_t = 2)]
    pub http_threads: usize,
    /// Device: cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Allow downloading a hub checkpoint missing from the cache.
    #[arg(long)]
    pub download: bool,
}

impl ServeArgs {
    fn config(&self) -> ServeConfig {
        let mut cfg = ServeConfig {
            max_batch: self.max_batch,
            max_wait: Duration::from_millis(self.max_wait_ms),
            queue_capacity: self.queue,
            max_body_bytes: self.max_body_bytes,
            request_timeout: Duration::from_millis(self.timeout_ms),
            ..ServeConfig::default()
        };
        cfg.decode.max_pixels = self.max_pixels;
        cfg
    }
}

/// Run the command.
pub fn run(args: ServeArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let service = Service::load(&args.model, args.download, device, args.config())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.http_threads.max(1))
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        // The one line on stdout: scripts and tests read the port from it.
        println!("listening on http://{local}");
        tracing::info!("serving `{}` on http://{local}", args.model);
        service.serve(listener, shutdown_signal()).await?;
        tracing::info!("queue drained; stopped");
        Ok(())
    })
}

/// Completes on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: no new connections, answering queued requests");
}
