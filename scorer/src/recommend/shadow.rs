//! Shadow scoring: the shadow version of a model answers the same requests as stable, off the
//! request path, and is compared with it; its answers are never returned.
//!
//! A request hands a [`ShadowJob`] to a bounded queue ([`Shadow::submit`] never waits: when
//! the queue is full the job is dropped and counted, so a slow shadow cannot slow serving).
//! Worker threads compute the shadow's top-k for the same user (trained factors of the shadow
//! version, or a fold-in from the same interactions) and record:
//!
//! - `shadow_jobs_total{model, outcome}`: `compared`, `dropped` (queue full), `no_user` (the
//!   shadow can place neither the user nor their interactions);
//! - `shadow_topk_overlap{model}`: |stable top-k ∩ shadow top-k| / k, a histogram in [0, 1];
//! - `shadow_score_distribution{model, variant}`: the top-k scores of stable and shadow, to
//!   compare their distributions (a shadow whose scores shift is worth a look before canary).

use std::collections::HashSet;
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use recsys_core::cf::interactions::EventType;
use recsys_core::cf::serving::{Interaction, ServingModel};
use tokio::sync::mpsc;

/// What a shadow comparison needs from one request.
#[derive(Clone, Debug)]
pub struct ShadowJob {
    /// The shadow version.
    pub shadow: Arc<ServingModel>,
    /// The user.
    pub user_id: String,
    /// The user's interactions, for a fold-in when the shadow does not know the user.
    pub interactions: Vec<(String, EventType, Option<f32>)>,
    /// Products excluded from stable's answer (already seen).
    pub exclude: Vec<String>,
    /// Stable's answer: product ids and CF scores, best first.
    pub stable: Vec<(String, f32)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    model: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScoreLabels {
    model: String,
    variant: &'static str,
}

/// Metrics of shadow scoring.
#[derive(Clone, Debug)]
pub struct ShadowMetrics {
    jobs: Family<JobLabels, Counter>,
    overlap: Family<ModelLabels, Histogram>,
    scores: Family<ScoreLabels, Histogram>,
}

impl Default for ShadowMetrics {
    fn default() -> Self {
        Self {
            jobs: Family::default(),
            overlap: Family::new_with_constructor(|| {
                Histogram::new([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
            }),
            scores: Family::new_with_constructor(|| {
                Histogram::new([-0.5, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5])
            }),
        }
    }
}

impl ShadowMetrics {
    /// Registers the metrics (prefix added by the caller).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "shadow_jobs",
            "Shadow comparisons by model and outcome (compared, dropped, no_user)",
            self.jobs.clone(),
        );
        registry.register(
            "shadow_topk_overlap",
            "Share of stable's top-k that the shadow version also returns",
            self.overlap.clone(),
        );
        registry.register(
            "shadow_score_distribution",
            "Top-k CF scores of stable and shadow, by model and variant",
            self.scores.clone(),
        );
    }

    fn count(&self, model: &str, outcome: &'static str) {
        self.jobs
            .get_or_create(&JobLabels {
                model: model.to_owned(),
                outcome,
            })
            .inc();
    }
}

/// The shadow queue and its workers.
#[derive(Debug)]
pub struct Shadow {
    tx: mpsc::Sender<ShadowJob>,
    metrics: ShadowMetrics,
    workers: Vec<JoinHandle<()>>,
}

/// The comparison of one job (for tests and logs).
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// |stable ∩ shadow| / k.
    pub overlap: f64,
    /// The shadow's answer.
    pub shadow: Vec<(String, f32)>,
}

/// Computes the shadow's answer to `job` and compares; `None` when the shadow cannot place
/// the user.
pub fn compare(job: &ShadowJob) -> Option<Comparison> {
    let k = job.stable.len();
    let m = &job.shadow;
    let folded;
    let user: &[f32] = match m.user_factors(&job.user_id) {
        Some(v) => v,
        None => {
            let interactions: Vec<Interaction<'_>> = job
                .interactions
                .iter()
                .map(|(item, kind, value)| Interaction {
                    item,
                    kind: *kind,
                    value: *value,
                })
                .collect();
            folded = m.fold_in(&interactions);
            if folded.known == 0 {
                return None;
            }
            &folded.factors
        }
    };
    let mut exclude: Vec<u32> = job.exclude.iter().filter_map(|p| m.item_index(p)).collect();
    exclude.sort_unstable();
    let shadow: Vec<(String, f32)> = m
        .top_k(user, k, &exclude, None)
        .into_iter()
        .filter_map(|(row, s)| Some((m.item_id(row)?.to_owned(), s)))
        .collect();
    let stable: HashSet<&str> = job.stable.iter().map(|(p, _)| p.as_str()).collect();
    let common = shadow
        .iter()
        .filter(|(p, _)| stable.contains(p.as_str()))
        .count();
    Some(Comparison {
        overlap: if k == 0 {
            1.0
        } else {
            common as f64 / k as f64
        },
        shadow,
    })
}

