//! DocuSearch's record format, in one place: record ids, metadata keys, the `full_embeddings`
//! encodings (`f32-gzip-b64`, `f16-b64`), how a document's pages and chunks become records, and
//! how records are read back. README.md ("The Chroma record format") describes the same thing
//! for other clients. The Chroma client (`crate::chroma::client`) carries these records without
//! knowing any of it.

use std::borrow::Cow;
use std::io::Read;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::chroma::client::{CollectionOptions, GetRecord, RawMetadata, Record, Space};
use crate::types::{ContentHash, DocFormat, DocId, MultiVector, SCHEMA_VERSION};

/// What a record holds, and so which collection it lives in: a page (the visual collection) or
/// a text chunk (the text collection). Its name is the record's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    Visual,
    Text,
}

impl RecordKind {
    /// The `type` metadata value.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Visual => "visual",
            RecordKind::Text => "text",
        }
    }
}

/// String metadata that nobody filters on and that is large: Chroma's string inverted index is
/// switched off for them when we create a collection (it would store each blob a second time).
pub const UNINDEXED_STRING_KEYS: [&str; 2] = [keys::FULL_EMBEDDINGS, keys::FULL_TEXT];

/// How DocuSearch's collections are created when missing: cosine space, and no string index on
/// the large `full_embeddings` and `full_text` values.
pub fn collection_options() -> CollectionOptions {
    CollectionOptions {
        space: Space::Cosine,
        unindexed_string_keys: UNINDEXED_STRING_KEYS
            .iter()
            .map(|k| k.to_string())
            .collect(),
        dimension: None,
    }
}

/// The id of a page record: `{doc_id}-page{NNN}`, 1-based, at least 3 digits.
pub fn page_id(doc_id: &DocId, page: u32) -> String {
    format!("{doc_id}-page{page:03}")
}

/// The id of a text-chunk record: `{doc_id}-chunk{NNNN}`, 0-based, at least 4 digits.
pub fn chunk_id(doc_id: &DocId, chunk: u32) -> String {
    format!("{doc_id}-chunk{chunk:04}")
}

/// What a record id names within its document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordPart {
    /// 1-based page number.
    Page(u32),
    /// 0-based chunk index.
    Chunk(u32),
}

impl RecordPart {
    /// The record's id.
    pub fn id(self, doc_id: &DocId) -> String {
        match self {
            RecordPart::Page(page) => page_id(doc_id, page),
            RecordPart::Chunk(chunk) => chunk_id(doc_id, chunk),
        }
    }

    pub fn kind(self) -> RecordKind {
        match self {
            RecordPart::Page(_) => RecordKind::Visual,
            RecordPart::Chunk(_) => RecordKind::Text,
        }
    }

    /// The page number or chunk index.
    pub fn number(self) -> u32 {
        match self {
            RecordPart::Page(n) | RecordPart::Chunk(n) => n,
        }
    }
}

