//! Types shared by the three kinds: durations, conditions and their bookkeeping.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition type: the spec passed validation and the operator acts on it.
pub const ACCEPTED: &str = "Accepted";
/// Condition type: the object does what it declares (kind-specific meaning).
pub const READY: &str = "Ready";

/// Regular expression every [`Duration`] matches: one or more `<integer><unit>` pairs.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";

/// A length of time written as `<integer><unit>` pairs, units `ms`, `s`, `m`, `h` and `d`,
/// for example `90s`, `30m` or `1h30m`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Duration(
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"), length(max = 32))] pub String,
);

/// Why a [`Duration`] string could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid duration {value:?}: {reason} (expected <integer><unit> pairs such as 90s, 30m or 1h30m; units ms, s, m, h, d)"
)]
pub struct DurationError {
    value: String,
    reason: String,
}

impl Duration {
    /// Parses the duration into a [`std::time::Duration`].
    pub fn to_std(&self) -> Result<std::time::Duration, DurationError> {
        let err = |reason: String| DurationError {
            value: self.0.clone(),
            reason,
        };
        let s = self.0.as_str();
        if s.is_empty() {
            return Err(err("empty".into()));
        }
        let mut total = std::time::Duration::ZERO;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(err(format!("expected a number at {rest:?}")));
            }
            let (num, tail) = rest.split_at(digits);
            let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
            let (unit, tail) = tail.split_at(unit_len);
            // humantime reads each `<number><unit>` pair; we only restrict the unit set.
            if !matches!(unit, "ms" | "s" | "m" | "h" | "d") {
                return Err(err(format!("unknown unit {unit:?}")));
            }
            let part = humantime::parse_duration(&format!("{num}{unit}"))
                .map_err(|e| err(e.to_string()))?;
            total = total
                .checked_add(part)
                .ok_or_else(|| err("overflows".into()))?;
            rest = tail;
        }
        Ok(total)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Duration {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// The status of a condition, as the Kubernetes API conventions spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The controller cannot tell yet.
    Unknown,
}

impl ConditionStatus {
    /// The wire form: `"True"`, `"False"` or `"Unknown"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(b: bool) -> Self {
        if b { Self::True } else { Self::False }
    }
}

/// Builds a condition for `generation`, stamped `now`.
pub fn condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(now),
    }
}

/// Merges `new` into `conditions`, keyed by type. `lastTransitionTime` only moves when the
/// status changes, as the API conventions require; reason, message and generation always
/// follow the newest observation.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let transition = if existing.status == new.status {
                existing.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            *existing = Condition {
                last_transition_time: transition,
                ..new
            };
        }
        None => conditions.push(new),
    }
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        let cases = [
            ("90s", 90),
            ("30m", 1800),
            ("1h30m", 5400),
            ("1d", 86_400),
            ("2h0m5s", 7205),
        ];
        for (text, secs) in cases {
            assert_eq!(
                Duration::from(text).to_std().expect(text).as_secs(),
                secs,
                "{text}"
            );
        }
        assert_eq!(
            Duration::from("250ms").to_std().expect("ms").as_millis(),
            250
        );
    }

    #[test]
    fn bad_durations_name_the_problem() {
        for bad in ["", "10", "m5", "5 m", "5w", "1h-3m"] {
            let e = Duration::from(bad).to_std().expect_err(bad).to_string();
            assert!(e.contains("invalid duration"), "{bad}: {e}");
        }
        let e = Duration::from("5w").to_std().expect_err("5w").to_string();
        assert!(e.contains("unknown unit \"w\""), "{e}");
    }

    #[test]
    fn pattern_and_parser_agree() {
        // The schema pattern is what the API server enforces; the parser must accept
        // everything the pattern accepts.
        for ok in ["1s", "10m", "1h30m", "100ms", "7d"] {
            assert!(Duration::from(ok).to_std().is_ok(), "{ok}");
        }
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().expect("t0");
        let t1: Timestamp = "2026-01-02T00:00:00Z".parse().expect("t1");
        let mut cs = vec![];
        set_condition(
            &mut cs,
            condition(READY, ConditionStatus::False, "A", "a", Some(1), t0),
        );
        set_condition(
            &mut cs,
            condition(READY, ConditionStatus::False, "B", "b", Some(2), t1),
        );
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].reason, "B");
        assert_eq!(cs[0].observed_generation, Some(2));
        assert_eq!(cs[0].last_transition_time.0, t0);
        set_condition(
            &mut cs,
            condition(READY, ConditionStatus::True, "C", "c", Some(2), t1),
        );
        assert_eq!(cs[0].last_transition_time.0, t1);
        set_condition(
            &mut cs,
            condition(ACCEPTED, ConditionStatus::True, "Ok", "", Some(2), t1),
        );
        assert_eq!(cs.len(), 2);
        assert_eq!(
            find_condition(&cs, ACCEPTED).map(|c| c.status.as_str()),
            Some("True")
        );
    }
}
