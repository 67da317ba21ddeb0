//! The probe server (`/healthz`, `/readyz`) and the metrics server (`/metrics`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Readiness shared between the controllers and the probe server.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    /// Marks the operator ready (CRDs found, controllers starting) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// The router of the probe port.
pub fn probes(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health)
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    if health.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// The router of the metrics port.
pub fn metrics(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(metrics)
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    match metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serves both ports until `shutdown` flips to true. With equal addresses, one listener serves
/// all three paths.
pub async fn serve(
    metrics_addr: SocketAddr,
    probe_addr: SocketAddr,
    m: Arc<Metrics>,
    health: Health,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if metrics_addr == probe_addr {
        let app = probes(health).merge(metrics(m));
        let listener = tokio::net::TcpListener::bind(metrics_addr).await?;
        return axum::serve(listener, app)
            .with_graceful_shutdown(stop(shutdown))
            .await;
    }
    let probe_listener = tokio::net::TcpListener::bind(probe_addr).await?;
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr).await?;
    let a =
        axum::serve(probe_listener, probes(health)).with_graceful_shutdown(stop(shutdown.clone()));
    let b = axum::serve(metrics_listener, metrics(m)).with_graceful_shutdown(stop(shutdown));
    let (ra, rb) = tokio::join!(a, b);
    ra.and(rb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use tower::ServiceExt;

    #[tokio::test]
    async fn readyz_follows_health() {
        let health = Health::default();
        let app = probes(health.clone());
        let get = |path: &str| Request::get(path).body(Body::empty()).expect("request");
        let r = app.clone().oneshot(get("/readyz")).await.expect("call");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        health.set_ready(true);
        let r = app.clone().oneshot(get("/readyz")).await.expect("call");
        assert_eq!(r.status(), StatusCode::OK);
        let r = app.oneshot(get("/healthz")).await.expect("call");
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_are_exposed() {
        let m = Arc::new(Metrics::default());
        m.leader.set(1);
        let r = metrics(m)
            .oneshot(
                Request::get("/metrics")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("call");
        assert_eq!(r.status(), StatusCode::OK);
        let body = axum::body::to_bytes(r.into_body(), 1 << 20)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("recsys_operator_leader 1"), "{text}");
    }
}
