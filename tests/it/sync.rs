//! The write path against a real `chroma run`: new, re-indexed, shrunk, deleted and moved
//! documents, two agents, a server that dies mid-sync, requests over the size limit, bit-exact
//! `full_embeddings`, and the official Python client reading it all back.
//! Multi-vectors are synthetic (seeded random rows): the model is not part of this layer.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use docusearch_agent::chroma::client::{ChromaClient, ChromaError, Include, RetryPolicy};
use docusearch_agent::config::{Config, MultivectorEncoding};
use docusearch_agent::records::{self, decode_full_embeddings, keys};
use docusearch_agent::sync::{ChunkRecord, DocumentMeta, PageRecord, SyncError, Syncer};
use docusearch_agent::types::{ContentHash, DocFormat, DocId, MultiVector};
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::common::{self, signal, until};

const DIM: usize = 128;

fn config(agent: &str, encoding: MultivectorEncoding) -> Config {
    let mut cfg = Config::default();
    cfg.agent_id = agent.into();
    cfg.chroma.multivector_encoding = encoding;
    cfg
}

/// `rows` unit vectors of 128 floats, like ColPali's output, from a seed.
fn multivector(seed: u64, rows: usize) -> MultiVector {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data: Vec<f32> = (0..rows * DIM)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    for row in data.chunks_mut(DIM) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= n);
    }
    MultiVector::new(rows, DIM, data)
}

fn doc(agent: &str, path: &str, num_pages: u32) -> DocumentMeta {
    let source_path = PathBuf::from(path);
    DocumentMeta {
        doc_id: DocId::new(agent, &source_path),
        agent_id: agent.into(),
        filename: source_path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
        format: DocFormat::Pdf,
        num_pages,
        content_hash: ContentHash::of_bytes(path.as_bytes()),
        model: "vidore/colpali-v1.2-merged".into(),
        timestamp: "2026-11-27T17:00:00Z".into(),
        source_path,
    }
}

/// Pages `range`, each with `rows` token vectors; `seed` varies the content.
fn pages(seed: u64, range: std::ops::RangeInclusive<u32>, rows: usize) -> Vec<PageRecord> {
    range
        .map(|p| PageRecord {
            page: p,
            text: format!("page {p} of seed {seed}"),
            embedding: multivector(seed * 10_000 + p as u64, rows),
        })
        .collect()
}

fn chunks(seed: u64, n: u32) -> Vec<ChunkRecord> {
    (0..n)
        .map(|i| ChunkRecord {
            chunk_index: i,
            page: i / 2 + 1,
            text: format!("chunk {i} words words words"),
            word_count: 4,
            embedding: multivector(seed * 10_000 + 5_000 + i as u64, 20),
        })
        .collect()
}

/// Upserts a whole document the way the agent streams it, then prunes.
async fn sync_document(
    s: &Syncer,
    d: &DocumentMeta,
    pages: &[PageRecord],
    chunks: &[ChunkRecord],
) -> Result<(), SyncError> {
    for slice in pages.chunks(4) {
        s.upsert_pages(d, slice).await?;
    }
    s.upsert_chunks(d, chunks).await?;
    s.finish_document(d, pages.len() as u32, chunks.len() as u32)
        .await
}

async fn ids_of(s: &Syncer, d: &DocId) -> (Vec<String>, Vec<String>) {
    let filter = json!({ "doc_id": d.as_str() });
    let mut v = s
        .visual_collection()
        .get_where(filter.clone(), &[])
        .await
        .unwrap()
        .ids;
    let mut t = s
        .text_collection()
        .get_where(filter, &[])
        .await
        .unwrap()
        .ids;
    v.sort();
    t.sort();
    (v, t)
}

fn expected_page_ids(d: &DocId, n: u32) -> Vec<String> {
    (1..=n).map(|p| records::page_id(d, p)).collect()
}

fn bits(m: &MultiVector) -> Vec<u32> {
    m.data.iter().map(|v| v.to_bits()).collect()
}

