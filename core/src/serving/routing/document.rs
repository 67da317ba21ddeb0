//! The file form of a routing table ([`RoutingDocument`]) and its validation.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Canary, ModelRoute, Problem, RoutingTable, ValidationError};
use crate::artifacts::{ArtifactError, validate_model_name, validate_version};

/// The `formatVersion` this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Longest salt, in characters (as `ModelDeployment.spec.routingSalt`).
const MAX_SALT_CHARS: usize = 64;
/// Longest revision, in characters.
const MAX_REVISION_CHARS: usize = 128;

/// The syntax of a routing document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingFormat {
    /// YAML (a JSON document is also valid YAML in practice).
    Yaml,
    /// JSON.
    Json,
}

impl RoutingFormat {
    /// The format of a file: by extension (`.json` → JSON, `.yaml`/`.yml` → YAML), otherwise
    /// JSON if the first non-blank character of `text` is `{`, else YAML.
    pub fn detect(path: &Path, text: &str) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => Self::Json,
            Some(e) if e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml") => {
                Self::Yaml
            }
            _ if text.trim_start().starts_with('{') => Self::Json,
            _ => Self::Yaml,
        }
    }
}

impl fmt::Display for RoutingFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Yaml => "YAML",
            Self::Json => "JSON",
        })
    }
}

/// A routing table as written in a file or a ConfigMap (format in the
/// [module documentation](super)). Unknown fields are refused; [`RoutingTable::from_document`]
/// checks the values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingDocument {
    /// Version of this format; must be [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Free-form revision for logs and metrics (1–128 characters), for example the
    /// `ModelDeployment` generation that produced the table. Default: `sha256:<12 hex>` of the
    /// table's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Routes by model name (the registry's model name rule). A name listed twice is refused.
    #[serde(deserialize_with = "unique_models")]
    pub models: BTreeMap<String, RouteDocument>,
}

/// The route of one model, as written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDocument {
    /// The version (or alias) every user not on the canary gets.
    pub stable: String,
    /// A version taking a share of users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryDocument>,
    /// A version scored off the request path and never returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<String>,
    /// Salt of the assignment hash (1–64 characters); default: the model name. Changing it
    /// reshuffles every user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
}

/// A canary, as written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CanaryDocument {
    /// The canary version (or alias); must differ from stable.
    pub version: String,
    /// Percentage of users (0–100). Read as a wide integer so that an out-of-range value gets
    /// a message naming the field rather than a type error.
    pub weight: i64,
}

/// Deserializes the `models` map, refusing a key given twice (serde's maps keep the last).
fn unique_models<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, RouteDocument>, D::Error> {
    struct Models;
    impl<'de> Visitor<'de> for Models {
        type Value = BTreeMap<String, RouteDocument>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map from model name to route")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(name) = map.next_key::<String>()? {
                if out.contains_key(&name) {
                    return Err(A::Error::custom(format_args!(
                        "model `{name}` is listed twice"
                    )));
                }
                let route = map.next_value()?;
                out.insert(name, route);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_map(Models)
}

/// `version "x y" may only contain …`: an artifact-name error as a problem message.
fn name_message(error: ArtifactError) -> String {
    match error {
        ArtifactError::InvalidName {
            what,
            value,
            reason,
        } => format!("{what} {value:?} {reason}"),
        other => other.to_string(),
    }
}

/// Checks free text (salt, revision): 1 to `max` characters, no control characters.
fn check_text(value: &str, max: usize) -> Result<(), String> {
    let chars = value.chars().count();
    if chars == 0 {
        return Err("must not be empty".to_owned());
    }
    if chars > max {
        return Err(format!("has {chars} characters; at most {max} are allowed"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{value:?} contains a control character"));
    }
    Ok(())
}

/// The content revision of a normalized document (salts filled in, no revision).
fn content_revision(document: &RoutingDocument) -> String {
    // Serializing plain strings and integers into JSON cannot fail.
    let bytes = serde_json::to_vec(document).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

pub(super) fn route_document(route: &ModelRoute) -> RouteDocument {
    RouteDocument {
        stable: route.stable.clone(),
        canary: route.canary.as_ref().map(|c| CanaryDocument {
            version: c.version.clone(),
            weight: i64::from(c.weight),
        }),
        shadow: route.shadow.clone(),
        salt: Some(route.salt.clone()),
    }
}

pub(super) fn validate(document: RoutingDocument) -> Result<RoutingTable, ValidationError> {
    let mut problems = Vec::new();
    let mut problem = |path: String, message: String| problems.push(Problem { path, message });

    if document.format_version != FORMAT_VERSION {
        problem(
            "formatVersion".to_owned(),
            format!(
                "{} is not supported; this reader knows formatVersion {FORMAT_VERSION}",
                document.format_version
            ),
        );
    }
    if let Some(revision) = &document.revision
        && let Err(m) = check_text(revision, MAX_REVISION_CHARS)
    {
        problem("revision".to_owned(), m);
    }

    let mut models = BTreeMap::new();
    for (name, route) in &document.models {
        let at = format!("models.{name}");
        if let Err(e) = validate_model_name(name) {
            problem(at.clone(), name_message(e));
        }
        if let Err(e) = validate_version(&route.stable) {
            problem(format!("{at}.stable"), name_message(e));
        }
        let mut canary = None;
        if let Some(c) = &route.canary {
            if let Err(e) = validate_version(&c.version) {
                problem(format!("{at}.canary.version"), name_message(e));
            } else if c.version == route.stable {
                problem(
                    format!("{at}.canary.version"),
                    format!(
                        "{:?} is also the stable version; a canary must be another version",
                        c.version
                    ),
                );
            }
            match u8::try_from(c.weight) {
                Ok(w) if w <= 100 => {
                    canary = Some(Canary {
                        version: c.version.clone(),
                        weight: w,
                    });
                }
                _ if c.weight < 0 => {
                    problem(
                        format!("{at}.canary.weight"),
                        format!("{} is below 0", c.weight),
                    );
                }
                _ => {
                    problem(
                        format!("{at}.canary.weight"),
                        format!("{} is above 100", c.weight),
                    );
                }
            }
        }
        if let Some(shadow) = &route.shadow {
            if let Err(e) = validate_version(shadow) {
                problem(format!("{at}.shadow"), name_message(e));
            } else if *shadow == route.stable {
                problem(
                    format!("{at}.shadow"),
                    format!(
                        "{shadow:?} is also the stable version; a shadow must be another version"
                    ),
                );
            }
        }
        if let Some(salt) = &route.salt
            && let Err(m) = check_text(salt, MAX_SALT_CHARS)
        {
            problem(format!("{at}.salt"), m);
        }
        models.insert(
            name.clone(),
            ModelRoute {
                model: name.clone(),
                stable: route.stable.clone(),
                canary,
                shadow: route.shadow.clone(),
                salt: route.salt.clone().unwrap_or_else(|| name.clone()),
            },
        );
    }
    if !problems.is_empty() {
        return Err(ValidationError { problems });
    }

    let revision = match document.revision {
        Some(r) => r,
        None => content_revision(&RoutingDocument {
            format_version: FORMAT_VERSION,
            revision: None,
            models: models
                .iter()
                .map(|(n, r)| (n.clone(), route_document(r)))
                .collect(),
        }),
    };
    Ok(RoutingTable { revision, models })
}
