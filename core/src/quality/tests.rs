use super::*;

const H: i64 = volume::HOUR_MS;

fn columns() -> Vec<Column> {
    EXPECTED_COLUMNS
        .iter()
        .map(|(n, t, _)| Column {
            name: (*n).into(),
            data_type: (*t).into(),
        })
        .collect()
}

/// Four weeks of clean hourly buckets (views 100, purchases 20 an hour) ending at `at`.
fn clean(at_ms: i64) -> EventProfile {
    let args = QualityArgs::default();
    let from = at_ms - args.history_ms();
    let mut buckets = vec![];
    for h in from.div_euclid(H) + 1..at_ms.div_euclid(H) {
        for (t, n) in [("view", 100), ("purchase", 30)] {
            buckets.push(Bucket {
                hour: Some(h),
                event_type: Some(t.into()),
                rows: n,
                ..Default::default()
            });
        }
    }
    EventProfile {
        target: "events".into(),
        at_ms,
        history_from_ms: from,
        columns: Some(columns()),
        buckets,
        newest_ms: Some(at_ms - 30_000),
        duplicates: Some((0, 3120)),
        ..Default::default()
    }
}

const AT: i64 = 1_795_000_000_000 / H * H + H / 4;

fn verdicts(results: &[CheckResult]) -> BTreeMap<&str, Verdict> {
    results
        .iter()
        .map(|r| (r.check.as_str(), r.verdict))
        .collect()
}

fn failing(results: &[CheckResult]) -> Vec<&str> {
    results
        .iter()
        .filter(|r| r.verdict == Verdict::Fail)
        .map(|r| r.check.as_str())
        .collect()
}

#[test]
fn clean_data_passes_every_check() {
    let r = evaluate(&clean(AT), &QualityArgs::default());
    assert_eq!(failing(&r), Vec::<&str>::new(), "{r:#?}");
    let v = verdicts(&r);
    for check in [
        "schema",
        "freshness",
        "completeness.user_id",
        "completeness.product_id",
        "completeness.occurred_at",
        "validity.event_type",
        "validity.duplicate",
        "volume.total",
        "volume.view",
        "volume.purchase",
    ] {
        assert_eq!(v.get(check), Some(&Verdict::Pass), "{check}: {r:#?}");
    }
    assert_eq!(v.get("validity.unknown_product"), Some(&Verdict::Skipped));
    let report = QualityReport::new("data-quality", AT, r, 0.1);
    assert!(report.passed);
    assert_eq!(report.summary().checks["volume"]["pass"], 3);
}

#[test]
fn a_changed_or_missing_column_fails_the_schema_check_and_names_it() {
    let mut p = clean(AT);
    let cols = p.columns.as_mut().expect("columns");
    cols.retain(|c| c.name != "category");
    cols.iter_mut()
        .find(|c| c.name == "value")
        .expect("value")
        .data_type = "double precision".into();
    let r = evaluate(&p, &QualityArgs::default());
    let s = &r[0];
    assert_eq!((s.check.as_str(), s.verdict), ("schema", Verdict::Fail));
    assert_eq!(s.observed, Some(2.0));
    assert!(
        s.message.contains("column category (text) is missing")
            && s.message
                .contains("value is double precision, expected real"),
        "{}",
        s.message
    );
    // A required column missing: nothing else can be read, and the report says why.
    p.columns
        .as_mut()
        .expect("columns")
        .retain(|c| c.name != "product_id");
    let r = evaluate(&p, &QualityArgs::default());
    assert_eq!(r.len(), 2, "{r:#?}");
    assert!(r[1].message.contains("no column product_id"));
}

#[test]
fn stale_events_fail_freshness_with_their_age() {
    let mut p = clean(AT);
    p.newest_ms = Some(AT - 31 * 60_000);
    let r = evaluate(&p, &QualityArgs::default());
    let f = r
        .iter()
        .find(|r| r.check == "freshness")
        .expect("freshness");
    assert_eq!(
        (f.verdict, f.observed, f.threshold),
        (Verdict::Fail, Some(1860.0), Some(300.0))
    );
    assert!(
        f.message.contains("31.0m old (at most 5m)"),
        "{}",
        f.message
    );
    p.newest_ms = None;
    let r = evaluate(&p, &QualityArgs::default());
    assert_eq!(verdicts(&r)["freshness"], Verdict::Fail);
}

#[test]
fn a_burst_of_nulls_is_judged_on_its_worst_hour() {
    let mut p = clean(AT);
    // 26 of the last complete hour's 130 events have no product: under 1% of the day, 20%
    // of the hour.
    let last = AT.div_euclid(H) - 1;
    let b = p
        .buckets
        .iter_mut()
        .find(|b| b.hour == Some(last) && b.event_type.as_deref() == Some("view"))
        .expect("bucket");
    b.missing_product = 26;
    let r = evaluate(&p, &QualityArgs::default());
    assert_eq!(failing(&r), ["completeness.product_id"]);
    let c = r
        .iter()
        .find(|r| r.check == "completeness.product_id")
        .expect("check");
    assert_eq!(c.observed, Some(0.2));
    assert!(
        c.message.contains("26 of 130 events in the hour"),
        "{}",
        c.message
    );
}