/// Metadata of one record, by id.
async fn metadata(s: &Syncer, visual: bool, id: &str) -> Map<String, Value> {
    let c = if visual {
        s.visual_collection()
    } else {
        s.text_collection()
    };
    let got = c
        .get_ids(&[id.to_string()], &[Include::Metadatas])
        .await
        .unwrap();
    assert_eq!(got.ids, [id], "record {id} exists");
    got.metadatas.unwrap()[0].clone().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_reindexed_shrunk_and_deleted_documents() {
    let chroma = common::start_chroma();
    let s = Syncer::connect(
        &chroma.url(),
        &config("agent-a", MultivectorEncoding::F32GzipB64),
    )
    .await
    .expect("connect");
    let d = doc("agent-a", "/docs/report.pdf", 10);

    // New document.
    sync_document(&s, &d, &pages(1, 1..=10, 64), &chunks(1, 6))
        .await
        .unwrap();
    let (v, t) = ids_of(&s, &d.doc_id).await;
    assert_eq!(v, expected_page_ids(&d.doc_id, 10));
    assert_eq!(t.len(), 6);
    assert_eq!(s.count_document(&d.doc_id).await.unwrap(), (10, 6));
    let m = metadata(&s, true, &records::page_id(&d.doc_id, 3)).await;
    assert_eq!(m[keys::TYPE], "visual");
    assert_eq!(m[keys::PAGE], 3);
    assert_eq!(m[keys::NUM_PAGES], 10);
    assert_eq!(m[keys::FILENAME], "report.pdf");
    assert_eq!(m[keys::SOURCE_PATH], "/docs/report.pdf");
    assert_eq!(m[keys::FORMAT], "pdf");
    assert_eq!(m[keys::AGENT_ID], "agent-a");
    assert_eq!(m[keys::EMBEDDING_SHAPE], "(64, 128)");
    assert_eq!(m[keys::SEQ_LENGTH], 64);
    assert_eq!(m[keys::MULTIVECTOR_ENCODING], "f32-gzip-b64");
    let c = metadata(&s, false, &records::chunk_id(&d.doc_id, 5)).await;
    assert_eq!(c[keys::TYPE], "text");
    assert_eq!(c[keys::CHUNK_ID], 5);
    assert_eq!(c[keys::PAGE], 3);
    assert_eq!(c[keys::FULL_TEXT], "chunk 5 words words words");
    assert_eq!(c[keys::WORD_COUNT], 4);

    // Re-indexed with new content: same ids, new values, no duplicates.
    let writes_before = s.client().write_requests();
    sync_document(&s, &d, &pages(2, 1..=10, 64), &chunks(2, 6))
        .await
        .unwrap();
    assert!(s.client().write_requests() > writes_before);
    assert_eq!(
        s.visual_collection().count().await.unwrap(),
        10,
        "no duplicate page records"
    );
    assert_eq!(
        s.text_collection().count().await.unwrap(),
        6,
        "no duplicate text records"
    );
    let m = metadata(&s, true, &records::page_id(&d.doc_id, 3)).await;
    let stored = decode_full_embeddings(&m).unwrap();
    assert_eq!(
        bits(&stored),
        bits(&pages(2, 3..=3, 64)[0].embedding),
        "the new content replaced the old"
    );

    // Shrinks from 10 pages to 5 (and 6 chunks to 2): pages 6-10 go, 1-5 stay.
    let short = doc("agent-a", "/docs/report.pdf", 5);
    sync_document(&s, &short, &pages(3, 1..=5, 64), &chunks(3, 2))
        .await
        .unwrap();
    let (v, t) = ids_of(&s, &d.doc_id).await;
    assert_eq!(v, expected_page_ids(&d.doc_id, 5));
    assert_eq!(
        t,
        [
            records::chunk_id(&d.doc_id, 0),
            records::chunk_id(&d.doc_id, 1)
        ]
    );
    assert_eq!(
        metadata(&s, true, &records::page_id(&d.doc_id, 5)).await[keys::NUM_PAGES],
        5
    );

    // Another document is untouched by all of this, then deletion removes only the first.
    let other = doc("agent-a", "/docs/other.pdf", 2);
    sync_document(&s, &other, &pages(4, 1..=2, 16), &chunks(4, 1))
        .await
        .unwrap();
    s.delete_document(&d.doc_id).await.unwrap();
    assert_eq!(s.count_document(&d.doc_id).await.unwrap(), (0, 0));
    assert_eq!(s.count_document(&other.doc_id).await.unwrap(), (2, 1));
    // Deleting what is already gone is fine (a retried job).
    s.delete_document(&d.doc_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_document_is_rekeyed_bit_for_bit_without_the_model() {
    let chroma = common::start_chroma();
    for (encoding, agent) in [
        (MultivectorEncoding::F32GzipB64, "agent-a"),
        (MultivectorEncoding::F16B64, "agent-b"),
    ] {
        rename_case(&chroma, encoding, agent).await;
    }
}

async fn rename_case(chroma: &common::TestChroma, encoding: MultivectorEncoding, agent: &str) {
    let s = Syncer::connect(&chroma.url(), &config(agent, encoding))
        .await
        .unwrap();
    let old = doc(agent, "/docs/draft.pdf", 3);
    let ps = pages(7, 1..=3, 1030);
    let cs = chunks(7, 3);
    sync_document(&s, &old, &ps, &cs).await.unwrap();
    let read = |ids: Vec<String>, visual: bool| {
        let s = s.clone();
        async move {
            let c = if visual {
                s.visual_collection().clone()
            } else {
                s.text_collection().clone()
            };
            c.get_ids(
                &ids,
                &[Include::Embeddings, Include::Documents, Include::Metadatas],
            )
            .await
            .unwrap()
        }
    };
    let before = read(expected_page_ids(&old.doc_id, 3), true).await;

    // The target path already holds a stale record of some other file (page 9): it must go.
    let mut new = doc(agent, "/docs/final/report-v2.pdf", 3);
    new.timestamp = "2026-11-27T18:00:00Z".into();
    s.upsert_pages(&new, &pages(99, 9..=9, 8)).await.unwrap();

    // No model anywhere in this call: only what Chroma holds.
    assert!(s.move_document(&old.doc_id, &new).await.unwrap());
    assert_eq!(
        s.count_document(&old.doc_id).await.unwrap(),
        (0, 0),
        "old ids gone"
    );
    let (v, t) = ids_of(&s, &new.doc_id).await;
    assert_eq!(v, expected_page_ids(&new.doc_id, 3));
    assert_eq!(
        t,
        (0..3)
            .map(|c| records::chunk_id(&new.doc_id, c))
            .collect::<Vec<_>>()
    );

    let after = read(expected_page_ids(&new.doc_id, 3), true).await;
    for (i, p) in ps.iter().enumerate() {
        let bi = before
            .ids
            .iter()
            .position(|x| *x == records::page_id(&old.doc_id, p.page))
            .unwrap();
        let ai = after
            .ids
            .iter()
            .position(|x| *x == records::page_id(&new.doc_id, p.page))
            .unwrap();
        let bm = before.metadatas.as_ref().unwrap()[bi].as_ref().unwrap();
        let am = after.metadatas.as_ref().unwrap()[ai].as_ref().unwrap();
        assert_eq!(
            am[keys::FULL_EMBEDDINGS],
            bm[keys::FULL_EMBEDDINGS],
            "blob unchanged, page {}",
            i + 1
        );
        assert_eq!(
            bits(&decode_full_embeddings(am).unwrap()),
            bits(&decode_full_embeddings(bm).unwrap()),
            "bit for bit"
        );
        if encoding == MultivectorEncoding::F32GzipB64 {
            assert_eq!(
                bits(&decode_full_embeddings(am).unwrap()),
                bits(&p.embedding),
                "the model's own values"
            );
        }
        // The record vector: Chroma re-normalises stored vectors in cosine space, so only the
        // last bit may move (the multi-vector above is compared bit for bit).
        let want = match encoding {
            MultivectorEncoding::F32GzipB64 => p.embedding.mean_normalized(),
            MultivectorEncoding::F16B64 => before.embeddings.as_ref().unwrap()[bi].clone(),
        };
        for got in [
            &before.embeddings.as_ref().unwrap()[bi],
            &after.embeddings.as_ref().unwrap()[ai],
        ] {
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-7,
                "record embedding of page {} off by {worst}",
                i + 1
            );
        }
        assert_eq!(
            after.documents.as_ref().unwrap()[ai],
            before.documents.as_ref().unwrap()[bi]
        );
        assert_eq!(am[keys::DOC_ID], new.doc_id.as_str());
        assert_eq!(am[keys::SOURCE_PATH], "/docs/final/report-v2.pdf");
        assert_eq!(am[keys::FILENAME], "report-v2.pdf");
        assert_eq!(am[keys::TIMESTAMP], "2026-11-27T18:00:00Z");
        assert_eq!(am[keys::PAGE], p.page);
    }
    let chunk = metadata(&s, false, &records::chunk_id(&new.doc_id, 2)).await;
    assert_eq!(chunk[keys::MULTIVECTOR_ENCODING], encoding.as_str());
    if encoding == MultivectorEncoding::F32GzipB64 {
        assert_eq!(
            bits(&decode_full_embeddings(&chunk).unwrap()),
            bits(&cs[2].embedding)
        );
    }
    assert_eq!(chunk[keys::FULL_TEXT], cs[2].text.as_str());

    // Nothing left under the old id: a second move reports it.
    assert!(!s.move_document(&old.doc_id, &new).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_the_same_path_keep_their_documents_apart() {
    let chroma = common::start_chroma();
    let a = Syncer::connect(
        &chroma.url(),
        &config("laptop", MultivectorEncoding::F32GzipB64),
    )
    .await
    .unwrap();
    let b = Syncer::connect(
        &chroma.url(),
        &config("desktop", MultivectorEncoding::F16B64),
    )
    .await
    .unwrap();
    let da = doc("laptop", "/Users/me/notes.pdf", 4);
    let db = doc("desktop", "/Users/me/notes.pdf", 2);
    assert_ne!(da.doc_id, db.doc_id, "doc ids include the agent");
    sync_document(&a, &da, &pages(1, 1..=4, 16), &chunks(1, 2))
        .await
        .unwrap();
    sync_document(&b, &db, &pages(2, 1..=2, 16), &chunks(2, 3))
        .await
        .unwrap();
    assert_eq!(a.count_document(&da.doc_id).await.unwrap(), (4, 2));
    assert_eq!(b.count_document(&db.doc_id).await.unwrap(), (2, 3));
    assert_eq!(
        metadata(&a, true, &records::page_id(&db.doc_id, 1)).await[keys::AGENT_ID],
        "desktop"
    );
    // One agent shrinking and deleting its copy leaves the other's alone.
    b.finish_document(&db, 1, 0).await.unwrap();
    assert_eq!(a.count_document(&da.doc_id).await.unwrap(), (4, 2));
    a.delete_document(&da.doc_id).await.unwrap();
    assert_eq!(b.count_document(&db.doc_id).await.unwrap(), (1, 0));
    assert_eq!(a.visual_collection().count().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_embeddings_read_back_bit_exact_in_both_encodings() {
    let chroma = common::start_chroma();
    for (encoding, agent) in [
        (MultivectorEncoding::F32GzipB64, "f32"),
        (MultivectorEncoding::F16B64, "f16"),
    ] {
        let s = Syncer::connect(&chroma.url(), &config(agent, encoding))
            .await
            .unwrap();
        let d = doc(agent, "/docs/exact.pdf", 2);
        let ps = pages(11, 1..=2, 1030);
        let cs = chunks(11, 2);
        sync_document(&s, &d, &ps, &cs).await.unwrap();
        for p in &ps {
            let m = metadata(&s, true, &records::page_id(&d.doc_id, p.page)).await;
            assert_eq!(m[keys::MULTIVECTOR_ENCODING], encoding.as_str());
            let back = decode_full_embeddings(&m).unwrap();
            assert_eq!((back.rows, back.dim), (1030, 128));
            let want: Vec<u32> = match encoding {
                MultivectorEncoding::F32GzipB64 => bits(&p.embedding),
                MultivectorEncoding::F16B64 => p
                    .embedding
                    .data
                    .iter()
                    .map(|v| half::f16::from_f32(*v).to_f32().to_bits())
                    .collect(),
            };
            assert_eq!(bits(&back), want, "{agent} page {}", p.page);
        }
        let m = metadata(&s, false, &records::chunk_id(&d.doc_id, 1)).await;
        assert_eq!(decode_full_embeddings(&m).unwrap().rows, 20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_request_limit_goes_out_in_several_requests() {
    let chroma = common::start_chroma();
    let cfg = config("agent-a", MultivectorEncoding::F32GzipB64);
    let s = Syncer::connect(&chroma.url(), &cfg).await.unwrap();
    // 72 full-size pages in f32: ~0.65 MB of base64 each, ~47 MB in all, over the 40 MiB limit.
    let d = doc("agent-a", "/docs/big.pdf", 72);
    let ps = pages(5, 1..=72, 1030);
    let before = s.client().write_requests();
    s.upsert_pages(&d, &ps)
        .await
        .expect("split into requests the server takes");
    let requests = s.client().write_requests() - before;
    assert!(
        requests >= 2,
        "one call of 72 pages went out in {requests} request(s)"
    );
    assert_eq!(s.count_document(&d.doc_id).await.unwrap(), (72, 0));

    // The limit is real: the same pages in one request are refused, with the server's reason.
    let one_shot = ChromaClient::new(&chroma.url(), &cfg.chroma)
        .unwrap()
        .with_request_budget(200 * 1024 * 1024)
        .with_retry(RetryPolicy::no_retry());
    let s1 = Syncer::connect_with(one_shot, &cfg).await.unwrap();
    let err = s1.upsert_pages(&d, &ps).await.unwrap_err();
    let SyncError::Chroma { source, .. } = &err else {
        panic!("{err}")
    };
    // The server answers 413, or (when its answer beats the end of our upload) closes the
    // connection mid-request; either way the 47 MB request does not get in.
    assert!(
        source.status() == Some(413)
            || matches!(
                source,
                ChromaError::Unreachable {
                    kind: "connection failed",
                    ..
                }
            ),
        "{err}"
    );
    assert_eq!(s.count_document(&d.doc_id).await.unwrap(), (72, 0));
}

/// All ids of the collection, with duplicates if the server ever returned any.
async fn all_ids(s: &Syncer) -> Vec<String> {
    s.visual_collection()
        .get_where(json!({"agent_id": s.agent_id()}), &[])
        .await
        .unwrap()
        .ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_sync_is_waited_for_and_everything_arrives_once() {
    let chroma = common::start_chroma();
    let cfg = config("agent-a", MultivectorEncoding::F32GzipB64);
    // Patient enough to outlast a restart by the supervisor.
    let client = ChromaClient::new(&chroma.url(), &cfg.chroma)
        .unwrap()
        .with_retry(RetryPolicy {
            max_attempts: 40,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
        });
    let s = Syncer::connect_with(client, &cfg).await.unwrap();
    let d = doc("agent-a", "/docs/long.pdf", 40);
    let ps = pages(21, 1..=40, 1030);
    let cs = chunks(21, 10);
    let task = {
        let (s, d, ps, cs) = (s.clone(), d.clone(), ps.clone(), cs.clone());
        tokio::spawn(async move { sync_document(&s, &d, &ps, &cs).await })
    };
    // Kill the server once the sync is under way (some pages written, not all).
    let watcher = Syncer::connect(&chroma.url(), &cfg).await.unwrap();
    let mut under_way = false;
    for _ in 0..600 {
        let (p, _) = watcher.count_document(&d.doc_id).await.unwrap();
        if p >= 8 {
            under_way = p < 40;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(under_way, "the sync was not caught in the middle");
    let pid = chroma.server.pid().expect("running");
    signal(pid, libc::SIGKILL);
    until("the supervisor to restart the server", || async {
        chroma.server.starts() >= 2
    })
    .await;
    task.await
        .unwrap()
        .expect("the sync finished after the restart");

    let (v, t) = ids_of(&s, &d.doc_id).await;
    assert_eq!(v, expected_page_ids(&d.doc_id, 40), "every page arrived");
    assert_eq!(t.len(), 10);
    let ids = all_ids(&s).await;
    assert_eq!(
        ids.len(),
        ids.iter().collect::<HashSet<_>>().len(),
        "nothing twice"
    );
    assert_eq!(s.visual_collection().count().await.unwrap(), 40);
    let m = metadata(&s, true, &records::page_id(&d.doc_id, 40)).await;
    assert_eq!(
        bits(&decode_full_embeddings(&m).unwrap()),
        bits(&ps[39].embedding)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_fails_the_job_as_transient_and_the_retried_job_completes() {
    let chroma = common::start_chroma();
    let mut cfg = config("agent-a", MultivectorEncoding::F16B64);
    cfg.chroma.timeout_s = 2;
    let impatient = ChromaClient::new(&chroma.url(), &cfg.chroma)
        .unwrap()
        .with_retry(RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(100),
        });
    let s = Syncer::connect_with(impatient, &cfg).await.unwrap();
    let d = doc("agent-a", "/docs/frozen.pdf", 12);
    let ps = pages(31, 1..=12, 256);
    let cs = chunks(31, 4);
    s.upsert_pages(&d, &ps[..4]).await.unwrap();

    let pid = chroma.server.pid().unwrap();
    signal(pid, libc::SIGSTOP);
    let err = sync_document(&s, &d, &ps, &cs).await.unwrap_err();
    signal(pid, libc::SIGCONT);
    assert!(
        err.is_transient(),
        "a frozen server is a reason to retry later: {err}"
    );
    assert!(
        err.to_string().contains("/docs/frozen.pdf"),
        "names the file: {err}"
    );

    // The agent's queue runs the job again: it completes, and nothing is doubled.
    sync_document(&s, &d, &ps, &cs).await.expect("retried job");
    let (v, t) = ids_of(&s, &d.doc_id).await;
    assert_eq!(v, expected_page_ids(&d.doc_id, 12));
    assert_eq!(t.len(), 4);
    assert_eq!(s.visual_collection().count().await.unwrap(), 12);
    assert_eq!(s.text_collection().count().await.unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_collections_of_another_dimension_at_start() {
    let chroma = common::start_chroma();
    let s = Syncer::connect(&chroma.url(), &config("a", MultivectorEncoding::F32GzipB64))
        .await
        .unwrap();
    let d = doc("a", "/docs/x.pdf", 1);
    sync_document(&s, &d, &pages(1, 1..=1, 4), &[])
        .await
        .unwrap();
    let again = Syncer::connect(&chroma.url(), &config("a", MultivectorEncoding::F32GzipB64))
        .await
        .unwrap();
    again.check_dimension(128).expect("same model");
    let mut broken = pages(2, 1..=1, 4);
    broken[0].embedding.data[5] = f32::NAN;
    let err = again.upsert_pages(&d, &broken).await.unwrap_err();
    assert!(
        matches!(err, SyncError::NonFinite { .. }) && !err.is_transient(),
        "{err}"
    );
    assert!(
        err.to_string().contains("/docs/x.pdf") && err.to_string().contains("page001"),
        "{err}"
    );
    let err = again.check_dimension(96).unwrap_err();
    assert!(!err.is_transient());
    let msg = err.to_string();
    assert!(
        msg.contains("visual_collection") && msg.contains("96") && msg.contains("128"),
        "{msg}"
    );
}

/// Writes the multi-vectors the Python check compares against.
fn write_raw(dir: &Path, id: &str, mv: &MultiVector) -> PathBuf {
    let path = dir.join(format!("{id}.f32"));
    let bytes: Vec<u8> = mv.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_reads_and_decodes_the_records() {
    let python = docusearch_agent::runtime_paths::find_setup_python()
        .unwrap_or_else(|e| panic!("prerequisite missing for this test: {e}"));
    let chroma = common::start_chroma();
    let dir = tempfile::tempdir().unwrap();
    let mut expect = Vec::new();
    for (encoding, agent) in [
        (MultivectorEncoding::F32GzipB64, "py-f32"),
        (MultivectorEncoding::F16B64, "py-f16"),
    ] {
        let cfg = config(agent, encoding);
        let s = Syncer::connect(&chroma.url(), &cfg).await.unwrap();
        let d = doc(agent, "/docs/python.pdf", 3);
        let ps = pages(41, 1..=3, 1030);
        let cs = chunks(41, 2);
        sync_document(&s, &d, &ps, &cs).await.unwrap();
        for p in &ps {
            let id = records::page_id(&d.doc_id, p.page);
            let raw = write_raw(dir.path(), &id, &p.embedding);
            expect.push(
                json!({"collection": cfg.chroma.visual_collection, "id": id, "type": "visual",
                "rows": p.embedding.rows, "dim": DIM, "raw_f32": raw}),
            );
        }
        for c in &cs {
            let id = records::chunk_id(&d.doc_id, c.chunk_index);
            let raw = write_raw(dir.path(), &id, &c.embedding);
            expect.push(
                json!({"collection": cfg.chroma.text_collection, "id": id, "type": "text",
                "rows": c.embedding.rows, "dim": DIM, "raw_f32": raw}),
            );
        }
    }
    let expect_path = dir.path().join("expect.json");
    let cfg = Config::default();
    std::fs::write(
        &expect_path,
        serde_json::to_vec(&json!({"host": "127.0.0.1", "port": chroma.server.port(),
            "tenant": cfg.chroma.tenant, "database": cfg.chroma.database, "records": expect}))
        .unwrap(),
    )
    .unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/check_records.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&expect_path)
        .env("ANONYMIZED_TELEMETRY", "False")
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}. Fix: run scripts/setup",
                python.display()
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python check failed:\n{stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(report["checked"]["f32-gzip-b64"], 5, "{stdout}");
    assert_eq!(report["checked"]["f16-b64"], 5, "{stdout}");
}
