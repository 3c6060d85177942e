//! Two-stage search against a real Chroma server: with every record a candidate, the ranking is
//! exactly a brute-force MaxSim over all records; and one query end to end through the real
//! model code (tiny checkpoint) and the `search` command.

use std::path::PathBuf;
use std::process::Command;

use docusearch_agent::chroma::client::{Collection, GetRequest, Include};
use docusearch_agent::config::{Config, DeviceChoice, ModelConfig, MultivectorEncoding};
use docusearch_agent::records;
use docusearch_agent::search::{RecordKind, Scope, SearchOptions, Searcher};
use docusearch_agent::sync::{ChunkRecord, DocumentMeta, PageRecord, Syncer};
use docusearch_agent::types::{ContentHash, DocFormat, DocId, MultiVector};
use rand::{Rng, SeedableRng};

use crate::common;

fn random_mv(rng: &mut impl Rng, rows: usize, dim: usize) -> MultiVector {
    let data = (0..rows * dim)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    MultiVector::new(rows, dim, data)
}

fn doc_meta(config: &Config, name: &str, pages: u32) -> DocumentMeta {
    let path = PathBuf::from(format!("/corpus/{name}.pdf"));
    DocumentMeta {
        doc_id: DocId::new(&config.agent_id, &path),
        agent_id: config.agent_id.clone(),
        source_path: path,
        filename: format!("{name}.pdf"),
        format: DocFormat::Pdf,
        num_pages: pages,
        content_hash: ContentHash::of_bytes(name.as_bytes()),
        model: "synthetic".into(),
        timestamp: "2026-11-27T17:00:00Z".into(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Every record of a collection, decoded, scored with the naive `MultiVector::maxsim`.
async fn brute_force(collection: &Collection, query: &MultiVector) -> Vec<(String, f32)> {
    let all = collection
        .get(&GetRequest {
            include: vec![Include::Metadatas],
            limit: Some(100_000),
            ..GetRequest::default()
        })
        .await
        .expect("read every record");
    let metas = all.metadatas.expect("metadatas asked for");
    all.ids
        .into_iter()
        .zip(metas)
        .map(|(id, m)| {
            let mv = records::decode_full_embeddings(&m.expect("record has metadata"))
                .expect("stored blob decodes");
            let score = query.maxsim(&mv);
            (id, score)
        })
        .collect()
}

/// Writes `docs` documents of synthetic multi-vectors (pages and chunks) through the Syncer.
async fn write_synthetic(syncer: &Syncer, config: &Config, docs: u32, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for d in 0..docs {
        let pages = 1 + d % 4;
        let meta = doc_meta(config, &format!("doc{d:02}"), pages);
        let page_records: Vec<PageRecord> = (1..=pages)
            .map(|p| PageRecord {
                page: p,
                text: format!("document {d} page {p} text"),
                embedding: {
                    let rows = 40 + rng.gen_range(0..60);
                    random_mv(&mut rng, rows, 128)
                },
            })
            .collect();
        let chunk_records: Vec<ChunkRecord> = (0..pages)
            .map(|c| ChunkRecord {
                chunk_index: c,
                page: c + 1,
                text: format!("chunk {c} of document {d}"),
                word_count: 5,
                embedding: {
                    let rows = 8 + rng.gen_range(0..20);
                    random_mv(&mut rng, rows, 128)
                },
            })
            .collect();
        syncer
            .upsert_pages(&meta, &page_records)
            .await
            .expect("pages written");
        syncer
            .upsert_chunks(&meta, &chunk_records)
            .await
            .expect("chunks written");
        syncer
            .finish_document(&meta, pages, pages)
            .await
            .expect("document finished");
    }
}

fn assert_equals_brute_force(
    results: &docusearch_agent::search::SearchResults,
    expected: &[(String, f32)],
    limit: usize,
) {
    let got: Vec<(String, f32)> = results
        .hits
        .iter()
        .map(|h| (h.id.clone(), h.score))
        .collect();
    let want: Vec<(String, f32)> = expected.iter().take(limit).cloned().collect();
    assert_eq!(got.len(), want.len(), "result count");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.0, w.0, "rank {}: got {:?}, brute force {:?}", i + 1, g, w);
        assert_eq!(
            g.1.to_bits(),
            w.1.to_bits(),
            "rank {}: score {} vs brute force {}",
            i + 1,
            g.1,
            w.1
        );
    }
}

fn ranked(mut v: Vec<(String, f32)>) -> Vec<(String, f32)> {
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

#[test]
fn with_every_record_a_candidate_search_equals_brute_force_maxsim() {
    let chroma = common::start_chroma();
    let rt = runtime();
    for encoding in [MultivectorEncoding::F32GzipB64, MultivectorEncoding::F16B64] {
        let mut config = Config::default();
        let suffix = encoding.as_str().replace('-', "_");
        config.chroma.visual_collection = format!("visual_{suffix}");
        config.chroma.text_collection = format!("text_{suffix}");
        config.chroma.multivector_encoding = encoding;
        rt.block_on(async {
            let syncer = Syncer::connect(&chroma.url(), &config)
                .await
                .expect("connect");
            write_synthetic(&syncer, &config, 12, 5).await;
            let visual = syncer.visual_collection();
            let text = syncer.text_collection();
            let total = visual.count().await.unwrap() + text.count().await.unwrap();
            assert_eq!(total, 2 * (1 + 2 + 3 + 4) * 3, "records written");

            let searcher = Searcher::open(syncer.client(), &config.chroma)
                .await
                .expect("searcher opens the collections");
            let mut rng = rand::rngs::StdRng::seed_from_u64(99);
            for q in 0..3 {
                let query = random_mv(&mut rng, 12 + q, 128);
                let v = brute_force(visual, &query).await;
                let t = brute_force(text, &query).await;
                // Small slices so several stage-2 requests run at once.
                let opts = |scope, limit| SearchOptions {
                    limit,
                    candidates: total,
                    scope,
                    fetch_slice: 4,
                    fetch_parallel: 3,
                };

                let all = ranked(v.iter().chain(&t).cloned().collect());
                let r = searcher
                    .search(&query, &opts(Scope::Hybrid, total))
                    .await
                    .unwrap();
                assert_eq!(r.candidates_visual + r.candidates_text, total);
                assert!(r.skipped.is_empty(), "{:?}", r.skipped);
                assert_equals_brute_force(&r, &all, total);
                let r = searcher
                    .search(&query, &opts(Scope::Hybrid, 7))
                    .await
                    .unwrap();
                assert_equals_brute_force(&r, &all, 7);
                assert_eq!(
                    r.hits.iter().map(|h| h.rank).collect::<Vec<_>>(),
                    (1..=7).collect::<Vec<_>>()
                );

                let r = searcher
                    .search(&query, &opts(Scope::Visual, 5))
                    .await
                    .unwrap();
                assert!(r.hits.iter().all(|h| h.kind == RecordKind::Visual));
                assert_equals_brute_force(&r, &ranked(v.clone()), 5);
                let r = searcher
                    .search(&query, &opts(Scope::Text, 5))
                    .await
                    .unwrap();
                assert!(r.hits.iter().all(|h| h.kind == RecordKind::Text));
                assert_equals_brute_force(&r, &ranked(t.clone()), 5);
            }

            // The fields a user sees come from the record.
            let query = random_mv(&mut rng, 10, 128);
            let r = searcher.search(&query, &opts_default(total)).await.unwrap();
            for h in &r.hits {
                let m = &h.metadata;
                assert!(!m.contains_key("full_embeddings"), "blob left in results");
                assert_eq!(h.filename.as_deref(), m["filename"].as_str());
                assert_eq!(h.page, m["page"].as_i64());
                match h.kind {
                    RecordKind::Visual => assert!(h.snippet.contains(" page "), "{}", h.snippet),
                    RecordKind::Text => assert!(h.snippet.starts_with("chunk "), "{}", h.snippet),
                }
            }
        });
    }
}

fn opts_default(candidates: usize) -> SearchOptions {
    SearchOptions {
        limit: 10,
        candidates,
        ..SearchOptions::default()
    }
}

#[test]
fn fewer_candidates_rank_only_what_stage_one_returned() {
    let chroma = common::start_chroma();
    let rt = runtime();
    let config = Config::default();
    rt.block_on(async {
        let syncer = Syncer::connect(&chroma.url(), &config)
            .await
            .expect("connect");
        write_synthetic(&syncer, &config, 6, 8).await;
        let searcher = Searcher::open(syncer.client(), &config.chroma)
            .await
            .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let query = random_mv(&mut rng, 16, 128);
        let r = searcher
            .search(
                &query,
                &SearchOptions {
                    limit: 100,
                    candidates: 3,
                    ..SearchOptions::default()
                },
            )
            .await
            .unwrap();
        assert_eq!((r.candidates_visual, r.candidates_text), (3, 3));
        assert_eq!(r.hits.len(), 6);
        // Scores are still exact MaxSim of the candidates, best first.
        assert!(r.hits.windows(2).all(|w| w[0].score >= w[1].score));
    });
}

#[test]
fn search_opens_nothing_it_was_not_given() {
    let chroma = common::start_chroma();
    let rt = runtime();
    let config = Config::default();
    rt.block_on(async {
        let client =
            docusearch_agent::chroma::client::ChromaClient::new(&chroma.url(), &config.chroma)
                .unwrap();
        let err = Searcher::open(&client, &config.chroma).await.unwrap_err();
        assert!(
            err.to_string().contains("nothing has been indexed"),
            "{err}"
        );
        // A reader must not have created the collections.
        assert!(client
            .get_collection(&config.chroma.visual_collection)
            .await
            .unwrap()
            .is_none());
    });
}

/// The `search` command end to end: pages embedded by the real model code (tiny checkpoint),
/// written by the Syncer, searched by the binary with a query embedded by the same model.
#[test]
fn search_command_end_to_end_through_the_tiny_checkpoint() {
    let chroma = common::start_chroma();
    let model_dir = common::fixture("tiny-colpali");
    let model = ModelConfig {
        name: model_dir.display().to_string(),
        device: DeviceChoice::Cpu,
        ..ModelConfig::default()
    };
    let embedder = docusearch_agent::embed::Embedder::load(&model).expect("tiny model loads");
    let config = Config {
        model,
        ..Config::default()
    };
    let image_size = embedder.image_size();
    // Three pages: flat colours and a gradient, so their embeddings differ.
    let images: Vec<image::RgbImage> = [(250u8, 30u8, 30u8), (20, 200, 40), (10, 10, 10)]
        .iter()
        .enumerate()
        .map(|(i, &(r, g, b))| {
            image::RgbImage::from_fn(image_size, image_size, |x, y| {
                if i == 2 {
                    image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
                } else {
                    image::Rgb([r, g, b])
                }
            })
        })
        .collect();
    let page_mvs = embedder.embed_images(&images).expect("pages embed");
    let query_text = "red page";
    let query = embedder
        .embed_queries(&[query_text])
        .expect("query embeds")
        .remove(0);

    let rt = runtime();
    let meta = doc_meta(&config, "colours", 3);
    rt.block_on(async {
        let syncer = Syncer::connect(&chroma.url(), &config)
            .await
            .expect("connect");
        let pages: Vec<PageRecord> = page_mvs
            .iter()
            .enumerate()
            .map(|(i, mv)| PageRecord {
                page: i as u32 + 1,
                text: format!("colour page {}", i + 1),
                embedding: mv.clone(),
            })
            .collect();
        syncer
            .upsert_pages(&meta, &pages)
            .await
            .expect("pages written");
        syncer.finish_document(&meta, 3, 0).await.expect("finished");
    });
    let mut expected: Vec<(u32, f32)> = page_mvs
        .iter()
        .enumerate()
        .map(|(i, mv)| (i as u32 + 1, query.maxsim(mv)))
        .collect();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1));

    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "state_dir = {:?}\n[chroma]\nurl = {:?}\n[model]\nname = {:?}\ndevice = \"cpu\"\n",
            dir.path().join("state"),
            chroma.url(),
            model_dir.display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_docusearch-agent"))
        .arg("--config")
        .arg(&cfg_path)
        .args(["search", query_text, "--json", "--verbose", "--limit", "3"])
        .output()
        .expect("run the binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "search failed: {stderr}");
    assert!(
        stderr.contains("stage 1"),
        "--verbose prints stage times: {stderr}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("--json prints one JSON document");
    let hits = json["results"]["hits"].as_array().expect("hits");
    assert_eq!(hits.len(), 3);
    for (hit, (page, score)) in hits.iter().zip(&expected) {
        assert_eq!(hit["page"].as_u64(), Some(*page as u64), "{hit}");
        assert_eq!(hit["filename"], "colours.pdf");
        assert_eq!(hit["kind"], "visual");
        let got = hit["score"].as_f64().unwrap() as f32;
        // The binary embeds the query itself: same model, same input, same numbers.
        assert!(
            (got - score).abs() <= 1e-4 * score.abs().max(1.0),
            "{got} vs {score}"
        );
    }
    assert!(json["results"]["times"]["stage1_ms"].as_f64().is_some());

    // Human output: rank, score, file, page, snippet.
    let out = Command::new(env!("CARGO_BIN_EXE_docusearch-agent"))
        .arg("--config")
        .arg(&cfg_path)
        .args(["search", query_text, "--mode", "visual", "--limit", "1"])
        .output()
        .expect("run the binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("  1.")
            && stdout.contains("colours.pdf")
            && stdout.contains(&format!("page {}", expected[0].0)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("colour page {}", expected[0].0)),
        "{stdout}"
    );
}

/// The order colpali-engine's `score_multi_vector` gives on the same vectors (computed once by
/// `scripts/check_search.py` with the reference stack and committed, so no Python is needed
/// here), after the vectors went through the Syncer into a real Chroma server and back.
#[test]
fn ranking_equals_colpali_engine_score_multi_vector() {
    let path = common::fixture("search-reference/colpali_scores.json");
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).expect("the reference fixture is committed"),
    )
    .expect("fixture is JSON");
    let decode = |v: &serde_json::Value| {
        records::decode_full_embeddings(v.as_object().expect("an object")).expect("blob decodes")
    };
    let query = decode(&reference["query"]);
    let pages: Vec<MultiVector> = reference["pages"]
        .as_array()
        .unwrap()
        .iter()
        .map(decode)
        .collect();
    let colpali_scores: Vec<f32> = reference["colpali_scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap() as f32)
        .collect();
    let colpali_order: Vec<usize> = reference["colpali_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as usize)
        .collect();

    let chroma = common::start_chroma();
    let config = Config::default();
    let rt = runtime();
    rt.block_on(async {
        let syncer = Syncer::connect(&chroma.url(), &config)
            .await
            .expect("connect");
        // One single-page document per reference page, so the file name says which page it is.
        for (i, mv) in pages.iter().enumerate() {
            let meta = doc_meta(&config, &format!("ref{i:02}"), 1);
            let page = PageRecord {
                page: 1,
                text: format!("reference page {i}"),
                embedding: mv.clone(),
            };
            syncer
                .upsert_pages(&meta, &[page])
                .await
                .expect("page written");
        }
        let searcher = Searcher::open(syncer.client(), &config.chroma)
            .await
            .unwrap();
        let r = searcher
            .search(
                &query,
                &SearchOptions {
                    limit: pages.len(),
                    candidates: pages.len(),
                    scope: Scope::Visual,
                    ..SearchOptions::default()
                },
            )
            .await
            .unwrap();
        let order: Vec<usize> = r
            .hits
            .iter()
            .map(|h| {
                let f = h.filename.as_deref().expect("filename");
                f["ref".len().."ref".len() + 2]
                    .parse()
                    .expect("ref page number")
            })
            .collect();
        assert_eq!(order, colpali_order, "our order vs colpali-engine's");
        for h in &r.hits {
            let i: usize = h.filename.as_deref().unwrap()[3..5].parse().unwrap();
            let want = colpali_scores[i];
            // torch sums in another order: equal to a few float ulps of the total.
            assert!(
                (h.score - want).abs() <= 1e-5 * want.abs().max(1.0),
                "page {i}: {} vs colpali-engine {want}",
                h.score
            );
        }
    });
}

/// An empty server is reported as such, before any model is loaded.
#[test]
fn search_command_on_an_empty_server_says_nothing_is_indexed() {
    let chroma = common::start_chroma();
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "state_dir = {:?}\n[chroma]\nurl = {:?}\n[model]\nname = {:?}\ndevice = \"cpu\"\n",
            dir.path().join("state"),
            chroma.url(),
            dir.path().join("no-model").display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_docusearch-agent"))
        .arg("--config")
        .arg(&cfg_path)
        .args(["search", "anything"])
        .output()
        .expect("run the binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("nothing has been indexed"), "{stderr}");
}
