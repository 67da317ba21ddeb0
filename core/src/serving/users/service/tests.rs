//! Unit tests of the service: the pure build, and the degradation paths with stand-in
//! dependencies that fail on demand (the real servers are exercised in
//! `core/tests/user_state.rs`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use clap::{CommandFactory as _, Parser};

use super::*;
use crate::cf::interactions::{Event, EventType};
use crate::cf::serving::fixtures::model;
use crate::serving::users::{InProcessUserHistory, InProcessUserStateCache, Lookup};

fn inter(item: &str, kind: EventType) -> Interaction {
    Interaction {
        product_id: item.into(),
        kind,
        at_ms: Some(1),
        value: None,
    }
}

fn event(id: &str, user: &str, item: &str, ts: i64) -> EventRow {
    EventRow {
        event_id: id.into(),
        event: Event {
            user: user.into(),
            item: item.into(),
            kind: EventType::Purchase,
            ts_ms: Some(ts),
            value: None,
        },
        category: None,
    }
}

#[test]
fn trained_fold_in_and_none() {
    let m = model();
    let h = [
        inter("p4", EventType::Purchase),
        inter("p3", EventType::View),
        inter("p4", EventType::View),
        inter("gone", EventType::View),
    ];
    let trained = build_state(&m, "a", &h, 10);
    assert_eq!(trained.source, FactorSource::Trained);
    assert_eq!(trained.factors.as_deref(), m.user_factors("a"));
    assert_eq!((trained.interactions, trained.known), (4, 3));
    assert_eq!(trained.seen, [3, 4]);

    let new = build_state(&m, "stranger", &h, 10);
    assert_eq!(new.source, FactorSource::FoldIn);
    let expected: Vec<_> = h.iter().map(Interaction::as_fold_in).collect();
    assert_eq!(new.factors, Some(m.fold_in(&expected).factors));
    let f = new.factors.as_deref().unwrap_or_default();
    assert!(f[1] > f[0].abs() * 3.0, "near the items touched: {f:?}");

    let unknown_items = build_state(&m, "stranger", &[inter("gone", EventType::View)], 10);
    assert_eq!(
        (
            unknown_items.source,
            unknown_items.factors,
            unknown_items.interactions
        ),
        (FactorSource::None, None, 1)
    );
    let nothing = build_state(&m, "stranger", &[], 10);
    assert_eq!(
        (nothing.source, nothing.interactions),
        (FactorSource::None, 0)
    );
    assert!(nothing.seen.is_empty());

    // Zero ratings weigh nothing: the fold-in places nobody.
    let mut zero = inter("p1", EventType::Rating);
    zero.value = Some(0.0);
    assert_eq!(
        build_state(&m, "stranger", &[zero], 10).source,
        FactorSource::None
    );
}

#[test]
fn seen_is_the_most_recent_distinct_products_as_sorted_rows() {
    let m = model();
    let h: Vec<_> = ["p6", "p2", "p6", "nope", "p0", "p5"]
        .iter()
        .map(|p| inter(p, EventType::Click))
        .collect();
    // Three most recent distinct products: p6, p2, p6 again (skipped), nope (unknown).
    assert_eq!(build_state(&m, "a", &h, 3).seen, [2, 6]);
    assert_eq!(build_state(&m, "a", &h, 100).seen, [0, 2, 5, 6]);
    assert!(build_state(&m, "a", &h, 0).seen.is_empty());
}

/// An in-process cache that fails or stalls on demand.
struct Flaky {
    inner: InProcessUserStateCache,
    fail: AtomicBool,
    fail_invalidate: AtomicBool,
    delay_ms: AtomicU64,
    gets: AtomicU64,
}

impl Flaky {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: InProcessUserStateCache::new(CacheOptions::default(), 1000).expect("cache"),
            fail: AtomicBool::new(false),
            fail_invalidate: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            gets: AtomicU64::new(0),
        })
    }

    async fn check(&self, op: &'static str) -> Result<(), UserStateError> {
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(UserStateError::redis(
                op,
                redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "down",
                )),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl UserStateCache for Flaky {
    fn backend(&self) -> &'static str {
        "flaky"
    }
    async fn get(&self, key: &StateKey<'_>) -> Result<Lookup, UserStateError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.check("get").await?;
        self.inner.get(key).await
    }
    async fn put(
        &self,
        key: &StateKey<'_>,
        generation: Generation,
        state: &CachedState,
    ) -> Result<bool, UserStateError> {
        self.check("put").await?;
        self.inner.put(key, generation, state).await
    }
    async fn invalidate_user(&self, user_id: &str) -> Result<(), UserStateError> {
        self.check("invalidate").await?;
        if self.fail_invalidate.load(Ordering::SeqCst) {
            return Err(UserStateError::Timeout {
                op: "invalidate",
                after: Duration::from_millis(1),
            });
        }
        self.inner.invalidate_user(user_id).await
    }
}