/// Reads a record id back: its doc id and what it names; `None` for an id of another form.
pub fn parse_id(id: &str) -> Option<(DocId, RecordPart)> {
    // Doc ids are hex, so the last `-` starts the part.
    let (doc, part) = id.rsplit_once('-')?;
    let number = |digits: &str| -> Option<u32> {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    let part = if let Some(n) = part.strip_prefix("page") {
        RecordPart::Page(number(n)?)
    } else {
        RecordPart::Chunk(number(part.strip_prefix("chunk")?)?)
    };
    (!doc.is_empty()).then(|| (DocId::from_string(doc), part))
}

/// Metadata keys. The first group is DocuSearch's, the second ours.
pub mod keys {
    pub const DOC_ID: &str = "doc_id";
    pub const TYPE: &str = "type";
    pub const FILENAME: &str = "filename";
    pub const SOURCE_PATH: &str = "source_path";
    pub const PAGE: &str = "page";
    pub const NUM_PAGES: &str = "num_pages";
    pub const FORMAT: &str = "format";
    pub const TIMESTAMP: &str = "timestamp";
    pub const FULL_EMBEDDINGS: &str = "full_embeddings";
    pub const EMBEDDING_SHAPE: &str = "embedding_shape";
    pub const SEQ_LENGTH: &str = "seq_length";
    pub const CHUNK_ID: &str = "chunk_id";
    pub const FULL_TEXT: &str = "full_text";
    pub const TEXT_PREVIEW: &str = "text_preview";
    pub const WORD_COUNT: &str = "word_count";

    pub const CONTENT_HASH: &str = "content_hash";
    pub const AGENT_ID: &str = "agent_id";
    pub const MODEL: &str = "model";
    pub const MULTIVECTOR_ENCODING: &str = "multivector_encoding";
    pub const SCHEMA_VERSION: &str = "schema_version";
}

/// Characters of a chunk kept in `text_preview`.
pub const TEXT_PREVIEW_CHARS: usize = 200;

pub use crate::types::MultivectorEncoding;

/// Bytes of a multi-vector deflated on trial before the whole is (32 KiB: 64 rows of 128 f32).
const DEFLATE_TRIAL_BYTES: usize = 32 << 10;

/// Encodes a multi-vector for the `full_embeddings` key.
pub fn encode_multivector(mv: &MultiVector, encoding: MultivectorEncoding) -> String {
    match encoding {
        MultivectorEncoding::F32GzipB64 => {
            let mut raw = Vec::with_capacity(mv.data.len() * 4);
            for v in &mv.data {
                raw.extend_from_slice(&v.to_le_bytes());
            }
            // Deflate only where it pays. Full-precision floats (what the CPU computes) shrink
            // by ~8%, yet every search would then inflate each candidate (~1 ms a page, most of
            // stage 2); values computed in bf16/f16 and widened to f32 shrink by 35-50%. Below a
            // 20% saving the same gzip format carries the bytes in stored blocks, which any gzip
            // reader takes and which decode at copy speed. A trial on the first rows decides:
            // deflating a whole full-precision text chunk only to throw it away was most of the
            // time a write spent encoding (BENCHMARKS.md, issue 15).
            let saves = |raw: &[u8], deflated: &[u8]| deflated.len() * 5 <= raw.len() * 4;
            let trial = &raw[..raw.len().min(DEFLATE_TRIAL_BYTES)];
            let gz = if trial.len() == raw.len() || saves(trial, &gzip(trial, 1)) {
                Some(gzip(&raw, 1)).filter(|d| saves(&raw, d))
            } else {
                None
            };
            base64_simd::STANDARD.encode_to_string(gz.unwrap_or_else(|| gzip(&raw, 0)))
        }
        MultivectorEncoding::F16B64 => {
            let mut raw = Vec::with_capacity(mv.data.len() * 2);
            for v in &mv.data {
                raw.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
            base64_simd::STANDARD.encode_to_string(raw)
        }
    }
}

/// gzip of `raw` at libdeflate's `level` (0 = stored blocks, 1 = fastest): several times the
/// speed of flate2's miniz back-end at level 1, and the same format. One compressor per thread
/// and level, as setting one up allocates its tables.
fn gzip(raw: &[u8], level: i32) -> Vec<u8> {
    use libdeflater::{CompressionLvl, Compressor};
    thread_local! {
        static COMPRESSORS: std::cell::RefCell<Vec<(i32, Compressor)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    COMPRESSORS.with(|cs| {
        let mut cs = cs.borrow_mut();
        let i = match cs.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                let lvl = CompressionLvl::new(level).expect("gzip levels are 0-12");
                cs.push((level, Compressor::new(lvl)));
                cs.len() - 1
            }
        };
        let c = &mut cs[i].1;
        let mut out = vec![0u8; c.gzip_compress_bound(raw.len())];
        let n = c
            .gzip_compress(raw, &mut out)
            .expect("the output buffer is libdeflate's own bound");
        out.truncate(n);
        out
    })
}

/// Decodes `full_embeddings` given its encoding and shape (`rows` vectors of `dim`).
pub fn decode_multivector(
    encoded: &str,
    encoding: MultivectorEncoding,
    rows: usize,
    dim: usize,
) -> Result<MultiVector, RecordError> {
    let bytes = base64_simd::STANDARD
        .decode_to_vec(encoded.as_bytes())
        .map_err(|_| RecordError::Base64)?;
    let values = rows * dim;
    let data = match encoding {
        MultivectorEncoding::F32GzipB64 => {
            let mut data = vec![0f32; values];
            let len = gunzip_into(&bytes, bytemuck::cast_slice_mut(&mut data))?;
            check_len(len, values * 4, rows, dim, encoding)?;
            // The bytes are little-endian; a no-op on little-endian machines.
            data.iter_mut()
                .for_each(|v| *v = f32::from_bits(u32::from_le(v.to_bits())));
            data
        }
        MultivectorEncoding::F16B64 => {
            check_len(bytes.len(), values * 2, rows, dim, encoding)?;
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()
        }
    };
    Ok(MultiVector::new(rows, dim, data))
}

/// Inflates gzip data into `out`, which has the size the record's shape says; returns the
/// inflated length (the caller compares it with the shape). The usual case, one gzip member of
/// exactly that size, goes through libdeflate in one call; anything else (several members, a
/// length other than the shape's, damage) through flate2's streaming decoder, which measures
/// the real length or says what is wrong.
fn gunzip_into(gz: &[u8], out: &mut [u8]) -> Result<usize, RecordError> {
    // libdeflate stops after the first member, so a short result goes the general way too.
    if libdeflater::Decompressor::new().gzip_decompress(gz, out) == Ok(out.len()) {
        return Ok(out.len());
    }
    let mut raw = Vec::with_capacity(out.len());
    flate2::read::MultiGzDecoder::new(gz)
        .read_to_end(&mut raw)
        .map_err(RecordError::Gzip)?;
    if raw.len() == out.len() {
        out.copy_from_slice(&raw);
    }
    Ok(raw.len())
}

fn check_len(
    bytes: usize,
    expected: usize,
    rows: usize,
    dim: usize,
    encoding: MultivectorEncoding,
) -> Result<(), RecordError> {
    if bytes != expected {
        return Err(RecordError::ShapeMismatch {
            bytes,
            rows,
            dim,
            encoding: encoding.as_str(),
            expected,
        });
    }
    Ok(())
}

/// `"(rows, dim)"`, the way Python prints a numpy shape (DocuSearch parses it back).
pub fn embedding_shape(rows: usize, dim: usize) -> String {
    format!("({rows}, {dim})")
}

/// Parses `"(rows, dim)"`; also accepts `"[rows, dim]"` and missing spaces.
pub fn parse_embedding_shape(s: &str) -> Option<(usize, usize)> {
    let inner = s
        .trim()
        .trim_start_matches(['(', '['])
        .trim_end_matches([')', ']']);
    let mut parts = inner.split(',').map(str::trim).filter(|p| !p.is_empty());
    let rows = parts.next()?.parse().ok()?;
    let dim = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((rows, dim))
}

/// One rendered page and its multi-vector: what a page record is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct PageRecord {
    /// 1-based.
    pub page: u32,
    pub text: String,
    pub embedding: MultiVector,
}

