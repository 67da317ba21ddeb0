use std::path::Path;

use super::*;

const EXAMPLE: &str = r#"
formatVersion: 1
revision: shop/als@7
models:
  als:
    stable: 20250101-120000-a1b2c3
    canary:
      version: 20250108-093000-d4e5f6
      weight: 10
    shadow: 20250110-170000-0a0b0c
    salt: als-2025
  bpr:
    stable: champion
"#;

fn yaml(text: &str) -> Result<RoutingTable, RoutingError> {
    RoutingTable::parse(text, RoutingFormat::Yaml, "routing.yaml")
}

fn problems(text: &str) -> Vec<String> {
    match yaml(text) {
        Err(RoutingError::Invalid { source, .. }) => {
            source.problems.iter().map(ToString::to_string).collect()
        }
        other => panic!("expected a validation error, got {other:?}"),
    }
}

fn parse_message(text: &str, format: RoutingFormat) -> String {
    match RoutingTable::parse(text, format, "routing.yaml") {
        Err(e @ RoutingError::Parse { .. }) => e.to_string(),
        other => panic!("expected a parse error, got {other:?}"),
    }
}

/// Known values, computed once (and by an independent Python implementation, see
/// docs/routing.md). If this test fails, the hash changed and every user would be reshuffled:
/// fix the code, never the values.
#[test]
fn bucket_values_are_pinned() {
    for (salt, user, expected) in [
        ("als", "user-1", 7255),
        ("als", "user-2", 298),
        ("als", "42", 2278),
        ("salt-2025", "user-1", 3247),
        ("", "", 1850),
        ("ab", "c", 298),
        ("a", "bc", 2972),
        ("als", "üser-ß", 5997),
    ] {
        assert_eq!(bucket(salt, user), expected, "bucket({salt:?}, {user:?})");
    }
}

#[test]
fn salt_and_user_do_not_run_together() {
    // Without the length prefix both would hash "abc".
    assert_ne!(bucket("ab", "c"), bucket("a", "bc"));
}

#[test]
fn example_parses_with_every_field() {
    let table = yaml(EXAMPLE).expect("valid");
    assert_eq!(table.revision(), "shop/als@7");
    assert_eq!(table.len(), 2);
    let als = table.route("als").expect("als");
    assert_eq!(als.model(), "als");
    assert_eq!(als.stable(), "20250101-120000-a1b2c3");
    let canary = als.canary().expect("canary");
    assert_eq!(canary.version(), "20250108-093000-d4e5f6");
    assert_eq!(canary.weight(), 10);
    assert_eq!(canary.threshold(), 1000);
    assert_eq!(als.shadow(), Some("20250110-170000-0a0b0c"));
    assert_eq!(als.salt(), "als-2025");
    assert_eq!(
        als.versions(),
        [
            "20250101-120000-a1b2c3",
            "20250108-093000-d4e5f6",
            "20250110-170000-0a0b0c"
        ]
    );
    let bpr = table.route("bpr").expect("bpr");
    assert_eq!(bpr.salt(), "bpr", "the salt defaults to the model name");
    assert_eq!(bpr.canary_weight(), 0);
    assert_eq!(bpr.shadow(), None);
    assert_eq!(bpr.versions(), ["champion"]);
    assert!(table.route("missing").is_none());
    assert_eq!(
        table.to_string(),
        "revision shop/als@7: als: stable 20250101-120000-a1b2c3, canary \
         20250108-093000-d4e5f6 at 10%, shadow 20250110-170000-0a0b0c; bpr: stable champion"
    );
}

#[test]
fn json_and_yaml_give_the_same_table() {
    let json = r#"{"formatVersion": 1, "revision": "shop/als@7", "models": {
        "als": {"stable": "20250101-120000-a1b2c3",
                "canary": {"version": "20250108-093000-d4e5f6", "weight": 10},
                "shadow": "20250110-170000-0a0b0c", "salt": "als-2025"},
        "bpr": {"stable": "champion"}}}"#;
    let from_json = RoutingTable::parse(json, RoutingFormat::Json, "routing.json").expect("json");
    assert_eq!(from_json, yaml(EXAMPLE).expect("yaml"));
    // YAML reads JSON too, which is what an extension-less file falls back to.
    assert_eq!(yaml(json).expect("json as yaml"), from_json);
}

