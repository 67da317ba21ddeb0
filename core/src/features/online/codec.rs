//! Key schema and value encoding of the online store. Both are documented in the parent
//! module; this file is the one place that builds keys and bytes.

use crate::features::{EntityKey, EntityKind, FeatureRef, FeatureValue, StoredValue};

use super::OnlineError;

/// Format version written as the first byte of every value.
pub const FORMAT_VERSION: u8 = 1;

/// Bytes before the payload: format, type tag, event time, write time.
pub const HEADER_LEN: usize = 18;

const TAG_FLOAT: u8 = 1;
const TAG_INT: u8 = 2;
const TAG_STRING: u8 = 3;
const TAG_FLOAT_VECTOR: u8 = 4;

/// Longest feature name accepted in a key.
pub const MAX_FEATURE_NAME_LEN: usize = 128;
/// Longest entity id accepted in a key (bytes).
pub const MAX_ENTITY_ID_LEN: usize = 512;
/// Longest key prefix.
pub const MAX_PREFIX_LEN: usize = 64;

/// Whether `prefix` is a valid key prefix, `[A-Za-z0-9_.-]{1,64}`: the rule of every key this
/// crate writes to Redis (the online store's and the user-state cache's).
pub fn is_valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Checks a key prefix: `[A-Za-z0-9_.-]{1,64}` (no `:` and no glob characters, so that a
/// `SCAN MATCH` pattern built from it matches only our keys).
pub fn validate_prefix(prefix: &str) -> Result<(), OnlineError> {
    if is_valid_prefix(prefix) {
        Ok(())
    } else {
        Err(OnlineError::InvalidName {
            what: "key prefix",
            name: prefix.to_owned(),
        })
    }
}

/// Checks a feature name: `[a-z][a-z0-9_]{0,127}`, the registry's rule.
pub fn validate_feature(feature: &FeatureRef) -> Result<(), OnlineError> {
    let name = feature.name.as_bytes();
    let ok = !name.is_empty()
        && name.len() <= MAX_FEATURE_NAME_LEN
        && name[0].is_ascii_lowercase()
        && name
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_');
    if ok {
        Ok(())
    } else {
        Err(OnlineError::InvalidName {
            what: "feature name",
            name: feature.name.clone(),
        })
    }
}

/// Checks an entity id: 1 to 512 bytes. Any UTF-8 is allowed, `:` included: the id is the
/// last component of a key, so the key stays unambiguous.
pub fn validate_entity(entity: &EntityKey) -> Result<(), OnlineError> {
    if entity.id.is_empty() || entity.id.len() > MAX_ENTITY_ID_LEN {
        return Err(OnlineError::InvalidName {
            what: "entity id",
            name: entity.id.chars().take(64).collect(),
        });
    }
    Ok(())
}

/// The field of a feature version inside an entity's hash: `{feature}:v{major}`.
pub fn field(feature: &FeatureRef) -> String {
    format!("{}:v{}", feature.name, feature.major)
}

/// The key of an entity's hash: `{prefix}:e:{entity_kind}:{entity_id}`.
pub fn entity_key(prefix: &str, entity: &EntityKey) -> String {
    format!("{prefix}:e:{}:{}", entity.kind, entity.id)
}

/// Appends the key of an entity's hash to `buf` (no allocation of its own).
pub fn push_entity_key(buf: &mut Vec<u8>, prefix: &str, entity: &EntityKey) {
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(b":e:");
    buf.extend_from_slice(entity.kind.as_str().as_bytes());
    buf.push(b':');
    buf.extend_from_slice(entity.id.as_bytes());
}

/// The `SCAN MATCH` pattern of every entity hash under `prefix`.
pub fn entity_pattern(prefix: &str) -> String {
    format!("{prefix}:e:*")
}

/// The entity of an entity-hash key, or `None` when the key is not one.
pub fn parse_entity_key(prefix: &str, key: &str) -> Option<EntityKey> {
    let rest = key.strip_prefix(prefix)?.strip_prefix(":e:")?;
    let (kind, id) = rest.split_once(':')?;
    let kind = match kind {
        "user" => EntityKind::User,
        "product" => EntityKind::Product,
        "user_product" => EntityKind::UserProduct,
        _ => return None,
    };
    Some(EntityKey {
        kind,
        id: id.to_owned(),
    })
}

/// The feature version of a field, or `None` when the field is not one.
pub fn parse_field(field: &str) -> Option<FeatureRef> {
    let (name, major) = field.rsplit_once(":v")?;
    Some(FeatureRef::new(name, major.parse().ok()?))
}

/// Length of the encoding of `value`.
pub fn encoded_len(value: &StoredValue) -> usize {
    HEADER_LEN
        + match &value.value {
            FeatureValue::Float(_) | FeatureValue::Int(_) => 8,
            FeatureValue::String(s) => s.len(),
            FeatureValue::FloatVector(v) => v.len() * 4,
        }
}

/// Encodes a value (format 1, little-endian; see the module documentation).
pub fn encode(value: &StoredValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(value));
    encode_into(value, &mut out);
    out
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into(value: &StoredValue, out: &mut Vec<u8>) {
    let tag = match &value.value {
        FeatureValue::Float(_) => TAG_FLOAT,
        FeatureValue::Int(_) => TAG_INT,
        FeatureValue::String(_) => TAG_STRING,
        FeatureValue::FloatVector(_) => TAG_FLOAT_VECTOR,
    };
    out.push(FORMAT_VERSION);
    out.push(tag);
    out.extend_from_slice(&value.event_time_ms.to_le_bytes());
    out.extend_from_slice(&value.written_at_ms.to_le_bytes());
    match &value.value {
        FeatureValue::Float(x) => out.extend_from_slice(&x.to_le_bytes()),
        FeatureValue::Int(x) => out.extend_from_slice(&x.to_le_bytes()),
        FeatureValue::String(s) => out.extend_from_slice(s.as_bytes()),
        FeatureValue::FloatVector(v) => {
            out.reserve(v.len() * 4);
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// Why bytes are not a value, without the key (see [`decode_at`]).
fn decode_bytes(bytes: &[u8]) -> Result<StoredValue, String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        ));
    }
    if bytes[0] != FORMAT_VERSION {
        return Err(format!(
            "format version {} (this build reads {FORMAT_VERSION})",
            bytes[0]
        ));
    }
    let i64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        i64::from_le_bytes(b)
    };
    let event_time_ms = i64_at(2);
    let written_at_ms = i64_at(10);
    let payload = &bytes[HEADER_LEN..];
    let fixed8 = |what: &str| -> Result<[u8; 8], String> {
        <[u8; 8]>::try_from(payload)
            .map_err(|_| format!("{what} payload of {} bytes, expected 8", payload.len()))
    };
    let value = match bytes[1] {
        TAG_FLOAT => FeatureValue::Float(f64::from_le_bytes(fixed8("float")?)),
        TAG_INT => FeatureValue::Int(i64::from_le_bytes(fixed8("int")?)),
        TAG_STRING => FeatureValue::String(
            std::str::from_utf8(payload)
                .map_err(|e| format!("string payload is not UTF-8: {e}"))?
                .to_owned(),
        ),
        TAG_FLOAT_VECTOR => {
            if !payload.len().is_multiple_of(4) {
                return Err(format!(
                    "float vector payload of {} bytes, not a multiple of 4",
                    payload.len()
                ));
            }
            FeatureValue::FloatVector(
                payload
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        }
        tag => return Err(format!("unknown type tag {tag}")),
    };
    Ok(StoredValue {
        value,
        event_time_ms,
        written_at_ms,
    })
}

