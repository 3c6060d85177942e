//! The two stages of a search (DESIGN.md, Search): Chroma's nearest neighbours of the query's
//! mean vector on each collection, then exact MaxSim on the candidates' `full_embeddings`.
//!
//! Stage 2 is where the time goes (fetching and decoding ~0.7 MB blobs), so the candidates are
//! fetched in slices, several requests in flight, and each slice is decoded and scored on the
//! rayon pool while the next ones arrive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::Semaphore;

use crate::chroma::client::{ChromaError, Collection, Include, RawGet};
use crate::records::{self, keys, RecordError};
use crate::search::maxsim::PreparedQuery;
use crate::types::MultiVector;

pub use crate::records::RecordKind;

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("{0}")]
    Chroma(#[from] ChromaError),
    #[error("neither collection {names} exists on this Chroma server: nothing has been indexed there yet. Fix: run the agent (or `docusearch-agent index PATH`) first, or check chroma.url and the collection names")]
    NoCollections { names: String },
    #[error("the query has no vectors (an empty query?)")]
    EmptyQuery,
    #[error("a stage-2 worker failed: {0}")]
    Worker(String),
}

/// Which collections a search reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Hybrid,
    Visual,
    Text,
}

#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// Results returned.
    pub limit: usize,
    /// Stage-1 candidates per collection.
    pub candidates: usize,
    pub scope: Scope,
    /// Records per stage-2 request (a page in f32 is ~0.7 MB of JSON).
    pub fetch_slice: usize,
    /// Stage-2 requests in flight at once.
    pub fetch_parallel: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            limit: 10,
            candidates: 100,
            scope: Scope::Hybrid,
            fetch_slice: 10,
            fetch_parallel: 4,
        }
    }
}

/// One result. `metadata` holds every key of the record except the `full_embeddings` blob.
#[derive(Debug, Clone, Serialize)]
pub struct SearchHit {
    pub rank: usize,
    pub score: f32,
    pub kind: RecordKind,
    pub id: String,
    pub filename: Option<String>,
    pub source_path: Option<String>,
    pub page: Option<i64>,
    pub chunk_id: Option<i64>,
    pub snippet: String,
    pub document: Option<String>,
    pub metadata: Map<String, Value>,
}

/// Wall-clock time of each stage, for `--verbose` and the benchmark.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageTimes {
    /// Both stage-1 queries (run concurrently).
    pub stage1: Duration,
    /// Fetch, decode and score of every candidate (overlapped).
    pub stage2: Duration,
    /// Summed over stage-2 slices: waiting for Chroma's answers.
    pub fetch_sum: Duration,
    /// Summed over stage-2 slices: decoding and scoring.
    pub score_sum: Duration,
    pub total: Duration,
}

/// A record that could not be scored (bad blob, other width): reported, not fatal.
#[derive(Debug, Clone, Serialize)]
pub struct SkippedRecord {
    pub id: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchResults {
    pub hits: Vec<SearchHit>,
    pub candidates_visual: usize,
    pub candidates_text: usize,
    pub skipped: Vec<SkippedRecord>,
    #[serde(serialize_with = "times_ms")]
    pub times: StageTimes,
}

fn times_ms<S: serde::Serializer>(t: &StageTimes, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut m = s.serialize_map(Some(5))?;
    m.serialize_entry("stage1_ms", &ms(t.stage1))?;
    m.serialize_entry("stage2_ms", &ms(t.stage2))?;
    m.serialize_entry("fetch_sum_ms", &ms(t.fetch_sum))?;
    m.serialize_entry("score_sum_ms", &ms(t.score_sum))?;
    m.serialize_entry("total_ms", &ms(t.total))?;
    m.end()
}

/// Reads the two collections; either may be absent (nothing of that kind indexed yet).
#[derive(Debug, Clone)]
pub struct Searcher {
    visual: Option<Collection>,
    text: Option<Collection>,
}

/// A candidate after stage 2, before ranking.
struct Scored {
    score: f32,
    kind: RecordKind,
    id: String,
    document: Option<String>,
    metadata: Map<String, Value>,
}

impl Searcher {
    pub fn new(visual: Option<Collection>, text: Option<Collection>) -> Searcher {
        Searcher { visual, text }
    }

