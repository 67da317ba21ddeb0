//! `spec.cfTrain.handOffTo`: a registered version goes to a ModelDeployment when its offline
//! NDCG reaches the ModelDeployment's `minOfflineMetricRatio` of the stable version's.
//!
//! The trainer does the comparison (it reads both manifests from the registry it writes to;
//! the operator passes `--compare-to <stable> --min-metric-ratio <r>` when it starts the run)
//! and reports it in its run summary; the operator decides from that summary, here, and sets
//! the ModelDeployment's `spec.version` with server-side apply under its own field manager.
//! So the operator needs no access to the artifact store, and trainer Pods none to the API.

use recsys_core::runs::RunSummary;
use recsys_crds::ModelDeployment;
use recsys_crds::batch_job::{CfTrainSpec, HandOff, HandOffOutcome};
use recsys_trainer::contract::RunOptions;

/// Field manager of the hand-off's writes to `spec.version`.
pub const FIELD_MANAGER: &str = "recsys-operator-handoff";

/// The options of a cf-train run that hands off to `md`: compare with its stable version when
/// it has one and a threshold.
pub fn run_options(cf: &CfTrainSpec, md: Option<&ModelDeployment>) -> RunOptions {
    let compare_to = md.filter(|md| md.spec.model == cf.model).and_then(|md| {
        let stable = md.status.as_ref()?.stable_version.clone()?;
        let ratio = md.spec.strategy.analysis.min_offline_metric_ratio?;
        Some((stable, ratio))
    });
    RunOptions { compare_to }
}

/// What becomes of the version a run registered.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The record on the run.
    pub hand_off: HandOff,
    /// The version to set as the ModelDeployment's `spec.version`, when it changes.
    pub set_version: Option<String>,
}

