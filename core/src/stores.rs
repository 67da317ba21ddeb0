//! Connection settings and clients of the production stores: Postgres (offline features,
//! registry index, run history, events), Redis (online features) and an S3-compatible object
//! store (model artifacts).

use std::time::Duration;

use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use clap::{Args, ValueEnum};

/// Why a store could not be reached or configured.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Postgres refused the connection or the query.
    #[error("postgres at {url}: {source}")]
    Postgres {
        /// The URL with any password removed.
        url: String,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// Redis refused the connection or the command.
    #[error("redis at {url}: {source}")]
    Redis {
        /// The URL with any password removed.
        url: String,
        /// The client's error.
        source: redis::RedisError,
    },
    /// The S3 settings are incomplete.
    #[error("s3 configuration: {0}")]
    S3Config(String),
}

impl StoreError {
    /// Stable label for metrics and events.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Postgres { .. } => "PostgresUnavailable",
            Self::Redis { .. } => "RedisUnavailable",
            Self::S3Config(_) => "S3Misconfigured",
        }
    }
}

/// Query parameters whose values are credentials, matched case-insensitively as substrings
/// of the parameter's name: libpq's `password` and `sslpassword`, `token`, `secret`, S3
/// presigned `X-Amz-Signature` and `X-Amz-Credential`, `api_key`, `auth`.
const SECRET_PARAMS: [&str; 8] = [
    "pass",
    "pwd",
    "secret",
    "token",
    "signature",
    "credential",
    "key",
    "auth",
];

/// A URL as it may be logged, shown on `/readyz` or written to a resource's status: the
/// userinfo password (`postgres://user:secret@…`, `redis://:secret@…`) and the values of
/// credential-like query parameters (`?password=…`, `?sslpassword=…`, `?token=…`) replaced by
/// `***`. Something that does not parse as a URL is shown as its scheme only
/// (`postgres://***`), since where its secret sits cannot be told.
pub fn redact_url(raw: &str) -> String {
    let Ok(mut url) = url::Url::parse(raw) else {
        return match raw.split_once("://") {
            Some((scheme, _))
                if !scheme.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
            {
                format!("{scheme}://***")
            }
            _ if raw.contains('@') || raw.contains('=') => "***".to_owned(),
            _ => raw.to_owned(),
        };
    };
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let secret = {
                    let k = k.to_ascii_lowercase();
                    SECRET_PARAMS.iter().any(|s| k.contains(s))
                };
                (
                    k.into_owned(),
                    if secret {
                        "***".to_owned()
                    } else {
                        v.into_owned()
                    },
                )
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    // The `***` set above comes back percent-encoded (`%2A%2A%2A`); show it as written.
    url.to_string().replace("%2A%2A%2A", "***")
}

/// Postgres options.
#[derive(Args, Clone, Debug)]
pub struct PostgresArgs {
    /// Postgres URL, for example `postgres://recsys@db:5432/recsys`.
    #[arg(
        long = "database-url",
        env = "RECSYS_DATABASE_URL",
        hide_env_values = true
    )]
    pub url: String,
    /// Largest number of pooled connections.
    #[arg(
        long = "database-max-connections",
        env = "RECSYS_DATABASE_MAX_CONNECTIONS",
        default_value_t = 8
    )]
    pub max_connections: u32,
}

/// Opens a Postgres pool and checks that the server answers.
pub async fn postgres(args: &PostgresArgs) -> Result<sqlx::PgPool, StoreError> {
    let err = |source| StoreError::Postgres {
        url: redact_url(&args.url),
        source,
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&args.url)
        .await
        .map_err(err)?;
    sqlx::query("SELECT 1").execute(&pool).await.map_err(err)?;
    Ok(pool)
}

