//! The recommendation API's routes (documented in `docs/http-api.md` and `/openapi.json`):
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /v1/recommendations?user_id=&k=&category=&exclude_seen=&model=` | [`Answer`]: top-k products |
//! | `POST /v1/scores` `{user_id, product_ids, model?}` | [`Answer`]: each candidate's `user_product_affinity` and score, in request order |
//! | `POST /v1/events` `{events: [...]}` | [`EventsAccepted`]: interactions recorded, the users' cached state invalidated, outcomes attributed to impressions |
//! | `GET /v1/experiments?model=` | [`super::experiments::ExperimentsAnswer`]: the A/B readout of each segment of a rollout |
//!
//! Unknown query parameters and body fields are refused (400 naming them), so a typo is an
//! error rather than a silently ignored option.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::features::http::ApiError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use recsys_core::events::{EventRow, parse_json_event};
use recsys_core::serving::users::UserStates;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::service::{Answer, RecommendRequest, Recommender};
use crate::auth::Caller;
use crate::features::routes::{HttpError, json_rejection};

/// Longest wait for the experiment store while attributing an ingested batch.
pub const ATTRIBUTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Largest number of events per `POST /v1/events`.
pub const MAX_EVENTS: usize = 1000;

/// State of the recommendation routes.
#[derive(Clone, Debug)]
pub struct RecommendState {
    /// The service.
    pub recommender: Arc<Recommender>,
    /// User state, for ingestion.
    pub users: Arc<UserStates>,
}

/// The OpenAPI description of these routes.
#[derive(utoipa::OpenApi)]
#[openapi(paths(recommendations, scores, events, super::experiments::experiments))]
pub struct RecommendApi;

/// The recommendation routes.
pub fn router(state: RecommendState) -> Router {
    Router::new()
        .route("/v1/recommendations", get(recommendations))
        .route("/v1/scores", post(scores))
        .route("/v1/events", post(events))
        .route("/v1/experiments", get(super::experiments::experiments))
        .with_state(state)
}

const RECOMMEND_PARAMS: [&str; 5] = ["user_id", "k", "category", "exclude_seen", "model"];

/// Parses the query of `GET /v1/recommendations`.
pub fn parse_recommend_query(
    query: Option<&str>,
    default_k: usize,
) -> Result<RecommendRequest, ApiError> {
    let bad = |m: String| ApiError::bad_request("InvalidQuery", m);
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if !RECOMMEND_PARAMS.contains(&k.as_ref()) {
            return Err(bad(format!(
                "unknown parameter {k:?}; the parameters are {}",
                RECOMMEND_PARAMS.join(", ")
            )));
        }
        if params.insert(k.to_string(), v.into_owned()).is_some() {
            return Err(bad(format!("parameter {k:?} is given twice")));
        }
    }
    let user_id = params
        .remove("user_id")
        .ok_or_else(|| bad("user_id: required".into()))?;
    let k = match params.remove("k") {
        None => default_k,
        Some(k) => k
            .parse()
            .map_err(|_| bad(format!("k: {k:?} is not a whole number")))?,
    };
    let exclude_seen = match params.remove("exclude_seen").as_deref() {
        None | Some("true") | Some("1") => true,
        Some("false") | Some("0") => false,
        Some(other) => return Err(bad(format!("exclude_seen: {other:?} is not true or false"))),
    };
    Ok(RecommendRequest {
        user_id,
        k,
        category: params.remove("category"),
        exclude_seen,
        model: params.remove("model"),
    })
}

/// The top-k products for a user, with the version, variant and path that produced them.
#[utoipa::path(get, path = "/v1/recommendations", tag = "recommendations",
    params(("user_id" = String, Query), ("k" = Option<usize>, Query, description = "1 to --max-k (200), default 20"),
        ("category" = Option<String>, Query, description = "only products of this category"),
        ("exclude_seen" = Option<bool>, Query, description = "leave out the user's history (default true)"),
        ("model" = Option<String>, Query, description = "the model (default the scorer's)")),
    responses((status = 200, body = Answer), (status = 400, body = ApiError),
        (status = 404, body = ApiError), (status = 503, body = ApiError)))]
#[tracing::instrument(level = "debug", skip_all)]
async fn recommendations(
    State(s): State<RecommendState>,
    RawQuery(query): RawQuery,
) -> Result<Json<Answer>, HttpError> {
    let req = parse_recommend_query(query.as_deref(), s.recommender.options().default_k)?;
    Ok(Json(s.recommender.recommend(req).await?))
}

/// Body of `POST /v1/scores`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScoresRequest {
    /// The user.
    pub user_id: String,
    /// Candidate products, scored in this order.
    pub product_ids: Vec<String>,
    /// The model (default: the scorer's).
    #[serde(default)]
    pub model: Option<String>,
}

/// The user's affinity to each candidate and its ranking score, in request order.
#[utoipa::path(post, path = "/v1/scores", tag = "recommendations",
    request_body = ScoresRequest,
    responses((status = 200, body = Answer), (status = 400, body = ApiError),
        (status = 404, body = ApiError), (status = 503, body = ApiError)))]
#[tracing::instrument(level = "debug", skip_all)]
async fn scores(
    State(s): State<RecommendState>,
    body: Result<Json<ScoresRequest>, JsonRejection>,
) -> Result<Json<Answer>, HttpError> {
    let Json(req) = body.map_err(json_rejection)?;
    Ok(Json(
        s.recommender
            .score(req.user_id, req.product_ids, req.model)
            .await?,
    ))
}

/// Body of `POST /v1/events`.
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsRequest {
    /// Events, each as a line of the JSON-lines events format: `user_id`, `product_id`,
    /// `event_type`, `timestamp` (ms or RFC 3339), `event_id`, optional `value` and
    /// `category`. At least one of `timestamp` and `event_id` is required: without an id,
    /// the id is derived from the content (time included), so a retry is the same event;
    /// without a time, the event is dated on arrival. Ids are unique: the same id twice in a
    /// batch must be the same event.
    pub events: Vec<serde_json::Value>,
}

/// Answer of `POST /v1/events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventsAccepted {
    /// Events new to the store (a repeated event id is not counted twice).
    pub new: u64,
    /// Distinct users.
    pub users: usize,
    /// Users whose cached state was invalidated.
    pub invalidated: usize,
}

