//! `repair` against a real Chroma server driven into chroma-core/chroma#7758: live records that
//! `get` returns but that a query with their own embedding never finds.
//!
//! The recipe (found by experiment on chroma 1.5.9, see BENCHMARKS.md, "Search"): 3,000 records of
//! 128-d vectors with a low intrinsic dimension (16, like real embeddings, unlike white noise)
//! in a collection whose HNSW graph keeps 8 neighbours per node; delete them all, upsert 3,000
//! new ones. A fresh build of the same data loses nothing; after the churn a few records (5 to
//! 100) are unreachable in about two runs out of three, so the churn is repeated (at most 5
//! rounds) until the recall check sees the state.

use std::process::Command;

use docusearch_agent::chroma::client::{ChromaClient, Collection, GetRequest, Include, Record};
use docusearch_agent::config::Config;
use docusearch_agent::search::repair::{recall_check, recall_check_collection, repair_collection};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::common;

const N: usize = 3000;
const DIM: usize = 128;
const LATENT: usize = 16;
const MAX_ROUNDS: usize = 5;

fn gaussian(rng: &mut impl Rng) -> f32 {
    // Box–Muller.
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Unit vectors in a 16-dimensional subspace of R^128, plus a little noise.
struct Generator {
    projection: Vec<f32>,
    rng: rand::rngs::StdRng,
}

impl Generator {
    fn new(seed: u64) -> Generator {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let projection = (0..LATENT * DIM).map(|_| gaussian(&mut rng)).collect();
        Generator { projection, rng }
    }

    fn vector(&mut self) -> Vec<f32> {
        let latent: Vec<f32> = (0..LATENT).map(|_| gaussian(&mut self.rng)).collect();
        let mut v: Vec<f32> = (0..DIM)
            .map(|j| {
                (0..LATENT)
                    .map(|i| latent[i] * self.projection[i * DIM + j])
                    .sum::<f32>()
                    + 0.01 * gaussian(&mut self.rng)
            })
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }

    fn records(&mut self, prefix: &str) -> Vec<Record> {
        (0..N)
            .map(|i| {
                let mut metadata = serde_json::Map::new();
                metadata.insert("n".into(), json!(i));
                metadata.insert(
                    "full_embeddings".into(),
                    json!(format!("blob-{prefix}-{i}")),
                );
                Record {
                    id: format!("{prefix}-page{i:04}"),
                    embedding: self.vector(),
                    document: Some(format!("text of {prefix} {i}")),
                    metadata,
                }
            })
            .collect()
    }
}

/// Our collection layout (cosine, blobs not indexed) with a sparse HNSW graph.
fn sparse_schema() -> serde_json::Value {
    json!({
        "defaults": {},
        "keys": {
            "#embedding": { "float_list": { "vector_index": { "enabled": true, "config": {
                "space": "cosine", "hnsw": { "max_neighbors": 8 } } } } },
            "full_embeddings": { "string": { "string_inverted_index": { "enabled": false, "config": {} } } },
        }
    })
}

async fn everything(c: &Collection) -> Vec<(String, Vec<f32>, Option<String>, String)> {
    let all = c
        .get(&GetRequest {
            include: vec![Include::Embeddings, Include::Documents, Include::Metadatas],
            limit: Some(100_000),
            ..GetRequest::default()
        })
        .await
        .expect("read every record");
    let mut rows: Vec<_> = all
        .ids
        .into_iter()
        .zip(all.embeddings.unwrap())
        .zip(all.documents.unwrap())
        .zip(all.metadatas.unwrap())
        .map(|(((id, e), d), m)| (id, e, d, serde_json::to_string(&m).unwrap()))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

#[test]
fn repair_brings_back_records_the_server_stopped_returning() {
    let chroma = common::start_chroma();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.chroma.url = Some(chroma.url());
    config.state_dir = dir.path().join("state");
    let name = config.chroma.visual_collection.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let before = rt.block_on(async {
        let client = ChromaClient::new(&chroma.url(), &config.chroma).unwrap();
        client.ensure_tenant_and_database().await.unwrap();
        let c = client
            .create_collection_with_schema(&name, &sparse_schema())
            .await
            .expect("create the collection");
        let mut generator = Generator::new(8);
        let mut ids: Vec<String> = Vec::new();
        c.add(&generator.records("first")).await.expect("insert");
        ids.extend((0..N).map(|i| format!("first-page{i:04}")));

        // Churn until the server loses track of some records.
        let mut report = None;
        for round in 0..MAX_ROUNDS {
            c.delete_ids(&ids).await.expect("delete all");
            let records = generator.records(&format!("round{round}"));
            ids = records.iter().map(|r| r.id.clone()).collect();
            c.upsert(&records).await.expect("upsert new ones");
            let r = recall_check_collection(&c, usize::MAX).await.unwrap();
            assert_eq!((r.total, r.checked), (N, N));
            eprintln!("round {round}: {} unreachable of {N}", r.unreachable.len());
            if !r.is_complete() {
                report = Some(r);
                break;
            }
        }
        let report = report.unwrap_or_else(|| {
            panic!("chroma did not lose any record in {MAX_ROUNDS} rounds of delete-all + upsert: the recipe for chroma-core/chroma#7758 no longer works on this server version")
        });
        // They are live: `get` returns every one of them.
        let got = c.get_ids(&report.unreachable, &[]).await.unwrap();
        assert_eq!(got.ids.len(), report.unreachable.len());

        // A dry run reports and changes nothing.
        let dry = repair_collection(&client, &name, true)
            .await
            .unwrap()
            .expect("collection exists");
        assert!(!dry.before.is_complete());
        assert!(dry.rebuilt.is_none());
        let same = client.get_collection(&name).await.unwrap().unwrap();
        assert_eq!(same.id, c.id, "a dry run must not swap the collection");
        everything(&c).await
    });

    // The command, as a user runs it.
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "state_dir = {:?}\n[chroma]\nurl = {:?}\n",
            config.state_dir,
            chroma.url()
        ),
    )
    .unwrap();
    let run_repair = || {
        Command::new(env!("CARGO_BIN_EXE_docusearch-agent"))
            .arg("--config")
            .arg(&cfg_path)
            .arg("repair")
            .output()
            .expect("run the binary")
    };
    // While an agent holds the state store (here: this test), the collection is not rebuilt:
    // the agent's writes would go to the replaced collection.
    {
        let store_dir = config.store_dir();
        let client = ChromaClient::new(&chroma.url(), &config.chroma).unwrap();
        let id = || {
            rt.block_on(client.get_collection(&name))
                .unwrap()
                .expect("the collection")
                .id
        };
        let id_before = id();
        let held = docusearch_agent::state::Store::open(&store_dir).expect("store");
        let out = run_repair();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{stdout}");
        assert!(
            stdout.contains("not rebuilt: the agent is running")
                && stdout.contains("stop the agent"),
            "{stdout}"
        );
        assert_eq!(id(), id_before, "no rebuild beside a running agent");
        drop(held);
        // An empty store would make every record look orphaned to step (3).
        std::fs::remove_dir_all(&store_dir).expect("remove the test's store");
    }
    let out = run_repair();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "repair failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("unreachable"), "{stdout}");
    assert!(
        stdout.contains(&format!("rebuilt from its own {N} records")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("recall now {N} of {N}")),
        "{stdout}"
    );

    rt.block_on(async {
        let client = ChromaClient::new(&chroma.url(), &config.chroma).unwrap();
        let report = recall_check(&client, &name, usize::MAX).await.unwrap();
        assert!(
            report.is_complete(),
            "still unreachable after repair: {:?}",
            report.unreachable
        );
        assert_eq!(report.checked, N);
        let c = client.get_collection(&name).await.unwrap().unwrap();
        // Same records: ids, documents and metadata byte for byte, embeddings to 1e-6.
        let after = everything(&c).await;
        assert_eq!(after.len(), before.len());
        for (a, b) in after.iter().zip(&before) {
            assert_eq!((&a.0, &a.2, &a.3), (&b.0, &b.2, &b.3));
            let diff =
                a.1.iter()
                    .zip(&b.1)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
            // Chroma normalises vectors of a cosine collection as it stores them, so a copy is
            // normalised twice: equal to the float's last bits, not bit for bit.
            assert!(diff <= 1e-6, "{}: embedding changed by up to {diff:e}", a.0);
        }
        // Same index settings.
        let schema = client.collection_schema(&c).await.unwrap();
        let vector = &schema["keys"]["#embedding"]["float_list"]["vector_index"]["config"];
        assert_eq!(vector["space"], "cosine", "{schema}");
        assert_eq!(vector["hnsw"]["max_neighbors"], 8, "{schema}");
        assert_eq!(
            schema["keys"]["full_embeddings"]["string"]["string_inverted_index"]["enabled"],
            false
        );
        // The old copy is gone: only our collection is left under any name.
        assert_eq!(c.count().await.unwrap(), N);
    });
}