/// Decides the hand-off of a finished, successful run to ModelDeployment `name`.
pub fn decide(
    cf: &CfTrainSpec,
    name: &str,
    summary: Option<&RunSummary>,
    md: Option<&ModelDeployment>,
) -> Decision {
    let record = |outcome, message: String| HandOff {
        model_deployment: name.to_owned(),
        outcome,
        message,
    };
    let not = |message: String| Decision {
        hand_off: record(HandOffOutcome::NotHandedOff, message),
        set_version: None,
    };
    let Some(version) = summary.and_then(|s| s.version.clone()) else {
        return not("the run's summary names no registered version (see its Pod's log)".into());
    };
    let Some(md) = md else {
        return not(format!(
            "ModelDeployment {name} not found in this namespace"
        ));
    };
    if md.spec.model != cf.model {
        return not(format!(
            "ModelDeployment {name} serves model {}, this job trains {}",
            md.spec.model, cf.model
        ));
    }
    let handed = |message: String| Decision {
        hand_off: record(HandOffOutcome::HandedOff, message),
        set_version: (md.spec.version != version).then(|| version.clone()),
    };
    let stable = md.status.as_ref().and_then(|s| s.stable_version.clone());
    let threshold = md.spec.strategy.analysis.min_offline_metric_ratio;
    match (stable, threshold) {
        (None, _) => handed(format!("{version}: {name} has no stable version yet")),
        (Some(_), None) => handed(format!(
            "{version}: {name} sets no strategy.analysis.minOfflineMetricRatio"
        )),
        (Some(stable), Some(_)) => {
            let Some(c) = summary.and_then(|s| s.comparison.as_ref()) else {
                return not(format!(
                    "{version} was not compared with the stable version {stable} (the run started before {name} had it); the next run will be"
                ));
            };
            if c.against != stable {
                not(format!(
                    "{version} was compared with {}, but the stable version is now {stable}; the next run compares with it",
                    c.against
                ))
            } else if c.passes {
                handed(format!("{version}: {}", c.describe()))
            } else {
                Decision {
                    hand_off: record(
                        HandOffOutcome::BelowThreshold,
                        format!("{version}: {}", c.describe()),
                    ),
                    set_version: None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use recsys_core::runs::Comparison;

    fn md(yaml: &str) -> ModelDeployment {
        serde_yaml::from_str(yaml).expect("fixture")
    }

    const MD: &str = r#"
apiVersion: recsys.io/v1alpha1
kind: ModelDeployment
metadata: { name: shop, namespace: shop }
spec:
  model: als
  version: "v1"
  artifacts: { uri: "s3://models/prod" }
  strategy: { steps: [{ full: {} }], analysis: { minOfflineMetricRatio: 0.98 } }
status: { stableVersion: "v1" }
"#;

    fn cf() -> CfTrainSpec {
        CfTrainSpec {
            model: "als".into(),
            hand_off_to: Some("shop".into()),
        }
    }

    fn summary(version: &str, against: &str, value: f64, passes: bool) -> RunSummary {
        RunSummary {
            job: "cf-train".into(),
            succeeded: true,
            version: Some(version.into()),
            comparison: Some(Comparison {
                against: against.into(),
                metric: "ndcg@10".into(),
                value,
                against_value: Some(0.2),
                min_ratio: 0.98,
                passes,
                note: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn runs_compare_with_the_stable_version_at_the_threshold() {
        let md = md(MD);
        assert_eq!(
            run_options(&cf(), Some(&md)).compare_to,
            Some(("v1".into(), 0.98))
        );
        assert_eq!(run_options(&cf(), None).compare_to, None);
    }

    #[test]
    fn a_better_version_is_handed_off_and_a_worse_one_is_not() {
        let md = md(MD);
        let good = decide(
            &cf(),
            "shop",
            Some(&summary("v2", "v1", 0.21, true)),
            Some(&md),
        );
        assert_eq!(good.hand_off.outcome, HandOffOutcome::HandedOff);
        assert_eq!(good.set_version.as_deref(), Some("v2"));
        assert!(
            good.hand_off.message.contains("ratio 1.050"),
            "{}",
            good.hand_off.message
        );

        let bad = decide(
            &cf(),
            "shop",
            Some(&summary("v3", "v1", 0.1, false)),
            Some(&md),
        );
        assert_eq!(bad.hand_off.outcome, HandOffOutcome::BelowThreshold);
        assert_eq!(bad.set_version, None);
        assert!(
            bad.hand_off.message.contains("ratio 0.500"),
            "{}",
            bad.hand_off.message
        );
    }

    #[test]
    fn nothing_is_handed_off_on_stale_or_missing_facts() {
        let md_v = md(MD);
        let stale = decide(
            &cf(),
            "shop",
            Some(&summary("v2", "v0", 0.3, true)),
            Some(&md_v),
        );
        assert_eq!(stale.hand_off.outcome, HandOffOutcome::NotHandedOff);
        assert!(stale.hand_off.message.contains("stable version is now v1"));
        let missing = decide(&cf(), "shop", Some(&summary("v2", "v1", 0.3, true)), None);
        assert_eq!(missing.hand_off.outcome, HandOffOutcome::NotHandedOff);
        let other_model = CfTrainSpec {
            model: "other".into(),
            hand_off_to: Some("shop".into()),
        };
        let wrong = decide(
            &other_model,
            "shop",
            Some(&summary("v2", "v1", 0.3, true)),
            Some(&md_v),
        );
        assert!(wrong.hand_off.message.contains("serves model als"));
        let no_version = decide(&cf(), "shop", None, Some(&md_v));
        assert_eq!(no_version.set_version, None);
    }

    #[test]
    fn the_first_version_goes_without_a_comparison() {
        let mut first = md(MD);
        first.status = None;
        let d = decide(
            &cf(),
            "shop",
            Some(&summary("v2", "v1", 0.1, false)),
            Some(&first),
        );
        assert_eq!(d.hand_off.outcome, HandOffOutcome::HandedOff);
        assert_eq!(d.set_version.as_deref(), Some("v2"));
    }
}
