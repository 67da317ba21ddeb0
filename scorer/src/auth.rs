//! Who may call the API: bearer tokens for everything that changes state, and optionally for
//! reads; per-client rate limits on event ingestion.
//!
//! # Tokens
//!
//! `--auth-tokens-dir` names a directory with one file per client, in the layout of a mounted
//! Kubernetes Secret. Each file's name is the client's name and its content the client's
//! token:
//!
//! - `shop-frontend` holds a token that may write (`POST /v1/events`) and read;
//! - `dashboards.read` holds a token that may only read.
//!
//! Hidden entries (the `..data` links a Secret volume carries) are skipped, and so are tokens
//! under 16 bytes (with a warning). The directory is read again every 5 seconds, so a token
//! is rotated without a restart: add the new token beside the old one, move the clients, then
//! delete the old one. Kubernetes refreshes a mounted Secret within about a minute.
//!
//! Only SHA-256 digests of the tokens are kept; a request's token is hashed and looked up,
//! so no comparison leaks how much of a guess was right. Tokens are never logged; client names
//! are.
//!
//! # Answers
//!
//! - A write without a token, or with a token that is not one of these: `401
//!   Unauthenticated`, with `WWW-Authenticate: Bearer`.
//! - A write with a read-only token: `403 Forbidden`.
//! - Reads are open unless `--auth-reads token`; then they need a token too, of either kind.
//! - Probes, `/metrics`, `/openapi.json` and `/v1/status` are always open. They change
//!   nothing and show no user's data.
//!
//! Without `--auth-tokens-dir` nothing is authenticated. That is meant for local mode, and the
//! scorer says so in a warning at start. The operator always sets the directory when a
//! ModelDeployment names a tokens Secret, or when the operator has a default one (the chart
//! creates it).
//!
//! # Rate limits
//!
//! `--ingest-rate` events a second per client, with bursts of `--ingest-burst`: a GCRA limiter
//! ([`governor`]) keyed by client name (by peer address when nothing is authenticated). A
//! batch over the limit is refused whole: `429 RateLimited` with `Retry-After`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::features::http::ApiError;
use arc_swap::ArcSwap;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};

use crate::ScorerError;
use crate::metrics::HttpMetrics;

/// Shortest token accepted, in bytes.
pub const MIN_TOKEN_BYTES: usize = 16;
/// How often the tokens directory is read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// File-name suffix of a read-only client.
pub const READ_ONLY_SUFFIX: &str = ".read";

/// Whether reads need a token.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadAccess {
    /// Anyone may read.
    #[default]
    Open,
    /// Reads need a token (read-only or not).
    Token,
}

/// Options of authentication and ingestion limits.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// Directory of client tokens (a mounted Secret): one file per client, named after it,
    /// holding its token; a file named `<client>.read` holds a read-only token. Read again
    /// every 5 s. Without it nothing is authenticated (local mode).
    #[arg(long, env = "RECSYS_SCORER_AUTH_TOKENS_DIR")]
    pub auth_tokens_dir: Option<PathBuf>,
    /// Whether reads need a token: `open` or `token`. Writes always do, with a tokens
    /// directory.
    #[arg(
        long,
        env = "RECSYS_SCORER_AUTH_READS",
        value_enum,
        default_value = "open"
    )]
    pub auth_reads: ReadAccess,
    /// Events a client may post per second, sustained; 0 turns the limit off.
    #[arg(long, env = "RECSYS_SCORER_INGEST_RATE", default_value_t = 5_000)]
    pub ingest_rate: u32,
    /// Events a client may post at once above the sustained rate (at least one batch, 1,000).
    #[arg(long, env = "RECSYS_SCORER_INGEST_BURST", default_value_t = 20_000)]
    pub ingest_burst: u32,
}

/// A caller, once authenticated (or the peer, when nothing is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    /// Its name: the token file's (without `.read`), or `peer:<address>`.
    pub name: Arc<str>,
    /// Whether it may write.
    pub write: bool,
}