#[test]
fn document_round_trips_through_both_syntaxes() {
    let table = yaml(EXAMPLE).expect("valid");
    let doc = table.to_document();
    let as_yaml = serde_yaml::to_string(&doc).expect("yaml");
    let as_json = serde_json::to_string(&doc).expect("json");
    assert_eq!(yaml(&as_yaml).expect("yaml back"), table);
    assert_eq!(
        RoutingTable::parse(&as_json, RoutingFormat::Json, "t.json").expect("json back"),
        table
    );
    assert!(as_json.contains("\"formatVersion\":1"), "{as_json}");
}

#[test]
fn revision_defaults_to_a_content_hash() {
    let a = yaml("formatVersion: 1\nmodels: {als: {stable: v1}}").expect("valid");
    let same = yaml("{formatVersion: 1, models: {als: {stable: v1, salt: als}}}").expect("valid");
    let other = yaml("formatVersion: 1\nmodels: {als: {stable: v2}}").expect("valid");
    assert!(a.revision().starts_with("sha256:"), "{}", a.revision());
    assert_eq!(a.revision().len(), "sha256:".len() + 12);
    assert_eq!(
        a.revision(),
        same.revision(),
        "an explicit default salt is the same table"
    );
    assert_ne!(a.revision(), other.revision());
    // Written out, the revision is explicit and stays the same.
    let back = yaml(&serde_yaml::to_string(&a.to_document()).expect("yaml")).expect("valid");
    assert_eq!(back.revision(), a.revision());
}

#[test]
fn an_empty_table_is_valid() {
    let table = yaml("formatVersion: 1\nmodels: {}").expect("valid");
    assert!(table.is_empty());
    assert!(table.to_string().ends_with("no models"));
}

#[test]
fn every_invalid_value_is_named_by_its_field() {
    assert_eq!(
        problems(
            "formatVersion: 1\nmodels: {als: {stable: v1, canary: {version: v2, weight: 120}}}"
        ),
        ["models.als.canary.weight: 120 is above 100"]
    );
    assert_eq!(
        problems(
            "formatVersion: 1\nmodels: {als: {stable: v1, canary: {version: v2, weight: -5}}}"
        ),
        ["models.als.canary.weight: -5 is below 0"]
    );
    assert_eq!(
        problems("formatVersion: 1\nmodels: {als: {stable: v1, canary: {version: v1, weight: 5}}}"),
        [
            "models.als.canary.version: \"v1\" is also the stable version; a canary must be \
             another version"
        ]
    );
    assert_eq!(
        problems("formatVersion: 1\nmodels: {als: {stable: v1, shadow: v1}}"),
        ["models.als.shadow: \"v1\" is also the stable version; a shadow must be another version"]
    );
    assert_eq!(
        problems("formatVersion: 2\nmodels: {}"),
        ["formatVersion: 2 is not supported; this reader knows formatVersion 1"]
    );
    assert_eq!(
        problems("formatVersion: 1\nmodels: {Als: {stable: v1}}"),
        ["models.Als: model name \"Als\" may only contain a-z, 0-9 and `-`"]
    );
    assert_eq!(
        problems("formatVersion: 1\nmodels: {als: {stable: '..v1'}}"),
        ["models.als.stable: version \"..v1\" must not start with `.` or contain `..`"]
    );
    assert_eq!(
        problems("formatVersion: 1\nmodels: {als: {stable: 'v 1'}}"),
        ["models.als.stable: version \"v 1\" may only contain A-Z, a-z, 0-9, `.`, `_` and `-`"]
    );
    assert_eq!(
        problems("formatVersion: 1\nmodels: {als: {stable: ''}}"),
        ["models.als.stable: version \"\" must have 1 to 128 characters"]
    );
    assert_eq!(
        problems("formatVersion: 1\nmodels: {als: {stable: v1, salt: ''}}"),
        ["models.als.salt: must not be empty"]
    );
    let long = "s".repeat(65);
    assert_eq!(
        problems(&format!(
            "formatVersion: 1\nmodels: {{als: {{stable: v1, salt: {long}}}}}"
        )),
        ["models.als.salt: has 65 characters; at most 64 are allowed"]
    );
    assert_eq!(
        problems("formatVersion: 1\nrevision: \"a\\tb\"\nmodels: {}"),
        ["revision: \"a\\tb\" contains a control character"]
    );
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = "formatVersion: 1\nmodels:\n  als: {stable: v1, canary: {version: 'x y', weight: 101}}\n  bpr: {stable: v1, shadow: v1}\n";
    let error = yaml(text).expect_err("invalid");
    assert_eq!(error.kind(), "Invalid");
    assert_eq!(
        error.to_string(),
        "routing table routing.yaml is invalid: models.als.canary.version: version \"x y\" may \
         only contain A-Z, a-z, 0-9, `.`, `_` and `-`; models.als.canary.weight: 101 is above \
         100; models.bpr.shadow: \"v1\" is also the stable version; a shadow must be another \
         version"
    );
}

