//! Serving under load and through shutdown.
//!
//! # Overload
//!
//! Every API request (not the probes nor `/metrics`, which must answer while the API is
//! saturated) goes through, outermost first:
//!
//! - **load shedding**: at most `--max-concurrency` API requests are served at once, over
//!   the whole scorer. One more is answered at once with `503 Overloaded` and `Retry-After: 1`,
//!   instead of queueing behind the others. Queueing is what turns a burst into a latency
//!   collapse for everyone.
//! - **a request timeout**: a request not answered within `--request-timeout` is answered
//!   `503 Timeout` with `Retry-After: 1`. Its work is dropped.
//!
//! Store calls on the request path have their own, shorter timeouts (feature reads
//! `--feature-budget`, user states `--user-cache-timeout` and `--user-history-timeout`, event
//! ingestion `--events-record-timeout`). The request timeout is the backstop for whatever has
//! none.
//!
//! # Shutdown
//!
//! On SIGTERM (every pod termination) or SIGINT, [`serve`]:
//!
//! 1. fails readiness at once (`/readyz` answers 503 `shutting down`), and keeps serving
//!    for `--shutdown-delay`, so that the endpoints controller and the load balancers stop
//!    sending new requests before the listener closes;
//! 2. stops accepting connections and lets in-flight requests finish, for at most
//!    `--shutdown-grace`;
//! 3. flushes the user-state invalidations still pending after a Redis outage, within the
//!    rest of the grace period, and says how many could not be flushed.
//!
//! The defaults (5 s + 20 s) fit Kubernetes' default 30 s `terminationGracePeriodSeconds`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::features::http::ApiError;
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use tower::BoxError;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::timeout::TimeoutLayer;

use crate::metrics::HttpMetrics;
use crate::{Scorer, ScorerError};

fn parse_duration(s: &str) -> Result<Duration, String> {
    recsys_core::features::registry::parse_duration_ms(s).map(Duration::from_millis)
}

/// Options of serving: overload protection and shutdown.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Longest time an API request may take; beyond it the answer is 503 `Timeout` with
    /// `Retry-After`.
    #[arg(long, env = "RECSYS_SCORER_REQUEST_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// API requests served at once; one more is shed with 503 `Overloaded` and `Retry-After`
    /// rather than queued. Probes and `/metrics` are not counted.
    #[arg(long, env = "RECSYS_SCORER_MAX_CONCURRENCY", default_value_t = 64)]
    pub max_concurrency: usize,
    /// After SIGTERM or SIGINT: how long readiness fails while requests are still served, so
    /// that load balancers stop sending new ones before the listener closes.
    #[arg(long, env = "RECSYS_SCORER_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// Then: how long in-flight requests (and the flush of pending invalidations) get before
    /// the scorer exits.
    #[arg(long, env = "RECSYS_SCORER_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

impl Default for ServeArgs {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            a: ServeArgs,
        }
        Wrap::parse_from(["defaults"]).a
    }
}

impl ServeArgs {
    /// Checks the options.
    pub fn validate(&self) -> Result<(), ScorerError> {
        if self.max_concurrency == 0 {
            return Err(ScorerError::InvalidOption {
                option: "--max-concurrency",
                reason: "must be at least 1".into(),
            });
        }
        if self.request_timeout.is_zero() {
            return Err(ScorerError::InvalidOption {
                option: "--request-timeout",
                reason: "must be positive".into(),
            });
        }
        Ok(())
    }
}

/// Whether the scorer is shutting down: readiness fails from the moment it is set.
#[derive(Clone, Debug, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    /// Marks the scorer as shutting down.
    pub fn start(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether it is.
    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

fn refusal(error: &str, message: String, retry_after: bool) -> Response {
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(ApiError::new(503, error, message)),
    )
        .into_response();
    if retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// Wraps the API routes in load shedding and the request timeout.
pub fn protect(api: Router, args: &ServeArgs, metrics: HttpMetrics) -> Router {
    let limit = args.max_concurrency;
    let timeout = args.request_timeout;
    api.layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(move |err: BoxError| {
                let metrics = metrics.clone();
                async move {
                    if err.is::<tower::load_shed::error::Overloaded>() {
                        metrics.rejected("overloaded");
                        refusal(
                            "Overloaded",
                            format!("the scorer is serving its limit of {limit} requests at once; retry shortly"),
                            true,
                        )
                    } else if err.is::<tower::timeout::error::Elapsed>() {
                        metrics.rejected("timeout");
                        refusal(
                            "Timeout",
                            format!("not answered within {timeout:?} (--request-timeout)"),
                            true,
                        )
                    } else {
                        (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            Json(ApiError::new(500, "Internal", err.to_string())),
                        )
                            .into_response()
                    }
                }
            }))
            .layer(LoadShedLayer::new())
            .layer(GlobalConcurrencyLimitLayer::new(limit))
            .layer(TimeoutLayer::new(timeout)),
    )
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Serves `scorer` on `listener` until `signal` resolves, then shuts down as the module
/// documentation describes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    scorer: Scorer,
    args: &ServeArgs,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ScorerError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(
        listener,
        scorer
            .router()
            .into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = stopped.await;
    })
    .into_future();
    let mut server = tokio::spawn(server);
    tokio::select! {
        // The server ended on its own: an error.
        ended = &mut server => {
            return match ended {
                Ok(r) => r.map_err(ScorerError::Serve),
                Err(e) => Err(ScorerError::Serve(std::io::Error::other(e))),
            };
        }
        () = signal => {}
    }
    scorer.state().draining().start();
    tracing::info!(
        delay = ?args.shutdown_delay,
        grace = ?args.shutdown_grace,
        "shutting down: not ready from now; serving until the delay ends, then finishing in-flight requests"
    );
    tokio::time::sleep(args.shutdown_delay).await;
    let _ = stop.send(());
    let deadline = tokio::time::Instant::now() + args.shutdown_grace;
    match tokio::time::timeout_at(deadline, &mut server).await {
        Ok(Ok(Ok(()))) => tracing::info!("in-flight requests finished"),
        Ok(Ok(Err(e))) => return Err(ScorerError::Serve(e)),
        Ok(Err(e)) => return Err(ScorerError::Serve(std::io::Error::other(e))),
        Err(_) => {
            tracing::warn!(grace = ?args.shutdown_grace, "requests still running after the grace period; exiting");
            server.abort();
        }
    }
    if let Some(r) = scorer.state().recommend() {
        let pending = r.users.pending_invalidations();
        if pending > 0 {
            let left = match tokio::time::timeout_at(deadline, flush(&r.users)).await {
                Ok(left) => left,
                Err(_) => r.users.pending_invalidations(),
            };
            if left == 0 {
                tracing::info!(
                    flushed = pending,
                    "pending user-state invalidations flushed"
                );
            } else {
                tracing::error!(
                    pending = left,
                    "user-state invalidations could not be flushed before exit (Redis unreachable); \
                     those users' cached states may be served stale until they expire (--user-state-ttl)"
                );
            }
        }
    }
    drop(scorer);
    Ok(())
}

/// Flushes pending invalidations until none is left or a round makes no progress.
async fn flush(users: &recsys_core::serving::users::UserStates) -> usize {
    let mut left = users.pending_invalidations();
    while left > 0 {
        let now = users.flush_pending().await;
        if now >= left {
            return now;
        }
        left = now;
    }
    0
}