#[test]
fn invalid_values_fail_validity_each_on_its_own() {
    let mut p = clean(AT);
    let last = AT.div_euclid(H) - 1;
    p.buckets.push(Bucket {
        hour: Some(last),
        event_type: Some("wishlist".into()),
        rows: 40,
        ..Default::default()
    });
    p.buckets[0].long_ids = 0;
    let b = p.buckets.iter_mut().rev().nth(1).expect("bucket");
    b.long_ids = 10;
    p.buckets.push(Bucket {
        hour: Some(AT.div_euclid(H) + 5),
        event_type: Some("view".into()),
        rows: 9,
        future: 9,
        ..Default::default()
    });
    p.duplicates = Some((50, 2880));
    p.unknown_products = Some(profile::UnknownProducts {
        unknown: 300,
        rows: 2880,
        products: 12,
        example: Some("p-999".into()),
    });
    let r = evaluate(&p, &QualityArgs::default());
    let v = verdicts(&r);
    for check in [
        "validity.event_type",
        "validity.id_length",
        "validity.future_timestamp",
        "validity.duplicate",
    ] {
        assert_eq!(v[check], Verdict::Fail, "{check}: {r:#?}");
    }
    // Unknown products warn by default: a catalog lags behind new listings.
    assert_eq!(v["validity.unknown_product"], Verdict::Warn);
    let u = r
        .iter()
        .find(|r| r.check == "validity.unknown_product")
        .expect("check");
    assert!(
        u.message.contains("12 products") && u.message.contains("p-999"),
        "{}",
        u.message
    );
    let t = r
        .iter()
        .find(|r| r.check == "validity.event_type")
        .expect("type");
    assert!(t.message.contains("\"wishlist\" ×40"), "{}", t.message);
}

#[test]
fn volume_anomalies_per_type_and_warn_only_configuration() {
    let mut p = clean(AT);
    let last = AT.div_euclid(H) - 1;
    for b in p.buckets.iter_mut().filter(|b| b.hour == Some(last)) {
        if b.event_type.as_deref() == Some("purchase") {
            b.rows = 6;
        }
    }
    let r = evaluate(&p, &QualityArgs::default());
    assert_eq!(failing(&r), ["volume.purchase"], "{r:#?}");
    let c = r
        .iter()
        .find(|r| r.check == "volume.purchase")
        .expect("check");
    // The worst span is the last hour and the elapsed quarter of this one: 6 of 37.5.
    assert_eq!((c.observed, c.threshold), (Some(0.16), Some(0.5)));
    assert!(
        c.message.starts_with("drop: 6 purchase events"),
        "{}",
        c.message
    );
    let args = QualityArgs {
        warn_only: vec!["volume".into()],
        ..QualityArgs::default()
    };
    let r = evaluate(&p, &args);
    assert_eq!(verdicts(&r)["volume.purchase"], Verdict::Warn);
    let report = QualityReport::new("data-quality", AT, r, 0.0);
    assert!(report.passed, "a warning does not hold the gate");
    assert_eq!(report.summary().violations.len(), 1);
}

#[test]
fn an_events_file_is_profiled_leniently() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("events.jsonl");
    let t = AT - 2 * 60_000;
    let mut body = String::new();
    for i in 0..50 {
        body.push_str(&format!(
            "{{\"user_id\":\"u{i}\",\"product_id\":\"p{}\",\"event_type\":\"view\",\"timestamp\":{}}}\n",
            i % 7,
            t + i
        ));
    }
    body.push_str(&format!(
        "{{\"user_id\":\"u1\",\"product_id\":null,\"event_type\":\"view\",\"timestamp\":{t}}}\n"
    ));
    body.push_str(&format!(
        "{{\"user_id\":\"u1\",\"product_id\":\"p0\",\"event_type\":\"view\",\"timestamp\":{t}}}\n"
    ));
    body.push_str("not json\n");
    std::fs::write(&path, body).expect("write");
    let catalog: std::collections::HashSet<String> = (0..6).map(|i| format!("p{i}")).collect();
    let p = profile::file(
        &path,
        crate::events::FileFormat::Auto,
        Some(AT),
        &QualityArgs::default(),
        Some(&catalog),
    )
    .expect("profile");
    assert_eq!(p.malformed, 1);
    assert!(
        p.malformed_example
            .as_deref()
            .expect("example")
            .starts_with("line 53: not JSON")
    );
    assert_eq!(p.newest_ms, Some(t + 49));
    let rows: u64 = p.buckets.iter().map(|b| b.rows).sum();
    assert_eq!(rows, 52);
    assert_eq!(p.duplicates, Some((0, 52)));
    let u = p.unknown_products.as_ref().expect("catalog");
    assert_eq!(
        (u.unknown, u.products, u.example.as_deref()),
        (7, 1, Some("p6"))
    );
    let r = evaluate(&p, &QualityArgs::default());
    let v = verdicts(&r);
    assert_eq!(v["schema"], Verdict::Fail);
    assert_eq!(v["completeness.product_id"], Verdict::Fail);
    assert_eq!(v["completeness.occurred_at"], Verdict::Skipped);
    assert_eq!(v["freshness"], Verdict::Pass);
    assert_eq!(
        v["volume.total"],
        Verdict::Skipped,
        "no history in the file"
    );
}

#[test]
fn defaults_and_options_parse() {
    let a = QualityArgs::default();
    assert_eq!(a.freshness_max_age.ms, 300_000);
    assert_eq!(a.check_window.ms, 86_400_000);
    assert!(!a.blocks("validity.unknown_product", CheckType::Validity));
    assert!(a.blocks("validity.duplicate", CheckType::Validity));
    assert!(fraction("1.5").is_err() && duration_arg("soon").is_err());
}
