//! The in-cluster routing source: the table the operator writes into a ConfigMap, watched
//! through the Kubernetes API.
//!
//! The operator writes one ConfigMap per `ModelDeployment` (`<name>-routing`, key
//! `routing.yaml`) and every scorer pod of that model watches it here. Watching the API rather
//! than mounting the ConfigMap as a volume matters for rollouts: a mounted file follows the
//! kubelet's sync period (up to a minute, and pods see it at different moments), a watch sees a
//! change within the API server's watch latency, so a rollback reaches every pod at once.
//!
//! The rules are those of the file source: only validated tables serve; a change that is
//! missing, unparsable or invalid is logged and counted once and the previous table keeps
//! serving. Before the first valid table arrives the source serves an empty table, so the
//! scorer runs and answers `/healthz` but is not ready.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use recsys_core::serving::routing::{
    MAX_FILE_BYTES, RoutingError, RoutingFormat, RoutingMetrics, RoutingPublisher, RoutingSource,
    RoutingTable,
};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Key of the table in the ConfigMap, unless told otherwise.
pub const DEFAULT_KEY: &str = "routing.yaml";

/// Revision of the empty table served before the first valid one.
const WAITING: &str = "waiting-for-configmap";

/// Which ConfigMap holds the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigMapRef {
    /// Namespace of the ConfigMap.
    pub namespace: String,
    /// Name of the ConfigMap.
    pub name: String,
    /// Key of the table in `data` (its extension chooses YAML or JSON).
    pub key: String,
}

impl fmt::Display for ConfigMapRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "configmap {}/{} key {}",
            self.namespace, self.name, self.key
        )
    }
}

/// Why the in-cluster source could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the routing table from {target}: {source}")]
pub struct StartError {
    target: ConfigMapRef,
    source: kube::Error,
}

/// A routing table in a ConfigMap, watched through the API server.
pub struct ConfigMapRoutingSource {
    target: ConfigMapRef,
    published: Arc<RoutingPublisher>,
    task: JoinHandle<()>,
}

impl fmt::Debug for ConfigMapRoutingSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigMapRoutingSource")
            .field("target", &self.target)
            .field("revision", &self.published.current().revision())
            .finish_non_exhaustive()
    }
}

impl ConfigMapRoutingSource {
    /// Reads the ConfigMap once and starts watching it (on the current Tokio runtime; the task
    /// stops when the source is dropped).
    ///
    /// A missing ConfigMap or an invalid table is not an error here: the source serves an empty
    /// table until a valid one is written. A failed read is (the API server unreachable, or the
    /// scorer's service account not allowed to read ConfigMaps), so that a misconfigured pod
    /// says so at once.
    pub async fn start(
        client: Client,
        target: ConfigMapRef,
        metrics: RoutingMetrics,
    ) -> Result<Self, StartError> {
        let api: Api<ConfigMap> = Api::namespaced(client, &target.namespace);
        let first = api
            .get_opt(&target.name)
            .await
            .map_err(|source| StartError {
                target: target.clone(),
                source,
            })?;
        let empty = RoutingTable::empty(WAITING).expect("an empty table is valid");
        let mut follower = Follower {
            target: target.clone(),
            published: Arc::new(RoutingPublisher::new(Arc::new(empty))),
            metrics,
            applied: None,
            last_refused: None,
        };
        follower.observe(first.as_ref());
        let published = follower.published.clone();
        let task = tokio::spawn(follower.run(api));
        Ok(Self {
            target,
            published,
            task,
        })
    }

    /// The ConfigMap watched.
    pub fn target(&self) -> &ConfigMapRef {
        &self.target
    }
}

impl Drop for ConfigMapRoutingSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RoutingSource for ConfigMapRoutingSource {
    fn current(&self) -> Arc<RoutingTable> {
        self.published.current()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.published.subscribe()
    }
}

type Digest = [u8; 32];

/// The watch task: turns ConfigMap events into published tables.
struct Follower {
    target: ConfigMapRef,
    published: Arc<RoutingPublisher>,
    metrics: RoutingMetrics,
    /// Hash of the text of the table serving, once one was read.
    applied: Option<Digest>,
    /// What was last refused, so that a watch relist does not report it again.
    last_refused: Option<Observed>,
}

/// What one look at the ConfigMap found.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Observed {
    /// The table's text, by hash.
    Text(Digest),
    /// The ConfigMap does not exist.
    NoConfigMap,
    /// The ConfigMap has no such key.
    NoKey,
}

