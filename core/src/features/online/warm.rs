//! Warming an online store from the offline store: the latest value of every entity of each
//! feature, so that a process starting on an empty online store (the in-process one of local
//! mode) serves what a batch job already wrote offline.

use crate::features::offline::{OfflineStore, PitOptions};
use crate::features::{EntityKey, EntityKind, FeatureRef};

use super::{
    DEFAULT_RETENTION_FACTOR, OnlineFeature, OnlineStore, WriteReport, duration_ms, now_ms,
};

/// What [`warm_from_offline`] did.
#[derive(Debug, Default)]
pub struct WarmReport {
    /// Feature versions copied.
    pub features: usize,
    /// What the online writes did, summed over the features.
    pub written: WriteReport,
    /// Feature versions that could not be copied: the feature, the error kind and its message.
    pub failures: Vec<(FeatureRef, &'static str, String)>,
}

/// Copies, for each `(feature, entity kind)`, every entity's value as of now from `offline`
/// into `online` (the online store's overwrite rule keeps anything newer already there).
/// Values older than `TTL × DEFAULT_RETENTION_FACTOR` are left out, as the online store would
/// refuse them. A feature that fails is reported and the others are still copied.
///
/// Reads a whole feature at a time: meant for local data sets and start-up, not for a
/// production offline store (materialization jobs write Redis there).
pub async fn warm_from_offline(
    online: &dyn OnlineStore,
    offline: &dyn OfflineStore,
    features: &[(OnlineFeature, EntityKind)],
) -> WarmReport {
    let mut report = WarmReport::default();
    let now = now_ms();
    for (feature, kind) in features {
        let options = PitOptions {
            as_of_written_ms: None,
            max_age_ms: Some(
                duration_ms(feature.ttl).saturating_mul(i64::from(DEFAULT_RETENTION_FACTOR)),
            ),
        };
        let rows = match offline
            .snapshot(&feature.feature, *kind, now, &options)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                report
                    .failures
                    .push((feature.feature.clone(), e.kind(), e.to_string()));
                continue;
            }
        };
        if rows.is_empty() {
            continue;
        }
        let values: Vec<_> = rows
            .into_iter()
            .map(|(id, v)| (EntityKey { kind: *kind, id }, v))
            .collect();
        match online
            .write_batch(&feature.feature, feature.ttl, &values)
            .await
        {
            Ok(written) => {
                report.features += 1;
                report.written += written;
            }
            Err(e) => report
                .failures
                .push((feature.feature.clone(), e.kind(), e.to_string())),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::features::offline::{InProcessOfflineStore, OfflineRow};
    use crate::features::online::InProcessOnlineStore;
    use crate::features::{FeatureValue, StoredValue};

    #[tokio::test]
    async fn warming_copies_the_latest_servable_values() {
        let offline = InProcessOfflineStore::new();
        let online = InProcessOnlineStore::new();
        let now = now_ms();
        let pop = OnlineFeature::new(FeatureRef::new("pop", 1), Duration::from_secs(60));
        let aff = OnlineFeature::new(FeatureRef::new("aff", 1), Duration::from_secs(60));
        offline
            .write(
                &pop.feature,
                EntityKind::Product,
                &[
                    OfflineRow::new("p1", FeatureValue::Float(1.0), now - 5_000),
                    OfflineRow::new("p1", FeatureValue::Float(2.0), now - 1_000),
                    // Past retention (2 × 60 s): not copied.
                    OfflineRow::new("p2", FeatureValue::Float(3.0), now - 200_000),
                ],
            )
            .await
            .expect("write");
        // Something newer is already online for p3: kept.
        offline
            .write(
                &pop.feature,
                EntityKind::Product,
                &[OfflineRow::new("p3", FeatureValue::Float(4.0), now - 9_000)],
            )
            .await
            .expect("write");
        let newer = StoredValue {
            value: FeatureValue::Float(5.0),
            event_time_ms: now - 10,
            written_at_ms: now,
        };
        online
            .write_batch(
                &pop.feature,
                pop.ttl,
                &[(EntityKey::product("p3"), newer.clone())],
            )
            .await
            .expect("online write");

        let report = warm_from_offline(
            &online,
            &offline,
            &[
                (pop.clone(), EntityKind::Product),
                (aff.clone(), EntityKind::User),
            ],
        )
        .await;
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        assert_eq!(report.features, 1, "aff has no offline values");
        assert_eq!(report.written.written, 1, "{report:?}");
        assert_eq!(report.written.kept_newer, 1, "{report:?}");

        let entities = [
            EntityKey::product("p1"),
            EntityKey::product("p2"),
            EntityKey::product("p3"),
        ];
        let m = online
            .read_batch(&entities, std::slice::from_ref(&pop))
            .await
            .expect("read");
        assert_eq!(
            m.get(0, 0).map(|v| v.value.clone()),
            Some(FeatureValue::Float(2.0))
        );
        assert_eq!(m.get(1, 0), None);
        assert_eq!(m.get(2, 0), Some(&newer));
    }

    #[tokio::test]
    async fn a_failing_feature_is_reported_and_the_rest_copied() {
        let offline = InProcessOfflineStore::new();
        let online = InProcessOnlineStore::new();
        let good = OnlineFeature::new(FeatureRef::new("good", 1), Duration::from_secs(60));
        let bad = OnlineFeature::new(FeatureRef::new("Bad", 1), Duration::from_secs(60));
        offline
            .write(
                &good.feature,
                EntityKind::User,
                &[OfflineRow::new("u1", FeatureValue::Int(1), now_ms())],
            )
            .await
            .expect("write");
        let report = warm_from_offline(
            &online,
            &offline,
            &[(bad, EntityKind::User), (good, EntityKind::User)],
        )
        .await;
        assert_eq!(report.features, 1);
        assert_eq!(report.written.written, 1);
        assert_eq!(report.failures.len(), 1, "{report:?}");
        assert_eq!(report.failures[0].1, "OfflineInvalidFeature");
    }
}