/// Whether a Redis error means the server is unavailable (I/O, a dropped or refused
/// connection, a timeout, an unrecoverable state) rather than a refused command: what the
/// online store and the user-state cache degrade on.
pub(crate) fn redis_unavailable(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

/// Redis options.
#[derive(Args, Clone, Debug)]
pub struct RedisArgs {
    /// Redis URL, for example `redis://cache:6379/0`.
    #[arg(long = "redis-url", env = "RECSYS_REDIS_URL", hide_env_values = true)]
    pub url: String,
}

/// A Redis connection made on first use, so that a process starts (and degrades) while Redis
/// is down: connection attempts time out after 500 ms and are retried twice per reconnection;
/// commands time out after 5 s (the callers' own timeouts are shorter).
pub fn redis_lazy(url: &str) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_millis(500)))
        .set_response_timeout(Some(std::time::Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_min_delay(std::time::Duration::from_millis(100))
        .set_max_delay(std::time::Duration::from_secs(1));
    redis::aio::ConnectionManager::new_lazy_with_config(client, config)
}

/// Opens a multiplexed, self-reconnecting Redis connection and checks that the server answers.
pub async fn redis(args: &RedisArgs) -> Result<redis::aio::ConnectionManager, StoreError> {
    let err = |source| StoreError::Redis {
        url: redact_url(&args.url),
        source,
    };
    let client = redis::Client::open(args.url.as_str()).map_err(err)?;
    let mut conn = redis::aio::ConnectionManager::new(client)
        .await
        .map_err(err)?;
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(err)?;
    Ok(conn)
}

/// When the S3 client computes and checks checksums. AWS S3 supports `when-supported`
/// (the SDK default); several S3-compatible servers mishandle streaming trailer checksums, so
/// `when-required` is offered for them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ChecksumMode {
    /// Compute request checksums and validate responses whenever the operation supports it.
    #[default]
    WhenSupported,
    /// Only when the operation requires it.
    WhenRequired,
}

/// S3 options.
#[derive(Args, Clone, Debug)]
pub struct S3Args {
    /// Endpoint of a non-AWS S3 server, for example `http://seaweedfs:8333`; AWS when unset.
    #[arg(long = "s3-endpoint", env = "RECSYS_S3_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Region of the bucket.
    #[arg(
        long = "s3-region",
        env = "RECSYS_S3_REGION",
        default_value = "us-east-1"
    )]
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most non-AWS servers.
    #[arg(
        long = "s3-force-path-style",
        env = "RECSYS_S3_FORCE_PATH_STYLE",
        default_value_t = false
    )]
    pub force_path_style: bool,
    /// Checksum behaviour of requests and responses.
    #[arg(long = "s3-checksums", env = "RECSYS_S3_CHECKSUMS", value_enum, default_value_t = ChecksumMode::WhenSupported)]
    pub checksums: ChecksumMode,
    /// Access key id; the default AWS credential chain when unset.
    #[arg(
        long = "s3-access-key-id",
        env = "AWS_ACCESS_KEY_ID",
        hide_env_values = true
    )]
    pub access_key_id: Option<String>,
    /// Secret access key, required with an access key id.
    #[arg(
        long = "s3-secret-access-key",
        env = "AWS_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    pub secret_access_key: Option<String>,
}