impl Follower {
    async fn run(mut self, api: Api<ConfigMap>) {
        let config =
            watcher::Config::default().fields(&format!("metadata.name={}", self.target.name));
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Apply(cm) | Event::InitApply(cm)) => self.observe(Some(&cm)),
                Ok(Event::Delete(_)) => self.observe(None),
                Ok(Event::Init | Event::InitDone) => {}
                // The watcher retries with backoff; the current table keeps serving meanwhile.
                Err(e) => tracing::warn!(
                    target = %self.target,
                    error = &e as &dyn std::error::Error,
                    "routing ConfigMap watch failed; retrying, the current table keeps serving"
                ),
            }
        }
    }

    /// Acts on the ConfigMap as it is now (`None`: it does not exist).
    fn observe(&mut self, cm: Option<&ConfigMap>) {
        let text = cm.map(|cm| {
            cm.data
                .as_ref()
                .and_then(|d| d.get(&self.target.key))
                .map(String::as_str)
        });
        let observed = match text {
            None => Observed::NoConfigMap,
            Some(None) => Observed::NoKey,
            Some(Some(t)) => Observed::Text(sha256(t.as_bytes())),
        };
        if let Observed::Text(digest) = observed
            && self.applied == Some(digest)
        {
            self.last_refused = None;
            return;
        }
        if self.last_refused.as_ref() == Some(&observed) {
            return;
        }
        let origin = self.target.to_string();
        let result = match (text, &observed) {
            (Some(Some(t)), _) => self.decode(t, &origin),
            (_, Observed::NoKey) => Err(RoutingError::Missing {
                origin,
                message: format!("the ConfigMap has no key {:?}", self.target.key),
            }),
            _ => Err(RoutingError::Missing {
                origin,
                message: "the ConfigMap does not exist".to_owned(),
            }),
        };
        match (result, observed) {
            (Ok(table), Observed::Text(digest)) => self.apply(table, digest),
            (Err(error), observed) => {
                self.refuse(&error);
                self.last_refused = Some(observed);
            }
            (Ok(_), _) => unreachable!("a table is only decoded from text"),
        }
    }

    fn decode(&self, text: &str, origin: &str) -> Result<RoutingTable, RoutingError> {
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(RoutingError::TooLarge {
                origin: origin.to_owned(),
                limit: MAX_FILE_BYTES,
            });
        }
        let format = RoutingFormat::detect(Path::new(&self.target.key), text);
        RoutingTable::parse(text, format, origin)
    }

    fn apply(&mut self, table: RoutingTable, digest: Digest) {
        self.published.apply(table, &self.target, &self.metrics);
        self.applied = Some(digest);
        self.last_refused = None;
    }

    fn refuse(&self, error: &RoutingError) {
        self.published.refuse(error, &self.target, &self.metrics);
    }
}

fn sha256(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn follower() -> Follower {
        Follower {
            target: ConfigMapRef {
                namespace: "shop".into(),
                name: "als-routing".into(),
                key: DEFAULT_KEY.into(),
            },
            published: Arc::new(RoutingPublisher::new(Arc::new(
                RoutingTable::empty(WAITING).expect("empty"),
            ))),
            metrics: RoutingMetrics::new(),
            applied: None,
            last_refused: None,
        }
    }

    fn cm(key: &str, text: &str) -> ConfigMap {
        ConfigMap {
            data: Some(BTreeMap::from([(key.to_owned(), text.to_owned())])),
            ..ConfigMap::default()
        }
    }

    fn failures(metrics: &RoutingMetrics) -> Vec<String> {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("routing_table_reload_failures_total{"))
            .map(str::to_owned)
            .collect();
        // Series of a family come in no set order.
        lines.sort();
        lines
    }

    const V1: &str = "formatVersion: 1\nrevision: g1\nmodels:\n  als: {stable: v1}\n";
    const V2: &str = "formatVersion: 1\nrevision: g2\nmodels:\n  als: {stable: v1, canary: {version: v2, weight: 10}}\n";

    #[test]
    fn serves_nothing_until_a_valid_table_then_keeps_the_last_good_one() {
        let mut f = follower();
        f.observe(None);
        assert_eq!(f.published.current().revision(), WAITING);
        assert!(f.published.current().is_empty());
        f.observe(Some(&cm(DEFAULT_KEY, V1)));
        assert_eq!(f.published.current().revision(), "g1");

        // Bad changes leave g1 serving, each reported once however often the watch relists.
        for _ in 0..3 {
            f.observe(Some(&cm(
                DEFAULT_KEY,
                "formatVersion: 1\nmodels: {als: {stable: '..'}}\n",
            )));
        }
        f.observe(Some(&cm("other.yaml", V2)));
        f.observe(None);
        f.observe(None);
        assert_eq!(f.published.current().revision(), "g1");
        assert_eq!(
            failures(&f.metrics),
            [
                "routing_table_reload_failures_total{kind=\"Invalid\"} 1",
                "routing_table_reload_failures_total{kind=\"Missing\"} 3"
            ]
        );

        f.observe(Some(&cm(DEFAULT_KEY, V2)));
        let table = f.published.current();
        assert_eq!(table.revision(), "g2");
        assert_eq!(
            table
                .route("als")
                .and_then(|r| r.canary())
                .map(|c| c.weight()),
            Some(10)
        );
    }

    #[test]
    fn a_relist_of_the_table_serving_is_not_a_new_load() {
        let mut f = follower();
        let mut changes = f.published.subscribe();
        f.observe(Some(&cm(DEFAULT_KEY, V1)));
        assert!(changes.has_changed().expect("open"));
        changes.mark_unchanged();
        f.observe(Some(&cm(DEFAULT_KEY, V1)));
        assert!(!changes.has_changed().expect("open"));
    }

    #[test]
    fn json_keys_are_read_as_json() {
        let mut f = follower();
        f.target.key = "routing.json".into();
        f.observe(Some(&cm(
            "routing.json",
            r#"{"formatVersion": 1, "revision": "j", "models": {"als": {"stable": "v1"}}}"#,
        )));
        assert_eq!(f.published.current().revision(), "j");
    }
}