/// Parses the events of a `POST /v1/events`, naming the bad one.
pub fn parse_events(values: &[serde_json::Value], now_ms: i64) -> Result<Vec<EventRow>, ApiError> {
    let bad = |m: String| ApiError::bad_request("InvalidRequest", m);
    if values.is_empty() || values.len() > MAX_EVENTS {
        return Err(bad(format!(
            "events: {} events; give 1–{MAX_EVENTS}",
            values.len()
        )));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let (mut event, id, category) =
                parse_json_event(&v.to_string()).map_err(|e| bad(format!("events[{i}]: {e}")))?;
            // The id never depends on this server's clock: an event without an id is named by
            // its content, time included, so a retry is the same event.
            let ts = match (event.ts_ms, &id) {
                (Some(ts), _) => ts,
                (None, Some(_)) => *event.ts_ms.insert(now_ms),
                (None, None) => {
                    return Err(bad(format!(
                        "events[{i}]: give a timestamp or an event_id: without either, a retry \
                         could not be told from a new event"
                    )));
                }
            };
            let event_id = id.unwrap_or_else(|| {
                let mut h = Sha256::new();
                for part in [
                    event.user.as_str(),
                    event.item.as_str(),
                    event.kind.as_str(),
                    &ts.to_string(),
                    &event.value.map(|v| v.to_string()).unwrap_or_default(),
                ] {
                    h.update(part.as_bytes());
                    h.update([0]);
                }
                let hex: String = h.finalize()[..16]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!("api-{hex}")
            });
            Ok(EventRow {
                event_id,
                event,
                category,
            })
        })
        .collect()
}

/// Records interactions and invalidates the users' cached state.
#[utoipa::path(post, path = "/v1/events", tag = "recommendations",
    request_body = EventsRequest,
    responses((status = 202, body = EventsAccepted), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 429, body = ApiError), (status = 503, body = ApiError)))]
