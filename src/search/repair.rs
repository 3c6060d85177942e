//! `repair`: find live records that Chroma's `query` no longer returns (chroma-core/chroma#7758:
//! after many deletes and upserts, `get` still has them but the vector index cannot reach them)
//! and rebuild the collection from its own records, without the model; then reconcile Chroma
//! with the state store for this agent id (orphan records, files without records, failed jobs).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::chroma::client::{ChromaClient, ChromaError, Collection, GetRequest, Include, Record};
use crate::config::ChromaConfig;
use crate::records::{self, keys};
use crate::state::{FileStamp, JobKind, JobState, Store, StoreError};
use crate::types::DocId;

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("{0}")]
    Chroma(#[from] ChromaError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("collection `{0}` does not exist on this Chroma server")]
    NoCollection(String),
    #[error("record {id} in `{collection}` came back without its {what}; the rebuild stopped before changing anything. Fix: re-index the file it belongs to, or delete the record")]
    IncompleteRecord {
        collection: String,
        id: String,
        what: &'static str,
    },
    #[error("the copy of `{collection}` holds {copied} records but the original {original}: records changed during the rebuild (is the agent writing?). Nothing was swapped; the copy `{copy}` was deleted. Fix: stop the agent and run `repair` again")]
    CountChanged {
        collection: String,
        copy: String,
        original: usize,
        copied: usize,
    },
}

/// Results asked of each recall query: a record's own vector is at distance 0, so it comes
/// first unless exact duplicates tie with it.
const RECALL_K: usize = 10;
/// Query vectors per recall request.
const RECALL_BATCH: usize = 100;
/// Records read per request while scanning (ids and 128-d embeddings only).
const SCAN_PAGE: usize = 1000;
/// Records read per request while copying: whole records, a page in f32 is ~0.7 MB of JSON.
const COPY_PAGE: usize = 40;

/// What a recall check found in one collection.
#[derive(Debug, Clone, Serialize)]
pub struct RecallReport {
    pub collection: String,
    /// Records in the collection.
    pub total: usize,
    /// Records queried with their own embedding.
    pub checked: usize,
    /// Checked records the server did not return for their own embedding.
    pub unreachable: Vec<String>,
}

impl RecallReport {
    pub fn is_complete(&self) -> bool {
        self.unreachable.is_empty()
    }

    /// Share of checked records that came back, 1.0 when none was checked.
    pub fn recall(&self) -> f64 {
        if self.checked == 0 {
            1.0
        } else {
            1.0 - self.unreachable.len() as f64 / self.checked as f64
        }
    }
}

/// Recall check of the collection `name` (what `doctor` calls): queries up to `sample` records
/// (a random sample; `usize::MAX` for all) with their own embedding and lists those not returned.
pub async fn recall_check(
    client: &ChromaClient,
    name: &str,
    sample: usize,
) -> Result<RecallReport, RepairError> {
    let collection = client
        .get_collection(name)
        .await?
        .ok_or_else(|| RepairError::NoCollection(name.to_string()))?;
    recall_check_collection(&collection, sample).await
}

/// As [`recall_check`], on an open collection.
pub async fn recall_check_collection(
    collection: &Collection,
    sample: usize,
) -> Result<RecallReport, RepairError> {
    let mut ids = all_ids(collection).await?;
    let total = ids.len();
    if sample < total {
        ids.shuffle(&mut rand::thread_rng());
        ids.truncate(sample);
    }
    let mut unreachable = Vec::new();
    for batch in ids.chunks(RECALL_BATCH) {
        let got = collection.get_ids(batch, &[Include::Embeddings]).await?;
        let embeddings = got.embeddings.unwrap_or_default();
        // Records deleted since the scan are simply not checked.
        let (found, embeddings): (Vec<String>, Vec<Vec<f32>>) =
            got.ids.into_iter().zip(embeddings).unzip();
        if found.is_empty() {
            continue;
        }
        let k = RECALL_K.min(total.max(1));
        let answer = collection
            .query(&embeddings, k, None, &[Include::Distances])
            .await?;
        for (i, id) in found.iter().enumerate() {
            let returned = answer.ids.get(i).map(Vec::as_slice).unwrap_or(&[]);
            if returned.contains(id) {
                continue;
            }
            // Exact duplicates (blank pages) can fill the first k at distance 0: ask for more
            // before calling the record unreachable.
            let dists = answer
                .distances
                .as_ref()
                .and_then(|d| d.get(i))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let tied = dists.len() == k && dists.iter().all(|d| d.is_some_and(|d| d <= 1e-6));
            if !tied || !self_found_among_ties(collection, id, &embeddings[i], total).await? {
                unreachable.push(id.clone());
            }
        }
    }
    Ok(RecallReport {
        collection: collection.name.clone(),
        total,
        checked: ids.len(),
        unreachable,
    })
}