#[test]
fn unknown_fields_are_refused_with_their_place() {
    let message = parse_message(
        "formatVersion: 1\nmodels:\n  als:\n    stable: v1\n    canary: {version: v2, wieght: 10}\n",
        RoutingFormat::Yaml,
    );
    assert!(message.contains("models.als.canary"), "{message}");
    assert!(message.contains("unknown field `wieght`"), "{message}");
    let message = parse_message("formatVersion: 1\nmodel: {}\n", RoutingFormat::Yaml);
    assert!(message.contains("unknown field `model`"), "{message}");
    let message = parse_message(
        r#"{"formatVersion": 1, "models": {"als": {"stable": "v1", "shaddow": "v2"}}}"#,
        RoutingFormat::Json,
    );
    assert!(message.contains("unknown field `shaddow`"), "{message}");
    assert!(message.contains("line 1"), "{message}");
    assert!(
        message.starts_with("routing table routing.yaml is not a valid JSON"),
        "{message}"
    );
}

#[test]
fn missing_and_mistyped_fields_are_refused() {
    let message = parse_message("models: {}\n", RoutingFormat::Yaml);
    assert!(
        message.contains("missing field `formatVersion`"),
        "{message}"
    );
    let message = parse_message("formatVersion: 1\nmodels: {als: {}}\n", RoutingFormat::Yaml);
    assert!(
        message.contains("models.als: missing field `stable`"),
        "{message}"
    );
    let message = parse_message(
        "formatVersion: 1\nmodels: {als: {stable: v1, canary: {version: v2, weight: 12.5}}}\n",
        RoutingFormat::Yaml,
    );
    assert!(message.contains("models.als.canary.weight"), "{message}");
    let message = parse_message("formatVersion: 1\n", RoutingFormat::Yaml);
    assert!(message.contains("missing field `models`"), "{message}");
    for empty in ["", "  \n# nothing\n"] {
        let message = parse_message(empty, RoutingFormat::Yaml);
        assert!(message.ends_with("the document is empty"), "{message}");
    }
}

#[test]
fn a_model_listed_twice_is_refused() {
    let message = parse_message(
        "formatVersion: 1\nmodels:\n  als: {stable: v1}\n  als: {stable: v2}\n",
        RoutingFormat::Yaml,
    );
    assert!(message.contains("als"), "{message}");
    assert!(
        message.contains("twice") || message.contains("duplicate"),
        "{message}"
    );
    let message = parse_message(
        r#"{"formatVersion": 1, "models": {"als": {"stable": "v1"}, "als": {"stable": "v2"}}}"#,
        RoutingFormat::Json,
    );
    assert!(message.contains("model `als` is listed twice"), "{message}");
}

#[test]
fn format_is_detected_from_extension_then_content() {
    assert_eq!(
        RoutingFormat::detect(Path::new("r.json"), "a: 1"),
        RoutingFormat::Json
    );
    assert_eq!(
        RoutingFormat::detect(Path::new("r.YAML"), "{}"),
        RoutingFormat::Yaml
    );
    assert_eq!(
        RoutingFormat::detect(Path::new("r.yml"), "{}"),
        RoutingFormat::Yaml
    );
    assert_eq!(
        RoutingFormat::detect(Path::new("routing"), "  {\"a\": 1}"),
        RoutingFormat::Json
    );
    assert_eq!(
        RoutingFormat::detect(Path::new("routing"), "a: 1"),
        RoutingFormat::Yaml
    );
}

