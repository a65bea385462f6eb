//! Serving a loaded [`Service`] on a listener until shutdown, then draining its queue.

use std::future::Future;

use tokio::net::TcpListener;

use crate::error::{Result, ServeError};
use crate::state::Service;

impl Service {
    /// Serve on `listener` until `shutdown` completes; then stop accepting, answer every request
    /// already received (the queue drains), and stop the batching thread.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let Service { state, worker } = self;
        let app = crate::routes::router(state);
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| ServeError::Io {
                what: format!("serving on {addr}"),
                source,
            })?;
        // Every handler (and its copy of the queue's sender) is gone: the thread drains and ends.
        tokio::task::spawn_blocking(move || worker.join())
            .await
            .map_err(|e| ServeError::Worker(e.to_string()))?
            .map_err(|_| ServeError::Worker("the batching thread panicked".into()))
    }
}