/// A history that fails on demand, or invalidates the user in the cache while it is being
/// read (an event recorded by another process during the build).
struct Scripted {
    inner: InProcessUserHistory,
    fail: AtomicBool,
    race: Option<Arc<dyn UserStateCache>>,
}

#[async_trait]
impl UserHistory for Scripted {
    fn backend(&self) -> &'static str {
        "scripted"
    }
    async fn history(
        &self,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<Interaction>, UserStateError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(UserStateError::History(crate::events::EventsError::Io {
                path: "events".into(),
                source: std::io::Error::other("database down"),
            }));
        }
        let h = self.inner.history(user_id, limit).await;
        if let Some(cache) = &self.race {
            cache.invalidate_user(user_id).await?;
        }
        h
    }
    async fn record(&self, events: &[EventRow]) -> Result<u64, UserStateError> {
        self.inner.record(events).await
    }
}

fn history(race: Option<Arc<dyn UserStateCache>>) -> Arc<Scripted> {
    let inner = InProcessUserHistory::new(1_000);
    Arc::new(Scripted {
        inner,
        fail: AtomicBool::new(false),
        race,
    })
}

fn options() -> UserStatesOptions {
    UserStatesOptions {
        cache_timeout: Duration::from_millis(100),
        failure_threshold: 2,
        cooldown: Duration::from_secs(60),
        max_cooldown: Duration::from_secs(60),
        ..UserStatesOptions::default()
    }
}