async fn self_found_among_ties(
    collection: &Collection,
    id: &str,
    embedding: &[f32],
    total: usize,
) -> Result<bool, RepairError> {
    let k = total.clamp(1, 1000);
    let answer = collection
        .query(&[embedding.to_vec()], k, None, &[])
        .await?;
    Ok(answer
        .ids
        .first()
        .is_some_and(|ids| ids.iter().any(|x| x == id)))
}

/// Every id in the collection (paged reads of ids only).
async fn all_ids(collection: &Collection) -> Result<Vec<String>, RepairError> {
    let mut ids = Vec::new();
    loop {
        let page = collection
            .get(&GetRequest {
                include: vec![],
                limit: Some(SCAN_PAGE),
                offset: Some(ids.len()),
                ..GetRequest::default()
            })
            .await?;
        let n = page.ids.len();
        ids.extend(page.ids);
        if n < SCAN_PAGE {
            return Ok(ids);
        }
    }
}

/// What a rebuild did.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    pub collection: String,
    pub records: usize,
    /// The new collection's id (the name is unchanged).
    pub new_id: String,
}

/// Rebuilds `collection` from its own records: copies every record (embedding, document,
/// metadata) into a new collection created with the same schema (index settings, HNSW
/// parameters), then swaps the names and deletes the old one. No model is needed.
///
/// Readers that open the collection by name during the swap may briefly find it missing;
/// writers holding the old collection's id must reopen it by name.
pub async fn rebuild_collection(
    client: &ChromaClient,
    collection: &Collection,
) -> Result<RebuildReport, RepairError> {
    let name = collection.name.clone();
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let copy_name = format!("{name}__rebuild_{stamp}");
    let old_name = format!("{name}__old_{stamp}");
    let schema = client.collection_schema(collection).await?;
    let copy = client
        .create_collection_with_schema(&copy_name, &schema)
        .await?;

    let copied = match copy_records(collection, &copy).await {
        Ok(n) => n,
        Err(e) => {
            let _ = client.delete_collection(&copy_name).await;
            return Err(e);
        }
    };
    let original = collection.count().await?;
    let in_copy = copy.count().await?;
    if in_copy != original || copied != original {
        client.delete_collection(&copy_name).await?;
        return Err(RepairError::CountChanged {
            collection: name,
            copy: copy_name,
            original,
            copied: in_copy,
        });
    }

    // The swap: old out of the way, copy under the real name, old deleted.
    client.rename_collection(collection, &old_name).await?;
    if let Err(e) = client.rename_collection(&copy, &name).await {
        // Put the original back rather than leave nothing under the name.
        let _ = client.rename_collection(collection, &name).await;
        return Err(e.into());
    }
    client.delete_collection(&old_name).await?;
    tracing::info!(collection = %name, records = copied, "collection rebuilt from its own records");
    Ok(RebuildReport {
        collection: name,
        records: copied,
        new_id: copy.id.clone(),
    })
}