#[test]
fn recall_check_of_a_healthy_collection_finds_everything() {
    let chroma = common::start_chroma();
    let config = Config::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = ChromaClient::new(&chroma.url(), &config.chroma).unwrap();
        client.ensure_tenant_and_database().await.unwrap();
        let c = client.get_or_create_collection("healthy").await.unwrap();
        let mut generator = Generator::new(3);
        let mut records = generator.records("doc");
        records.truncate(500);
        // Exact duplicates (blank pages) tie at distance 0: not unreachable.
        for r in records.iter_mut().take(15) {
            r.embedding = records_first_embedding();
        }
        c.add(&records).await.unwrap();
        let full = recall_check(&client, "healthy", usize::MAX).await.unwrap();
        assert_eq!((full.total, full.checked), (500, 500));
        assert!(full.is_complete(), "{:?}", full.unreachable);
        let sample = recall_check(&client, "healthy", 50).await.unwrap();
        assert_eq!((sample.total, sample.checked), (500, 50));
        assert!(recall_check(&client, "absent", 10).await.is_err());
    });
}

fn records_first_embedding() -> Vec<f32> {
    let mut v = vec![0f32; DIM];
    v[0] = 1.0;
    v
}

mod store_reconcile {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::Duration;

    use docusearch_agent::config::Config;
    use docusearch_agent::search::repair::MISSING_RECORDS_ERROR;
    use docusearch_agent::state::{FileRecord, FileStamp, JobKind, JobState, RetryPolicy, Store};
    use docusearch_agent::sync::{ChunkRecord, DocumentMeta, PageRecord, Syncer};
    use docusearch_agent::types::{ContentHash, DocFormat, DocId, MultiVector, SCHEMA_VERSION};
    use rand::{Rng, SeedableRng};

