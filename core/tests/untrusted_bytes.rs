//! Property tests of every parser that reads bytes from outside the process: the events
//! readers (JSON lines as posted to the scorer, and the file formats), the factor-file format,
//! the user-state codec, the online-store value codec, rankings and routing documents.
//!
//! - **Arbitrary bytes never panic.** Whatever comes in, the parser returns a value or an
//!   error.
//! - **No allocation from an unchecked length.** The test binary's allocator is capped at
//!   [`ALLOC_LIMIT`]. A parser that trusted a declared length (a header claiming 2^60 rows)
//!   would abort the run instead of returning an error. Headers with huge declared sizes are
//!   generated on purpose.
//! - **Valid values round-trip.** Encoding then decoding gives the value back.
//!
//! Each target prints how many inputs it tried (`cargo test --test untrusted_bytes --
//! --nocapture`). `RECSYS_FUZZ_CASES` sets the number per
//! property (default 2,000; CI's default run takes a few seconds).

use std::sync::atomic::{AtomicU64, Ordering};

use cap::Cap;
use ndarray::Array2;
use proptest::prelude::*;
use recsys_core::artifacts::{FACTOR_HEADER_LEN, FACTOR_MAGIC, decode_factors, encode_factors};
use recsys_core::events::{FileFormat, parse_json_event, read_file};
use recsys_core::features::online;
use recsys_core::features::rankings::Rankings;
use recsys_core::features::{FeatureValue, StoredValue};
use recsys_core::serving::routing::{RoutingFormat, RoutingTable};
use recsys_core::serving::users::{CachedState, FactorSource, decode, encode};

/// Largest heap the test binary may hold at once.
const ALLOC_LIMIT: usize = 512 << 20;

#[global_allocator]
static ALLOCATOR: Cap<std::alloc::System> = Cap::new(std::alloc::System, ALLOC_LIMIT);

fn cases() -> u32 {
    std::env::var("RECSYS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs `test` on `cases()` inputs of `strategy`, then prints how many it tried.
fn fuzz<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let tried = AtomicU64::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(config());
    let result = runner.run(&strategy, |v| {
        tried.fetch_add(1, Ordering::Relaxed);
        test(v)
    });
    println!(
        "{name}: {} inputs tried (heap capped at {} MiB, {} KiB held now)",
        tried.load(Ordering::Relaxed),
        ALLOCATOR.limit() >> 20,
        ALLOCATOR.allocated() / 1024
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

/// A factor-file header with the given fields, then `body` bytes.
fn factor_header(version: u32, rows: u64, cols: u64, dtype: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FACTOR_HEADER_LEN + body.len());
    out.extend_from_slice(&FACTOR_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&rows.to_le_bytes());
    out.extend_from_slice(&cols.to_le_bytes());
    out.extend_from_slice(&dtype.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(body);
    out
}

#[test]
fn factor_files_never_panic_and_round_trip() {
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..256),
        prop_oneof![0u64..8, Just(u64::MAX), Just(1 << 60), any::<u64>()],
        prop_oneof![0u64..8, Just(u64::MAX), Just(1 << 40), any::<u64>()],
        prop_oneof![Just(1u32), any::<u32>()],
        prop_oneof![Just(1u32), any::<u32>()],
        proptest::collection::vec(-1e6f32..1e6, 0..48),
    );
    fuzz(
        "factor files",
        strategy,
        |(bytes, rows, cols, version, dtype, values)| {
            let _ = decode_factors("fuzz", &bytes);
            let _ = decode_factors("fuzz", &factor_header(version, rows, cols, dtype, &bytes));
            // A valid matrix round-trips.
            let cols = 1 + values.len() % 6;
            let rows = values.len() / cols;
            let m = Array2::from_shape_vec((rows, cols), values[..rows * cols].to_vec())
                .expect("shape");
            let back =
                decode_factors("fuzz", &encode_factors(m.view())).expect("valid factors decode");
            prop_assert_eq!(back, m);
            Ok(())
        },
    );
}

fn cached_state() -> impl Strategy<Value = CachedState> {
    (
        prop_oneof![
            Just(FactorSource::None),
            Just(FactorSource::Trained),
            Just(FactorSource::FoldIn)
        ],
        proptest::collection::vec(-1e3f32..1e3, 1..32),
        any::<u32>(),
        any::<u32>(),
        proptest::collection::btree_set(any::<u32>(), 0..64),
        any::<i64>(),
    )
        .prop_map(
            |(source, factors, interactions, known, seen, written_at_ms)| CachedState {
                factors: if source == FactorSource::FoldIn {
                    factors
                } else {
                    vec![]
                },
                source,
                interactions,
                known: known.min(interactions),
                seen: seen.into_iter().collect(),
                written_at_ms,
            },
        )
}

#[test]
fn user_states_never_panic_and_round_trip() {
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..256),
        cached_state(),
        any::<usize>(),
        any::<(usize, u8)>(),
    );
    fuzz("user-state codec", strategy, |(bytes, state, cut, flip)| {
        let _ = decode(&bytes, || "fuzz".into());
        let encoded = encode(&state);
        let back = decode(&encoded, || "fuzz".into()).expect("a valid state decodes");
        prop_assert_eq!(&back, &state);
        // Truncated or with one byte changed: an error or a value, never a panic.
        let _ = decode(&encoded[..cut % (encoded.len() + 1)], || "fuzz".into());
        let mut changed = encoded.clone();
        if !changed.is_empty() {
            let i = flip.0 % changed.len();
            changed[i] ^= flip.1.max(1);
            let _ = decode(&changed, || "fuzz".into());
        }
        Ok(())
    });
}

