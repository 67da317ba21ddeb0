//! The factor-file format (see the module docs of [`artifacts`](super)) and sha256.

use ndarray::{Array2, ArrayView2};
use sha2::{Digest as _, Sha256};

use super::ArtifactError;

/// First four bytes of every factor file.
pub const FACTOR_MAGIC: [u8; 4] = *b"RSF1";
/// Bytes before the first value.
pub const FACTOR_HEADER_LEN: usize = 32;
const FORMAT_VERSION: u32 = 1;
const DTYPE_F32: u32 = 1;

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Encodes a matrix as a factor file.
pub fn encode_factors(matrix: ArrayView2<'_, f32>) -> Vec<u8> {
    let (rows, cols) = matrix.dim();
    let mut out = Vec::with_capacity(FACTOR_HEADER_LEN + rows * cols * 4);
    out.extend_from_slice(&FACTOR_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(rows as u64).to_le_bytes());
    out.extend_from_slice(&(cols as u64).to_le_bytes());
    out.extend_from_slice(&DTYPE_F32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    // `iter` walks in logical row-major order whatever the memory layout.
    for value in matrix.iter() {
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Decodes a factor file, refusing a bad header, a length that does not match the header and
/// any value that is not finite. `key` names the file in errors.
pub fn decode_factors(key: &str, bytes: &[u8]) -> Result<Array2<f32>, ArtifactError> {
    let bad = |reason: String| ArtifactError::BadFormat {
        key: key.to_owned(),
        reason,
    };
    if bytes.len() < FACTOR_HEADER_LEN {
        return Err(bad(format!(
            "truncated: {} bytes, the header alone needs {FACTOR_HEADER_LEN}",
            bytes.len()
        )));
    }
    if bytes[..4] != FACTOR_MAGIC {
        return Err(bad(format!(
            "not a factor file: magic {:?}, expected \"RSF1\"",
            String::from_utf8_lossy(&bytes[..4])
        )));
    }
    let version = u32_at(bytes, 4);
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "factor format version {version}, this build reads {FORMAT_VERSION}"
        )));
    }
    let (rows, cols) = (u64_at(bytes, 8), u64_at(bytes, 16));
    let dtype = u32_at(bytes, 24);
    if dtype != DTYPE_F32 {
        return Err(bad(format!(
            "dtype code {dtype}, only {DTYPE_F32} (f32 little-endian) is supported"
        )));
    }
    if u32_at(bytes, 28) != 0 {
        return Err(bad("reserved header bytes 28..32 are not zero".into()));
    }
    let data_len = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(4))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad(format!("shape {rows} × {cols} is too large")))?;
    let actual = bytes.len() - FACTOR_HEADER_LEN;
    if actual != data_len {
        let what = if actual < data_len {
            "truncated"
        } else {
            "trailing bytes"
        };
        return Err(bad(format!(
            "{what}: header says {rows} × {cols} f32 ({data_len} bytes of data), found {actual}"
        )));
    }
    let mut values = Vec::with_capacity(data_len / 4);
    for (i, chunk) in bytes[FACTOR_HEADER_LEN..].chunks_exact(4).enumerate() {
        let value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if !value.is_finite() {
            let i = i as u64;
            return Err(ArtifactError::NonFinite {
                key: key.to_owned(),
                row: i / cols,
                col: i % cols,
                value,
            });
        }
        values.push(value);
    }
    let shape = usize::try_from(rows)
        .ok()
        .zip(usize::try_from(cols).ok())
        .ok_or_else(|| bad(format!("shape {rows} × {cols} is too large")))?;
    Array2::from_shape_vec(shape, values).map_err(|e| bad(format!("shape {rows} × {cols}: {e}")))
}

#[cfg(test)]
mod tests {
    use ndarray::array;

    use super::*;

    #[test]
    fn round_trip_keeps_shape_and_bits() {
        let m = array![[1.0f32, -2.5, 3.25], [0.0, f32::MIN_POSITIVE, f32::MAX]];
        let bytes = encode_factors(m.view());
        assert_eq!(bytes.len(), FACTOR_HEADER_LEN + 6 * 4);
        assert_eq!(&bytes[..4], b"RSF1");
        assert_eq!(decode_factors("f", &bytes).expect("decodes"), m);
        // A transposed view is written in its logical order.
        let t = m.t();
        assert_eq!(decode_factors("f", &encode_factors(t)).expect("decodes"), t);
        // Empty shapes are representable.
        let empty = Array2::<f32>::zeros((0, 4));
        assert_eq!(
            decode_factors("f", &encode_factors(empty.view())).expect("decodes"),
            empty
        );
    }

    #[test]
    fn layout_is_fixed_little_endian() {
        let bytes = encode_factors(array![[1.0f32, 2.0]].view());
        let expected: Vec<u8> = [
            &b"RSF1"[..],
            &1u32.to_le_bytes(),
            &1u64.to_le_bytes(),
            &2u64.to_le_bytes(),
            &1u32.to_le_bytes(),
            &0u32.to_le_bytes(),
            &1.0f32.to_le_bytes(),
            &2.0f32.to_le_bytes(),
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    fn refusal(bytes: &[u8]) -> ArtifactError {
        decode_factors("models/m/v/user_factors.f32", bytes).expect_err("must refuse")
    }

    #[test]
    fn refuses_truncation_garbage_and_bad_headers() {
        let good = encode_factors(array![[1.0f32, 2.0], [3.0, 4.0]].view());

        let err = refusal(&good[..good.len() - 1]);
        assert_eq!(err.kind(), "BadFormat");
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(err.to_string().contains("user_factors.f32"), "{err}");

        let err = refusal(&good[..10]);
        assert!(err.to_string().contains("header alone"), "{err}");

        let mut longer = good.clone();
        longer.push(0);
        assert!(refusal(&longer).to_string().contains("trailing"));

        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(refusal(&magic).to_string().contains("magic"));

        let mut version = good.clone();
        version[4] = 2;
        assert!(refusal(&version).to_string().contains("version 2"));

        let mut dtype = good.clone();
        dtype[24] = 2;
        assert!(refusal(&dtype).to_string().contains("dtype code 2"));

        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(refusal(&huge).to_string().contains("too large"));
    }

    #[test]
    fn refuses_nan_and_infinity_naming_the_cell() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let m = array![[1.0f32, 2.0, 3.0], [4.0, 5.0, bad]];
            let err = refusal(&encode_factors(m.view()));
            assert_eq!(err.kind(), "NonFinite");
            let ArtifactError::NonFinite { row, col, .. } = err else {
                unreachable!()
            };
            assert_eq!((row, col), (1, 2));
        }
    }

    #[test]
    fn sha256_is_lower_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