impl Shadow {
    /// A queue of `capacity` jobs served by `workers` threads.
    pub fn start(capacity: usize, workers: usize, metrics: ShadowMetrics) -> Self {
        let (tx, rx) = mpsc::channel::<ShadowJob>(capacity.max(1));
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let handles = (0..workers.max(1))
            .map(|i| {
                let rx = rx.clone();
                let metrics = metrics.clone();
                std::thread::Builder::new()
                    .name(format!("shadow-{i}"))
                    .spawn(move || {
                        loop {
                            let job = {
                                let mut guard = match rx.lock() {
                                    Ok(g) => g,
                                    Err(poisoned) => poisoned.into_inner(),
                                };
                                guard.blocking_recv()
                            };
                            let Some(job) = job else { break };
                            Self::run(&metrics, &job);
                        }
                    })
                    .unwrap_or_else(|e| panic!("spawning a shadow worker thread: {e}"))
            })
            .collect();
        Self {
            tx,
            metrics,
            workers: handles,
        }
    }

    fn run(metrics: &ShadowMetrics, job: &ShadowJob) {
        let model = job.shadow.name().to_owned();
        let Some(c) = compare(job) else {
            metrics.count(&model, "no_user");
            return;
        };
        metrics.count(&model, "compared");
        metrics
            .overlap
            .get_or_create(&ModelLabels {
                model: model.clone(),
            })
            .observe(c.overlap);
        for (variant, scores) in [
            ("stable", job.stable.iter().map(|s| s.1).collect::<Vec<_>>()),
            ("shadow", c.shadow.iter().map(|s| s.1).collect()),
        ] {
            let h = metrics.scores.get_or_create(&ScoreLabels {
                model: model.clone(),
                variant,
            });
            for s in scores {
                h.observe(f64::from(s));
            }
        }
        tracing::debug!(
            model,
            user = job.user_id,
            overlap = c.overlap,
            "shadow compared"
        );
    }

    /// Queues a job; a full queue drops it (counted). Returns whether it was queued.
    pub fn submit(&self, job: ShadowJob) -> bool {
        let model = job.shadow.name().to_owned();
        match self.tx.try_send(job) {
            Ok(()) => true,
            Err(_) => {
                self.metrics.count(&model, "dropped");
                false
            }
        }
    }

    /// Closes the queue and waits for the workers to finish what is queued.
    pub fn shutdown(self) {
        drop(self.tx);
        for w in self.workers {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;
    use recsys_core::artifacts::{DataInfo, Dtype, LoadedModel, Manifest};
    use recsys_core::cf::als::AlsModel;
    use recsys_core::cf::interactions::IdMap;

    fn model(version: &str, flip: bool) -> Arc<ServingModel> {
        let items = if flip {
            array![[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.9, 0.1]]
        } else {
            array![[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.9, 0.1]]
        };
        Arc::new(
            ServingModel::new(
                "als",
                LoadedModel {
                    model: AlsModel {
                        user_factors: array![[1.0, 0.0]],
                        item_factors: items,
                        regularization: 0.1,
                    },
                    users: IdMap::from_ids(vec!["u".into()]),
                    items: IdMap::from_ids((0..4).map(|i| format!("p{i}")).collect()),
                    manifest: Manifest {
                        format_version: 1,
                        model: "als".into(),
                        version: version.into(),
                        created_at: chrono_now(),
                        trainer_version: "test".into(),
                        git_sha: None,
                        dtype: Dtype::F32,
                        regularization: 0.1,
                        files: vec![],
                        params: serde_json::Value::Null,
                        metrics: serde_json::Value::Null,
                        data: DataInfo::default(),
                    },
                },
            )
            .expect("model"),
        )
    }

    fn chrono_now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
    }

    fn job(shadow: Arc<ServingModel>, user: &str) -> ShadowJob {
        ShadowJob {
            shadow,
            user_id: user.into(),
            interactions: vec![],
            exclude: vec![],
            stable: vec![("p0".into(), 1.0), ("p3".into(), 0.9)],
        }
    }

    #[test]
    fn the_same_model_overlaps_fully_and_a_different_one_less() {
        let same = compare(&job(model("v1", false), "u")).expect("compared");
        assert_eq!(same.overlap, 1.0);
        let other = compare(&job(model("v2", true), "u")).expect("compared");
        assert_eq!(other.overlap, 0.5, "{other:?}");
        // A user the shadow does not know is folded in from the interactions, or skipped.
        assert!(compare(&job(model("v1", false), "stranger")).is_none());
        let mut j = job(model("v1", false), "stranger");
        j.interactions = vec![("p0".into(), EventType::Purchase, None)];
        assert!(compare(&j).is_some());
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let metrics = ShadowMetrics::default();
        // One worker, a queue of one: flood it faster than it can drain.
        let shadow = Shadow::start(1, 1, metrics.clone());
        let m = model("v1", false);
        let started = std::time::Instant::now();
        let queued = (0..2000)
            .filter(|_| shadow.submit(job(m.clone(), "u")))
            .count();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "submit never waits"
        );
        shadow.shutdown();
        let mut text = String::new();
        let mut reg = Registry::default();
        metrics.register(&mut reg);
        prometheus_client::encoding::text::encode(&mut text, &reg).expect("encode");
        let count = |outcome: &str| -> u64 {
            let prefix = format!("shadow_jobs_total{{model=\"als\",outcome=\"{outcome}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .map_or(0, |v| v.trim().parse().unwrap_or(0))
        };
        assert_eq!(count("compared") as usize, queued, "{text}");
        assert_eq!(count("dropped") as usize, 2000 - queued, "{text}");
        assert!(count("dropped") > 0, "{text}");
        assert!(text.contains("shadow_topk_overlap_bucket"), "{text}");
    }
}