/// The tokens in force: digests to clients.
#[derive(Debug, Default)]
struct Tokens {
    by_digest: HashMap<[u8; 32], Client>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Reads a tokens directory. Unreadable entries and short tokens are skipped with a warning;
/// a directory that cannot be listed is an error.
fn read_tokens(dir: &Path) -> std::io::Result<Tokens> {
    let mut tokens = Tokens::default();
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(client = %file, error = %e, "token file unreadable; skipped");
                continue;
            }
        };
        let token = bytes.trim_ascii();
        if token.len() < MIN_TOKEN_BYTES {
            tracing::warn!(
                client = %file,
                bytes = token.len(),
                "token shorter than {MIN_TOKEN_BYTES} bytes; skipped"
            );
            continue;
        }
        let (name, write) = match file.strip_suffix(READ_ONLY_SUFFIX) {
            Some(name) => (name.to_owned(), false),
            None => (file.clone(), true),
        };
        tokens.by_digest.insert(
            digest(token),
            Client {
                name: name.into(),
                write,
            },
        );
    }
    Ok(tokens)
}

/// Authentication and ingestion limits, shared by the requests.
pub struct Auth {
    dir: Option<PathBuf>,
    reads: ReadAccess,
    tokens: ArcSwap<Tokens>,
    limiter: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    clock: DefaultClock,
    metrics: HttpMetrics,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("dir", &self.dir)
            .field("reads", &self.reads)
            .field("clients", &self.tokens.load().by_digest.len())
            .finish_non_exhaustive()
    }
}

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or not one of ours: 401.
    Unauthenticated(String),
    /// A token without the right: 403.
    Forbidden(String),
    /// Over the client's rate: 429, retry after the duration.
    RateLimited(String, Duration),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, error, message) = match &self {
            Refusal::Unauthenticated(m) => (StatusCode::UNAUTHORIZED, "Unauthenticated", m),
            Refusal::Forbidden(m) => (StatusCode::FORBIDDEN, "Forbidden", m),
            Refusal::RateLimited(m, _) => (StatusCode::TOO_MANY_REQUESTS, "RateLimited", m),
        };
        let mut response = (
            status,
            Json(ApiError::new(status.as_u16(), error, message.clone())),
        )
            .into_response();
        let headers = response.headers_mut();
        match self {
            Refusal::Unauthenticated(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"recsys\""),
                );
            }
            Refusal::RateLimited(_, after) => {
                let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
                if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                    headers.insert(header::RETRY_AFTER, v);
                }
            }
            Refusal::Forbidden(_) => {}
        }
        response
    }
}

impl Auth {
    /// Authentication from `args`: reads the tokens directory once (an unreadable directory
    /// is an error: the scorer would refuse every write).
    pub fn new(args: &AuthArgs, metrics: HttpMetrics) -> Result<Self, ScorerError> {
        let tokens = match &args.auth_tokens_dir {
            None => {
                tracing::warn!(
                    "no --auth-tokens-dir: event ingestion is not authenticated (fine on one machine; \
                     give the scorer a tokens Secret anywhere else)"
                );
                Tokens::default()
            }
            Some(dir) => {
                let tokens = read_tokens(dir).map_err(|e| ScorerError::InvalidOption {
                    option: "--auth-tokens-dir",
                    reason: format!("{}: {e}", dir.display()),
                })?;
                tracing::info!(
                    dir = %dir.display(),
                    clients = ?client_names(&tokens),
                    "authentication tokens loaded"
                );
                tokens
            }
        };
        let limiter = match NonZeroU32::new(args.ingest_rate) {
            None => None,
            Some(rate) => {
                let burst =
                    NonZeroU32::new(args.ingest_burst.max(args.ingest_rate)).unwrap_or(rate);
                if burst.get() < super::recommend::routes::MAX_EVENTS as u32 {
                    return Err(ScorerError::InvalidOption {
                        option: "--ingest-burst",
                        reason: format!(
                            "{} is below one full batch ({} events)",
                            burst,
                            super::recommend::routes::MAX_EVENTS
                        ),
                    });
                }
                Some(RateLimiter::keyed(
                    Quota::per_second(rate).allow_burst(burst),
                ))
            }
        };
        Ok(Self {
            dir: args.auth_tokens_dir.clone(),
            reads: args.auth_reads,
            tokens: ArcSwap::from_pointee(tokens),
            limiter,
            clock: DefaultClock::default(),
            metrics,
        })
    }