fn metric(states: &UserStates, line: &str) -> f64 {
    let mut registry = prometheus_client::registry::Registry::default();
    states.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    text.lines()
        .find(|l| l.starts_with(line))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn miss_then_hit_then_invalidated_by_record() -> Result<(), UserStateError> {
    let m = model();
    let h = history(None);
    let cache = Flaky::new();
    let states = UserStates::new(h.clone(), cache.clone(), options())?;
    states
        .record(&[event("e1", "new", "p3", 10), event("e2", "a", "p0", 10)])
        .await?;

    let first = states.get_or_build(&m, "new").await?;
    assert_eq!(
        (first.cache, first.source),
        (CacheOutcome::Miss, FactorSource::FoldIn)
    );
    assert_eq!((first.interactions, first.seen.as_slice()), (1, &[3][..]));
    let second = states.get_or_build(&m, "new").await?;
    assert_eq!(second.cache, CacheOutcome::Hit);
    assert_eq!(
        UserState {
            cache: CacheOutcome::Miss,
            ..second.clone()
        },
        first,
        "a hit answers what the miss computed"
    );
    // A trained user's hit takes the factors from the model.
    states.get_or_build(&m, "a").await?;
    let a = states.get_or_build(&m, "a").await?;
    assert_eq!(a.cache, CacheOutcome::Hit);
    assert_eq!(a.factors.as_deref(), m.user_factors("a"));
    assert_eq!(a.seen, [0]);

    // A new interaction invalidates every version of the user.
    let report = states.record(&[event("e3", "new", "p5", 20)]).await?;
    assert_eq!(
        report,
        RecordReport {
            new: 1,
            users: 1,
            invalidated: 1,
            pending: 0
        }
    );
    let after = states.get_or_build(&m, "new").await?;
    assert_eq!(after.cache, CacheOutcome::Miss);
    assert_eq!(
        (after.interactions, after.seen.as_slice()),
        (2, &[3, 5][..])
    );
    assert_eq!(states.get_or_build(&m, "a").await?.cache, CacheOutcome::Hit);
    assert_eq!(
        metric(&states, r#"user_state_requests_total{cache="hit"}"#),
        3.0
    );
    assert_eq!(
        metric(&states, r#"user_state_builds_total{source="fold_in"}"#),
        2.0
    );

    let e = states.get_or_build(&m, "").await.expect_err("empty id");
    assert_eq!(e.kind(), "InvalidUserId");
    Ok(())
}

#[tokio::test]
async fn a_failing_cache_is_bypassed_then_skipped_with_the_same_answers()
-> Result<(), UserStateError> {
    let m = model();
    let h = history(None);
    let cache = Flaky::new();
    let states = UserStates::new(h.clone(), cache.clone(), options())?;
    states.record(&[event("e1", "new", "p3", 10)]).await?;
    let healthy = states.get_or_build(&m, "new").await?;

    cache.fail.store(true, Ordering::SeqCst);
    for i in 0..5 {
        let s = states.get_or_build(&m, "new").await?;
        assert_eq!(s.cache, CacheOutcome::Bypassed, "call {i}");
        assert_eq!(
            UserState {
                cache: CacheOutcome::Miss,
                ..s
            },
            healthy
        );
    }
    assert!(states.cache_circuit_open());
    // Two failures opened the circuit; the other three calls did not touch the cache.
    assert_eq!(cache.gets.load(Ordering::SeqCst), 1 + 2);
    assert_eq!(
        metric(
            &states,
            r#"user_state_cache_operations_total{op="get",outcome="skipped"}"#
        ),
        3.0
    );
    assert_eq!(
        metric(&states, r#"user_state_circuit_open{dependency="cache"}"#),
        1.0
    );
    Ok(())
}

#[tokio::test]
async fn a_slow_cache_costs_at_most_its_timeout() -> Result<(), UserStateError> {
    let m = model();
    let cache = Flaky::new();
    cache.delay_ms.store(5_000, Ordering::SeqCst);
    let states = UserStates::new(history(None), cache, options())?;
    let started = Instant::now();
    let s = states.get_or_build(&m, "a").await?;
    assert_eq!(
        (s.cache, s.source),
        (CacheOutcome::Bypassed, FactorSource::Trained)
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        metric(
            &states,
            r#"user_state_cache_operations_total{op="get",outcome="timeout"}"#
        ),
        1.0
    );
    Ok(())
}

#[tokio::test]
async fn a_failing_history_serves_trained_factors_and_caches_nothing() -> Result<(), UserStateError>
{
    let m = model();
    let h = history(None);
    let lenient = UserStatesOptions {
        failure_threshold: 100,
        ..options()
    };
    let states = UserStates::new(h.clone(), Flaky::new(), lenient)?;
    states.record(&[event("e1", "a", "p3", 10)]).await?;
    h.fail.store(true, Ordering::SeqCst);
    let a = states.get_or_build(&m, "a").await?;
    assert_eq!(a.source, FactorSource::Trained);
    assert_eq!(a.factors.as_deref(), m.user_factors("a"));
    assert_eq!(a.history_error, Some("EventsIo"));
    assert!(a.seen.is_empty());
    let stranger = states.get_or_build(&m, "stranger").await?;
    assert_eq!(
        (stranger.source, stranger.factors),
        (FactorSource::None, None)
    );
    // Not cached: once the history answers, the state is complete.
    h.fail.store(false, Ordering::SeqCst);
    let a = states.get_or_build(&m, "a").await?;
    assert_eq!(
        (a.cache, a.history_error, a.seen.as_slice()),
        (CacheOutcome::Miss, None, &[3][..])
    );

    // Failing again and again: the circuit opens and the history is not asked any more.
    let states = UserStates::new(h.clone(), Flaky::new(), options())?;
    h.fail.store(true, Ordering::SeqCst);
    let mut errors = vec![];
    for _ in 0..3 {
        errors.push(states.get_or_build(&m, "a").await?.history_error);
    }
    assert_eq!(
        errors,
        [Some("EventsIo"), Some("EventsIo"), Some("CircuitOpen")]
    );
    assert!(states.history_circuit_open());
    Ok(())
}

#[tokio::test]
async fn a_build_that_raced_an_invalidation_is_not_cached() -> Result<(), UserStateError> {
    let m = model();
    let cache = Flaky::new();
    let states = UserStates::new(history(Some(cache.clone())), cache.clone(), options())?;
    let first = states.get_or_build(&m, "a").await?;
    assert_eq!(first.cache, CacheOutcome::Miss);
    // The history invalidated the user while it was read: the write was refused.
    assert_eq!(
        states.get_or_build(&m, "a").await?.cache,
        CacheOutcome::Miss
    );
    assert_eq!(
        metric(
            &states,
            r#"user_state_cache_operations_total{op="put",outcome="superseded"}"#
        ),
        2.0
    );
    Ok(())
}

#[tokio::test]
async fn failed_invalidations_are_pending_and_bypass_the_cache_until_flushed()
-> Result<(), UserStateError> {
    let m = model();
    let cache = Flaky::new();
    let lenient = UserStatesOptions {
        failure_threshold: 100,
        ..options()
    };
    let states = UserStates::new(history(None), cache.clone(), lenient)?;
    states.record(&[event("e1", "new", "p3", 10)]).await?;
    assert_eq!(states.get_or_build(&m, "new").await?.seen, [3]);

    cache.fail_invalidate.store(true, Ordering::SeqCst);
    let report = states.record(&[event("e2", "new", "p4", 20)]).await?;
    assert_eq!((report.invalidated, report.pending), (0, 1));
    assert_eq!(states.pending_invalidations(), 1);
    // The cache still holds the old state, but this process does not read it.
    let s = states.get_or_build(&m, "new").await?;
    assert_eq!(
        (s.cache, s.seen.as_slice()),
        (CacheOutcome::Bypassed, &[3, 4][..])
    );
    assert_eq!(states.flush_pending().await, 1);

    cache.fail_invalidate.store(false, Ordering::SeqCst);
    // The next request for the user flushes the invalidation first.
    let s = states.get_or_build(&m, "new").await?;
    assert_eq!(
        (s.cache, s.seen.as_slice()),
        (CacheOutcome::Miss, &[3, 4][..])
    );
    assert_eq!(states.pending_invalidations(), 0);
    assert_eq!(metric(&states, "user_state_pending_invalidations"), 0.0);
    Ok(())
}

#[tokio::test]
async fn the_flusher_retries_in_the_background() -> Result<(), UserStateError> {
    let cache = Flaky::new();
    let lenient = UserStatesOptions {
        failure_threshold: 1_000_000,
        ..options()
    };
    let states = Arc::new(UserStates::new(history(None), cache.clone(), lenient)?);
    cache.fail_invalidate.store(true, Ordering::SeqCst);
    states
        .record(&[event("e1", "u1", "p3", 10), event("e2", "u2", "p3", 10)])
        .await?;
    assert_eq!(states.pending_invalidations(), 2);
    let task = states.spawn_flusher(Duration::from_millis(10));
    cache.fail_invalidate.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while states.pending_invalidations() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(states.pending_invalidations(), 0);
    // The task ends once the service is dropped.
    drop(states);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("flusher ends")
        .expect("flusher ok");
    Ok(())
}

#[tokio::test]
async fn a_cached_state_that_does_not_fit_the_model_is_recomputed() -> Result<(), UserStateError> {
    let m = model();
    let cache = Flaky::new();
    let states = UserStates::new(history(None), cache.clone(), options())?;
    let key = StateKey {
        model: "als",
        version: "v1",
        user_id: "new",
    };
    let bad = CachedState {
        source: FactorSource::FoldIn,
        factors: vec![1.0; 5],
        interactions: 1,
        known: 1,
        seen: vec![99],
        written_at_ms: now_ms(),
    };
    assert!(cache.inner.put(&key, Generation(None), &bad).await?);
    let s = states.get_or_build(&m, "new").await?;
    assert_eq!(
        (s.cache, s.source),
        (CacheOutcome::Miss, FactorSource::None)
    );
    assert_eq!(
        metric(
            &states,
            r#"user_state_errors_total{kind="CorruptUserState"}"#
        ),
        1.0
    );
    assert_eq!(
        states.get_or_build(&m, "new").await?.cache,
        CacheOutcome::Hit
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_histories_fold_in_off_the_worker_with_the_same_answer() -> Result<(), UserStateError>
{
    let m = model();
    let h = history(None);
    let events: Vec<_> = (0..150)
        .map(|i| event(&format!("e{i}"), "long", &format!("p{}", i % 7), i))
        .collect();
    h.record(&events).await?;
    let states = UserStates::new(h.clone(), Flaky::new(), options())?;
    let s = states.get_or_build(&m, "long").await?;
    let direct = build_state(&m, "long", &h.history("long", 500).await?, 500);
    assert_eq!((s.source, s.interactions), (FactorSource::FoldIn, 150));
    assert_eq!(s.factors, direct.factors);
    assert_eq!(s.seen, (0..7).collect::<Vec<u32>>());
    Ok(())
}

#[test]
fn options_are_checked_and_args_map_onto_them() {
    assert!(UserStatesOptions::default().validate().is_ok());
    let e = UserStatesOptions {
        history_limit: 0,
        ..UserStatesOptions::default()
    }
    .validate()
    .expect_err("limit");
    assert!(e.to_string().contains("history_limit"), "{e}");

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        users: UserStateArgs,
    }
    Cli::command().debug_assert();
    let cli = Cli::try_parse_from(["x"]).expect("defaults");
    assert_eq!(cli.users.options(), UserStatesOptions::default());
    assert_eq!(cli.users.cache_options(), CacheOptions::default());
    let cli = Cli::try_parse_from([
        "x",
        "--user-state-ttl",
        "1h30m",
        "--user-cache-timeout",
        "5ms",
    ])
    .expect("parse");
    assert_eq!(cli.users.ttl, Duration::from_secs(5400));
    assert_eq!(cli.users.options().cache_timeout, Duration::from_millis(5));
    assert!(Cli::try_parse_from(["x", "--user-state-ttl", "soon"]).is_err());
}