/// Builds an S3 client from the options. No request is sent.
pub async fn s3(args: &S3Args) -> Result<aws_sdk_s3::Client, StoreError> {
    let (request, response) = match args.checksums {
        ChecksumMode::WhenSupported => (
            RequestChecksumCalculation::WhenSupported,
            ResponseChecksumValidation::WhenSupported,
        ),
        ChecksumMode::WhenRequired => (
            RequestChecksumCalculation::WhenRequired,
            ResponseChecksumValidation::WhenRequired,
        ),
    };
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(Region::new(args.region.clone()));
    match (&args.access_key_id, &args.secret_access_key) {
        (Some(id), Some(secret)) => {
            loader = loader.credentials_provider(Credentials::new(
                id,
                secret,
                None,
                None,
                "recsys-args",
            ));
        }
        (Some(_), None) => {
            return Err(StoreError::S3Config(
                "an access key id was given without a secret access key (--s3-secret-access-key / AWS_SECRET_ACCESS_KEY)".into(),
            ));
        }
        _ => {}
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(args.force_path_style)
        .request_checksum_calculation(request)
        .response_checksum_validation(response);
    if let Some(endpoint) = &args.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    Ok(aws_sdk_s3::Client::from_conf(builder.build()))
}

/// Opens the artifact store a `--store`-style option names: a local directory, or
/// `s3://bucket[/prefix]` with the S3 options. No request is sent.
pub async fn artifact_store(
    spec: &str,
    s3_args: &S3Args,
) -> Result<std::sync::Arc<dyn crate::artifacts::ArtifactStore>, StoreError> {
    match spec.strip_prefix("s3://") {
        Some(rest) => {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StoreError::S3Config(format!(
                    "artifact store {spec:?}: s3:// needs a bucket (s3://bucket/prefix)"
                )));
            }
            let client = s3(s3_args).await?;
            Ok(std::sync::Arc::new(crate::artifacts::S3Store::new(
                client, bucket, prefix,
            )))
        }
        None if spec.is_empty() => Err(StoreError::S3Config(
            "artifact store: give a directory or s3://bucket/prefix".into(),
        )),
        None => Ok(std::sync::Arc::new(crate::artifacts::LocalDirStore::new(
            spec,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact_url("postgres://recsys:secret@db:5432/recsys"),
            "postgres://recsys:***@db:5432/recsys"
        );
        assert_eq!(redact_url("redis://cache:6379/0"), "redis://cache:6379/0");
        for (raw, shown) in [
            // Redis: a password without a user, and ACL users.
            (
                "redis://:hunter22@cache:6379/0",
                "redis://:***@cache:6379/0",
            ),
            (
                "rediss://app:hunter22@cache:6380",
                "rediss://app:***@cache:6380",
            ),
            // libpq parameters, mixed with harmless ones (kept).
            (
                "postgres://recsys@db/recsys?password=hunter22&sslmode=require",
                "postgres://recsys@db/recsys?password=***&sslmode=require",
            ),
            (
                "postgresql://db/recsys?user=recsys&sslpassword=hunter22&PassWord=hunter22",
                "postgresql://db/recsys?user=recsys&sslpassword=***&PassWord=***",
            ),
            // Percent-encoded passwords and presigned S3 URLs.
            ("postgres://u:hun%40ter22@db/x", "postgres://u:***@db/x"),
            (
                "https://s3.example/b/k?X-Amz-Credential=AKIA1&X-Amz-Signature=abcd&x-id=GetObject",
                "https://s3.example/b/k?X-Amz-Credential=***&X-Amz-Signature=***&x-id=GetObject",
            ),
            (
                "http://127.0.0.1:8080/?api_key=hunter22",
                "http://127.0.0.1:8080/?api_key=***",
            ),
            // What does not parse shows its scheme only.
            ("postgres://u:hunter22@db:notaport/x", "postgres://***"),
            ("host=db password=hunter22", "***"),
        ] {
            let r = redact_url(raw);
            assert_eq!(r, shown, "{raw}");
            assert!(
                !r.contains("hunter22") && !r.contains("AKIA1"),
                "{raw} -> {r}"
            );
        }
    }

    #[tokio::test]
    async fn half_credentials_are_refused() {
        let args = S3Args {
            endpoint: Some("http://127.0.0.1:1".into()),
            region: "us-east-1".into(),
            force_path_style: true,
            checksums: ChecksumMode::WhenRequired,
            access_key_id: Some("id".into()),
            secret_access_key: None,
        };
        let err = s3(&args).await.expect_err("must refuse");
        assert_eq!(err.kind(), "S3Misconfigured");
        assert!(err.to_string().contains("secret access key"), "{err}");
    }
}
