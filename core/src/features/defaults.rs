//! The definitions of the first features, embedded: the local mode registers them when its
//! registry does not know a feature a job computes, so that `recsys-trainer popularity` works
//! on a laptop with nothing applied. They are the files of `docs/examples/features/`, the same
//! ones a cluster applies as `FeatureDefinition` resources, so both modes compute the same
//! thing.

use super::registry::FeatureSpec;

/// The example manifests, by file name.
const MANIFESTS: [(&str, &str); 3] = [
    (
        "popularity-score.yaml",
        include_str!("../../../docs/examples/features/popularity-score.yaml"),
    ),
    (
        "freshness-score.yaml",
        include_str!("../../../docs/examples/features/freshness-score.yaml"),
    ),
    (
        "user-category-affinity.yaml",
        include_str!("../../../docs/examples/features/user-category-affinity.yaml"),
    ),
];

/// Parses the `spec` of a `FeatureDefinition` manifest (YAML) into a registry spec.
pub fn spec_from_manifest(yaml: &str) -> Result<FeatureSpec, String> {
    let doc: serde_json::Value =
        serde_yaml::from_str(yaml).map_err(|e| format!("not YAML: {e}"))?;
    let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
    if kind != "FeatureDefinition" {
        return Err(format!("kind is {kind:?}, expected FeatureDefinition"));
    }
    let spec = doc
        .get("spec")
        .cloned()
        .ok_or_else(|| "no spec".to_owned())?;
    serde_json::from_value(spec).map_err(|e| format!("spec: {e}"))
}

/// The embedded definitions.
pub fn specs() -> Vec<FeatureSpec> {
    MANIFESTS
        .iter()
        .map(|(file, yaml)| {
            // A test below parses every manifest, so this cannot fail in a build that passed.
            spec_from_manifest(yaml)
                .unwrap_or_else(|e| panic!("docs/examples/features/{file}: {e}"))
        })
        .collect()
}

/// The embedded definition of `name`.
pub fn spec(name: &str) -> Option<FeatureSpec> {
    specs().into_iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::compute::Computation;

    #[test]
    fn every_embedded_manifest_is_a_valid_definition_of_a_known_computation() {
        for (file, yaml) in MANIFESTS {
            let spec = spec_from_manifest(yaml).unwrap_or_else(|e| panic!("{file}: {e}"));
            spec.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
            let c = Computation::from_job(&spec.computation.job)
                .unwrap_or_else(|| panic!("{file}: unknown job {}", spec.computation.job));
            assert_eq!(c.default_feature(), spec.name, "{file}");
            c.check(&spec).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
        assert_eq!(specs().len(), Computation::ALL.len());
    }

    #[test]
    fn manifests_of_other_kinds_are_refused() {
        let err = spec_from_manifest("kind: BatchJob\nspec: {}\n").expect_err("refused");
        assert!(err.contains("BatchJob"), "{err}");
        assert!(spec_from_manifest("kind: [").is_err());
    }
}
