//! Writing documents to Chroma: records, batching, upsert-then-prune, moves and deletions.
//!
//! A document's records are streamed in (`upsert_pages`, `upsert_chunks`) as they are embedded,
//! then `finish_document` removes the ids it no longer has. Nothing is ever deleted before its
//! replacement is written, so a changed document never drops out of search.

use std::collections::HashSet;

use rayon::prelude::*;

use crate::chroma::client::{ChromaClient, ChromaError, Collection, GetResult, Include, Record};
use crate::records::{self, MultivectorEncoding, RecordError, RecordKind};
use crate::types::{DocId, MultiVector};

pub use crate::records::{ChunkRecord, DocumentMeta, PageRecord};

/// Records read back per request when re-keying a moved document (~0.7 MB each in f32).
const MOVE_SLICE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{what} ({path}): {source}")]
    Chroma {
        what: &'static str,
        /// The document's source path or id, so the log says which file waits.
        path: String,
        #[source]
        source: ChromaError,
    },
    #[error("cannot connect to Chroma: {0}")]
    Connect(#[source] ChromaError),
    #[error("record {id} in collection `{collection}` cannot be re-keyed: {source}. Fix: re-index the document")]
    BadRecord {
        id: String,
        collection: String,
        #[source]
        source: RecordError,
    },
    #[error("{path}: the embedding of {record} holds NaN or infinite values (a model or device fault); it was not written")]
    NonFinite { path: String, record: String },
    #[error("{path}: embeddings of dimension {found}, but collection `{collection}` holds dimension {expected}. Fix: use other collection names for this model, or delete the collection")]
    Dimension {
        path: String,
        collection: String,
        expected: usize,
        found: usize,
    },
}

impl SyncError {
    /// The job should stay queued and be retried later (Chroma down, slow, or failing).
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Chroma { source, .. } | SyncError::Connect(source) => source.is_transient(),
            _ => false,
        }
    }
}

/// Writes documents into the visual (pages) and text (chunks) collections.
#[derive(Debug, Clone)]
pub struct Syncer {
    client: ChromaClient,
    visual: Collection,
    text: Collection,
    encoding: MultivectorEncoding,
    agent_id: String,
}

impl Syncer {
    /// Connects to `url`, creates the tenant, database and both collections when missing.
    pub async fn connect(url: &str, cfg: &crate::config::Config) -> Result<Syncer, SyncError> {
        let client = ChromaClient::new(url, &cfg.chroma).map_err(SyncError::Connect)?;
        Self::connect_with(client, cfg).await
    }

    /// As [`Syncer::connect`], with a client set up by the caller (retry policy, request budget).
    pub async fn connect_with(
        client: ChromaClient,
        cfg: &crate::config::Config,
    ) -> Result<Syncer, SyncError> {
        client.heartbeat().await.map_err(SyncError::Connect)?;
        client
            .ensure_tenant_and_database()
            .await
            .map_err(SyncError::Connect)?;
        let options = records::collection_options();
        let visual = client
            .get_or_create_collection_with(&cfg.chroma.visual_collection, &options)
            .await
            .map_err(SyncError::Connect)?;
        let text = client
            .get_or_create_collection_with(&cfg.chroma.text_collection, &options)
            .await
            .map_err(SyncError::Connect)?;
        Ok(Syncer {
            client,
            visual,
            text,
            encoding: cfg.chroma.multivector_encoding,
            agent_id: cfg.agent_id.clone(),
        })
    }

    pub fn client(&self) -> &ChromaClient {
        &self.client
    }

    pub fn visual_collection(&self) -> &Collection {
        &self.visual
    }

    pub fn text_collection(&self) -> &Collection {
        &self.text
    }