    use crate::common;

    const AGENT: &str = "laptop-a";
    const OTHER: &str = "desktop-b";

    fn multivector(seed: u64) -> MultiVector {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        MultiVector::new(
            5,
            128,
            (0..5 * 128).map(|_| rng.gen_range(-1.0f32..1.0)).collect(),
        )
    }

    fn meta(agent: &str, path: &Path, num_pages: u32) -> DocumentMeta {
        DocumentMeta {
            doc_id: DocId::new(agent, path),
            agent_id: agent.into(),
            filename: path.file_name().unwrap().to_string_lossy().into_owned(),
            format: DocFormat::Pdf,
            num_pages,
            content_hash: ContentHash::of_bytes(path.as_os_str().as_encoded_bytes()),
            model: "test-model".into(),
            timestamp: "2026-11-27T18:00:00Z".into(),
            source_path: path.to_path_buf(),
        }
    }

    /// Writes `pages` page records and `chunks` text records of `path` through the syncer.
    async fn write_doc(s: &Syncer, agent: &str, path: &Path, pages: u32, chunks: u32, seed: u64) {
        let m = meta(agent, path, pages);
        let p: Vec<PageRecord> = (1..=pages)
            .map(|i| PageRecord {
                page: i,
                text: format!("page {i}"),
                embedding: multivector(seed * 100 + i as u64),
            })
            .collect();
        let c: Vec<ChunkRecord> = (0..chunks)
            .map(|i| ChunkRecord {
                chunk_index: i,
                page: 1,
                text: format!("chunk {i}"),
                word_count: 2,
                embedding: multivector(seed * 100 + 50 + i as u64),
            })
            .collect();
        s.upsert_pages(&m, &p).await.expect("write pages");
        s.upsert_chunks(&m, &c).await.expect("write chunks");
    }