fn stored_value() -> impl Strategy<Value = StoredValue> {
    let value = prop_oneof![
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(FeatureValue::Float),
        any::<i64>().prop_map(FeatureValue::Int),
        ".{0,40}".prop_map(FeatureValue::String),
        proptest::collection::vec(-1e6f32..1e6, 0..32).prop_map(FeatureValue::FloatVector),
    ];
    (value, any::<i64>(), any::<i64>()).prop_map(|(value, event_time_ms, written_at_ms)| {
        StoredValue {
            value,
            event_time_ms,
            written_at_ms,
        }
    })
}

#[test]
fn online_values_never_panic_and_round_trip() {
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..256),
        stored_value(),
        any::<usize>(),
    );
    fuzz(
        "online-store value codec",
        strategy,
        |(bytes, value, cut)| {
            let _ = online::decode_at("fuzz", &bytes);
            let encoded = online::encode(&value);
            let back = online::decode_at("fuzz", &encoded).expect("a valid value decodes");
            prop_assert_eq!(back, value);
            let _ = online::decode_at("fuzz", &encoded[..cut % (encoded.len() + 1)]);
            Ok(())
        },
    );
}

#[test]
fn events_never_panic() {
    let strategy = (
        ".{0,200}",
        r#"\{("(user_id|product_id|event_type|timestamp|event_id|value|category|ts|type|item)": ?("[a-z0-9 ]{0,8}"|-?[0-9]{1,20}(\.[0-9]{1,4})?|null|true|\[\]|\{\}),? ?){0,8}\}"#,
        proptest::collection::vec(any::<u8>(), 0..512),
        prop_oneof![
            Just(FileFormat::Auto),
            Just(FileFormat::Jsonl),
            Just(FileFormat::Tsv),
            Just(FileFormat::Csv),
            Just(FileFormat::Otto)
        ],
    );
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("events");
    fuzz(
        "events (JSON lines and files)",
        strategy,
        |(line, json, file, format)| {
            let _ = parse_json_event(&line);
            let _ = parse_json_event(&json);
            std::fs::write(&path, &file).expect("write");
            let _ = read_file(&path, format);
            Ok(())
        },
    );
}

const VALID_ROUTING: &str = "formatVersion: 1\nrevision: r1\nmodels:\n  als:\n    stable: v1\n    canary: {version: v2, weight: 10}\n";

#[test]
fn routing_documents_and_rankings_never_panic() {
    let strategy = (
        ".{0,300}",
        proptest::collection::vec((any::<usize>(), any::<char>(), any::<bool>()), 0..6),
        proptest::collection::vec(any::<u8>(), 0..300),
    );
    fuzz(
        "routing documents and rankings",
        strategy,
        |(text, edits, bytes)| {
            for format in [RoutingFormat::Yaml, RoutingFormat::Json] {
                let _ = RoutingTable::parse(&text, format, "fuzz");
            }
            // A valid document with a few characters inserted or removed.
            let mut doc: Vec<char> = VALID_ROUTING.chars().collect();
            for (at, c, insert) in edits {
                let i = at % (doc.len() + 1);
                if insert {
                    doc.insert(i, c);
                } else if i < doc.len() {
                    doc.remove(i);
                }
            }
            let doc: String = doc.into_iter().collect();
            let _ = RoutingTable::parse(&doc, RoutingFormat::Yaml, "fuzz");
            let _ = Rankings::from_json("fuzz", &bytes);
            let _ = Rankings::from_json("fuzz", text.as_bytes());
            Ok(())
        },
    );
}

#[test]
fn a_valid_routing_document_round_trips() {
    let t = RoutingTable::parse(VALID_ROUTING, RoutingFormat::Yaml, "doc").expect("valid");
    let json = serde_json::to_string(&t.to_document()).expect("json");
    let back = RoutingTable::parse(&json, RoutingFormat::Json, "doc").expect("round trip");
    assert_eq!(back, t);
}