    /// No authentication and no limits (in-process use, tests), without the start warning.
    pub fn disabled(metrics: HttpMetrics) -> Self {
        Self {
            dir: None,
            reads: ReadAccess::Open,
            tokens: ArcSwap::from_pointee(Tokens::default()),
            limiter: None,
            clock: DefaultClock::default(),
            metrics,
        }
    }

    /// Whether tokens are checked at all.
    pub fn enabled(&self) -> bool {
        self.dir.is_some()
    }

    /// Reads the tokens directory again; logs the clients when they changed. A directory
    /// that cannot be read keeps the tokens in force.
    pub fn reload(&self) {
        let Some(dir) = &self.dir else { return };
        match read_tokens(dir) {
            Ok(tokens) => {
                let old = self.tokens.load();
                if old.by_digest != tokens.by_digest {
                    tracing::info!(clients = ?client_names(&tokens), "authentication tokens reloaded");
                    self.tokens.store(Arc::new(tokens));
                }
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "tokens directory unreadable; the tokens in force stay");
            }
        }
        if let Some(l) = &self.limiter {
            l.retain_recent();
        }
    }

    /// Who is calling, and whether they may: `write` for a state-changing route.
    pub fn check(
        &self,
        authorization: Option<&HeaderValue>,
        peer: Option<SocketAddr>,
        write: bool,
        what: &str,
    ) -> Result<Client, Refusal> {
        if !self.enabled() {
            return Ok(Client {
                name: peer.map_or_else(
                    || "peer:unknown".into(),
                    |p| format!("peer:{}", p.ip()).into(),
                ),
                write: true,
            });
        }
        let needs_token = write || self.reads == ReadAccess::Token;
        let bearer = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty());
        let tokens = self.tokens.load();
        let none_loaded = || {
            if tokens.by_digest.is_empty() {
                format!(
                    "; the scorer has no tokens: {} holds none (is the tokens Secret created?)",
                    self.dir.as_deref().unwrap_or(Path::new("")).display()
                )
            } else {
                String::new()
            }
        };
        let client = match bearer {
            None if needs_token => {
                return Err(Refusal::Unauthenticated(format!(
                    "{what} needs a bearer token (Authorization: Bearer <token>){}",
                    none_loaded()
                )));
            }
            None => {
                return Ok(Client {
                    name: "anonymous".into(),
                    write: false,
                });
            }
            Some(token) => match tokens.by_digest.get(&digest(token.as_bytes())) {
                Some(c) => c.clone(),
                None if needs_token => {
                    return Err(Refusal::Unauthenticated(format!(
                        "the bearer token is not one of the scorer's tokens (revoked, mistyped, or not yet loaded){}",
                        none_loaded()
                    )));
                }
                None => {
                    return Ok(Client {
                        name: "anonymous".into(),
                        write: false,
                    });
                }
            },
        };
        if write && !client.write {
            return Err(Refusal::Forbidden(format!(
                "client {} has a read-only token; {what} needs a token that may write",
                client.name
            )));
        }
        Ok(client)
    }

    /// Takes `events` from `client`'s ingestion allowance.
    pub fn take(&self, client: &Client, events: usize) -> Result<(), Refusal> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let n =
            NonZeroU32::new(u32::try_from(events).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        match limiter.check_key_n(&client.name, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let after = not_until.wait_time_from(self.clock.now());
                self.metrics.rejected("rate_limited");
                Err(Refusal::RateLimited(
                    format!(
                        "client {} is over its ingestion rate; {events} events fit again in {} ms",
                        client.name,
                        after.as_millis()
                    ),
                    after,
                ))
            }
            Err(_) => {
                self.metrics.rejected("rate_limited");
                Err(Refusal::RateLimited(
                    format!("{events} events are more than the ingestion burst (--ingest-burst)"),
                    Duration::from_secs(1),
                ))
            }
        }
    }

    /// Starts the reload of the tokens directory every [`RELOAD_EVERY`].
    pub fn spawn_reload(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let me = me.clone();
                // File reads off the async workers.
                let _ = tokio::task::spawn_blocking(move || me.reload()).await;
            }
        })
    }
}

