//! The fixture of the recommendation tests: a model trained on structured synthetic data and
//! published (and promoted) to the real S3 server, popularity rankings in the same bucket, the
//! training interactions as purchases in the events table of a fresh Postgres database, and a
//! scorer started as `recsys-scorer` starts (`Args` → `start_all`) on a real socket.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use recsys_core::artifacts::{ManifestInput, Registry, S3Store};
use recsys_core::cf::als::{self, AlsModel, AlsParams, Solver};
use recsys_core::cf::eval;
use recsys_core::cf::interactions::{Confidence, Event, EventType, IdMap};
use recsys_core::cf::synth::{self, SynthParams, Synthetic};
use recsys_core::events::{self, EventRow, PostgresEvents};
use recsys_core::features::FeatureRef;
use recsys_core::features::rankings::{Rankings, write_rankings};
use recsys_core::stores::{self, ChecksumMode, PostgresArgs};
use serde_json::{Value, json};
use sprs::CsMat;

use crate::{TestEnv, http_json, wait_for};

/// Users of the synthetic data, `u0` to `u399`.
pub const USERS: usize = 400;
/// Products of the synthetic data, `p0` to `p299`.
pub const ITEMS: usize = 300;

/// What a recommendation test runs against.
pub struct Fixture {
    /// The data: interactions and the hidden topics behind them.
    pub data: Synthetic,
    /// The interactions trained on (and stored as events).
    pub train: CsMat<f32>,
    /// Two interactions per user held out of training.
    pub test: CsMat<f32>,
    /// The trained model.
    pub model: AlsModel,
    /// Its published version, promoted to `champion`.
    pub version: String,
    /// The popularity rankings written next to it.
    pub rankings: Rankings,
    /// Each product's category, `topic<n>`.
    pub categories: BTreeMap<String, String>,
    /// URL of the fresh database holding the events table.
    pub database_url: String,
    /// A pool on it.
    pub pool: sqlx::PgPool,
    /// `--artifacts` of the scorer: `s3://bucket/prefix`.
    pub artifacts: String,
    /// A tag unique to this run (for key prefixes).
    pub tag: String,
    /// When the fixture was built (the events are a minute older).
    pub now_ms: i64,
    env: TestEnv,
}

impl Fixture {
    /// Trains, publishes and stores everything under names derived from `name`
    /// (`[a-z0-9_]`): the database `t_<name>_…` and the S3 prefix `<name>/…`.
    pub async fn build(env: &TestEnv, name: &str) -> anyhow::Result<Self> {
        // Data with structure: users and items in topics; two interactions per user held out.
        let data = synth::generate(&SynthParams {
            topics: 8,
            ..SynthParams::new(USERS, ITEMS, 9_000, 11)
        });
        let (train, test) = eval::leave_k_out(&data.weights, 2, 3);
        let model = als::train(
            &Confidence::Linear { alpha: 10.0 }.apply(&train),
            &AlsParams {
                factors: 16,
                regularization: 0.05,
                iterations: 12,
                solver: Solver::ConjugateGradient { steps: 3 },
                threads: 2,
                seed: 5,
            },
            |_| {},
        )?;
        let users = IdMap::from_ids((0..USERS).map(|u| format!("u{u}")).collect());
        let items = IdMap::from_ids((0..ITEMS).map(|i| format!("p{i}")).collect());

        // The model and the rankings, in the real S3 server under a prefix of this run.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let tag = format!("{:x}{nanos:x}", std::process::id());
        let prefix = format!("{name}/{tag}");
        let s3 = env.s3_args(ChecksumMode::WhenSupported)?;
        let bucket = env.var("RECSYS_TEST_S3_BUCKET")?.to_owned();
        let store = Arc::new(S3Store::new(stores::s3(&s3).await?, &bucket, &prefix));
        let registry = Registry::new(store.clone());
        let version = registry
            .publish(
                "als",
                &model,
                &users,
                &items,
                ManifestInput {
                    params: json!({"alpha": 10.0, "confidence": "linear"}),
                    ..ManifestInput::default()
                },
            )
            .await?;
        registry.promote("als", &version).await?;
        let mut counts = vec![0.0_f64; ITEMS];
        for (_, i, _) in triples(&train) {
            counts[i] += 1.0;
        }
        let max = counts.iter().copied().fold(0.0, f64::max);
        let scores: Vec<(String, f64)> = counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0.0)
            .map(|(i, c)| (format!("p{i}"), c / max))
            .collect();
        let categories: BTreeMap<String, String> = (0..ITEMS)
            .map(|i| (format!("p{i}"), format!("topic{}", data.item_topic[i])))
            .collect();
        let now_ms = recsys_core::features::online::now_ms();
        let rankings = Rankings::build(
            &FeatureRef::new("popularity_score", 1),
            now_ms,
            now_ms,
            1000,
            &scores,
            &categories,
        )?;
        write_rankings(store.as_ref(), &rankings).await?;