/// Decodes the bytes stored under `key` (for Redis, the hash key and the field); the error
/// names it.
pub fn decode_at(key: &str, bytes: &[u8]) -> Result<StoredValue, OnlineError> {
    decode_lazy(bytes, || key.to_owned())
}

/// [`decode_at`] with the key built only when the bytes do not decode.
pub fn decode_lazy(bytes: &[u8], key: impl FnOnce() -> String) -> Result<StoredValue, OnlineError> {
    decode_bytes(bytes).map_err(|reason| OnlineError::Corrupt { key: key(), reason })
}

/// The ordering of writes: a value replaces the stored one when its `(event_time_ms,
/// written_at_ms)` is not older. Equal pairs replace (an idempotent rewrite).
pub fn supersedes(new: &StoredValue, current: &StoredValue) -> bool {
    (new.event_time_ms, new.written_at_ms) >= (current.event_time_ms, current.written_at_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sv(value: FeatureValue) -> StoredValue {
        StoredValue {
            value,
            event_time_ms: 1_760_000_000_123,
            written_at_ms: 1_760_000_000_456,
        }
    }

    #[test]
    fn every_type_round_trips() {
        for value in [
            FeatureValue::Float(0.25),
            FeatureValue::Float(f64::MIN_POSITIVE),
            FeatureValue::Float(-1e300),
            FeatureValue::Int(i64::MIN),
            FeatureValue::Int(42),
            FeatureValue::String(String::new()),
            FeatureValue::String("électroménager ✓ : | *".into()),
            FeatureValue::FloatVector(vec![]),
            FeatureValue::FloatVector(vec![1.5, -0.0, f32::MAX, 3.25e-7]),
        ] {
            let stored = sv(value);
            let bytes = encode(&stored);
            assert_eq!(bytes.len(), encoded_len(&stored));
            assert_eq!(bytes[0], FORMAT_VERSION);
            assert_eq!(decode_at("k", &bytes).expect("decodes"), stored);
        }
    }

    #[test]
    fn layout_is_little_endian_and_documented() {
        let bytes = encode(&StoredValue {
            value: FeatureValue::Int(1),
            event_time_ms: 2,
            written_at_ms: 3,
        });
        let mut expected = vec![1u8, TAG_INT];
        expected.extend_from_slice(&2i64.to_le_bytes());
        expected.extend_from_slice(&3i64.to_le_bytes());
        expected.extend_from_slice(&1i64.to_le_bytes());
        assert_eq!(bytes, expected);
    }

    #[test]
    fn nan_survives_bit_for_bit() {
        let bytes = encode(&sv(FeatureValue::Float(f64::NAN)));
        match decode_at("k", &bytes).expect("decodes").value {
            FeatureValue::Float(x) => assert!(x.is_nan()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn corrupt_bytes_are_an_error_naming_the_key() {
        let good = encode(&sv(FeatureValue::FloatVector(vec![1.0, 2.0])));
        let key = "rs:e:product:p-1 embedding:v2";
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "shorter than"),
            (good[..10].to_vec(), "shorter than"),
            ([&good[..], &[0u8]].concat(), "multiple of 4"),
        ];
        let mut wrong_version = good.clone();
        wrong_version[0] = 9;
        cases.push((wrong_version, "format version 9"));
        let mut wrong_tag = good.clone();
        wrong_tag[1] = 77;
        cases.push((wrong_tag, "unknown type tag 77"));
        let mut short_float = encode(&sv(FeatureValue::Float(1.0)));
        short_float.pop();
        cases.push((short_float, "expected 8"));
        let mut bad_utf8 = encode(&sv(FeatureValue::String("ab".into())));
        bad_utf8.push(0xff);
        cases.push((bad_utf8, "not UTF-8"));
        for (bytes, why) in cases {
            let err = decode_at(key, &bytes).expect_err("must fail");
            assert_eq!(err.kind(), "CorruptValue");
            let text = err.to_string();
            assert!(text.contains("rs:e:product:p-1 embedding:v2"), "{text}");
            assert!(text.contains(why), "{text} should say {why}");
        }
    }

    #[test]
    fn keys_follow_the_schema_and_parse_back() {
        let f = FeatureRef::new("popularity_score", 3);
        let e = EntityKey::user_product("u:1", "p|2");
        let k = entity_key("rs", &e);
        assert_eq!(k, "rs:e:user_product:u:1|p|2");
        assert_eq!(field(&f), "popularity_score:v3");
        let mut buf = Vec::new();
        push_entity_key(&mut buf, "rs", &e);
        assert_eq!(buf, k.as_bytes());
        assert_eq!(parse_entity_key("rs", &k), Some(e));
        assert_eq!(parse_field("popularity_score:v3"), Some(f));
        assert_eq!(parse_field("popularity_score"), None);
        assert_eq!(parse_entity_key("rs", "rs:x:user:1"), None);
        assert_eq!(parse_entity_key("other", &k), None);
        assert_eq!(entity_pattern("rs"), "rs:e:*");
    }

    #[test]
    fn names_that_could_escape_a_scan_pattern_are_refused() {
        assert!(validate_prefix("rs-test.1_a").is_ok());
        for bad in ["", "a:b", "a*", "a?", "a[b]", "a\\b", &"x".repeat(65)] {
            assert_eq!(
                validate_prefix(bad).expect_err(bad).kind(),
                "InvalidName",
                "{bad}"
            );
        }
        assert!(validate_feature(&FeatureRef::new("user_category_affinity", 1)).is_ok());
        for bad in ["", "1abc", "Abc", "a-b", "a:b", "a*", &"a".repeat(129)] {
            assert!(validate_feature(&FeatureRef::new(bad, 1)).is_err(), "{bad}");
        }
        assert!(validate_entity(&EntityKey::user("")).is_err());
        assert!(validate_entity(&EntityKey::user("x".repeat(513))).is_err());
        assert!(validate_entity(&EntityKey::user("any: * thing")).is_ok());
    }

    #[test]
    fn newer_event_time_wins_then_newer_write() {
        let at = |event, written| StoredValue {
            value: FeatureValue::Int(0),
            event_time_ms: event,
            written_at_ms: written,
        };
        assert!(supersedes(&at(2, 1), &at(1, 9)));
        assert!(!supersedes(&at(1, 9), &at(2, 1)));
        assert!(supersedes(&at(2, 5), &at(2, 4)));
        assert!(!supersedes(&at(2, 4), &at(2, 5)));
        assert!(supersedes(&at(2, 4), &at(2, 4)));
    }
}