/// One text chunk and its multi-vector (embedded through the query prompt): what a text-chunk
/// record is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkRecord {
    pub chunk_index: u32,
    /// The (1-based) page the chunk starts on.
    pub page: u32,
    pub text: String,
    pub word_count: usize,
    pub embedding: MultiVector,
}

/// What every record of a document says about the document.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentMeta {
    pub doc_id: DocId,
    /// The agent that indexed it (records are listed and repaired per agent).
    pub agent_id: String,
    pub source_path: PathBuf,
    pub filename: String,
    pub format: DocFormat,
    pub num_pages: u32,
    pub content_hash: ContentHash,
    /// The model that produced the embeddings.
    pub model: String,
    /// ISO 8601 UTC.
    pub timestamp: String,
}

impl DocumentMeta {
    /// Writes the shared keys into `m` (new records, and moved ones being re-keyed).
    fn write_into(&self, m: &mut Map<String, Value>) {
        m.insert(keys::DOC_ID.into(), self.doc_id.as_str().into());
        m.insert(keys::FILENAME.into(), self.filename.as_str().into());
        m.insert(
            keys::SOURCE_PATH.into(),
            self.source_path.to_string_lossy().into(),
        );
        m.insert(keys::NUM_PAGES.into(), self.num_pages.into());
        m.insert(keys::FORMAT.into(), self.format.as_str().into());
        m.insert(keys::TIMESTAMP.into(), self.timestamp.as_str().into());
        m.insert(
            keys::CONTENT_HASH.into(),
            self.content_hash.0.as_str().into(),
        );
        m.insert(keys::AGENT_ID.into(), self.agent_id.as_str().into());
        m.insert(keys::MODEL.into(), self.model.as_str().into());
        m.insert(keys::SCHEMA_VERSION.into(), SCHEMA_VERSION.into());
    }
}

fn embedding_keys(m: &mut Map<String, Value>, mv: &MultiVector, encoding: MultivectorEncoding) {
    m.insert(
        keys::FULL_EMBEDDINGS.into(),
        encode_multivector(mv, encoding).into(),
    );
    m.insert(
        keys::EMBEDDING_SHAPE.into(),
        embedding_shape(mv.rows, mv.dim).into(),
    );
    m.insert(keys::SEQ_LENGTH.into(), mv.rows.into());
    m.insert(keys::MULTIVECTOR_ENCODING.into(), encoding.as_str().into());
}

/// The record of one page: its id, its mean vector, its text as the document, its metadata.
pub fn page_record(doc: &DocumentMeta, page: &PageRecord, encoding: MultivectorEncoding) -> Record {
    Record {
        id: page_id(&doc.doc_id, page.page),
        embedding: page.embedding.mean_normalized(),
        document: Some(page.text.clone()),
        metadata: page_metadata(doc, page.page, &page.embedding, encoding),
    }
}

/// The record of one text chunk: its id, its mean vector, its text as the document, its
/// metadata.
pub fn chunk_record(
    doc: &DocumentMeta,
    chunk: &ChunkRecord,
    encoding: MultivectorEncoding,
) -> Record {
    Record {
        id: chunk_id(&doc.doc_id, chunk.chunk_index),
        embedding: chunk.embedding.mean_normalized(),
        document: Some(chunk.text.clone()),
        metadata: chunk_metadata(doc, chunk, encoding),
    }
}

/// Metadata of a page record (`type` = `visual`); `page` is 1-based.
pub fn page_metadata(
    doc: &DocumentMeta,
    page: u32,
    mv: &MultiVector,
    encoding: MultivectorEncoding,
) -> Map<String, Value> {
    let mut m = Map::new();
    doc.write_into(&mut m);
    m.insert(keys::TYPE.into(), RecordKind::Visual.as_str().into());
    m.insert(keys::PAGE.into(), page.into());
    embedding_keys(&mut m, mv, encoding);
    m
}