    fn file_record(path: &Path, pages: u32, chunks: u32) -> FileRecord {
        FileRecord {
            stamp: FileStamp::of_path(path).unwrap_or(FileStamp {
                size: 1,
                mtime_ns: 1,
            }),
            content_hash: ContentHash::of_bytes(path.as_os_str().as_encoded_bytes()),
            doc_id: DocId::new(AGENT, path),
            num_pages: pages,
            num_chunks: chunks,
            model: "test-model".into(),
            schema_version: SCHEMA_VERSION,
            indexed_at: Some("2026-11-27T18:00:00Z".into()),
            last_error: None,
        }
    }

    /// (page records, text records) of a document.
    fn counts(
        rt: &tokio::runtime::Runtime,
        s: &Syncer,
        agent: &str,
        path: &Path,
    ) -> (usize, usize) {
        rt.block_on(s.count_document(&DocId::new(agent, path)))
            .expect("count")
    }

    fn repair(cfg_path: &Path, dry_run: bool) -> (bool, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_docusearch-agent"));
        cmd.arg("--config").arg(cfg_path).arg("repair");
        if dry_run {
            cmd.arg("--dry-run");
        }
        let out = cmd.output().expect("run the binary");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        (
            out.status.success(),
            format!("{stdout}\n--- stderr:\n{stderr}"),
        )
    }

