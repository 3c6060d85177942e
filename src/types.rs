//! Types that several stages share: what a document is called, what a page holds, what the model
//! returns.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Version of the Chroma record format (the records' `schema_version` key, and
/// `FileRecord::schema_version`: which format a file's records were written in); bumped on any
/// incompatible change. The state store's own format is versioned apart, by
/// `state::STORE_VERSION`, so that bumping this one does not touch the store.
pub const SCHEMA_VERSION: u32 = 1;

/// A document's identity: the first 32 hex chars of blake3(agent_id, NUL, canonical path).
/// Stable while the file is edited in place, so a re-index overwrites the same Chroma ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DocId(String);

impl DocId {
    pub fn new(agent_id: &str, canonical_path: &Path) -> DocId {
        let mut h = blake3::Hasher::new();
        h.update(agent_id.as_bytes());
        h.update(&[0]);
        h.update(canonical_path.as_os_str().as_encoded_bytes());
        let hex = h.finalize().to_hex();
        DocId(hex[..32].to_string())
    }

    /// Wraps an id read back from Chroma or the store.
    pub fn from_string(s: impl Into<String>) -> DocId {
        DocId(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// blake3 of a file's bytes, as hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContentHash(pub String);

impl ContentHash {
    pub fn of_bytes(bytes: &[u8]) -> ContentHash {
        ContentHash(blake3::hash(bytes).to_hex().to_string())
    }

    pub fn of_file(path: &Path) -> std::io::Result<ContentHash> {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(path)?)?;
        Ok(ContentHash(h.finalize().to_hex().to_string()))
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A late-interaction embedding: `rows` vectors of `dim` floats, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiVector {
    pub rows: usize,
    pub dim: usize,
    pub data: Vec<f32>,
}

impl MultiVector {
    pub fn new(rows: usize, dim: usize, data: Vec<f32>) -> MultiVector {
        assert_eq!(
            rows * dim,
            data.len(),
            "multivector data does not match its shape"
        );
        MultiVector { rows, dim, data }
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// The record embedding Chroma indexes: the mean of the rows, L2-normalised.
    pub fn mean_normalized(&self) -> Vec<f32> {
        let mut mean = vec![0f32; self.dim];
        for r in 0..self.rows {
            for (m, v) in mean.iter_mut().zip(self.row(r)) {
                *m += *v;
            }
        }
        let n = self.rows.max(1) as f32;
        mean.iter_mut().for_each(|m| *m /= n);
        let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            mean.iter_mut().for_each(|m| *m /= norm);
        }
        mean
    }

    /// Late-interaction score of `self` (a query) against `doc`: Σ over query rows of the max
    /// dot product over the document's rows.
    pub fn maxsim(&self, doc: &MultiVector) -> f32 {
        assert_eq!(
            self.dim, doc.dim,
            "maxsim of multivectors of different widths"
        );
        (0..self.rows)
            .map(|q| {
                let qv = self.row(q);
                (0..doc.rows)
                    .map(|d| qv.iter().zip(doc.row(d)).map(|(a, b)| a * b).sum::<f32>())
                    .fold(f32::NEG_INFINITY, f32::max)
            })
            .sum()
    }
}

/// The kind of source a document came from, as stored in the `format` metadata key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocFormat {
    Pdf,
    Image,
    Docx,
    Pptx,
    Xlsx,
    Odt,
    Odp,
    Ods,
    Doc,
    Ppt,
    Text,
    Markdown,
    Html,
    Csv,
    Json,
}

impl DocFormat {
    /// From a file name's extension; `None` for files we do not index.
    pub fn from_path(path: &Path) -> Option<DocFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "pdf" => DocFormat::Pdf,
            "png" | "jpg" | "jpeg" | "tif" | "tiff" | "webp" | "bmp" | "gif" => DocFormat::Image,
            "docx" => DocFormat::Docx,
            "pptx" => DocFormat::Pptx,
            "xlsx" => DocFormat::Xlsx,
            "odt" => DocFormat::Odt,
            "odp" => DocFormat::Odp,
            "ods" => DocFormat::Ods,
            "doc" => DocFormat::Doc,
            "ppt" => DocFormat::Ppt,
            "txt" | "text" => DocFormat::Text,
            "md" | "markdown" => DocFormat::Markdown,
            "html" | "htm" => DocFormat::Html,
            "csv" => DocFormat::Csv,
            "json" => DocFormat::Json,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DocFormat::Pdf => "pdf",
            DocFormat::Image => "image",
            DocFormat::Docx => "docx",
            DocFormat::Pptx => "pptx",
            DocFormat::Xlsx => "xlsx",
            DocFormat::Odt => "odt",
            DocFormat::Odp => "odp",
            DocFormat::Ods => "ods",
            DocFormat::Doc => "doc",
            DocFormat::Ppt => "ppt",
            DocFormat::Text => "text",
            DocFormat::Markdown => "markdown",
            DocFormat::Html => "html",
            DocFormat::Csv => "csv",
            DocFormat::Json => "json",
        }
    }
}

/// How `full_embeddings` holds a multi-vector; the record's `multivector_encoding` names it
/// (absent: `f32-gzip-b64`). The names are also the values of `chroma.multivector_encoding`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum MultivectorEncoding {
    /// base64(gzip(little-endian f32, row-major)): what DocuSearch's search engine reads.
    #[default]
    #[serde(rename = "f32-gzip-b64")]
    F32GzipB64,
    /// base64(little-endian IEEE f16, row-major): half the size.
    #[serde(rename = "f16-b64")]
    F16B64,
}

impl MultivectorEncoding {
    pub fn as_str(self) -> &'static str {
        match self {
            MultivectorEncoding::F32GzipB64 => "f32-gzip-b64",
            MultivectorEncoding::F16B64 => "f16-b64",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32-gzip-b64" => Some(Self::F32GzipB64),
            "f16-b64" => Some(Self::F16B64),
            _ => None,
        }
    }
}
