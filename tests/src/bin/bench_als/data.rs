//! The benchmark's data: reading `user item weight` files, the one seeded split, and the raw
//! CSR files both sides read.
//!
//! The raw format is three little-endian arrays per matrix, `<name>.indptr` and
//! `<name>.indices` as `i32` and `<name>.data` as `f32`, with the shape kept in
//! `params.json`: numpy reads them with `fromfile` without parsing or copying.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use sprs::{CsMat, TriMat};

/// A weights matrix read from a text file.
#[derive(Debug)]
pub struct Loaded {
    /// users × items, duplicates summed.
    pub weights: CsMat<f32>,
    /// Lines skipped because the weight was zero, negative or not finite.
    pub skipped: usize,
}

/// Parses `user item [weight]` lines separated by tabs, commas, semicolons or spaces. Ids are
/// any tokens, numbered in order of appearance; a missing weight is 1. Blank lines and lines
/// starting with `#` or `%` are ignored, and so is a first line whose weight is not a number
/// (a header). Weights that are not finite and > 0 are skipped and counted.
pub fn parse_weights(text: impl BufRead) -> anyhow::Result<Loaded> {
    let mut users: HashMap<String, usize> = HashMap::new();
    let mut items: HashMap<String, usize> = HashMap::new();
    let mut triples: Vec<(usize, usize, f32)> = Vec::new();
    let mut skipped = 0;
    let mut first = true;
    for (n, line) in text.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", n + 1))?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('%') {
            continue;
        }
        let was_first = std::mem::replace(&mut first, false);
        let mut fields = line
            .split(|c: char| c == '\t' || c == ',' || c == ';' || c.is_whitespace())
            .filter(|f| !f.is_empty());
        let (Some(user), Some(item)) = (fields.next(), fields.next()) else {
            bail!("line {}: expected `user item [weight]`: {line:?}", n + 1);
        };
        let weight = match fields.next() {
            None => 1.0,
            Some(w) => match w.parse::<f32>() {
                Ok(w) => w,
                Err(_) if was_first => continue,
                Err(e) => bail!("line {}: weight {w:?}: {e}", n + 1),
            },
        };
        if !(weight.is_finite() && weight > 0.0) {
            skipped += 1;
            continue;
        }
        let next = users.len();
        let u = *users.entry(user.to_owned()).or_insert(next);
        let next = items.len();
        let i = *items.entry(item.to_owned()).or_insert(next);
        triples.push((u, i, weight));
    }
    if triples.is_empty() {
        bail!("no interactions found");
    }
    let mut tri = TriMat::with_capacity((users.len(), items.len()), triples.len());
    for (u, i, w) in triples {
        tri.add_triplet(u, i, w);
    }
    Ok(Loaded {
        weights: tri.to_csr(),
        skipped,
    })
}

/// Reads a `user item weight` file (see [`parse_weights`]).
pub fn read_weights(path: &Path) -> anyhow::Result<Loaded> {
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    parse_weights(BufReader::new(file)).with_context(|| format!("parsing {}", path.display()))
}

