//! What a batch-job run tells the operator when it ends: a compact JSON summary that the
//! trainer writes as its container's termination message. The operator reads it from the Pod's
//! status, so trainer Pods need no API credentials, and nothing but the Pod carries it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Environment variable naming the file the summary goes to (the operator sets it to the
/// container's `terminationMessagePath`); unset, no summary is written.
pub const SUMMARY_PATH_ENV: &str = "RECSYS_TERMINATION_MESSAGE_PATH";

/// The kubelet keeps at most this many bytes of a termination message.
pub const MAX_BYTES: usize = 4096;

/// The end of one run of a trainer job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    /// The job (`popularity`, `cf-train`, …).
    pub job: String,
    /// Whether it succeeded.
    pub succeeded: bool,
    /// The error's stable kind, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// What went wrong, when it failed (shortened to fit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Wall time of the run.
    pub seconds: f64,
    /// Events read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<u64>,
    /// Rows or values written (feature values, interactions learned from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// The model a `cf-train` run registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The version it registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Offline metrics of that version on its held-out split (`ndcg@10`, …), and the
    /// popularity baseline's as `baseline.ndcg@10`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// The registered version against another (`cf-train --compare-to`): what a hand-off to a
    /// ModelDeployment is decided on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
    /// What the run's data-quality checks found (the `data-quality` job, and the input checks
    /// of `cf-train` and the feature jobs): the operator exports it as metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<crate::quality::QualitySummary>,
}

/// A new version's offline metric against an earlier version's, both from their manifests
/// (each measured on its own held-out split, at the same k).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Comparison {
    /// The version compared against.
    pub against: String,
    /// The metric, e.g. `ndcg@10`.
    pub metric: String,
    /// The new version's value.
    pub value: f64,
    /// The other version's value, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub against_value: Option<f64>,
    /// The least `value / against_value` that passes.
    pub min_ratio: f64,
    /// Whether the new version passes.
    pub passes: bool,
    /// Why it could not be compared, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Comparison {
    /// `value / against_value`, when both are known and the other is positive.
    pub fn ratio(&self) -> Option<f64> {
        self.against_value
            .filter(|v| *v > 0.0)
            .map(|v| self.value / v)
    }

    /// One line with the figures, for conditions and Events.
    pub fn describe(&self) -> String {
        match (self.against_value, self.ratio(), &self.note) {
            (_, _, Some(note)) => format!("not compared with {}: {note}", self.against),
            (Some(a), Some(r), None) => format!(
                "{} {:.4} vs {:.4} for {} (ratio {:.3}, at least {:.3} needed)",
                self.metric, self.value, a, self.against, r, self.min_ratio
            ),
            (Some(a), None, None) => format!(
                "{} {:.4} vs {:.4} for {}: no ratio against zero",
                self.metric, self.value, a, self.against
            ),
            (None, _, None) => format!("{} of {} unknown", self.metric, self.against),
        }
    }
}

impl RunSummary {
    /// The summary as JSON of at most [`MAX_BYTES`]: the message is shortened to 1 KiB, then,
    /// if it still does not fit, the metrics go, then the message, so the parts the operator
    /// acts on (outcome, version) always fit.
    pub fn to_message(&self) -> String {
        let json = |s: &Self| serde_json::to_string(s).unwrap_or_default();
        let mut s = self.clone();
        if let Some(m) = &mut s.message {
            shorten(m, 1024);
        }
        if json(&s).len() > MAX_BYTES {
            s.metrics.clear();
        }
        while json(&s).len() > MAX_BYTES
            && s.quality.as_ref().is_some_and(|q| !q.violations.is_empty())
        {
            if let Some(q) = &mut s.quality {
                q.violations.pop();
            }
        }
        if json(&s).len() > MAX_BYTES {
            s.message = None;
        }
        if json(&s).len() > MAX_BYTES {
            shorten(&mut s.job, 64);
            for (f, max) in [
                (&mut s.error_kind, 64),
                (&mut s.model, 256),
                (&mut s.version, 256),
            ] {
                if let Some(f) = f {
                    shorten(f, max);
                }
            }
        }
        json(&s)
    }

    /// Reads a termination message; `None` when it is not a summary (a crash before it was
    /// written leaves the log's tail there instead).
    pub fn parse(message: &str) -> Option<Self> {
        serde_json::from_str(message.trim()).ok()
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut with `…`.
fn shorten(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut cut = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s.push('…');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_round_trip_and_always_fit() {
        let s = RunSummary {
            job: "cf-train".into(),
            succeeded: true,
            seconds: 12.5,
            rows: Some(8000),
            model: Some("als".into()),
            version: Some("20261204-170000-abcdef".into()),
            metrics: BTreeMap::from([("ndcg@10".into(), 0.21), ("baseline.ndcg@10".into(), 0.1)]),
            ..Default::default()
        };
        assert_eq!(RunSummary::parse(&s.to_message()), Some(s.clone()));

        let long = RunSummary {
            succeeded: false,
            error_kind: Some("Usage".into()),
            message: Some("é".repeat(10_000)),
            metrics: (0..500).map(|i| (format!("m{i}"), 1.0)).collect(),
            ..s
        };
        let msg = long.to_message();
        assert!(msg.len() <= MAX_BYTES, "{}", msg.len());
        let back = RunSummary::parse(&msg).expect("still a summary");
        assert_eq!(
            back.version, long.version,
            "what the operator acts on is kept"
        );
        assert!(back.message.expect("message").ends_with('…'));
        assert_eq!(RunSummary::parse("panicked at …"), None);
    }
}