        // Histories: the training interactions in a fresh events table.
        let database_url = env.fresh_database(name).await?;
        let pool = stores::postgres(&PostgresArgs {
            url: database_url.clone(),
            max_connections: 2,
        })
        .await?;
        events::migrate(&pool).await?;
        let rows: Vec<EventRow> = triples(&train)
            .map(|(u, i, _)| EventRow {
                event_id: format!("e{u}-{i}"),
                event: Event {
                    user: format!("u{u}"),
                    item: format!("p{i}"),
                    kind: EventType::Purchase,
                    ts_ms: Some(now_ms - 60_000),
                    value: None,
                },
                category: Some(format!("topic{}", data.item_topic[i])),
            })
            .collect();
        PostgresEvents::new(pool.clone()).insert(&rows).await?;

        Ok(Self {
            data,
            train,
            test,
            model,
            version,
            rankings,
            categories,
            database_url,
            pool,
            artifacts: format!("s3://{bucket}/{prefix}"),
            tag,
            now_ms,
            env: env.clone(),
        })
    }

    /// The scorer's options over this fixture, with user states (and online features) in
    /// the Redis at `redis_url` under `redis_prefix`, and `extra` options.
    pub fn args(
        &self,
        redis_url: &str,
        redis_prefix: &str,
        extra: &[&str],
    ) -> anyhow::Result<recsys_scorer::Args> {
        Ok(recsys_scorer::Args::try_parse_from(self.argv(
            redis_url,
            redis_prefix,
            extra,
        )?)?)
    }

    /// [`Self::args`] as a command line (the program name first), to run the binary.
    pub fn argv(
        &self,
        redis_url: &str,
        redis_prefix: &str,
        extra: &[&str],
    ) -> anyhow::Result<Vec<String>> {
        let mut argv = vec![
            "recsys-scorer",
            "--database-url",
            &self.database_url,
            "--database-migrate",
            "--redis-url",
            redis_url,
            "--redis-prefix",
            redis_prefix,
            "--artifacts",
            &self.artifacts,
            "--s3-endpoint",
            self.env.var("RECSYS_TEST_S3_ENDPOINT")?,
            "--s3-force-path-style",
            "--s3-region",
            self.env.var("RECSYS_TEST_S3_REGION")?,
        ];
        argv.extend_from_slice(extra);
        Ok(argv.into_iter().map(str::to_owned).collect())
    }

    /// Products `u` trained on, as ids.
    pub fn seen(&self, u: usize) -> Vec<String> {
        self.train
            .outer_view(u)
            .map(|r| r.indices().iter().map(|i| format!("p{i}")).collect())
            .unwrap_or_default()
    }
}

/// Starts the scorer as its binary does, serves it on 127.0.0.1:0 and waits until `/readyz`
/// answers 200 (the model loaded).
pub async fn serve(
    args: &recsys_scorer::Args,
) -> anyhow::Result<(recsys_scorer::Scorer, SocketAddr)> {
    let scorer = recsys_scorer::start_all(args).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = scorer
        .router()
        .into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, router).await });
    wait_for(
        Duration::from_secs(30),
        "scorer ready with the model",
        || async { Ok(http_json(addr, "GET", "/readyz", None).await?.0 == 200) },
    )
    .await?;
    Ok((scorer, addr))
}

/// The product ids of an answer, in order.
pub fn ids(v: &Value) -> Vec<String> {
    v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["product_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `(row, column, value)` of a CSR matrix.
pub fn triples(m: &CsMat<f32>) -> impl Iterator<Item = (usize, usize, f32)> + '_ {
    m.outer_iterator()
        .enumerate()
        .flat_map(|(u, row)| row.iter().map(move |(i, v)| (u, i, *v)).collect::<Vec<_>>())
}
