//! The feature API's routes (documented with examples in `docs/http-api.md`):
//!
//! | route | answer |
//! | --- | --- |
//! | `POST /v1/features/batch` | `BatchRequest` → `BatchResponse`: entities × features |
//! | `GET /v1/features/users/{id}?features=a,b@2` | `BatchResponse` of one row; without `features`, every online user feature |
//! | `GET /v1/features/products/{id}?features=…` | likewise for a product |
//! | `GET /v1/features?entity=&tag=&owner=&q=&include_deprecated=&include_retired=` | `FeatureList` (discovery) |
//! | `GET /v1/features/{name}` | `FeatureDetail`: versions, lifecycle, last materialization |
//!
//! Errors are `{"error": kind, "message": …}`: 400 for a bad request (naming the field: `features[2]`,
//! `entities[0]`, a query parameter), 404 for an unknown feature, 413 for a request over the
//! limits, 415 for a body that is not JSON, 503 only when nothing at all can be served (no
//! catalog loaded yet, or neither the online store nor the fallback had any value).

use std::sync::Arc;

use crate::features::http::{
    ApiError, BatchRequest, BatchResponse, FeatureDetail, FeatureList, parse_discovery_query,
    parse_features_query, path_entity,
};
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use recsys_core::features::EntityKind;

use super::FeatureService;

/// An [`ApiError`] as an HTTP answer.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::debug!(error = %self.0.error, message = %self.0.message, "request not served");
        }
        (status, Json(self.0)).into_response()
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<crate::recommend::service::RecommendError> for HttpError {
    fn from(e: crate::recommend::service::RecommendError) -> Self {
        Self(e.into())
    }
}

/// The OpenAPI description of these routes.
#[derive(utoipa::OpenApi)]
#[openapi(paths(batch, user, product, list, describe))]
pub struct FeatureApi;

/// The feature routes over `service`.
pub fn router(service: Arc<FeatureService>) -> Router {
    Router::new()
        .route("/v1/features", get(list))
        .route("/v1/features/batch", post(batch))
        .route("/v1/features/users/{id}", get(user))
        .route("/v1/features/products/{id}", get(product))
        .route("/v1/features/{name}", get(describe))
        .with_state(service)
}

/// A body that is not a `BatchRequest`: 415 without a JSON content type, 413 over the size
/// limit, otherwise 400 (axum's 422 for well-formed JSON of the wrong shape included, like
/// every other invalid request), the message naming the field (`entities[0].kind`).
pub(crate) fn json_rejection(r: JsonRejection) -> HttpError {
    let (status, kind) = match r.status() {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (r.status(), "UnsupportedMediaType"),
        StatusCode::PAYLOAD_TOO_LARGE => (r.status(), "RequestTooLarge"),
        _ => (StatusCode::BAD_REQUEST, "InvalidRequest"),
    };
    HttpError(ApiError::new(
        status.as_u16(),
        kind,
        format!("request body: {}", r.body_text()),
    ))
}

fn query_rejection(r: QueryRejection) -> HttpError {
    HttpError(ApiError::bad_request(
        "InvalidQuery",
        format!("query string: {}", r.body_text()),
    ))
}

fn path_rejection(r: PathRejection) -> HttpError {
    HttpError(ApiError::bad_request(
        "InvalidPath",
        format!("path: {}", r.body_text()),
    ))
}

/// Features of many entities in one read.
#[utoipa::path(post, path = "/v1/features/batch", tag = "features",
    request_body = BatchRequest,
    responses((status = 200, body = BatchResponse), (status = 400, body = ApiError),
        (status = 413, body = ApiError), (status = 503, body = ApiError)))]
#[tracing::instrument(level = "debug", skip_all, fields(entities = tracing::field::Empty))]
async fn batch(
    State(service): State<Arc<FeatureService>>,
    body: Result<Json<BatchRequest>, JsonRejection>,
) -> Result<Json<BatchResponse>, HttpError> {
    let Json(req) = body.map_err(json_rejection)?;
    tracing::Span::current().record("entities", req.entities.len());
    Ok(Json(
        service
            .read(req.entities, Some(&req.features), None)
            .await?,
    ))
}

async fn one(
    kind: EntityKind,
    service: &FeatureService,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<BatchResponse>, HttpError> {
    let Path(id) = id.map_err(path_rejection)?;
    let Query(pairs) = query.map_err(query_rejection)?;
    let specs = parse_features_query(&pairs)?;
    let entity = path_entity(kind, &id);
    Ok(Json(
        service
            .read(vec![entity], specs.as_deref(), Some(kind))
            .await?,
    ))
}

/// Features of one user; without `features`, every online user feature.
#[utoipa::path(get, path = "/v1/features/users/{id}", tag = "features",
    params(("id" = String, Path, description = "user id"),
        ("features" = Option<String>, Query, description = "comma-separated `name` or `name@vN`")),
    responses((status = 200, body = BatchResponse), (status = 400, body = ApiError),
        (status = 404, body = ApiError), (status = 503, body = ApiError)))]
#[tracing::instrument(level = "debug", skip_all)]
async fn user(
    State(service): State<Arc<FeatureService>>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<BatchResponse>, HttpError> {
    one(EntityKind::User, &service, id, query).await
}

/// Features of one product; without `features`, every online product feature.
#[utoipa::path(get, path = "/v1/features/products/{id}", tag = "features",
    params(("id" = String, Path, description = "product id"),
        ("features" = Option<String>, Query, description = "comma-separated `name` or `name@vN`")),
    responses((status = 200, body = BatchResponse), (status = 400, body = ApiError),
        (status = 404, body = ApiError), (status = 503, body = ApiError)))]
#[tracing::instrument(level = "debug", skip_all)]
async fn product(
    State(service): State<Arc<FeatureService>>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<BatchResponse>, HttpError> {
    one(EntityKind::Product, &service, id, query).await
}

/// Discovery: the registered features matching every filter given.
#[utoipa::path(get, path = "/v1/features", tag = "features",
    params(("entity" = Option<String>, Query, description = "user, product or user_product"),
        ("tag" = Option<String>, Query), ("owner" = Option<String>, Query),
        ("q" = Option<String>, Query, description = "text in the name, description or tags"),
        ("include_deprecated" = Option<bool>, Query), ("include_retired" = Option<bool>, Query)),
    responses((status = 200, body = FeatureList), (status = 400, body = ApiError)))]
#[tracing::instrument(level = "debug", skip_all)]
async fn list(
    State(service): State<Arc<FeatureService>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<FeatureList>, HttpError> {
    let Query(pairs) = query.map_err(query_rejection)?;
    let query = parse_discovery_query(&pairs)?;
    Ok(Json(service.search(&query).await?))
}

/// One feature: its versions, lifecycle and last materialization per major version.
#[utoipa::path(get, path = "/v1/features/{name}", tag = "features",
    params(("name" = String, Path, description = "feature name")),
    responses((status = 200, body = FeatureDetail), (status = 404, body = ApiError)))]
#[tracing::instrument(level = "debug", skip_all, fields(feature = tracing::field::Empty))]
async fn describe(
    State(service): State<Arc<FeatureService>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<FeatureDetail>, HttpError> {
    let Path(name) = name.map_err(path_rejection)?;
    tracing::Span::current().record("feature", name.as_str());
    Ok(Json(service.describe(&name).await?))
}