    /// Opens the configured collections without creating them.
    pub async fn open(
        client: &crate::chroma::client::ChromaClient,
        cfg: &crate::config::ChromaConfig,
    ) -> Result<Searcher, SearchError> {
        let (visual, text) = tokio::try_join!(
            client.get_collection(&cfg.visual_collection),
            client.get_collection(&cfg.text_collection)
        )?;
        if visual.is_none() && text.is_none() {
            return Err(SearchError::NoCollections {
                names: format!("`{}` nor `{}`", cfg.visual_collection, cfg.text_collection),
            });
        }
        Ok(Searcher { visual, text })
    }

    pub async fn search(
        &self,
        query: &MultiVector,
        opts: &SearchOptions,
    ) -> Result<SearchResults, SearchError> {
        if query.rows == 0 {
            return Err(SearchError::EmptyQuery);
        }
        let start = Instant::now();
        let mean = vec![query.mean_normalized()];
        let wanted = |kind| {
            matches!(
                (opts.scope, kind),
                (Scope::Hybrid, _)
                    | (Scope::Visual, RecordKind::Visual)
                    | (Scope::Text, RecordKind::Text)
            )
        };
        let visual = self.visual.as_ref().filter(|_| wanted(RecordKind::Visual));
        let text = self.text.as_ref().filter(|_| wanted(RecordKind::Text));

        // Stage 1: ids only (no metadata: it would drag every candidate's blob along).
        let (visual_ids, text_ids) = tokio::try_join!(
            stage1(visual, &mean, opts.candidates),
            stage1(text, &mean, opts.candidates)
        )?;
        let stage1_time = start.elapsed();

        // Stage 2.
        let prepared = Arc::new(PreparedQuery::new(query));
        let stage2_start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let permits = Arc::new(Semaphore::new(opts.fetch_parallel.max(1)));
        for (collection, kind, ids) in [
            (visual, RecordKind::Visual, &visual_ids),
            (text, RecordKind::Text, &text_ids),
        ] {
            let Some(collection) = collection else {
                continue;
            };
            for slice in ids.chunks(opts.fetch_slice.max(1)) {
                let (collection, slice) = (collection.clone(), slice.to_vec());
                let (prepared, permits) = (prepared.clone(), permits.clone());
                tasks.spawn(async move {
                    let permit = permits.acquire_owned().await;
                    let t = Instant::now();
                    let got = collection
                        .get_ids_raw(&slice, &[Include::Metadatas, Include::Documents])
                        .await?;
                    drop(permit);
                    let fetched = t.elapsed();
                    let t = Instant::now();
                    let scored =
                        tokio::task::spawn_blocking(move || score_slice(&prepared, kind, &got))
                            .await
                            .map_err(|e| SearchError::Worker(e.to_string()))??;
                    Ok::<_, SearchError>((scored, fetched, t.elapsed()))
                });
            }
        }
        let mut scored = Vec::new();
        let mut skipped = Vec::new();
        let mut times = StageTimes::default();
        while let Some(joined) = tasks.join_next().await {
            let ((mut ok, mut bad), fetched, scoring) =
                joined.map_err(|e| SearchError::Worker(e.to_string()))??;
            scored.append(&mut ok);
            skipped.append(&mut bad);
            times.fetch_sum += fetched;
            times.score_sum += scoring;
        }
        times.stage1 = stage1_time;
        times.stage2 = stage2_start.elapsed();

        // Highest score first; ties in id order so equal inputs give equal outputs.
        scored.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
        scored.truncate(opts.limit);
        let hits = scored
            .into_iter()
            .enumerate()
            .map(|(i, s)| hit(i + 1, s))
            .collect();
        times.total = start.elapsed();
        for s in &skipped {
            tracing::warn!(record = %s.id, "record not scored: {}", s.reason);
        }
        Ok(SearchResults {
            hits,
            candidates_visual: visual_ids.len(),
            candidates_text: text_ids.len(),
            skipped,
            times,
        })
    }
}

/// Stage 1 on one collection: ids only (metadata would drag every candidate's blob along).
async fn stage1(
    collection: Option<&Collection>,
    mean: &[Vec<f32>],
    k: usize,
) -> Result<Vec<String>, ChromaError> {
    let Some(c) = collection else {
        return Ok(Vec::new());
    };
    let r = c.query(mean, k, None, &[]).await?;
    Ok(r.ids.into_iter().next().unwrap_or_default())
}

/// Parses, decodes and scores one fetched slice on the rayon pool. The blobs are read in place
/// from the answer's bytes; only the other metadata keys are copied out.
fn score_slice(
    query: &PreparedQuery,
    kind: RecordKind,
    got: &RawGet,
) -> Result<(Vec<Scored>, Vec<SkippedRecord>), SearchError> {
    let got = got.parse()?;
    let n = got.ids.len();
    let metadatas = got.metadatas.unwrap_or_default();
    let documents = got.documents.unwrap_or_default();
    let items: Vec<_> = got
        .ids
        .into_iter()
        .zip(metadatas.into_iter().chain(std::iter::repeat(None)))
        .zip(documents.into_iter().chain(std::iter::repeat(None)))
        .take(n)
        .collect();
    let results: Vec<Result<Scored, SkippedRecord>> = items
        .into_par_iter()
        .map(|((id, raw), document)| {
            let skip = |reason: String| SkippedRecord {
                id: id.clone(),
                reason,
            };
            let (metadata, blob) = records::split_raw_metadata(raw.unwrap_or_default())
                .map_err(|e| skip(e.to_string()))?;
            let blob = blob.ok_or_else(|| {
                skip(
                    RecordError::MissingKey {
                        key: keys::FULL_EMBEDDINGS,
                    }
                    .to_string(),
                )
            })?;
            let mv = records::decode_blob(&metadata, &blob)
                .map_err(|e: RecordError| skip(e.to_string()))?;
            if mv.dim != query.dim() {
                return Err(skip(format!(
                    "its vectors have {} components, the query's {} (indexed with another model?)",
                    mv.dim,
                    query.dim()
                )));
            }
            // Results carry every key but the blob, which has served its purpose.
            Ok(Scored {
                score: query.score(&mv),
                kind,
                id,
                document,
                metadata,
            })
        })
        .collect();
    let mut ok = Vec::with_capacity(results.len());
    let mut bad = Vec::new();
    for r in results {
        match r {
            Ok(s) => ok.push(s),
            Err(s) => bad.push(s),
        }
    }
    Ok((ok, bad))
}

const SNIPPET_CHARS: usize = 160;

fn hit(rank: usize, s: Scored) -> SearchHit {
    let str_of = |k: &str| s.metadata.get(k).and_then(Value::as_str).map(String::from);
    let int_of = |k: &str| s.metadata.get(k).and_then(Value::as_i64);
    let source = match s.kind {
        RecordKind::Text => str_of(keys::TEXT_PREVIEW).or_else(|| s.document.clone()),
        RecordKind::Visual => s.document.clone(),
    };
    SearchHit {
        rank,
        score: s.score,
        kind: s.kind,
        filename: str_of(keys::FILENAME),
        source_path: str_of(keys::SOURCE_PATH),
        page: int_of(keys::PAGE),
        chunk_id: int_of(keys::CHUNK_ID),
        snippet: snippet(source.as_deref().unwrap_or("")),
        id: s.id,
        document: s.document,
        metadata: s.metadata,
    }
}

/// The text on one line, whitespace collapsed, cut at a character boundary.
fn snippet(text: &str) -> String {
    let mut out = String::new();
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
        if out.chars().count() > SNIPPET_CHARS {
            break;
        }
    }
    if out.chars().count() > SNIPPET_CHARS {
        out = out.chars().take(SNIPPET_CHARS - 1).collect::<String>() + "…";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_are_one_short_line() {
        assert_eq!(snippet("  a\n\nb\tc  "), "a b c");
        let long = "word ".repeat(100);
        let s = snippet(&long);
        assert_eq!(s.chars().count(), SNIPPET_CHARS);
        assert!(s.ends_with('…'));
        assert_eq!(
            snippet("é".repeat(500).as_str()).chars().count(),
            SNIPPET_CHARS
        );
    }
}
