//! Sync benchmark: disk per page with Chroma's string index on and off for `full_embeddings`,
//! and insert throughput, for both encodings, each on a fresh managed `chroma run`.
//!
//! `cargo run --example bench_sync -- [pages]` (default 200 pages of 1030×128).

use std::path::Path;
use std::time::Instant;

use docusearch_agent::chroma::client::{ChromaClient, CollectionOptions, Record};
use docusearch_agent::chroma::managed::ManagedChroma;
use docusearch_agent::config::{ChromaConfig, MultivectorEncoding};
use docusearch_agent::records::{self, DocumentMeta};
use docusearch_agent::types::{DocId, MultiVector};
use rand::{Rng, SeedableRng};

fn multivector(seed: u64) -> MultiVector {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data: Vec<f32> = (0..1030 * 128)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    for row in data.chunks_mut(128) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= n);
    }
    MultiVector::new(1030, 128, data)
}

/// Bytes allocated on disk under `dir` (the server's own log excluded).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if !entry.file_name().to_string_lossy().ends_with(".log") {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

struct Run {
    label: String,
    secs: f64,
    /// Building the records alone (mean, gzip, base64, metadata), no network.
    encode_secs: f64,
    blob_bytes: usize,
    disk: u64,
}

async fn run(
    pages: &[MultiVector],
    encoding: MultivectorEncoding,
    index_blobs: bool,
) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let chroma_bin = docusearch_agent::runtime_paths::find_chroma(None)?;
    let data = dir.path().join("chroma");
    let mut server = ManagedChroma::start(&chroma_bin, &data)?;
    let empty = disk_bytes(&data);
    let client = ChromaClient::new(&server.url(), &ChromaConfig::default())?;
    let options = if index_blobs {
        CollectionOptions::default()
    } else {
        records::collection_options()
    };
    let col = client
        .get_or_create_collection_with("visual_collection", &options)
        .await?;
    let doc_id = DocId::from_string("0123456789abcdef0123456789abcdef");
    let fields = DocumentMeta {
        doc_id: doc_id.clone(),
        agent_id: "bench".into(),
        source_path: "/bench/bench.pdf".into(),
        filename: "bench.pdf".into(),
        format: docusearch_agent::types::DocFormat::Pdf,
        num_pages: pages.len() as u32,
        content_hash: docusearch_agent::types::ContentHash("0".into()),
        model: "synthetic".into(),
        timestamp: "2026-11-27T17:00:00Z".into(),
    };
    let encode_started = Instant::now();
    for (i, mv) in pages.iter().enumerate() {
        let m = records::page_metadata(&fields, i as u32 + 1, mv, encoding);
        std::hint::black_box((m, mv.mean_normalized()));
    }
    let encode_secs = encode_started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut blob_bytes = 0;
    // Four pages per call, the way the agent streams a document out of the embedder.
    for (i, slice) in pages.chunks(4).enumerate() {
        let recs: Vec<Record> = slice
            .iter()
            .enumerate()
            .map(|(j, mv)| {
                let page = (i * 4 + j + 1) as u32;
                let metadata = records::page_metadata(&fields, page, mv, encoding);
                blob_bytes += metadata[records::keys::FULL_EMBEDDINGS]
                    .as_str()
                    .map_or(0, str::len);
                Record {
                    id: records::page_id(&doc_id, page),
                    embedding: mv.mean_normalized(),
                    document: Some(String::new()),
                    metadata,
                }
            })
            .collect();
        col.upsert(&recs).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(col.count().await? == pages.len(), "not every page arrived");
    server.stop();
    Ok(Run {
        label: format!(
            "{}, string index on full_embeddings {}",
            encoding.as_str(),
            if index_blobs {
                "ON (Chroma default)"
            } else {
                "OFF (ours)"
            }
        ),
        secs,
        encode_secs,
        blob_bytes,
        disk: disk_bytes(&data) - empty,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200);
    let pages: Vec<MultiVector> = (0..n as u64).map(multivector).collect();
    let mut runs = Vec::new();
    for (encoding, index) in [
        (MultivectorEncoding::F32GzipB64, true),
        (MultivectorEncoding::F32GzipB64, false),
        (MultivectorEncoding::F16B64, true),
        (MultivectorEncoding::F16B64, false),
    ] {
        runs.push(run(&pages, encoding, index).await?);
    }
    println!(
        "{n} pages of 1030x128, upserted 4 pages per request; disk = data dir growth after stop"
    );
    println!(
        "| configuration | blob MB/page | disk MB/page | disk / blob | vs f32 default | pages/s | encode ms/page |"
    );
    println!("|---|---|---|---|---|---|---|");
    let base = runs[0].disk as f64;
    for r in &runs {
        let mb = |b: f64| b / n as f64 / 1e6;
        println!(
            "| {} | {:.3} | {:.3} | {:.2} | {:.2} | {:.1} | {:.1} |",
            r.label,
            mb(r.blob_bytes as f64),
            mb(r.disk as f64),
            r.disk as f64 / r.blob_bytes as f64,
            r.disk as f64 / base,
            n as f64 / r.secs,
            r.encode_secs * 1000.0 / n as f64
        );
    }
    Ok(())
}