async fn copy_records(from: &Collection, to: &Collection) -> Result<usize, RepairError> {
    let mut offset = 0;
    loop {
        let page = from
            .get(&GetRequest {
                include: vec![Include::Embeddings, Include::Documents, Include::Metadatas],
                limit: Some(COPY_PAGE),
                offset: Some(offset),
                ..GetRequest::default()
            })
            .await?;
        let n = page.ids.len();
        let embeddings = page.embeddings.unwrap_or_default();
        let documents = page.documents.unwrap_or_default();
        let metadatas = page.metadatas.unwrap_or_default();
        let mut records = Vec::with_capacity(n);
        for (i, id) in page.ids.into_iter().enumerate() {
            let Some(embedding) = embeddings.get(i).cloned() else {
                return Err(RepairError::IncompleteRecord {
                    collection: from.name.clone(),
                    id,
                    what: "embedding",
                });
            };
            records.push(Record {
                id,
                embedding,
                document: documents.get(i).cloned().flatten(),
                metadata: metadatas.get(i).cloned().flatten().unwrap_or_else(Map::new),
            });
        }
        to.add(&records).await?;
        offset += n;
        if n < COPY_PAGE {
            return Ok(offset);
        }
    }
}

/// What `repair` found and did in one collection.
#[derive(Debug, Clone, Serialize)]
pub struct CollectionRepair {
    pub before: RecallReport,
    pub rebuilt: Option<RebuildReport>,
    pub after: Option<RecallReport>,
}

/// Steps (1) and (2) of `repair` on one collection: a full recall check, and unless `dry_run`,
/// a rebuild when records are unreachable, checked again afterwards.
pub async fn repair_collection(
    client: &ChromaClient,
    name: &str,
    dry_run: bool,
) -> Result<Option<CollectionRepair>, RepairError> {
    let Some(collection) = client.get_collection(name).await? else {
        return Ok(None);
    };
    let before = recall_check_collection(&collection, usize::MAX).await?;
    if before.is_complete() || dry_run {
        return Ok(Some(CollectionRepair {
            before,
            rebuilt: None,
            after: None,
        }));
    }
    let rebuilt = rebuild_collection(client, &collection).await?;
    let after = recall_check(client, name, usize::MAX).await?;
    Ok(Some(CollectionRepair {
        before,
        rebuilt: Some(rebuilt),
        after: Some(after),
    }))
}

/// Why records are called orphans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrphanReason {
    /// The state store knows no file with this doc id.
    NotInStore,
    /// The store knows the file, but it is gone from disk.
    FileGone,
}

/// One document's records in Chroma that belong to no live file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrphanDocument {
    pub doc_id: String,
    /// From the store, or else from a record's metadata (read for the first few only).
    pub source_path: Option<String>,
    pub reason: OrphanReason,
    pub page_records: usize,
    pub text_records: usize,
}

/// A file the store calls indexed whose records are (partly) missing from Chroma.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissingRecords {
    pub path: PathBuf,
    pub pages_expected: u32,
    pub pages_missing: usize,
    pub chunks_expected: u32,
    pub chunks_missing: usize,
}

/// What step (3), the reconcile of Chroma with the state store, found (and, unless
/// `dry_run`, did: orphans deleted, files re-queued, failed jobs retried).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreReconcile {
    pub agent_id: String,
    pub dry_run: bool,
    /// Records of this agent id in Chroma (both collections).
    pub records: usize,
    /// Files the store knows.
    pub files: usize,
    /// Paths with a job queued or running: left to the pipeline, not checked.
    pub busy: Vec<PathBuf>,
    pub orphans: Vec<OrphanDocument>,
    /// Store entries of files gone from disk (forgotten with their records).
    pub gone_files: Vec<PathBuf>,
    /// Files under a watched folder that is missing (an unmounted disk): out of reach, not
    /// gone, so kept with their records and not checked.
    #[serde(default)]
    pub unavailable: Vec<PathBuf>,
    pub missing: Vec<MissingRecords>,
    /// Failed jobs (queued again unless `dry_run`).
    pub failed_jobs: Vec<(PathBuf, String)>,
}

/// Source paths of this many orphan documents are read from Chroma for the report (a record's
/// metadata carries its multi-vector, ~0.7 MB, so not for thousands).
const ORPHAN_PATHS_SHOWN: usize = 20;

/// The error a re-queued file carries until it is indexed again: it makes the pipeline embed
/// the file even though its content hash is unchanged.
pub const MISSING_RECORDS_ERROR: &str =
    "its records were missing from Chroma (found by `repair`); queued to be indexed again";