/// Metadata of a text-chunk record (`type` = `text`).
pub fn chunk_metadata(
    doc: &DocumentMeta,
    chunk: &ChunkRecord,
    encoding: MultivectorEncoding,
) -> Map<String, Value> {
    let mut m = Map::new();
    doc.write_into(&mut m);
    m.insert(keys::TYPE.into(), RecordKind::Text.as_str().into());
    m.insert(keys::PAGE.into(), chunk.page.into());
    m.insert(keys::CHUNK_ID.into(), chunk.chunk_index.into());
    m.insert(keys::FULL_TEXT.into(), chunk.text.as_str().into());
    m.insert(
        keys::TEXT_PREVIEW.into(),
        chunk
            .text
            .chars()
            .take(TEXT_PREVIEW_CHARS)
            .collect::<String>()
            .into(),
    );
    m.insert(keys::WORD_COUNT.into(), chunk.word_count.into());
    embedding_keys(&mut m, &chunk.embedding, encoding);
    m
}

/// The `where` filter for every record of one document.
pub fn where_document(doc_id: &DocId) -> Value {
    json!({ keys::DOC_ID: doc_id.as_str() })
}

/// The `where` filter for every record one agent wrote.
pub fn where_agent(agent_id: &str) -> Value {
    json!({ keys::AGENT_ID: agent_id })
}

/// Why a stored record could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record metadata has no `{key}` (not a record this agent or DocuSearch wrote)")]
    MissingKey { key: &'static str },
    #[error("record metadata `{key}` = {value} is not {expected}")]
    BadValue {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("unknown `multivector_encoding` {0:?}: expected f32-gzip-b64 or f16-b64 (written by a newer agent?)")]
    UnknownEncoding(String),
    #[error("`full_embeddings` is not valid base64")]
    Base64,
    #[error("`full_embeddings` is not valid gzip: {0}")]
    Gzip(std::io::Error),
    #[error("`full_embeddings` holds {bytes} bytes, but `embedding_shape` ({rows}, {dim}) in {encoding} needs {expected}")]
    ShapeMismatch {
        bytes: usize,
        rows: usize,
        dim: usize,
        encoding: &'static str,
        expected: usize,
    },
}

/// Decodes a record's `full_embeddings` from its metadata, reading `embedding_shape` and
/// `multivector_encoding` (absent in records DocuSearch itself wrote: `f32-gzip-b64`).
pub fn decode_full_embeddings(metadata: &Map<String, Value>) -> Result<MultiVector, RecordError> {
    let encoded = str_key(metadata, keys::FULL_EMBEDDINGS)?;
    decode_blob(metadata, encoded)
}

/// Metadata without `full_embeddings`, and that blob.
pub type SplitMetadata<'a> = (Map<String, Value>, Option<Cow<'a, str>>);

/// One record's metadata as the server sent it (JSON text per key), split into the
/// `full_embeddings` blob, borrowed from the answer when it holds no escapes (base64 never
/// does), and every other key parsed.
pub fn split_raw_metadata(raw: RawMetadata<'_>) -> Result<SplitMetadata<'_>, RecordError> {
    let mut rest = Map::new();
    let mut blob = None;
    for (key, value) in raw {
        let text = value.get();
        if key == keys::FULL_EMBEDDINGS {
            let bad = || RecordError::BadValue {
                key: keys::FULL_EMBEDDINGS,
                value: text.chars().take(40).collect(),
                expected: "a string",
            };
            blob = Some(match serde_json::from_str::<&str>(text) {
                Ok(s) => Cow::Borrowed(s),
                Err(_) => Cow::Owned(serde_json::from_str::<String>(text).map_err(|_| bad())?),
            });
        } else {
            // The server sent valid JSON, so each value parses.
            let v = serde_json::from_str(text).map_err(|_| RecordError::BadValue {
                key: "metadata",
                value: text.chars().take(40).collect(),
                expected: "JSON",
            })?;
            rest.insert(key, v);
        }
    }
    Ok((rest, blob))
}

/// `decode_full_embeddings` with the blob apart from the other keys (`split_raw_metadata`).
pub fn decode_blob(
    metadata: &Map<String, Value>,
    encoded: &str,
) -> Result<MultiVector, RecordError> {
    let shape = str_key(metadata, keys::EMBEDDING_SHAPE)?;
    let (rows, dim) = parse_embedding_shape(shape).ok_or_else(|| RecordError::BadValue {
        key: keys::EMBEDDING_SHAPE,
        value: shape.to_string(),
        expected: "a shape such as \"(1030, 128)\"",
    })?;
    let encoding = match metadata.get(keys::MULTIVECTOR_ENCODING) {
        None | Some(Value::Null) => MultivectorEncoding::F32GzipB64,
        Some(Value::String(s)) => {
            MultivectorEncoding::parse(s).ok_or_else(|| RecordError::UnknownEncoding(s.clone()))?
        }
        Some(other) => return Err(RecordError::UnknownEncoding(other.to_string())),
    };
    decode_multivector(encoded, encoding, rows, dim)
}

fn str_key<'a>(
    metadata: &'a Map<String, Value>,
    key: &'static str,
) -> Result<&'a str, RecordError> {
    match metadata.get(key) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(RecordError::MissingKey { key }),
        Some(other) => Err(RecordError::BadValue {
            key,
            value: other.to_string(),
            expected: "a string",
        }),
    }
}

