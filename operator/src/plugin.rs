//! `kubectl recsys`: the rollout of a ModelDeployment from the command line, as
//! `kubectl argo rollouts` is for Argo Rollouts. Installed as `kubectl-recsys` on the `PATH`,
//! kubectl finds it as a plugin.
//!
//! Every command that changes something sets one annotation the operator acts on once
//! ([`crate::controller::rollout::Action`]) and records in `status.lastAction`; the value says
//! who asked and when. `undo` also sets `spec.version` (to a version that was stable before),
//! in the same patch. With GitOps, change `spec.version` in Git instead: a sync would put the
//! old value back.

use std::fmt::Write as _;

use clap::{Parser, Subcommand};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use recsys_crds::model_deployment::Verdict;
use recsys_crds::{ModelDeployment, ModelDeploymentStatus, Stage};

use crate::controller::rollout::{
    ABORT_ANNOTATION, APPROVE_ANNOTATION, PROMOTE_ANNOTATION, RETRY_ANNOTATION, UNDO_ANNOTATION,
};

/// `kubectl recsys`: see and steer ModelDeployment rollouts.
#[derive(Parser, Debug)]
#[command(name = "kubectl-recsys", version)]
pub struct PluginArgs {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true, env = "RECSYS_NAMESPACE")]
    pub namespace: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// A plugin command.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Where the rollout stands: stage, step, weights, scorer pods, the last analysis.
    Status {
        /// The ModelDeployment.
        name: String,
    },
    /// Approve the pause the rollout waits at; with `--full`, promote the candidate to every
    /// user now, skipping the remaining steps and analysis.
    Promote {
        /// The ModelDeployment.
        name: String,
        /// Skip every remaining step.
        #[arg(long)]
        full: bool,
    },
    /// Stop the rollout: every user back on stable; the candidate stays registered.
    Abort {
        /// The ModelDeployment.
        name: String,
    },
    /// Roll an aborted or rolled-back candidate out again from the first step.
    Retry {
        /// The ModelDeployment.
        name: String,
    },
    /// Go back to the version that was stable before the current one (or `--to-version`), at
    /// once: it was rolled out before.
    Undo {
        /// The ModelDeployment.
        name: String,
        /// A version that was stable before (default: the one before the current).
        #[arg(long)]
        to_version: Option<String>,
    },
    /// Past rollouts, newest first.
    History {
        /// The ModelDeployment.
        name: String,
    },
}

/// Errors of the plugin, each with what to do.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The API server refused or could not be reached.
    #[error("{0}")]
    Kube(#[from] kube::Error),
    /// No kubeconfig or in-cluster config.
    #[error("no Kubernetes configuration: {0}")]
    Config(String),
    /// The command does not apply to the rollout as it stands.
    #[error("{0}")]
    NotApplicable(String),
}