/// Record ids of one document, per collection.
#[derive(Default)]
struct DocRecords {
    pages: Vec<String>,
    chunks: Vec<String>,
}

/// Every id in `collection` written by `agent_id`, grouped by doc id (`{doc_id}-page…`).
async fn ids_of_agent(
    collection: &Collection,
    agent_id: &str,
    out: &mut BTreeMap<String, DocRecords>,
    pages: bool,
) -> Result<usize, RepairError> {
    let mut offset = 0;
    loop {
        let page = collection
            .get(&GetRequest {
                filter: Some(records::where_agent(agent_id)),
                include: vec![],
                limit: Some(SCAN_PAGE),
                offset: Some(offset),
                ..GetRequest::default()
            })
            .await?;
        let n = page.ids.len();
        for id in page.ids {
            // An id of another form counts as a document of its own (an orphan).
            let doc = match records::parse_id(&id) {
                Some((doc, _)) => doc.as_str().to_string(),
                None => id.clone(),
            };
            let entry = out.entry(doc).or_default();
            if pages {
                entry.pages.push(id);
            } else {
                entry.chunks.push(id);
            }
        }
        offset += n;
        if n < SCAN_PAGE {
            return Ok(offset);
        }
    }
}

/// Step (3) of `repair`: reconciles what Chroma holds for `agent_id` with the state store.
/// Records whose doc id no file in the store has, or whose file is gone from disk, are deleted
/// (and a gone file is forgotten); files the store calls indexed with records missing are
/// queued again (their file record marked so the unchanged content is embedded anyway); failed
/// jobs are queued again. With `dry_run` it only reports. Documents with a job queued or
/// running are skipped, so this is safe while the agent's pipeline works (the running agent
/// does it for `repair`, `POST /repair`). Files under `missing_folders` (watched folders that
/// are not there: an unmounted disk) are left as they are.
pub async fn reconcile_with_store(
    client: &ChromaClient,
    chroma: &ChromaConfig,
    agent_id: &str,
    store: &Store,
    missing_folders: &[PathBuf],
    dry_run: bool,
) -> Result<StoreReconcile, RepairError> {
    let visual = client.get_collection(&chroma.visual_collection).await?;
    let text = client.get_collection(&chroma.text_collection).await?;
    let mut in_chroma: BTreeMap<String, DocRecords> = BTreeMap::new();
    let mut records = 0;
    if let Some(c) = &visual {
        records += ids_of_agent(c, agent_id, &mut in_chroma, true).await?;
    }
    if let Some(c) = &text {
        records += ids_of_agent(c, agent_id, &mut in_chroma, false).await?;
    }

    // Documents with a job queued or running are the pipeline's: their records may be half
    // written or half re-keyed right now. Read after the records were listed: the pipeline
    // records a file before it drops its job, so a document whose records were listed above
    // is now either known to the store or busy, never neither.
    let mut busy_paths = Vec::new();
    for (path, job) in store.all_jobs()? {
        if job.state == JobState::Failed {
            continue;
        }
        if let JobKind::Move { from, .. } = &job.kind {
            busy_paths.push(from.clone());
        }
        busy_paths.push(path);
    }
    let busy: HashSet<String> = busy_paths
        .iter()
        .map(|p| DocId::new(agent_id, p).as_str().to_string())
        .collect();
    // Every file the store knows (all paths are absolute, so all are under the root).
    let files = store.files_under(Path::new(std::path::MAIN_SEPARATOR_STR))?;
    let mut report = StoreReconcile {
        agent_id: agent_id.to_string(),
        dry_run,
        records,
        files: files.len(),
        busy: busy_paths,
        orphans: Vec::new(),
        gone_files: Vec::new(),
        unavailable: Vec::new(),
        missing: Vec::new(),
        failed_jobs: store.failures()?,
    };
    // Failed jobs first: a re-queue below replaces a failed job anyway.
    if !dry_run && !report.failed_jobs.is_empty() {
        store.retry_failed()?;
    }

    let mut known: HashSet<String> = HashSet::new();
    let mut to_delete: Vec<&DocRecords> = Vec::new();
    for (path, rec) in &files {
        let doc = rec.doc_id.as_str().to_string();
        if busy.contains(&doc) {
            known.insert(doc);
            continue;
        }
        let held = in_chroma.get(&doc);
        let Some(stamp) = FileStamp::of_path(path) else {
            if missing_folders.iter().any(|f| path.starts_with(f)) {
                report.unavailable.push(path.clone());
                known.insert(doc);
                continue;
            }
            // Gone from disk: its records are orphans and the store forgets it.
            if let Some(h) = held {
                report.orphans.push(OrphanDocument {
                    doc_id: doc.clone(),
                    source_path: Some(path.to_string_lossy().into_owned()),
                    reason: OrphanReason::FileGone,
                    page_records: h.pages.len(),
                    text_records: h.chunks.len(),
                });
                to_delete.push(h);
            }
            report.gone_files.push(path.clone());
            known.insert(doc);
            continue;
        };
        known.insert(doc.clone());
        if rec.last_error.is_some() {
            // Not indexed: its failed job (retried above) or its next change deals with it.
            continue;
        }
        let id = DocId::from_string(doc);
        let (pages, chunks): (HashSet<&str>, HashSet<&str>) = match held {
            Some(h) => (
                h.pages.iter().map(String::as_str).collect(),
                h.chunks.iter().map(String::as_str).collect(),
            ),
            None => (HashSet::new(), HashSet::new()),
        };
        let pages_missing = (1..=rec.num_pages)
            .filter(|p| !pages.contains(records::page_id(&id, *p).as_str()))
            .count();
        let chunks_missing = (0..rec.num_chunks)
            .filter(|c| !chunks.contains(records::chunk_id(&id, *c).as_str()))
            .count();
        if pages_missing + chunks_missing == 0 {
            continue;
        }
        report.missing.push(MissingRecords {
            path: path.clone(),
            pages_expected: rec.num_pages,
            pages_missing,
            chunks_expected: rec.num_chunks,
            chunks_missing,
        });
        if !dry_run {
            let mut marked = rec.clone();
            marked.last_error = Some(MISSING_RECORDS_ERROR.to_string());
            store.put_file(path, &marked)?;
            store.enqueue(
                JobKind::Index { path: path.clone() },
                Some(stamp),
                Duration::ZERO,
            )?;
        }
    }

    // Documents no file in the store has.
    for (doc, held) in &in_chroma {
        if known.contains(doc) || busy.contains(doc) {
            continue;
        }
        let source_path = if report.orphans.len() < ORPHAN_PATHS_SHOWN {
            source_path_of(visual.as_ref(), text.as_ref(), held).await?
        } else {
            None
        };
        report.orphans.push(OrphanDocument {
            doc_id: doc.clone(),
            source_path,
            reason: OrphanReason::NotInStore,
            page_records: held.pages.len(),
            text_records: held.chunks.len(),
        });
        to_delete.push(held);
    }

    if !dry_run {
        for held in &to_delete {
            if let (Some(c), false) = (&visual, held.pages.is_empty()) {
                c.delete_ids(&held.pages).await?;
            }
            if let (Some(c), false) = (&text, held.chunks.is_empty()) {
                c.delete_ids(&held.chunks).await?;
            }
        }
        for path in &report.gone_files {
            store.remove_file(path)?;
        }
        store.flush()?;
    }
    Ok(report)
}

/// `source_path` from one of the document's records.
async fn source_path_of(
    visual: Option<&Collection>,
    text: Option<&Collection>,
    held: &DocRecords,
) -> Result<Option<String>, RepairError> {
    let (collection, id) = match (held.pages.first(), held.chunks.first()) {
        (Some(id), _) => (visual, id),
        (None, Some(id)) => (text, id),
        (None, None) => return Ok(None),
    };
    let Some(c) = collection else {
        return Ok(None);
    };
    let got = c
        .get_ids(std::slice::from_ref(id), &[Include::Metadatas])
        .await?;
    Ok(got
        .metadatas
        .and_then(|m| m.into_iter().next().flatten())
        .and_then(|m| {
            m.get(keys::SOURCE_PATH)
                .and_then(Value::as_str)
                .map(String::from)
        }))
}