fn client_names(tokens: &Tokens) -> Vec<String> {
    let mut names: Vec<String> = tokens
        .by_digest
        .values()
        .map(|c| {
            if c.write {
                c.name.to_string()
            } else {
                format!("{} (read-only)", c.name)
            }
        })
        .collect();
    names.sort();
    names
}

/// Whether a request changes state.
pub fn is_write(method: &Method, path: &str) -> bool {
    method == Method::POST && path == "/v1/events"
}

/// The caller of a request, as the handlers see it (a request extension).
#[derive(Clone, Debug)]
pub struct Caller {
    /// Who.
    pub client: Client,
    auth: Arc<Auth>,
}

impl Caller {
    /// Takes `events` from the caller's ingestion allowance.
    pub fn take(&self, events: usize) -> Result<(), Refusal> {
        self.auth.take(&self.client, events)
    }
}

/// The middleware: refuses what [`Auth::check`] refuses and hands the [`Caller`] to the
/// handlers as a request extension.
pub async fn authenticate(
    State(auth): State<Arc<Auth>>,
    mut request: Request,
    next: Next,
) -> Response {
    let write = is_write(request.method(), request.uri().path());
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let what = format!("{} {}", request.method(), request.uri().path());
    match auth.check(
        request.headers().get(header::AUTHORIZATION),
        peer,
        write,
        &what,
    ) {
        Ok(client) => {
            request.extensions_mut().insert(Caller {
                client,
                auth: auth.clone(),
            });
            next.run(request).await
        }
        Err(refusal) => {
            auth.metrics.rejected(match refusal {
                Refusal::Unauthenticated(_) => "unauthenticated",
                Refusal::Forbidden(_) => "forbidden",
                Refusal::RateLimited(..) => "rate_limited",
            });
            refusal.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(dir: &Path, reads: ReadAccess, rate: u32) -> Auth {
        Auth::new(
            &AuthArgs {
                auth_tokens_dir: Some(dir.to_owned()),
                auth_reads: reads,
                ingest_rate: rate,
                ingest_burst: 1000,
            },
            HttpMetrics::default(),
        )
        .expect("auth")
    }

    fn bearer(t: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {t}")).expect("header")
    }

    #[test]
    fn writes_need_a_write_token_and_tokens_rotate() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("shop"), "shop-token-0123456789\n").expect("write");
        std::fs::write(dir.path().join("dash.read"), "dash-token-0123456789").expect("write");
        std::fs::write(dir.path().join("short"), "tiny").expect("write");
        std::fs::create_dir(dir.path().join("..data")).expect("dir");
        let a = auth(dir.path(), ReadAccess::Open, 0);
        let w = "POST /v1/events";
        let ok = a
            .check(Some(&bearer("shop-token-0123456789")), None, true, w)
            .expect("writer");
        assert_eq!((&*ok.name, ok.write), ("shop", true));
        assert!(matches!(
            a.check(None, None, true, w),
            Err(Refusal::Unauthenticated(m)) if m.contains("needs a bearer token")
        ));
        assert!(matches!(
            a.check(Some(&bearer("not-a-token-0123456789")), None, true, w),
            Err(Refusal::Unauthenticated(m)) if m.contains("not one of")
        ));
        assert!(
            matches!(
                a.check(Some(&bearer("tiny")), None, true, w),
                Err(Refusal::Unauthenticated(_))
            ),
            "short tokens are not loaded"
        );
        assert!(matches!(
            a.check(Some(&bearer("dash-token-0123456789")), None, true, w),
            Err(Refusal::Forbidden(m)) if m.contains("client dash has a read-only token")
        ));
        // Reads are open, with or without a token.
        assert!(
            a.check(None, None, false, "GET /v1/recommendations")
                .is_ok()
        );
        // Rotation: a new token beside the old, then the old removed.
        std::fs::write(dir.path().join("shop-2"), "shop-token-abcdefghij").expect("write");
        a.reload();
        assert!(
            a.check(Some(&bearer("shop-token-abcdefghij")), None, true, w)
                .is_ok()
        );
        assert!(
            a.check(Some(&bearer("shop-token-0123456789")), None, true, w)
                .is_ok()
        );
        std::fs::remove_file(dir.path().join("shop")).expect("remove");
        a.reload();
        assert!(
            a.check(Some(&bearer("shop-token-0123456789")), None, true, w)
                .is_err()
        );
        assert!(
            a.check(Some(&bearer("shop-token-abcdefghij")), None, true, w)
                .is_ok()
        );
    }

    #[test]
    fn protected_reads_need_any_valid_token() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("dash.read"), "dash-token-0123456789").expect("write");
        let a = auth(dir.path(), ReadAccess::Token, 0);
        let r = "GET /v1/recommendations";
        assert!(matches!(
            a.check(None, None, false, r),
            Err(Refusal::Unauthenticated(_))
        ));
        let c = a
            .check(Some(&bearer("dash-token-0123456789")), None, false, r)
            .expect("reader");
        assert!(!c.write);
    }

    #[test]
    fn ingestion_is_limited_per_client() {
        let dir = tempfile::tempdir().expect("dir");
        let a = auth(dir.path(), ReadAccess::Open, 1000);
        let one = Client {
            name: "one".into(),
            write: true,
        };
        let two = Client {
            name: "two".into(),
            write: true,
        };
        a.take(&one, 1000).expect("the burst");
        match a.take(&one, 500) {
            Err(Refusal::RateLimited(m, after)) => {
                assert!(m.contains("client one"), "{m}");
                assert!(
                    after > Duration::ZERO && after <= Duration::from_secs(1),
                    "{after:?}"
                );
            }
            other => panic!("not limited: {other:?}"),
        }
        a.take(&two, 1000)
            .expect("another client has its own allowance");
        assert!(
            matches!(a.take(&two, 5000), Err(Refusal::RateLimited(..))),
            "over the burst"
        );
    }

    #[test]
    fn an_empty_directory_refuses_writes_and_says_why() {
        let dir = tempfile::tempdir().expect("dir");
        let a = auth(dir.path(), ReadAccess::Open, 0);
        match a.check(None, None, true, "POST /v1/events") {
            Err(Refusal::Unauthenticated(m)) => {
                assert!(m.contains("the scorer has no tokens"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            a.check(None, None, false, "GET /v1/recommendations")
                .is_ok()
        );
    }

    #[test]
    fn nothing_is_checked_without_a_directory() {
        let a = Auth::new(&AuthArgs::default(), HttpMetrics::default()).expect("auth");
        let c = a
            .check(
                None,
                Some("127.0.0.1:9".parse().expect("addr")),
                true,
                "POST /v1/events",
            )
            .expect("open");
        assert_eq!(&*c.name, "peer:127.0.0.1");
    }
}