    #[test]
    fn repair_reconciles_chroma_with_the_state_store() {
        let chroma = common::start_chroma();
        let dir = tempfile::tempdir().unwrap();
        let docs: PathBuf = dir.path().join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        let docs = docs.canonicalize().unwrap();
        let state_dir = dir.path().join("state");
        let mut cfg = Config {
            agent_id: AGENT.into(),
            state_dir: state_dir.clone(),
            ..Config::default()
        };
        cfg.chroma.url = Some(chroma.url());
        // A watched folder on a disk that is not mounted: its files are out of reach, not gone.
        let unmounted = dir.path().join("unmounted-disk/docs");
        let cfg_path = dir.path().join("config.toml");
        std::fs::write(
            &cfg_path,
            format!(
                "state_dir = {:?}\nagent_id = {AGENT:?}\n[chroma]\nurl = {:?}\n[watch]\nfolders = [{:?}, {:?}]\n",
                state_dir,
                chroma.url(),
                docs,
                unmounted
            ),
        )
        .unwrap();

        let kept = docs.join("kept.pdf"); // on disk, in the store, in Chroma: untouched
        let gone = docs.join("gone.pdf"); // in the store and Chroma, deleted from disk
        let stray = docs.join("stray.pdf"); // in Chroma only (no file the store knows)
        let lost = docs.join("lost.pdf"); // on disk, in the store as indexed, no records
        let broken = docs.join("broken.pdf"); // a failed job
        for p in [&kept, &gone, &lost, &broken] {
            std::fs::write(p, format!("%PDF-1.4 {}", p.display())).unwrap();
        }
        let other = docs.join("kept.pdf"); // the same path, written by another agent
        let away = unmounted.join("away.pdf"); // in the store and Chroma, its disk unmounted

        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let syncer = rt
            .block_on(Syncer::connect(&chroma.url(), &cfg))
            .expect("connect");
        let mut other_cfg = cfg.clone();
        other_cfg.agent_id = OTHER.into();
        let other_syncer = rt
            .block_on(Syncer::connect(&chroma.url(), &other_cfg))
            .expect("connect");
        rt.block_on(async {
            write_doc(&syncer, AGENT, &kept, 2, 1, 1).await;
            write_doc(&syncer, AGENT, &gone, 3, 2, 2).await;
            write_doc(&syncer, AGENT, &stray, 1, 1, 3).await;
            write_doc(&syncer, AGENT, &away, 2, 1, 6).await;
            write_doc(&other_syncer, OTHER, &other, 2, 1, 4).await;
            // Another agent's document that this agent's store does not know either.
            write_doc(&other_syncer, OTHER, &docs.join("elsewhere.pdf"), 1, 0, 5).await;
        });
        std::fs::create_dir_all(&state_dir).unwrap();
        {
            let store = Store::open(&cfg.store_dir()).expect("open the store");
            store.put_file(&kept, &file_record(&kept, 2, 1)).unwrap();
            store.put_file(&gone, &file_record(&gone, 3, 2)).unwrap();
            store.put_file(&lost, &file_record(&lost, 2, 1)).unwrap();
            store.put_file(&away, &file_record(&away, 2, 1)).unwrap();
            store
                .enqueue(
                    JobKind::Index {
                        path: broken.clone(),
                    },
                    FileStamp::of_path(&broken),
                    Duration::ZERO,
                )
                .unwrap();
            let job = store.take_due(u64::MAX).unwrap().expect("the job is due");
            let policy = RetryPolicy {
                max_attempts: 1,
                base: Duration::from_secs(1),
            };
            assert_eq!(
                store.fail(&job, "not a PDF", true, policy).unwrap(),
                JobState::Failed
            );
            store.flush().unwrap();
        }
        std::fs::remove_file(&gone).unwrap();

        let snapshot = |rt: &tokio::runtime::Runtime| {
            [
                counts(rt, &syncer, AGENT, &kept),
                counts(rt, &syncer, AGENT, &gone),
                counts(rt, &syncer, AGENT, &stray),
                counts(rt, &syncer, AGENT, &lost),
                counts(rt, &other_syncer, OTHER, &other),
                counts(rt, &other_syncer, OTHER, &docs.join("elsewhere.pdf")),
                counts(rt, &syncer, AGENT, &away),
            ]
        };
        let before = snapshot(&rt);
        assert_eq!(
            before,
            [(2, 1), (3, 2), (1, 1), (0, 0), (2, 1), (1, 0), (2, 1)]
        );

        // A dry run reports everything and changes nothing.
        let (ok, out) = repair(&cfg_path, true);
        assert!(ok, "{out}");
        assert!(out.contains(&format!("orphan: {} (1 page + 1 text records): no file in the state store; would be deleted", stray.display())), "{out}");
        assert!(out.contains(&format!("orphan: {} (3 page + 2 text records): its file is gone from disk; would be deleted", gone.display())), "{out}");
        assert!(out.contains(&format!("missing: {} has 2 of 2 page and 1 of 1 text records missing in Chroma; would be queued", lost.display())), "{out}");
        assert!(
            out.contains(&format!(
                "failed job: {}: not a PDF; would be retried",
                broken.display()
            )),
            "{out}"
        );
        assert!(out.contains("2 orphan documents, 1 files with missing records, 1 failed jobs (dry run: nothing changed)"), "{out}");
        assert!(
            out.contains("kept: 1 file(s) under a watched folder that is missing"),
            "{out}"
        );
        assert!(
            !out.contains("desktop-b") && !out.contains("elsewhere.pdf"),
            "another agent's records are not ours: {out}"
        );
        assert_eq!(snapshot(&rt), before, "a dry run changed Chroma");
        {
            let store = Store::open(&cfg.store_dir()).unwrap();
            assert_eq!(store.job(&broken).unwrap().unwrap().state, JobState::Failed);
            assert!(store.job(&lost).unwrap().is_none());
            assert!(store.file(&gone).unwrap().is_some());
            assert_eq!(store.file(&lost).unwrap().unwrap().last_error, None);
        }

        // While another process holds the store (a running agent), step 3 says so, changes
        // nothing, and the exit status says the repair is incomplete.
        {
            let _held = Store::open(&cfg.store_dir()).unwrap();
            let (ok, out) = repair(&cfg_path, false);
            assert!(!ok, "{out}");
            assert!(
                out.contains("skipped, the agent is running") && out.contains("stop the agent"),
                "{out}"
            );
            assert!(!out.contains("lock"), "no lock error: {out}");
            assert_eq!(snapshot(&rt), before);
        }

        // The real run.
        let (ok, out) = repair(&cfg_path, false);
        assert!(ok, "{out}");
        assert!(
            out.contains(&format!(
                "orphan: {} (1 page + 1 text records): no file in the state store; deleted",
                stray.display()
            )),
            "{out}"
        );
        assert!(
            out.contains("2 orphan documents, 1 files with missing records, 1 failed jobs"),
            "{out}"
        );
        let after = snapshot(&rt);
        assert_eq!(after[0], (2, 1), "a live file's records were touched");
        assert_eq!(
            after[1],
            (0, 0),
            "records of a file gone from disk are deleted"
        );
        assert_eq!(after[2], (0, 0), "records of no known file are deleted");
        assert_eq!(after[4], (2, 1), "another agent's records were touched");
        assert_eq!(after[5], (1, 0), "another agent's records were touched");
        assert_eq!(
            after[6],
            (2, 1),
            "records of a file on an unmounted disk were deleted"
        );
        let store = Store::open(&cfg.store_dir()).unwrap();
        let lost_job = store
            .job(&lost)
            .unwrap()
            .expect("the file with no records is queued");
        assert_eq!(
            (lost_job.kind, lost_job.state),
            (JobKind::Index { path: lost.clone() }, JobState::Queued)
        );
        // Marked so that the pipeline embeds it again although its content is unchanged.
        assert_eq!(
            store.file(&lost).unwrap().unwrap().last_error.as_deref(),
            Some(MISSING_RECORDS_ERROR)
        );
        let broken_job = store
            .job(&broken)
            .unwrap()
            .expect("the failed job is still there");
        assert_eq!(
            (broken_job.state, broken_job.attempts),
            (JobState::Queued, 0),
            "the failed job is retried"
        );
        assert!(
            store.file(&gone).unwrap().is_none(),
            "a file gone from disk is forgotten"
        );
        assert!(
            store.file(&away).unwrap().is_some(),
            "a file on an unmounted disk is remembered"
        );
        assert!(
            store.job(&kept).unwrap().is_none(),
            "a healthy file is not re-queued"
        );
        drop(store);

        // Nothing left to do: a second run finds everything consistent but the queued work.
        let (ok, out) = repair(&cfg_path, true);
        assert!(ok, "{out}");
        assert!(out.contains("0 orphan documents"), "{out}");
    }
}

