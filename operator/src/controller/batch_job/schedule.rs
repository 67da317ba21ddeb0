//! When a scheduled BatchJob is due: its cron expression read in its time zone (croner over
//! jiff), as the CronJob controller reads one.

use std::str::FromStr;

use croner::Cron;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use recsys_crds::BatchJobSpec;

/// A due run seen later than this after its time is missed, not started (the CronJob
/// controller's `startingDeadlineSeconds` of the CronJobs this operator used to create).
pub const STARTING_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

/// A schedule in its time zone.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    tz: TimeZone,
}

/// Why a schedule cannot be read, and the field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleError {
    /// `spec.schedule` or `spec.timeZone`.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl Schedule {
    /// The spec's schedule; `None` without one. Every problem is reported, each with its
    /// field.
    pub fn of(spec: &BatchJobSpec) -> Result<Option<Self>, Vec<ScheduleError>> {
        let tz = match &spec.time_zone {
            None => Ok(TimeZone::UTC),
            Some(name) => TimeZone::get(name).map_err(|_| ScheduleError {
                field: "spec.timeZone",
                message: format!("{name:?} is not a known IANA time zone"),
            }),
        };
        let Some(expr) = &spec.schedule else {
            return tz.map(|_| None).map_err(|e| vec![e]);
        };
        let cron = Cron::from_str(expr).map_err(|e| ScheduleError {
            field: "spec.schedule",
            message: format!("{expr:?} is not a valid cron schedule: {e}"),
        });
        match (cron, tz) {
            (Ok(cron), Ok(tz)) => Ok(Some(Self { cron, tz })),
            (cron, tz) => Err([cron.err(), tz.err()].into_iter().flatten().collect()),
        }
    }

    /// The latest due time at or before `now`.
    pub fn last_due(&self, now: Timestamp) -> Option<Timestamp> {
        self.cron
            .find_previous_occurrence(&now.to_zoned(self.tz.clone()), true)
            .ok()
            .map(|z| z.timestamp())
    }

    /// The first due time after `now`.
    pub fn next_due(&self, now: Timestamp) -> Option<Timestamp> {
        self.cron
            .find_next_occurrence(&now.to_zoned(self.tz.clone()), false)
            .ok()
            .map(|z| z.timestamp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> BatchJobSpec {
        serde_yaml::from_str(yaml).expect("spec")
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn due_times_follow_the_time_zone() {
        // 03:00 in Berlin is 02:00 UTC in winter.
        let s = Schedule::of(&spec(
            "{job: cf-train, schedule: '0 3 * * *', timeZone: Europe/Berlin}",
        ))
        .expect("valid")
        .expect("scheduled");
        let now = ts("2026-12-04T12:00:00Z");
        assert_eq!(s.last_due(now), Some(ts("2026-12-04T02:00:00Z")));
        assert_eq!(s.next_due(now), Some(ts("2026-12-05T02:00:00Z")));
        // At the due time itself, it is due.
        assert_eq!(
            s.last_due(ts("2026-12-05T02:00:00Z")),
            Some(ts("2026-12-05T02:00:00Z"))
        );
        let every5 = Schedule::of(&spec("{job: popularity, schedule: '*/5 * * * *'}"))
            .expect("valid")
            .expect("scheduled");
        assert_eq!(
            every5.next_due(ts("2026-12-04T12:03:10Z")),
            Some(ts("2026-12-04T12:05:00Z"))
        );
        let daily = Schedule::of(&spec("{job: popularity, schedule: '@daily'}"))
            .expect("macros")
            .expect("scheduled");
        assert_eq!(daily.last_due(now), Some(ts("2026-12-04T00:00:00Z")));
    }

    #[test]
    fn bad_schedules_and_zones_name_their_field() {
        let e = Schedule::of(&spec(
            "{job: popularity, schedule: '61 * * * *', timeZone: Mars/Olympus}",
        ))
        .expect_err("bad");
        let fields: Vec<&str> = e.iter().map(|e| e.field).collect();
        assert_eq!(fields, ["spec.schedule", "spec.timeZone"]);
        assert!(e[0].message.contains("61 * * * *"), "{}", e[0].message);
        assert!(
            Schedule::of(&spec("{job: popularity}"))
                .expect("ok")
                .is_none()
        );
    }
}