    pub fn encoding(&self) -> MultivectorEncoding {
        self.encoding
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// Refuses embeddings whose size differs from what the collections already hold (the agent
    /// calls this once its model is loaded, so a wrong model is caught before any work).
    pub fn check_dimension(&self, dim: usize) -> Result<(), SyncError> {
        self.check_dim_for("(model)", dim)
    }

    fn check_dim_for(&self, path: &str, dim: usize) -> Result<(), SyncError> {
        for c in [&self.visual, &self.text] {
            if let Some(expected) = c.dimension.filter(|d| *d != dim) {
                return Err(SyncError::Dimension {
                    path: path.to_string(),
                    collection: c.name.clone(),
                    expected,
                    found: dim,
                });
            }
        }
        Ok(())
    }

    fn check_embedding(&self, path: &str, record: &str, mv: &MultiVector) -> Result<(), SyncError> {
        self.check_dim_for(path, mv.dim)?;
        // JSON has no NaN: it would reach Chroma as null and be refused with a puzzling message.
        if !mv.data.iter().all(|v| v.is_finite()) {
            return Err(SyncError::NonFinite {
                path: path.to_string(),
                record: record.to_string(),
            });
        }
        Ok(())
    }

    /// Writes (or overwrites) some of a document's page records.
    pub async fn upsert_pages(
        &self,
        doc: &DocumentMeta,
        pages: &[PageRecord],
    ) -> Result<(), SyncError> {
        self.upsert_pages_of(&[(doc, pages)]).await
    }

    /// Writes the page records of several documents in as few requests as Chroma takes.
    /// Chroma's cost per request is high and grows with the collection (a local server spent
    /// 3.5× the CPU on the same records sent 16 a request instead of 100; BENCHMARKS.md), so
    /// the agent gathers what is ready across documents before it writes.
    pub async fn upsert_pages_of(
        &self,
        docs: &[(&DocumentMeta, &[PageRecord])],
    ) -> Result<(), SyncError> {
        let records = self.page_records(docs)?;
        self.send(&self.visual, "writing page records", docs, &records)
            .await
    }

    /// Writes (or overwrites) some of a document's text-chunk records.
    pub async fn upsert_chunks(
        &self,
        doc: &DocumentMeta,
        chunks: &[ChunkRecord],
    ) -> Result<(), SyncError> {
        self.upsert_chunks_of(&[(doc, chunks)]).await
    }

    /// Writes the text-chunk records of several documents in as few requests as Chroma takes
    /// (see [`Syncer::upsert_pages_of`]).
    pub async fn upsert_chunks_of(
        &self,
        docs: &[(&DocumentMeta, &[ChunkRecord])],
    ) -> Result<(), SyncError> {
        let records = self.chunk_records(docs)?;
        self.send(&self.text, "writing text records", docs, &records)
            .await
    }

    /// Writes page records, then text-chunk records, of several documents: the chunks are
    /// encoded while the page request is in flight (Chroma otherwise waited for each write's
    /// chunks to be encoded, ~1 s of a 28 s run in BENCHMARKS.md), and written only once the
    /// pages are in.
    pub async fn upsert_records_of(
        &self,
        pages: &[(&DocumentMeta, &[PageRecord])],
        chunks: &[(&DocumentMeta, &[ChunkRecord])],
    ) -> Result<(), SyncError> {
        let page_records = self.page_records(pages)?;
        let send_pages = async {
            if page_records.is_empty() {
                return Ok(());
            }
            self.send(&self.visual, "writing page records", pages, &page_records)
                .await
        };
        let encode_chunks = async {
            // The page request goes out first.
            tokio::task::yield_now().await;
            self.chunk_records(chunks)
        };
        let (sent, chunk_records) = tokio::join!(send_pages, encode_chunks);
        sent?;
        let chunk_records = chunk_records?;
        if chunk_records.is_empty() {
            return Ok(());
        }
        self.send(&self.text, "writing text records", chunks, &chunk_records)
            .await
    }

    /// Checks and encodes page records (gzip, base64: CPU work, spread over the cores).
    fn page_records(
        &self,
        docs: &[(&DocumentMeta, &[PageRecord])],
    ) -> Result<Vec<Record>, SyncError> {
        let mut all = Vec::new();
        for (doc, pages) in docs {
            let path = doc.source_path.to_string_lossy();
            for p in pages.iter() {
                self.check_embedding(&path, &records::page_id(&doc.doc_id, p.page), &p.embedding)?;
                all.push((*doc, p));
            }
        }
        Ok(all
            .par_iter()
            .map(|(doc, p)| records::page_record(doc, p, self.encoding))
            .collect())
    }

    /// Checks and encodes text-chunk records.
    fn chunk_records(
        &self,
        docs: &[(&DocumentMeta, &[ChunkRecord])],
    ) -> Result<Vec<Record>, SyncError> {
        let mut all = Vec::new();
        for (doc, chunks) in docs {
            let path = doc.source_path.to_string_lossy();
            for c in chunks.iter() {
                self.check_embedding(
                    &path,
                    &records::chunk_id(&doc.doc_id, c.chunk_index),
                    &c.embedding,
                )?;
                all.push((*doc, c));
            }
        }
        Ok(all
            .par_iter()
            .map(|(doc, c)| records::chunk_record(doc, c, self.encoding))
            .collect())
    }

    /// One upsert of encoded records into `collection`; `what` names it in errors.
    async fn send<R>(
        &self,
        collection: &Collection,
        what: &'static str,
        docs: &[(&DocumentMeta, &[R])],
        records: &[Record],
    ) -> Result<(), SyncError> {
        let requests = collection
            .upsert(records)
            .await
            .map_err(|source| chroma_err(what, &paths(docs), source))?;
        tracing::debug!(documents = %paths(docs), records = records.len(), requests, collection = %collection.name, "records written");
        Ok(())
    }

    /// Deletes this document's records beyond the final counts: pages `num_pages+1..` and chunks
    /// `num_chunks..` (chunk indices start at 0). Called after all records were upserted.
    pub async fn finish_document(
        &self,
        doc: &DocumentMeta,
        num_pages: u32,
        num_chunks: u32,
    ) -> Result<(), SyncError> {
        let path = doc.source_path.to_string_lossy();
        let keep_pages: HashSet<String> = (1..=num_pages)
            .map(|p| records::page_id(&doc.doc_id, p))
            .collect();
        let keep_chunks: HashSet<String> = (0..num_chunks)
            .map(|c| records::chunk_id(&doc.doc_id, c))
            .collect();
        let pruned_pages = prune(&self.visual, &doc.doc_id, &keep_pages)
            .await
            .map_err(|source| chroma_err("removing stale page records", &path, source))?;
        let pruned_chunks = prune(&self.text, &doc.doc_id, &keep_chunks)
            .await
            .map_err(|source| chroma_err("removing stale text records", &path, source))?;
        tracing::debug!(path = %path, pruned_pages, pruned_chunks, "document synced");
        Ok(())
    }

    /// Removes every record of a document from both collections.
    pub async fn delete_document(&self, doc_id: &DocId) -> Result<(), SyncError> {
        let filter = records::where_document(doc_id);
        for c in [&self.visual, &self.text] {
            c.delete_where(filter.clone()).await.map_err(|source| {
                chroma_err("deleting a document's records", doc_id.as_str(), source)
            })?;
        }
        Ok(())
    }

    /// Re-keys a moved or renamed document from what Chroma already holds (no model): reads its
    /// records back, writes them under the new doc id and metadata, then deletes the old ones.
    /// Returns false when Chroma holds nothing for `old`.
    pub async fn move_document(&self, old: &DocId, new: &DocumentMeta) -> Result<bool, SyncError> {
        let path = new.source_path.to_string_lossy();
        let mut found = false;
        for (collection, kind) in [
            (&self.visual, RecordKind::Visual),
            (&self.text, RecordKind::Text),
        ] {
            let old_ids = list_ids(collection, old).await.map_err(|source| {
                chroma_err("listing a moved document's records", &path, source)
            })?;
            if old_ids.is_empty() {
                continue;
            }
            found = true;
            let mut new_ids = HashSet::new();
            for slice in old_ids.chunks(MOVE_SLICE) {
                let got = collection
                    .get_ids(
                        slice,
                        &[Include::Embeddings, Include::Documents, Include::Metadatas],
                    )
                    .await
                    .map_err(|source| {
                        chroma_err("reading a moved document's records", &path, source)
                    })?;
                let moved = self.rekey(collection, kind, old, new, got)?;
                new_ids.extend(moved.iter().map(|r| r.id.clone()));
                collection.upsert(&moved).await.map_err(|source| {
                    chroma_err("writing a moved document's records", &path, source)
                })?;
            }
            if old != &new.doc_id {
                collection.delete_ids(&old_ids).await.map_err(|source| {
                    chroma_err("removing a moved document's old records", &path, source)
                })?;
            }
            // The new path may have held another file's records: only the moved ones stay.
            prune(collection, &new.doc_id, &new_ids)
                .await
                .map_err(|source| {
                    chroma_err("removing stale records at the new path", &path, source)
                })?;
        }
        Ok(found)
    }

    /// Builds the new records of one slice of a moved document.
    fn rekey(
        &self,
        collection: &Collection,
        kind: RecordKind,
        old: &DocId,
        new: &DocumentMeta,
        got: GetResult,
    ) -> Result<Vec<Record>, SyncError> {
        got.into_records()
            .into_iter()
            .map(|r| {
                let id = r.id.clone();
                records::rekey(kind, old, r, new).map_err(|source| SyncError::BadRecord {
                    id,
                    collection: collection.name.clone(),
                    source,
                })
            })
            .collect()
    }

    /// (page records, text records) Chroma holds for a document.
    pub async fn count_document(&self, doc_id: &DocId) -> Result<(usize, usize), SyncError> {
        let count = |c: &Collection| {
            let c = c.clone();
            async move {
                list_ids(&c, doc_id)
                    .await
                    .map(|ids| ids.len())
                    .map_err(|source| {
                        chroma_err("counting a document's records", doc_id.as_str(), source)
                    })
            }
        };
        Ok((count(&self.visual).await?, count(&self.text).await?))
    }
}

/// The documents of a write, for its error: the first one's path, and how many more.
fn paths<R>(docs: &[(&DocumentMeta, &[R])]) -> String {
    documents_label(docs.iter().map(|(d, _)| d.source_path.as_path()))
}

/// Names a write's documents in a log line or an error: the one path, or the first path and
/// how many other documents.
pub(crate) fn documents_label<'a>(
    mut paths: impl ExactSizeIterator<Item = &'a std::path::Path>,
) -> String {
    let others = paths.len().saturating_sub(1);
    let first = paths
        .next()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    match others {
        0 => first,
        n => format!("{first} and {n} other documents"),
    }
}

fn chroma_err(what: &'static str, path: &str, source: ChromaError) -> SyncError {
    SyncError::Chroma {
        what,
        path: path.to_string(),
        source,
    }
}

async fn list_ids(collection: &Collection, doc_id: &DocId) -> Result<Vec<String>, ChromaError> {
    Ok(collection
        .get_where(records::where_document(doc_id), &[])
        .await?
        .ids)
}

/// Deletes the document's ids that are not in `keep`; returns how many went.
async fn prune(
    collection: &Collection,
    doc_id: &DocId,
    keep: &HashSet<String>,
) -> Result<usize, ChromaError> {
    let stale: Vec<String> = list_ids(collection, doc_id)
        .await?
        .into_iter()
        .filter(|id| !keep.contains(id))
        .collect();
    if !stale.is_empty() {
        collection.delete_ids(&stale).await?;
    }
    Ok(stale.len())
}