/// Runs one plugin command; what it prints goes to `out`.
pub async fn run(args: PluginArgs, out: &mut String) -> Result<(), PluginError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| PluginError::Config(e.to_string()))?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config)?;
    let api: Api<ModelDeployment> = Api::namespaced(client, &ns);
    match args.command {
        Command::Status { name } => {
            let md = api.get(&name).await?;
            out.push_str(&status(&md));
        }
        Command::History { name } => {
            let md = api.get(&name).await?;
            out.push_str(&history(&md.status.unwrap_or_default()));
        }
        Command::Promote { name, full } => {
            let md = api.get(&name).await?;
            let s = md.status.clone().unwrap_or_default();
            if s.candidate_version.is_none() {
                return Err(PluginError::NotApplicable(format!(
                    "{name}: no rollout under way (stable {})",
                    s.stable_version.as_deref().unwrap_or("none")
                )));
            }
            if full {
                annotate(&api, &name, PROMOTE_ANNOTATION, &who(), None).await?;
                let _ = writeln!(out, "{name}: promotion to every user asked");
            } else {
                let step = s.current_step.unwrap_or(0);
                let at_pause = md
                    .spec
                    .strategy
                    .steps
                    .get(step.max(0) as usize)
                    .is_some_and(|st| st.pause.is_some());
                if !at_pause {
                    return Err(PluginError::NotApplicable(format!(
                        "{name}: step {step} is not a pause; use --full to promote now"
                    )));
                }
                annotate(&api, &name, APPROVE_ANNOTATION, &step.to_string(), None).await?;
                let _ = writeln!(out, "{name}: step {step} approved");
            }
        }
        Command::Abort { name } => {
            annotate(&api, &name, ABORT_ANNOTATION, &who(), None).await?;
            let _ = writeln!(out, "{name}: abort asked; every user goes back to stable");
        }
        Command::Retry { name } => {
            let s = api.get(&name).await?.status.unwrap_or_default();
            if !matches!(s.stage, Stage::Aborted | Stage::RolledBack) {
                return Err(PluginError::NotApplicable(format!(
                    "{name}: stage {:?}; only an aborted or rolled-back rollout can be retried",
                    s.stage
                )));
            }
            annotate(&api, &name, RETRY_ANNOTATION, &who(), None).await?;
            let _ = writeln!(out, "{name}: retry asked");
        }
        Command::Undo { name, to_version } => {
            let s = api.get(&name).await?.status.unwrap_or_default();
            let target = undo_target(&s, to_version.as_deref())
                .map_err(|m| PluginError::NotApplicable(format!("{name}: {m}")))?;
            annotate(&api, &name, UNDO_ANNOTATION, &who(), Some(&target)).await?;
            let _ = writeln!(out, "{name}: undo to {target} asked");
        }
    }
    Ok(())
}

/// Who asks, and when: the local user and the time, as the annotation's value.
fn who() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("{user} at {}", Timestamp::now())
}