#[tracing::instrument(level = "debug", skip_all)]
async fn events(
    State(s): State<RecommendState>,
    caller: Option<Extension<Caller>>,
    body: Result<Json<EventsRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<EventsAccepted>), Response> {
    let Json(req) = body.map_err(|r| json_rejection(r).into_response())?;
    let rows = parse_events(&req.events, recsys_core::features::online::now_ms())
        .map_err(|e| HttpError(e).into_response())?;
    if let Some(Extension(caller)) = &caller {
        caller
            .take(rows.len())
            .map_err(IntoResponse::into_response)?;
    }
    let report = s.users.record(&rows).await.map_err(|e| {
        let status = if e.is_outage() { 503 } else { 400 };
        HttpError(ApiError::new(status, e.kind(), e.to_string())).into_response()
    })?;
    // Stored: attribution to the A/B readout's impressions is best effort, bounded in time.
    if let Some(x) = s.recommender.experiments()
        && tokio::time::timeout(ATTRIBUTION_TIMEOUT, x.attribute(&rows))
            .await
            .is_err()
    {
        warn!("attribution of stored events timed out; the A/B readout misses them");
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(EventsAccepted {
            new: report.new,
            users: report.users,
            invalidated: report.invalidated,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recommendation_queries_parse_and_refuse_what_is_wrong() {
        let r = parse_recommend_query(
            Some("user_id=u%201&k=5&category=shoes&exclude_seen=false"),
            20,
        )
        .expect("parse");
        assert_eq!(
            (
                r.user_id.as_str(),
                r.k,
                r.category.as_deref(),
                r.exclude_seen
            ),
            ("u 1", 5, Some("shoes"), false)
        );
        let d = parse_recommend_query(Some("user_id=u"), 20).expect("defaults");
        assert_eq!((d.k, d.exclude_seen, d.model), (20, true, None));
        for (q, needle) in [
            (None, "user_id: required"),
            (Some("user_id=u&kk=3"), "unknown parameter \"kk\""),
            (Some("user_id=u&k=ten"), "k: \"ten\""),
            (Some("user_id=u&k=1&k=2"), "given twice"),
            (Some("user_id=u&exclude_seen=maybe"), "exclude_seen"),
        ] {
            let e = parse_recommend_query(q, 20).expect_err("refused");
            assert_eq!(e.status(), 400);
            assert!(e.message.contains(needle), "{q:?}: {}", e.message);
        }
    }

    #[test]
    fn events_parse_with_derived_ids_and_name_the_bad_one() {
        let rows = parse_events(
            &[
                serde_json::json!({"user_id": "u", "product_id": "p", "event_type": "view", "timestamp": 7}),
                serde_json::json!({"user_id": "u", "product_id": 7, "event_type": "purchase", "event_id": "e1"}),
            ],
            1000,
        )
        .expect("parse");
        assert_eq!(
            rows[1].event.ts_ms,
            Some(1000),
            "an event with an id is dated on arrival"
        );
        assert!(rows[0].event_id.starts_with("api-"));
        assert_eq!(rows[1].event_id, "e1");
        // A retry a second later has the same id: nothing in it comes from the clock.
        let again = parse_events(
            &[serde_json::json!({"user_id": "u", "product_id": "p", "event_type": "view", "timestamp": 7})],
            2000,
        )
        .expect("parse");
        assert_eq!(
            again[0].event_id, rows[0].event_id,
            "a retry has the same id"
        );
        let e = parse_events(
            &[serde_json::json!({"user_id": "u", "product_id": "p", "event_type": "view"})],
            1000,
        )
        .expect_err("neither a time nor an id");
        assert!(
            e.message
                .starts_with("events[0]: give a timestamp or an event_id"),
            "{}",
            e.message
        );
        let e = parse_events(
            &[
                serde_json::json!({"user_id": "u", "product_id": "p", "event_type": "view", "timestamp": 1}),
                serde_json::json!({"user_id": "u", "product_id": "p", "event_type": "teleport", "timestamp": 1}),
            ],
            0,
        )
        .expect_err("bad type");
        assert!(e.message.starts_with("events[1]:"), "{}", e.message);
        assert!(parse_events(&[], 0).is_err());
    }
}
