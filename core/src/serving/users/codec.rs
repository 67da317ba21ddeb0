//! Keys, fields and the binary encoding of cached user states (layout in the module docs).

use super::{CachedState, FactorSource, StateKey, UserStateError};

/// Format version of the encoding.
pub const FORMAT_VERSION: u8 = 1;

/// Bytes before the factors.
pub const HEADER_LEN: usize = 24;

/// The field holding the user's generation.
pub(crate) const GENERATION_FIELD: &str = "~gen";

/// The Redis key of a user: `{prefix}:u:{user_id}`.
pub fn user_key(prefix: &str, user_id: &str) -> String {
    let mut key = String::with_capacity(prefix.len() + 3 + user_id.len());
    key.push_str(prefix);
    key.push_str(":u:");
    key.push_str(user_id);
    key
}

/// The field of a model version in a user's hash: `{model}:{version}`.
pub fn field(key: &StateKey<'_>) -> String {
    format!("{}:{}", key.model, key.version)
}

/// Checks a key prefix: `[A-Za-z0-9_.-]{1,64}`, the online store's rule.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), UserStateError> {
    if crate::features::online::codec::is_valid_prefix(prefix) {
        Ok(())
    } else {
        Err(UserStateError::InvalidArgument(format!(
            "key prefix {prefix:?} must have 1 to 64 characters of A-Z, a-z, 0-9, `_`, `.`, `-`"
        )))
    }
}

/// Checks the model and version of a key: they must not contain `:` or start with `~` (model
/// names and versions of the artifact registry never do).
pub(crate) fn validate_key(key: &StateKey<'_>) -> Result<(), UserStateError> {
    super::validate_user_id(key.user_id)?;
    for (what, name) in [("model name", key.model), ("model version", key.version)] {
        let ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !ok {
            return Err(UserStateError::InvalidArgument(format!(
                "{what} {name:?} must have 1 to 128 characters of A-Z, a-z, 0-9, `_`, `.`, `-`"
            )));
        }
    }
    Ok(())
}

fn source_byte(s: FactorSource) -> u8 {
    match s {
        FactorSource::None => 0,
        FactorSource::Trained => 1,
        FactorSource::FoldIn => 2,
    }
}

/// Encodes a state (format 1). Factors beyond 65,535 are not representable and are refused
/// by [`super::UserStates`] before they get here; this cuts them.
pub fn encode(state: &CachedState) -> Vec<u8> {
    let n = state.factors.len().min(usize::from(u16::MAX));
    let m = state.seen.len().min(u32::MAX as usize);
    let mut out = Vec::with_capacity(HEADER_LEN + 4 * (n + m));
    out.push(FORMAT_VERSION);
    out.push(source_byte(state.source));
    out.extend_from_slice(&state.written_at_ms.to_le_bytes());
    out.extend_from_slice(&state.interactions.to_le_bytes());
    out.extend_from_slice(&state.known.to_le_bytes());
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&(m as u32).to_le_bytes());
    for f in &state.factors[..n] {
        out.extend_from_slice(&f.to_le_bytes());
    }
    for r in &state.seen[..m] {
        out.extend_from_slice(&r.to_le_bytes());
    }
    out
}

fn le<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[at..at + N]);
    a
}

/// Decodes a state; `key` names where the bytes came from in the error.
pub fn decode(bytes: &[u8], key: impl FnOnce() -> String) -> Result<CachedState, UserStateError> {
    let corrupt = |reason: String| UserStateError::Corrupt { key: key(), reason };
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[0] != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {}, this reader knows {FORMAT_VERSION}",
            bytes[0]
        )));
    }
    let source = match bytes[1] {
        0 => FactorSource::None,
        1 => FactorSource::Trained,
        2 => FactorSource::FoldIn,
        other => return Err(corrupt(format!("unknown source tag {other}"))),
    };
    let written_at_ms = i64::from_le_bytes(le(bytes, 2));
    let interactions = u32::from_le_bytes(le(bytes, 10));
    let known = u32::from_le_bytes(le(bytes, 14));
    let n = usize::from(u16::from_le_bytes(le(bytes, 18)));
    let m = u32::from_le_bytes(le(bytes, 20)) as usize;
    let expected = HEADER_LEN as u64 + 4 * (n as u64 + m as u64);
    if bytes.len() as u64 != expected {
        return Err(corrupt(format!(
            "{} bytes for {n} factors and {m} seen rows ({expected} expected)",
            bytes.len()
        )));
    }
    if (n > 0) != (source == FactorSource::FoldIn) {
        return Err(corrupt(format!(
            "{n} factors stored for source {}",
            source.as_str()
        )));
    }
    if known > interactions {
        return Err(corrupt(format!(
            "{known} known interactions of {interactions}"
        )));
    }
    let body = &bytes[HEADER_LEN..];
    let factors: Vec<f32> = body[..4 * n]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(le(c, 0)))
        .collect();
    if factors.iter().any(|f| !f.is_finite()) {
        return Err(corrupt("a factor is not finite".into()));
    }
    let seen: Vec<u32> = body[4 * n..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(le(c, 0)))
        .collect();
    if seen.windows(2).any(|w| w[0] >= w[1]) {
        return Err(corrupt("seen rows are not strictly ascending".into()));
    }
    Ok(CachedState {
        source,
        factors,
        interactions,
        known,
        seen,
        written_at_ms,
    })
}