/// Sets `annotation` (and `spec.version`, for an undo) in one merge patch.
async fn annotate(
    api: &Api<ModelDeployment>,
    name: &str,
    annotation: &str,
    value: &str,
    version: Option<&str>,
) -> Result<(), PluginError> {
    let mut patch = serde_json::json!({"metadata": {"annotations": {annotation: value}}});
    if let Some(v) = version {
        patch["spec"] = serde_json::json!({"version": v});
    }
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The version an undo goes back to: `asked` if it was stable before, else the latest
/// promoted version other than the current stable one.
pub fn undo_target(s: &ModelDeploymentStatus, asked: Option<&str>) -> Result<String, String> {
    let current = s.stable_version.as_deref().unwrap_or_default();
    let promoted = |v: &str| {
        s.history
            .iter()
            .any(|r| r.version == v && r.outcome == Stage::Promoted)
    };
    match asked {
        Some(v) if v == current => Err(format!("{v} is the stable version already")),
        Some(v) if promoted(v) => Ok(v.to_owned()),
        Some(v) => Err(format!(
            "{v} was never stable here (status.history); roll it out by setting spec.version"
        )),
        None => s
            .history
            .iter()
            .find(|r| r.outcome == Stage::Promoted && r.version != current)
            .map(|r| r.version.clone())
            .ok_or_else(|| "no earlier stable version in status.history".to_owned()),
    }
}

/// The `status` report.
pub fn status(md: &ModelDeployment) -> String {
    let s = md.status.clone().unwrap_or_default();
    let mut out = String::new();
    let name = md.metadata.name.as_deref().unwrap_or_default();
    let _ = writeln!(out, "Name:       {name}");
    let _ = writeln!(out, "Model:      {}", md.spec.model);
    let _ = writeln!(
        out,
        "Stable:     {}",
        s.stable_version.as_deref().unwrap_or("none")
    );
    if let Some(c) = &s.candidate_version {
        let _ = writeln!(out, "Candidate:  {c}");
    }
    let _ = writeln!(out, "Stage:      {:?}", s.stage);
    if let Some(step) = s.current_step {
        let steps = &md.spec.strategy.steps;
        let what = steps
            .get(step.max(0) as usize)
            .map_or("end".to_owned(), |st| {
                if let Some(sh) = &st.shadow {
                    format!("shadow {}", sh.duration.0)
                } else if let Some(c) = &st.canary {
                    format!("canary {}%", c.weight)
                } else if st.pause.is_some() {
                    "pause".to_owned()
                } else {
                    "full".to_owned()
                }
            });
        let _ = writeln!(out, "Step:       {step}/{} ({what})", steps.len());
    }
    let _ = writeln!(
        out,
        "Weights:    stable {}%, candidate {}%",
        100 - s.canary_weight,
        s.canary_weight
    );
    if let Some(f) = &s.scorers {
        let _ = writeln!(
            out,
            "Scorers:    {} ready of {}, {} with stable{}",
            f.ready,
            f.pods,
            f.with_stable,
            f.with_candidate
                .map(|c| format!(", {c} with the candidate"))
                .unwrap_or_default()
        );
    }
    for c in &s.conditions {
        let _ = writeln!(
            out,
            "{:<11} {} {}: {}",
            format!("{}:", c.type_),
            c.status,
            c.reason,
            c.message
        );
    }
    if let Some(a) = &s.analysis {
        let _ = writeln!(
            out,
            "Analysis:   {} failed in a row (failureLimit {})",
            a.consecutive_failures, md.spec.strategy.analysis.failure_limit
        );
        for r in a.runs.iter().take(3) {
            let _ = writeln!(
                out,
                "  {} step {} {:?} {}%: {:?} ({} s, {} pods)",
                r.at.0, r.step, r.exposure, r.weight, r.verdict, r.window_seconds, r.pods
            );
            for c in &r.checks {
                let mark = match c.verdict {
                    Verdict::Successful => "ok  ",
                    Verdict::Failed => "FAIL",
                    Verdict::Inconclusive => "??  ",
                };
                let _ = writeln!(out, "    {mark} {:?}: {}", c.check, c.message);
            }
        }
    }
    if let Some(x) = &s.experiment {
        let _ = writeln!(
            out,
            "Experiment: {} against stable, read {} (attribution window {} s)",
            x.candidate_version, x.read_at.0, x.attribution_window_seconds
        );
        for seg in &x.segments {
            let _ = writeln!(out, "  {}%: {}", seg.canary_weight, seg.summary);
            for v in &seg.variants {
                let pct =
                    |r: Option<f64>| r.map_or("n/a".to_owned(), |r| format!("{:.2}%", r * 100.0));
                let _ = writeln!(
                    out,
                    "    {:<7} {:<20} users {:>7}  impressions {:>8}  CTR {:>7}  conversion {:>7}",
                    v.variant,
                    v.version,
                    v.users,
                    v.impressions,
                    pct(v.ctr),
                    pct(v.conversion)
                );
            }
        }
    }
    out
}

/// The `history` report.
pub fn history(s: &ModelDeploymentStatus) -> String {
    let mut out = format!(
        "{:<26} {:<24} {:<11} REASON\n",
        "FINISHED", "VERSION", "OUTCOME"
    );
    for r in &s.history {
        let _ = writeln!(
            out,
            "{:<26} {:<24} {:<11} {}",
            r.finished_at.0.to_string(),
            r.version,
            format!("{:?}", r.outcome),
            r.reason
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use recsys_crds::RolloutRecord;

    fn record(version: &str, outcome: Stage) -> RolloutRecord {
        RolloutRecord {
            version: version.into(),
            outcome,
            reason: String::new(),
            finished_at: Time("2026-12-01T00:00:00Z".parse().expect("ts")),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        PluginArgs::command().debug_assert();
    }

    #[test]
    fn undo_goes_back_to_the_last_other_stable_version_only() {
        let s = ModelDeploymentStatus {
            stable_version: Some("v3".into()),
            history: vec![
                record("v3", Stage::Promoted),
                record("v4", Stage::RolledBack),
                record("v2", Stage::Promoted),
                record("v1", Stage::Promoted),
            ],
            ..Default::default()
        };
        assert_eq!(undo_target(&s, None), Ok("v2".into()));
        assert_eq!(undo_target(&s, Some("v1")), Ok("v1".into()));
        assert!(undo_target(&s, Some("v4")).is_err_and(|e| e.contains("never stable")));
        assert!(undo_target(&s, Some("v3")).is_err_and(|e| e.contains("already")));
        let fresh = ModelDeploymentStatus {
            stable_version: Some("v1".into()),
            history: vec![record("v1", Stage::Promoted)],
            ..Default::default()
        };
        assert!(undo_target(&fresh, None).is_err());
    }
}
