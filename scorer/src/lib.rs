//! `recsys-scorer`: the HTTP service users call for recommendations and scores.
//!
//! This version serves the probes and metrics only: `/readyz` answers 503 until a model is
//! loaded, and model loading arrives with the scoring work. The router is built by [`router`]
//! so tests drive it in-process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use clap::Parser;
use recsys_core::telemetry::TelemetryArgs;

/// Options of `recsys-scorer`.
#[derive(Parser, Debug, Clone)]
#[command(name = "recsys-scorer", version, about = "recsys scoring service")]
pub struct Args {
    /// Logging.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Address the HTTP API and probes listen on.
    #[arg(
        long,
        env = "RECSYS_SCORER_BIND_ADDRESS",
        default_value = "0.0.0.0:8080"
    )]
    pub bind_address: SocketAddr,
}

/// State shared by the handlers.
#[derive(Clone, Default)]
pub struct AppState {
    model_loaded: Arc<AtomicBool>,
}

impl AppState {
    /// Whether a model is loaded and the service can answer.
    pub fn is_ready(&self) -> bool {
        self.model_loaded.load(Ordering::SeqCst)
    }
}

/// The service's router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.is_ready() {
        (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready" })),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": "NoModel", "message": "no model is loaded" })),
        )
    }
}

/// Serves until Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.bind_address).await?;
    tracing::info!(address = %args.bind_address, "serving");
    axum::serve(listener, router(AppState::default()))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use clap::CommandFactory;
    use http::Request;
    use tower::ServiceExt;

    #[test]
    fn cli_is_well_formed() {
        Args::command().debug_assert();
    }

    #[tokio::test]
    async fn not_ready_without_a_model() {
        let app = router(AppState::default());
        let r = app
            .clone()
            .oneshot(Request::get("/readyz").body(Body::empty()).expect("req"))
            .await
            .expect("call");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(r.into_body(), 4096)
            .await
            .expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"], "NoModel");
        let r = app
            .oneshot(Request::get("/healthz").body(Body::empty()).expect("req"))
            .await
            .expect("call");
        assert_eq!(r.status(), StatusCode::OK);
    }
}