/// The time a stored value was written, read from its header without decoding the rest (as
/// the write script does to drop the oldest versions).
#[cfg(test)]
fn written_at(bytes: &[u8]) -> Option<i64> {
    (bytes.len() >= 10).then(|| i64::from_le_bytes(le(bytes, 2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold_in() -> CachedState {
        CachedState {
            source: FactorSource::FoldIn,
            factors: vec![0.5, -1.25, 3.0e-3, f32::MIN_POSITIVE],
            interactions: 12,
            known: 9,
            seen: vec![0, 3, 70_000, u32::MAX],
            written_at_ms: 1_767_225_600_123,
        }
    }

    #[test]
    fn round_trip_is_exact_and_compact() {
        for state in [
            fold_in(),
            CachedState {
                source: FactorSource::Trained,
                factors: vec![],
                interactions: 500,
                known: 480,
                seen: (0..500).map(|i| i * 7).collect(),
                written_at_ms: 1,
            },
            CachedState {
                source: FactorSource::None,
                factors: vec![],
                interactions: 0,
                known: 0,
                seen: vec![],
                written_at_ms: 0,
            },
        ] {
            let bytes = encode(&state);
            assert_eq!(
                bytes.len(),
                HEADER_LEN + 4 * (state.factors.len() + state.seen.len())
            );
            assert_eq!(decode(&bytes, String::new).expect("decode"), state);
            assert_eq!(written_at(&bytes), Some(state.written_at_ms));
        }
        // 64 factors and 500 seen rows, as the module docs say.
        let big = CachedState {
            factors: vec![0.1; 64],
            seen: (0..500).collect(),
            ..fold_in()
        };
        assert_eq!(encode(&big).len(), 2_280);
    }

    #[test]
    fn bad_bytes_are_corrupt_with_the_key_and_reason() {
        let good = encode(&fold_in());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..10].to_vec(), "header"),
            ([&[2u8][..], &good[1..]].concat(), "format version 2"),
            (
                [&good[..1], &[9u8][..], &good[2..]].concat(),
                "source tag 9",
            ),
            ([&good[..], &[0u8][..]].concat(), "expected"),
            (
                {
                    let mut b = good.clone();
                    b[1] = 1; // trained, but factors stored
                    b
                },
                "factors stored for source trained",
            ),
            (
                {
                    let mut b = good.clone();
                    let at = b.len() - 4;
                    b[at..].copy_from_slice(&1u32.to_le_bytes());
                    b
                },
                "ascending",
            ),
            (
                {
                    let mut b = good.clone();
                    b[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&f32::NAN.to_le_bytes());
                    b
                },
                "finite",
            ),
            (
                {
                    let mut b = good.clone();
                    b[14..18].copy_from_slice(&100u32.to_le_bytes());
                    b
                },
                "known",
            ),
        ];
        for (bytes, reason) in cases {
            let e = decode(&bytes, || "rs:u:u1 als:v1".into()).expect_err(reason);
            assert_eq!(e.kind(), "CorruptUserState");
            let text = e.to_string();
            assert!(
                text.contains("rs:u:u1 als:v1") && text.contains(reason),
                "{text}"
            );
        }
    }

    #[test]
    fn keys_fields_and_names() {
        let key = StateKey {
            model: "als",
            version: "20250101-120000-a1b2c3",
            user_id: "u:42",
        };
        assert_eq!(user_key("rs", key.user_id), "rs:u:u:42");
        assert_eq!(field(&key), "als:20250101-120000-a1b2c3");
        assert!(validate_key(&key).is_ok());
        for bad in [
            StateKey {
                model: "a:b",
                ..key
            },
            StateKey {
                version: "~gen",
                ..key
            },
            StateKey { model: "", ..key },
            StateKey { user_id: "", ..key },
        ] {
            assert!(validate_key(&bad).is_err(), "{bad:?}");
        }
        assert!(validate_prefix("rs-test.1_x").is_ok());
        for bad in ["", "a:b", "a*", &"p".repeat(65)] {
            let e = validate_prefix(bad).expect_err(bad);
            assert!(e.to_string().contains("prefix"), "{e}");
        }
    }
}
