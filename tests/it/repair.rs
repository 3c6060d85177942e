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
    let out = Command::new(env!("CARGO_BIN_EXE_docusearch-agent"))
        .arg("--config")
        .arg(&cfg_path)
        .arg("repair")
        .output()
        .expect("run the binary");
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