/// Reads an integer metadata value.
pub fn int_key(metadata: &Map<String, Value>, key: &'static str) -> Result<i64, RecordError> {
    match metadata.get(key) {
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| RecordError::BadValue {
            key,
            value: n.to_string(),
            expected: "an integer",
        }),
        None | Some(Value::Null) => Err(RecordError::MissingKey { key }),
        Some(other) => Err(RecordError::BadValue {
            key,
            value: other.to_string(),
            expected: "an integer",
        }),
    }
}

/// A moved document's record re-keyed from what Chroma returned for it (a `get` with
/// embeddings, documents and metadatas): the same vectors, blob and page or chunk number, under
/// the new doc id and with the new document's fields. `model` stays that of the embeddings.
pub fn rekey(
    kind: RecordKind,
    old: &DocId,
    got: GetRecord,
    new: &DocumentMeta,
) -> Result<Record, RecordError> {
    let mut metadata = got
        .metadata
        .ok_or(RecordError::MissingKey { key: "metadata" })?;
    // Chroma re-normalises vectors in cosine space, so what it returns can differ from what was
    // written in the last bit. From an f32 multi-vector the original is recomputed exactly;
    // from f16 only the stored vector is left.
    let lossless = metadata
        .get(keys::MULTIVECTOR_ENCODING)
        .and_then(Value::as_str)
        == Some(MultivectorEncoding::F32GzipB64.as_str());
    let embedding = match lossless {
        true => decode_full_embeddings(&metadata)?.mean_normalized(),
        false => got
            .embedding
            .ok_or(RecordError::MissingKey { key: "embedding" })?,
    };
    // The number comes from the id; from the metadata if the id is of another form.
    let number_key = match kind {
        RecordKind::Visual => keys::PAGE,
        RecordKind::Text => keys::CHUNK_ID,
    };
    let number = parse_id(&got.id)
        .filter(|(doc, part)| doc == old && part.kind() == kind)
        .map(|(_, part)| part.number())
        .or_else(|| int_key(&metadata, number_key).ok().map(|n| n as u32))
        .ok_or(RecordError::MissingKey { key: number_key })?;
    let model = metadata.get(keys::MODEL).cloned();
    new.write_into(&mut metadata);
    if let Some(model) = model {
        metadata.insert(keys::MODEL.into(), model);
    }
    let part = match kind {
        RecordKind::Visual => RecordPart::Page(number),
        RecordKind::Text => RecordPart::Chunk(number),
    };
    Ok(Record {
        id: part.id(&new.doc_id),
        embedding,
        document: got.document,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use std::io::Write;

    fn sample(rows: usize, dim: usize) -> MultiVector {
        // Values spanning many exponents, negative zero and subnormals: bit-exactness matters.
        let mut data: Vec<f32> = (0..rows * dim)
            .map(|i| (i as f32 * 0.618).sin() * 10f32.powi((i % 9) as i32 - 4))
            .collect();
        data[0] = -0.0;
        data[1] = f32::MIN_POSITIVE / 4.0;
        MultiVector::new(rows, dim, data)
    }

    #[test]
    fn f32_gzip_round_trip_is_bit_exact() {
        let mv = sample(37, 128);
        let s = encode_multivector(&mv, MultivectorEncoding::F32GzipB64);
        let back = decode_multivector(&s, MultivectorEncoding::F32GzipB64, 37, 128).unwrap();
        let bits = |m: &MultiVector| m.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&mv));
    }

    #[test]
    fn f16_round_trip_equals_f16_rounding() {
        let mv = sample(5, 128);
        let s = encode_multivector(&mv, MultivectorEncoding::F16B64);
        assert_eq!(
            s.len(),
            (5 * 128 * 2usize).div_ceil(3) * 4,
            "no compression in f16-b64"
        );
        let back = decode_multivector(&s, MultivectorEncoding::F16B64, 5, 128).unwrap();
        for (a, b) in back.data.iter().zip(&mv.data) {
            assert_eq!(a.to_bits(), half::f16::from_f32(*b).to_f32().to_bits());
        }
    }

    /// gzip bytes of `mv` as little-endian f32, at `level`, base64-encoded: how other writers
    /// (Python's `gzip.compress` is level 9) may have stored a blob.
    fn gzip_b64(raw: &[u8], level: u32) -> String {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        gz.write_all(raw).unwrap();
        base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap())
    }

    fn le_bytes(mv: &MultiVector) -> Vec<u8> {
        mv.data.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// The gzip member inside a blob: header flags aside, byte 10 starts the deflate data and
    /// its bits 1-2 give the first block's type (0 = stored, 1 fixed, 2 dynamic Huffman).
    fn first_block_type(blob: &str) -> u8 {
        let gz = base64::engine::general_purpose::STANDARD
            .decode(blob)
            .unwrap();
        assert_eq!(&gz[..3], &[0x1f, 0x8b, 8], "a gzip member");
        (gz[10] >> 1) & 3
    }

    #[test]
    fn deflate_is_used_only_where_it_saves() {
        // Full-precision values: stored blocks, so searches decode them at copy speed. 512 rows
        // (a text chunk) are more than the trial, so the trial decides both ways.
        let full = sample(512, 128);
        let s = encode_multivector(&full, MultivectorEncoding::F32GzipB64);
        assert_eq!(first_block_type(&s), 0);
        // Values computed in bf16 (a GPU) and widened: half of every float is zero, deflated.
        let mut bf16 = full.clone();
        bf16.data
            .iter_mut()
            .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
        let t = encode_multivector(&bf16, MultivectorEncoding::F32GzipB64);
        assert_ne!(first_block_type(&t), 0);
        assert!(t.len() * 10 < s.len() * 7, "{} vs {}", t.len(), s.len());
        for (blob, mv) in [(&s, &full), (&t, &bf16)] {
            let back = decode_multivector(blob, MultivectorEncoding::F32GzipB64, 512, 128).unwrap();
            assert_eq!(&back.data, &mv.data);
        }
    }

    #[test]
    fn f32_gzip_from_other_writers_decodes() {
        let mv = sample(9, 16);
        let raw = le_bytes(&mv);
        for level in [0, 6, 9] {
            let back = decode_multivector(
                &gzip_b64(&raw, level),
                MultivectorEncoding::F32GzipB64,
                9,
                16,
            )
            .unwrap();
            assert_eq!(back.data, mv.data, "level {level}");
        }
        // Two gzip members back to back (a concatenating writer): the general decoder's case.
        let (a, b) = raw.split_at(100);
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut two = b64.decode(gzip_b64(a, 6)).unwrap();
        two.extend(b64.decode(gzip_b64(b, 6)).unwrap());
        let back =
            decode_multivector(&b64.encode(two), MultivectorEncoding::F32GzipB64, 9, 16).unwrap();
        assert_eq!(back.data, mv.data);
    }

    #[test]
    fn bad_blobs_say_what_is_wrong() {
        let mv = sample(4, 8);
        let s = encode_multivector(&mv, MultivectorEncoding::F32GzipB64);
        let err =
            decode_multivector("not base64!", MultivectorEncoding::F32GzipB64, 4, 8).unwrap_err();
        assert!(matches!(err, RecordError::Base64), "{err}");
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut gz = b64.decode(&s).unwrap();
        gz.truncate(gz.len() / 2);
        let err = decode_multivector(&b64.encode(&gz), MultivectorEncoding::F32GzipB64, 4, 8)
            .unwrap_err();
        assert!(matches!(err, RecordError::Gzip(_)), "{err}");
    }

    #[test]
    fn wrong_shape_is_reported() {
        let mv = sample(4, 8);
        let s = encode_multivector(&mv, MultivectorEncoding::F32GzipB64);
        // Fewer bytes than the shape says, and more (the real length is measured either way).
        for (rows, expected) in [(5, 160), (3, 96)] {
            let err = decode_multivector(&s, MultivectorEncoding::F32GzipB64, rows, 8).unwrap_err();
            assert!(
                matches!(err, RecordError::ShapeMismatch { bytes: 128, expected: e, .. } if e == expected),
                "{err}"
            );
        }
    }

    #[test]
    fn shapes_parse_the_python_way() {
        assert_eq!(embedding_shape(1030, 128), "(1030, 128)");
        assert_eq!(parse_embedding_shape("(1030, 128)"), Some((1030, 128)));
        assert_eq!(parse_embedding_shape("[3,128]"), Some((3, 128)));
        assert_eq!(parse_embedding_shape("(3,)"), None);
        assert_eq!(parse_embedding_shape("(3, 128, 2)"), None);
    }

    const DOC: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn record_ids_round_trip() {
        let d = DocId::from_string(DOC);
        // Written as README.md says...
        assert_eq!(page_id(&d, 7), format!("{DOC}-page007"));
        assert_eq!(page_id(&d, 1234), format!("{DOC}-page1234"));
        assert_eq!(chunk_id(&d, 12), format!("{DOC}-chunk0012"));
        assert_eq!(chunk_id(&d, 0), format!("{DOC}-chunk0000"));
        // ...read back into what was written...
        for part in [
            RecordPart::Page(1),
            RecordPart::Page(7),
            RecordPart::Page(1234),
            RecordPart::Chunk(0),
            RecordPart::Chunk(12),
            RecordPart::Chunk(99_999),
        ] {
            assert_eq!(parse_id(&part.id(&d)), Some((d.clone(), part)), "{part:?}");
        }
        // ...and an id read back is written again the same way.
        for id in [format!("{DOC}-page042"), format!("{DOC}-chunk0003")] {
            let (doc, part) = parse_id(&id).unwrap();
            assert_eq!(part.id(&doc), id);
        }
        assert_eq!(RecordPart::Page(3).kind(), RecordKind::Visual);
        assert_eq!(RecordPart::Chunk(3).kind(), RecordKind::Text);
    }

    #[test]
    fn ids_of_another_form_are_not_ours() {
        for id in [
            "",
            "abc",
            "-page001",
            "abc-page",
            "abc-page+7",
            "abc-page 7",
            "abc-chunk-1",
            "abc-slide001",
            "abc_page_1",
            "abc-page99999999999",
        ] {
            assert_eq!(parse_id(id), None, "{id:?}");
        }
    }

    #[test]
    fn keys_and_values_are_docusearchs() {
        // The contract with DocuSearch and README.md's table: a rename here breaks readers.
        let docusearch = [
            (keys::DOC_ID, "doc_id"),
            (keys::TYPE, "type"),
            (keys::FILENAME, "filename"),
            (keys::SOURCE_PATH, "source_path"),
            (keys::PAGE, "page"),
            (keys::NUM_PAGES, "num_pages"),
            (keys::FORMAT, "format"),
            (keys::TIMESTAMP, "timestamp"),
            (keys::FULL_EMBEDDINGS, "full_embeddings"),
            (keys::EMBEDDING_SHAPE, "embedding_shape"),
            (keys::SEQ_LENGTH, "seq_length"),
            (keys::CHUNK_ID, "chunk_id"),
            (keys::FULL_TEXT, "full_text"),
            (keys::TEXT_PREVIEW, "text_preview"),
            (keys::WORD_COUNT, "word_count"),
            (keys::CONTENT_HASH, "content_hash"),
            (keys::AGENT_ID, "agent_id"),
            (keys::MODEL, "model"),
            (keys::MULTIVECTOR_ENCODING, "multivector_encoding"),
            (keys::SCHEMA_VERSION, "schema_version"),
        ];
        for (key, name) in docusearch {
            assert_eq!(key, name);
        }
        assert_eq!(RecordKind::Visual.as_str(), "visual");
        assert_eq!(RecordKind::Text.as_str(), "text");
        for e in [MultivectorEncoding::F32GzipB64, MultivectorEncoding::F16B64] {
            assert_eq!(MultivectorEncoding::parse(e.as_str()), Some(e));
        }
        assert_eq!(MultivectorEncoding::F32GzipB64.as_str(), "f32-gzip-b64");
        assert_eq!(MultivectorEncoding::F16B64.as_str(), "f16-b64");
        assert_eq!(
            where_document(&DocId::from_string("abc")),
            json!({ "doc_id": "abc" })
        );
        assert_eq!(where_agent("me"), json!({ "agent_id": "me" }));
        let opts = collection_options();
        assert_eq!(opts.space, Space::Cosine);
        assert_eq!(opts.unindexed_string_keys, ["full_embeddings", "full_text"]);
    }

    fn fields(doc_id: &DocId) -> DocumentMeta {
        DocumentMeta {
            doc_id: doc_id.clone(),
            agent_id: "agent".into(),
            source_path: "/x/a.pdf".into(),
            filename: "a.pdf".into(),
            format: DocFormat::Pdf,
            num_pages: 3,
            content_hash: ContentHash("h".into()),
            model: "m".into(),
            timestamp: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn a_page_record_carries_every_key_and_reads_back() {
        let d = DocId::from_string(DOC);
        let page = PageRecord {
            page: 2,
            text: "page two".into(),
            embedding: sample(3, 4),
        };
        let r = page_record(&fields(&d), &page, MultivectorEncoding::F32GzipB64);
        assert_eq!(r.id, format!("{DOC}-page002"));
        assert_eq!(r.document.as_deref(), Some("page two"));
        assert_eq!(r.embedding, page.embedding.mean_normalized());
        let m = &r.metadata;
        let mut names: Vec<&str> = m.keys().map(String::as_str).collect();
        names.sort_unstable();
        let mut expected = vec![
            keys::DOC_ID,
            keys::TYPE,
            keys::FILENAME,
            keys::SOURCE_PATH,
            keys::PAGE,
            keys::NUM_PAGES,
            keys::FORMAT,
            keys::TIMESTAMP,
            keys::FULL_EMBEDDINGS,
            keys::EMBEDDING_SHAPE,
            keys::SEQ_LENGTH,
            keys::CONTENT_HASH,
            keys::AGENT_ID,
            keys::MODEL,
            keys::MULTIVECTOR_ENCODING,
            keys::SCHEMA_VERSION,
        ];
        expected.sort_unstable();
        assert_eq!(names, expected);
        assert_eq!(m[keys::TYPE], "visual");
        assert_eq!(m[keys::DOC_ID], DOC);
        assert_eq!(int_key(m, keys::PAGE).unwrap(), 2);
        assert_eq!(int_key(m, keys::NUM_PAGES).unwrap(), 3);
        assert_eq!(int_key(m, keys::SEQ_LENGTH).unwrap(), 3);
        assert_eq!(
            int_key(m, keys::SCHEMA_VERSION).unwrap(),
            SCHEMA_VERSION as i64
        );
        assert_eq!(m[keys::EMBEDDING_SHAPE], "(3, 4)");
        assert_eq!(m[keys::MULTIVECTOR_ENCODING], "f32-gzip-b64");
        assert_eq!(decode_full_embeddings(m).unwrap(), page.embedding);
    }

    #[test]
    fn a_chunk_record_carries_every_key_and_reads_back() {
        let d = DocId::from_string(DOC);
        let chunk = ChunkRecord {
            chunk_index: 2,
            page: 1,
            text: "é".repeat(300),
            word_count: 1,
            embedding: sample(3, 4),
        };
        let r = chunk_record(&fields(&d), &chunk, MultivectorEncoding::F16B64);
        assert_eq!(r.id, format!("{DOC}-chunk0002"));
        let m = &r.metadata;
        for k in [
            keys::DOC_ID,
            keys::TYPE,
            keys::FILENAME,
            keys::SOURCE_PATH,
            keys::PAGE,
            keys::NUM_PAGES,
            keys::FORMAT,
            keys::TIMESTAMP,
            keys::FULL_EMBEDDINGS,
            keys::EMBEDDING_SHAPE,
            keys::SEQ_LENGTH,
            keys::CHUNK_ID,
            keys::FULL_TEXT,
            keys::TEXT_PREVIEW,
            keys::WORD_COUNT,
            keys::CONTENT_HASH,
            keys::AGENT_ID,
            keys::MODEL,
            keys::MULTIVECTOR_ENCODING,
            keys::SCHEMA_VERSION,
        ] {
            assert!(m.contains_key(k), "missing {k}");
        }
        assert_eq!(m.len(), 20);
        assert_eq!(m[keys::TYPE], "text");
        assert_eq!(int_key(m, keys::CHUNK_ID).unwrap(), 2);
        assert_eq!(int_key(m, keys::WORD_COUNT).unwrap(), 1);
        assert_eq!(m[keys::FULL_TEXT].as_str().unwrap(), chunk.text);
        assert_eq!(m[keys::TEXT_PREVIEW].as_str().unwrap().chars().count(), 200);
        assert_eq!(m[keys::MULTIVECTOR_ENCODING], "f16-b64");
        let back = decode_full_embeddings(m).unwrap();
        assert_eq!((back.rows, back.dim), (3, 4));
    }

    /// What a `get` returns for a record: its id, Chroma's copy of the vector (which cosine
    /// space may have changed in the last bit), its document and metadata.
    fn as_read(r: Record) -> GetRecord {
        GetRecord {
            id: r.id,
            embedding: Some(r.embedding.iter().map(|v| v * 1.000_001).collect()),
            document: r.document,
            metadata: Some(r.metadata),
        }
    }

    #[test]
    fn a_moved_record_keeps_its_vectors_and_number_under_the_new_id() {
        let old = DocId::from_string(DOC);
        let new = DocId::from_string("ffffffffffffffffffffffffffffffff");
        let mut moved = fields(&new);
        moved.source_path = "/y/b.pdf".into();
        moved.filename = "b.pdf".into();
        moved.model = "newer-model".into();
        let page = PageRecord {
            page: 5,
            text: "five".into(),
            embedding: sample(3, 4),
        };
        let before = page_record(&fields(&old), &page, MultivectorEncoding::F32GzipB64);
        let after = rekey(RecordKind::Visual, &old, as_read(before.clone()), &moved).unwrap();
        assert_eq!(after.id, page_id(&new, 5));
        // f32: the mean vector is recomputed exactly, not taken from Chroma's copy.
        assert_eq!(after.embedding, before.embedding);
        assert_eq!(after.document, before.document);
        let m = &after.metadata;
        assert_eq!(m[keys::DOC_ID], new.as_str());
        assert_eq!(m[keys::SOURCE_PATH], "/y/b.pdf");
        assert_eq!(m[keys::FILENAME], "b.pdf");
        assert_eq!(m[keys::MODEL], "m", "the embeddings' model stays");
        assert_eq!(
            m[keys::FULL_EMBEDDINGS],
            before.metadata[keys::FULL_EMBEDDINGS]
        );

        // f16: only Chroma's vector is left; the chunk number comes from the id.
        let chunk = ChunkRecord {
            chunk_index: 7,
            page: 2,
            text: "seven".into(),
            word_count: 1,
            embedding: sample(2, 4),
        };
        let before = chunk_record(&fields(&old), &chunk, MultivectorEncoding::F16B64);
        let read = as_read(before);
        let stored = read.embedding.clone().unwrap();
        let after = rekey(RecordKind::Text, &old, read, &moved).unwrap();
        assert_eq!(after.id, chunk_id(&new, 7));
        assert_eq!(after.embedding, stored);

        // An id of another form: the number comes from the metadata.
        let mut odd = as_read(page_record(
            &fields(&old),
            &page,
            MultivectorEncoding::F16B64,
        ));
        odd.id = "written-elsewhere".into();
        let after = rekey(RecordKind::Visual, &old, odd, &moved).unwrap();
        assert_eq!(after.id, page_id(&new, 5));
    }

    #[test]
    fn an_incomplete_record_is_not_rekeyed() {
        let old = DocId::from_string(DOC);
        let page = PageRecord {
            page: 1,
            text: String::new(),
            embedding: sample(1, 4),
        };
        let mut read = as_read(page_record(
            &fields(&old),
            &page,
            MultivectorEncoding::F16B64,
        ));
        read.metadata = None;
        let err = rekey(RecordKind::Visual, &old, read, &fields(&old)).unwrap_err();
        assert!(
            matches!(err, RecordError::MissingKey { key: "metadata" }),
            "{err}"
        );
        let mut read = as_read(page_record(
            &fields(&old),
            &page,
            MultivectorEncoding::F16B64,
        ));
        read.embedding = None;
        let err = rekey(RecordKind::Visual, &old, read, &fields(&old)).unwrap_err();
        assert!(
            matches!(err, RecordError::MissingKey { key: "embedding" }),
            "{err}"
        );
    }
}
