//! The committed CRDs in `charts/recsys/crds/` must be exactly what the types generate.
//! Regenerate with `cargo run -p recsys-crds --bin crdgen`.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/recsys/crds");
    let mut expected_files = vec![];
    for crd in recsys_crds::crds() {
        let name = recsys_crds::crd_file_name(&crd);
        let want = recsys_crds::crd_yaml(&crd).expect("render");
        let path = dir.join(&name);
        let have = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `cargo run -p recsys-crds --bin crdgen`",
                path.display()
            )
        });
        assert!(
            have == want,
            "{} is out of date with the Rust types; run `cargo run -p recsys-crds --bin crdgen` and commit",
            path.display()
        );
        expected_files.push(name);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .expect("crds dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present,
        expected_files,
        "stray or missing files in {}",
        dir.display()
    );
}

#[test]
fn committed_reference_matches_the_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/crds.md");
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    let want = recsys_crds::reference::markdown(&recsys_crds::crds());
    assert!(
        have == want,
        "{} is out of date; run `cargo run -p recsys-crds --bin crdgen` and commit",
        path.display()
    );
}

#[test]
fn feature_catalogue_matches_the_definitions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let defs = recsys_crds::feature_docs::load(&root.join("docs/examples/features"))
        .expect("feature definitions");
    let names: Vec<&str> = defs.iter().map(|d| d.spec.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "freshness_score",
            "popularity_score",
            "user_category_affinity"
        ]
    );
    let have =
        std::fs::read_to_string(root.join("docs/FEATURE_DEFINITIONS.md")).unwrap_or_default();
    assert!(
        have == recsys_crds::feature_docs::markdown(&defs),
        "docs/FEATURE_DEFINITIONS.md is out of date; run `cargo run -p recsys-crds --bin crdgen` and commit"
    );
}

#[test]
fn every_kind_is_in_the_recsys_category_with_a_short_name() {
    for crd in recsys_crds::crds() {
        let names = &crd.spec.names;
        assert_eq!(
            names.categories.as_deref(),
            Some(&["recsys".to_owned()][..]),
            "{}",
            names.kind
        );
        assert_eq!(
            names.short_names.as_ref().map(Vec::len),
            Some(1),
            "{}",
            names.kind
        );
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{} has a status subresource",
            names.kind
        );
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert!(
            columns.contains(&"Ready") && columns.contains(&"Age"),
            "{}: {columns:?}",
            names.kind
        );
    }
}

#[test]
fn every_schema_property_has_a_description() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        let Some(props) = schema.get("properties").and_then(|p| p.as_object()) else {
            if let Some(items) = schema.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
            return;
        };
        for (name, prop) in props {
            let here = format!("{path}.{name}");
            // apiVersion/kind/metadata are Kubernetes' own; the rest is ours.
            let ours = !matches!(name.as_str(), "apiVersion" | "kind" | "metadata");
            if ours
                && prop
                    .get("description")
                    .and_then(|d| d.as_str())
                    .is_none_or(str::is_empty)
            {
                missing.push(here.clone());
            }
            // Fields of k8s types (resources, conditions) carry upstream descriptions.
            walk(&here, prop, missing);
        }
    }
    let mut missing = vec![];
    for crd in recsys_crds::crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
        walk(
            &crd.spec.names.kind,
            &schema["openAPIV3Schema"],
            &mut missing,
        );
    }
    assert!(
        missing.is_empty(),
        "fields without a doc comment: {missing:#?}"
    );
}