#[test]
fn assignment_follows_the_bucket() {
    let table = yaml(
        "formatVersion: 1\nmodels: {als: {stable: v1, canary: {version: v2, weight: 30}, shadow: v3}}",
    )
    .expect("valid");
    let route = table.route("als").expect("als");
    for i in 0..1000 {
        let user = format!("user-{i}");
        let a = route.assign(Some(&user));
        let b = bucket("als", &user);
        assert_eq!(a.bucket, Some(b));
        if b < 3000 {
            assert_eq!((a.variant, a.version), (Variant::Canary, "v2"), "{user}");
        } else {
            assert_eq!((a.variant, a.version), (Variant::Stable, "v1"), "{user}");
        }
        assert_eq!(table.assign("als", Some(&user)), Some(a));
    }
    assert_eq!(route.variant_of(2999), Variant::Canary);
    assert_eq!(route.variant_of(3000), Variant::Stable);
    assert_eq!(route.shadow(), Some("v3"));
    assert_eq!(table.assign("other", Some("user-1")), None);
}

#[test]
fn anonymous_users_get_stable() {
    let table =
        yaml("formatVersion: 1\nmodels: {als: {stable: v1, canary: {version: v2, weight: 100}}}")
            .expect("valid");
    let route = table.route("als").expect("als");
    for anonymous in [None, Some("")] {
        assert_eq!(
            route.assign(anonymous),
            Assignment {
                variant: Variant::Stable,
                version: "v1",
                bucket: None
            }
        );
    }
    assert_eq!(
        route.assign(Some("u")).variant,
        Variant::Canary,
        "weight 100: everyone else"
    );
}

#[test]
fn weight_zero_canary_gets_nobody_but_is_loaded() {
    let table =
        yaml("formatVersion: 1\nmodels: {als: {stable: v1, canary: {version: v2, weight: 0}}}")
            .expect("valid");
    let route = table.route("als").expect("als");
    assert!((0..2000).all(|i| route.assign(Some(&i.to_string())).variant == Variant::Stable));
    assert_eq!(route.versions(), ["v1", "v2"]);
}

#[test]
fn versions_are_listed_once() {
    let table = yaml("formatVersion: 1\nmodels: {als: {stable: v1, canary: {version: v2, weight: 5}, shadow: v2}}")
        .expect("valid");
    assert_eq!(table.route("als").expect("als").versions(), ["v1", "v2"]);
}

#[test]
fn champion_table_serves_one_model_at_its_alias() {
    let table = RoutingTable::champion("als").expect("valid");
    let route = table.route("als").expect("als");
    assert_eq!(route.stable(), crate::artifacts::CHAMPION);
    assert_eq!(route.assign(Some("anyone")).version, "champion");
    assert_eq!(table.revision(), "embedded-champion");
    let error = RoutingTable::champion("Bad Name").expect_err("invalid model");
    assert_eq!(error.problems[0].path, "models.Bad Name");
}

#[test]
fn variant_wire_names() {
    assert_eq!(Variant::Stable.to_string(), "stable");
    assert_eq!(
        serde_json::to_string(&Variant::Canary).expect("json"),
        "\"canary\""
    );
}

#[tokio::test]
async fn static_source_publishes_replacements() {
    let metrics = RoutingMetrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let source = StaticRoutingSource::champion("als")
        .expect("valid")
        .with_metrics(metrics);
    let mut changes = source.subscribe();
    assert_eq!(source.current().revision(), "embedded-champion");

    let next = yaml("formatVersion: 1\nrevision: r2\nmodels: {als: {stable: v1, canary: {version: v2, weight: 25}}}")
        .expect("valid");
    source.replace(next.clone());
    tokio::time::timeout(std::time::Duration::from_secs(5), changes.changed())
        .await
        .expect("announced")
        .expect("sender alive");
    assert_eq!(**changes.borrow_and_update(), next);
    assert_eq!(*source.current(), next);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains("routing_table_info{revision=\"r2\"} 1"),
        "{text}"
    );
    assert!(
        !text.contains("embedded-champion"),
        "one info series at a time: {text}"
    );
    assert!(
        text.contains("routing_table_reloads_total{outcome=\"ok\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("routing_canary_weight_percent{model=\"als\"} 25"),
        "{text}"
    );
    assert!(text.contains("routing_table_models 1"), "{text}");
}