/// The whole loop on the real stages: a file indexed by the pipeline loses its records on the
/// server; the reconcile re-queues it; the next pipeline run embeds it again although its
/// content is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_records_vanished_is_indexed_again_after_the_reconcile() {
    use docusearch_agent::agent::real::{RealExtract, RealModelLoader, RealSink};
    use docusearch_agent::agent::runtime::index_paths;
    use docusearch_agent::search::repair::reconcile_with_store;
    use docusearch_agent::state::Store;

    use crate::common::{agent_exe, counts, pdf_pages, rig};

    let rig = rig(300);
    let s = rig.syncer().await;
    let path = rig.root.join("report.pdf");
    std::fs::write(&path, pdf_pages("repair", 0, 1)).unwrap();
    let index = || async {
        let store = Store::open(&rig.cfg.store_dir()).expect("store");
        index_paths(
            &rig.cfg,
            std::slice::from_ref(&rig.root),
            store,
            RealExtract::new(&rig.cfg, agent_exe()).expect("extractor"),
            RealModelLoader {
                cfg: rig.cfg.model.clone(),
            },
            RealSink(rig.syncer().await),
            std::sync::Arc::new(docusearch_agent::telemetry::Telemetry::new("tiny")),
            |_, _| {},
        )
        .await
        .expect("index runs")
    };
    let first = index().await;
    assert_eq!(first.indexed.len(), 1, "{first:?}");
    let id = rig.doc_id("report.pdf");
    let indexed = counts(&s, &id).await;
    assert_eq!(indexed.0, 2);

    // The server loses the document.
    s.delete_document(&id).await.unwrap();
    assert_eq!(counts(&s, &id).await, (0, 0));
    // Without the reconcile, indexing again finds the content unchanged and writes nothing.
    let again = index().await;
    assert!(again.indexed.is_empty(), "{again:?}");
    assert_eq!(counts(&s, &id).await, (0, 0));

    {
        let store = Store::open(&rig.cfg.store_dir()).expect("store");
        let r = reconcile_with_store(
            s.client(),
            &rig.cfg.chroma,
            &rig.cfg.agent_id,
            &store,
            &[],
            false,
        )
        .await
        .expect("reconcile");
        assert_eq!(r.missing.len(), 1, "{r:?}");
        assert_eq!(r.missing[0].path, path);
        assert!(r.orphans.is_empty(), "{r:?}");
    }
    let fixed = index().await;
    assert_eq!(
        fixed.indexed.len(),
        1,
        "the queued file is embedded again: {fixed:?}"
    );
    assert_eq!(counts(&s, &id).await, indexed);
    let store = Store::open(&rig.cfg.store_dir()).expect("store");
    assert_eq!(store.file(&path).unwrap().unwrap().last_error, None);
}