/// Writes `weights` as `user<TAB>item<TAB>weight` lines with numeric ids.
pub fn write_weights(weights: &CsMat<f32>, path: &Path) -> anyhow::Result<()> {
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    for (u, row) in weights.outer_iterator().enumerate() {
        for (i, w) in row.iter() {
            writeln!(out, "{u}\t{i}\t{w}")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Shape of a matrix written by [`write_csr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Stored entries.
    pub nnz: usize,
}

fn to_i32(v: usize, what: &str) -> anyhow::Result<i32> {
    i32::try_from(v).with_context(|| format!("{what} {v} does not fit the i32 CSR format"))
}

/// Writes `m` (CSR) as `dir/<name>.{indptr,indices,data}`.
pub fn write_csr(m: &CsMat<f32>, dir: &Path, name: &str) -> anyhow::Result<Shape> {
    let m = if m.is_csr() { m.clone() } else { m.to_csr() };
    let write = |ext: &str, bytes: Vec<u8>| {
        let path = dir.join(format!("{name}.{ext}"));
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    let mut bytes = Vec::with_capacity(4 * (m.rows() + 1));
    for &p in m.indptr().raw_storage() {
        bytes.extend_from_slice(&to_i32(p, "offset")?.to_le_bytes());
    }
    write("indptr", bytes)?;
    let mut bytes = Vec::with_capacity(4 * m.nnz());
    for &i in m.indices() {
        bytes.extend_from_slice(&to_i32(i, "column")?.to_le_bytes());
    }
    write("indices", bytes)?;
    write(
        "data",
        m.data().iter().flat_map(|v| v.to_le_bytes()).collect(),
    )?;
    Ok(Shape {
        rows: m.rows(),
        cols: m.cols(),
        nnz: m.nnz(),
    })
}

fn read_words(path: &Path, expected: usize) -> anyhow::Result<Vec<[u8; 4]>> {
    let mut bytes = Vec::with_capacity(4 * expected);
    fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() != 4 * expected {
        bail!(
            "{}: {} bytes, expected {}",
            path.display(),
            bytes.len(),
            4 * expected
        );
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect())
}

/// Reads a matrix written by [`write_csr`].
pub fn read_csr(dir: &Path, name: &str, shape: Shape) -> anyhow::Result<CsMat<f32>> {
    let index = |w: [u8; 4]| usize::try_from(i32::from_le_bytes(w)).context("negative index");
    let indptr = read_words(&dir.join(format!("{name}.indptr")), shape.rows + 1)?
        .into_iter()
        .map(index)
        .collect::<anyhow::Result<Vec<usize>>>()?;
    let indices = read_words(&dir.join(format!("{name}.indices")), shape.nnz)?
        .into_iter()
        .map(index)
        .collect::<anyhow::Result<Vec<usize>>>()?;
    let data = read_words(&dir.join(format!("{name}.data")), shape.nnz)?
        .into_iter()
        .map(f32::from_le_bytes)
        .collect();
    CsMat::try_new((shape.rows, shape.cols), indptr, indices, data)
        .map_err(|(_, _, _, e)| anyhow::anyhow!("{name}: invalid CSR: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_separators_headers_comments_and_duplicates() {
        let text = "user,item,weight\n\
                    # a comment\n\
                    alice,book,2\n\
                    bob\tbook\t1.5\r\n\
                    alice pen 1\n\
                    \n\
                    carol;pen\n\
                    alice,book,3\n\
                    bob,pen,0\n\
                    bob,pen,-2\n";
        let loaded = parse_weights(text.as_bytes()).expect("parse");
        let m = loaded.weights;
        assert_eq!(m.shape(), (3, 2), "alice bob carol × book pen");
        assert_eq!(m.get(0, 0), Some(&5.0), "duplicates are summed");
        assert_eq!(m.get(1, 0), Some(&1.5));
        assert_eq!(m.get(0, 1), Some(&1.0));
        assert_eq!(m.get(2, 1), Some(&1.0), "a missing weight is 1");
        assert_eq!(m.get(1, 1), None);
        assert_eq!(loaded.skipped, 2);
    }

    #[test]
    fn refuses_bad_lines_after_the_header() {
        let err = parse_weights("1 2 3\n4 5 x\n".as_bytes()).expect_err("bad weight");
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = parse_weights("lonely\n".as_bytes()).expect_err("one field");
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(parse_weights("".as_bytes()).is_err());
    }

    #[test]
    fn raw_csr_and_text_round_trip() {
        let mut tri = TriMat::new((3, 4));
        tri.add_triplet(0, 1, 2.0_f32);
        tri.add_triplet(2, 3, 1.0);
        tri.add_triplet(2, 0, 7.5);
        let m: CsMat<f32> = tri.to_csr();
        let dir = std::env::temp_dir().join(format!("bench-als-data-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let shape = write_csr(&m, &dir, "m").expect("write");
        assert_eq!(
            shape,
            Shape {
                rows: 3,
                cols: 4,
                nnz: 3
            }
        );
        assert_eq!(read_csr(&dir, "m", shape).expect("read"), m);
        let short = Shape { nnz: 4, ..shape };
        assert!(read_csr(&dir, "m", short).is_err());
        let tsv = dir.join("m.tsv");
        write_weights(&m, &tsv).expect("tsv");
        let back = read_weights(&tsv).expect("read tsv").weights;
        // Ids are renumbered in order of appearance: users 0, 2 and items 1, 0, 3.
        assert_eq!(back.shape(), (2, 3));
        assert_eq!(back.get(1, 1), Some(&7.5));
        assert_eq!(back.get(1, 2), Some(&1.0));
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
