//! ColPali on candle against the reference (colpali-engine on the same tiny random weights;
//! `scripts/make_tiny_colpali.py` wrote the checkpoint and the expected outputs).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use docusearch_agent::config::{DeviceChoice, ModelConfig};
use docusearch_agent::embed::{model_image_size, ColPaliConfig, Embedder, Prompts};
use docusearch_agent::types::MultiVector;

use crate::common;

fn model_dir() -> PathBuf {
    common::fixture("tiny-colpali")
}

fn model_config() -> ModelConfig {
    ModelConfig {
        name: model_dir().display().to_string(),
        device: DeviceChoice::Cpu,
        ..ModelConfig::default()
    }
}

struct Reference {
    json: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

fn reference() -> Reference {
    let dir = common::fixture("colpali-reference");
    let text =
        std::fs::read_to_string(dir.join("reference.json")).expect("reference.json is committed");
    let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors is committed");
    Reference {
        json: serde_json::from_str(&text).expect("reference.json is JSON"),
        tensors,
    }
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn reference_rows(r: &Reference, name: &str) -> MultiVector {
    let t = &r.tensors[name];
    let (rows, dim) = t.dims2().expect("2-D");
    MultiVector::new(
        rows,
        dim,
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    )
}

fn max_abs_diff(a: &MultiVector, b: &MultiVector) -> f32 {
    assert_eq!((a.rows, a.dim), (b.rows, b.dim), "shapes differ");
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn reference_image_paths(r: &Reference) -> Vec<PathBuf> {
    r.json["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let rel = i["path"].as_str().unwrap();
            match i["where"].as_str().unwrap() {
                "corpus" => common::corpus().join(rel),
                _ => common::fixture(rel),
            }
        })
        .collect()
}

fn queries(r: &Reference) -> Vec<String> {
    r.json["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn token_ids_equal_the_reference_processor() {
    let r = reference();
    let prompts = Prompts::load(&model_dir().join("tokenizer.json")).expect("tokenizer loads");
    let cfg = ColPaliConfig::from_json(
        &std::fs::read_to_string(model_dir().join("config.json")).unwrap(),
    )
    .expect("tiny config parses");
    assert_eq!(
        prompts.document_ids(cfg.image_token_index, cfg.vision.num_patches()),
        ids(&r.json["image_input_ids"])
    );
    for (q, expected) in queries(&r)
        .iter()
        .zip(r.json["query_input_ids"].as_array().unwrap())
    {
        assert_eq!(prompts.query_ids(q).unwrap(), ids(expected), "query {q:?}");
    }
}

#[test]
fn page_embeddings_from_reference_pixels_match_within_1e4() {
    let r = reference();
    let embedder = Embedder::load(&model_config()).expect("tiny model loads");
    assert_eq!(
        (embedder.device_name(), embedder.dtype_name()),
        ("cpu".into(), "f32".into())
    );
    assert!(
        !embedder.fell_back_to_cpu(),
        "cpu was asked for, not fallen back to"
    );
    let got = embedder
        .embed_pixel_values(&r.tensors["pixel_values"])
        .expect("forward");
    assert_eq!(got.len(), 3);
    for (i, mv) in got.iter().enumerate() {
        let want = reference_rows(&r, &format!("image_{i}"));
        let d = max_abs_diff(mv, &want);
        assert!(d < 1e-4, "image {i}: max |diff| {d}");
    }
}

#[test]
fn query_embeddings_and_scores_match_the_reference() {
    let r = reference();
    let embedder = Embedder::load(&model_config()).expect("tiny model loads");
    let qs = queries(&r);
    let texts: Vec<&str> = qs.iter().map(String::as_str).collect();
    let got = embedder.embed_queries(&texts).expect("forward");
    for (i, mv) in got.iter().enumerate() {
        let want = reference_rows(&r, &format!("query_{i}"));
        let d = max_abs_diff(mv, &want);
        assert!(d < 1e-4, "query {i}: max |diff| {d}");
    }
    let pages = embedder
        .embed_pixel_values(&r.tensors["pixel_values"])
        .unwrap();
    let want = r.json["scores"].as_array().unwrap();
    for (qi, q) in got.iter().enumerate() {
        for (pi, p) in pages.iter().enumerate() {
            let w = want[qi][pi].as_f64().unwrap() as f32;
            let s = q.maxsim(p);
            assert!((s - w).abs() < 1e-3, "score[{qi}][{pi}] {s} vs {w}");
        }
    }
}

#[test]
fn page_embeddings_from_image_files_match_within_1e3() {
    let r = reference();
    let embedder = Embedder::load(&model_config()).expect("tiny model loads");
    let images: Vec<image::RgbImage> = reference_image_paths(&r)
        .iter()
        .map(|p| {
            image::open(p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .to_rgb8()
        })
        .collect();
    // The resize alone: our pixel values against the reference processor's (PIL bicubic).
    let size = embedder.image_size();
    assert_eq!(size, r.json["image_size"].as_u64().unwrap() as u32);
    let ref_px = r.tensors["pixel_values"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let plane = 3 * (size * size) as usize;
    for (i, img) in images.iter().enumerate() {
        let ours = docusearch_agent::embed::preprocess::pixel_values(img, size);
        let d = ours
            .iter()
            .zip(&ref_px[i * plane..(i + 1) * plane])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // The resize is a port of Pillow's: the same bytes, so the same floats.
        assert!(
            d < 1e-6,
            "image {i}: pixel values differ from Pillow's by up to {d}"
        );
    }
    let got = embedder.embed_images(&images).expect("forward");
    for (i, mv) in got.iter().enumerate() {
        let want = reference_rows(&r, &format!("image_{i}"));
        let d = max_abs_diff(mv, &want);
        assert!(d < 1e-3, "image {i} end to end: max |diff| {d}");
    }
}

#[test]
fn a_batch_of_different_lengths_gives_the_same_rows_as_single_inputs() {
    let r = reference();
    let mut cfg = model_config();
    cfg.batch_size_text = 8;
    cfg.batch_size_visual = 4;
    let batched = Embedder::load(&cfg).unwrap();
    cfg.batch_size_text = 1;
    cfg.batch_size_visual = 1;
    let single = Embedder::load(&cfg).unwrap();
    let qs = queries(&r);
    let texts: Vec<&str> = qs.iter().map(String::as_str).collect();
    let a = batched.embed_queries(&texts).unwrap();
    let b = single.embed_queries(&texts).unwrap();
    // Different lengths: each is its own sequence in the packed batch.
    assert!(a[0].rows < a[2].rows);
    for (x, y) in a.iter().zip(&b) {
        assert!(max_abs_diff(x, y) < 1e-5, "batching changed a query's rows");
    }
    let images: Vec<image::RgbImage> = reference_image_paths(&r)
        .iter()
        .map(|p| image::open(p).unwrap().to_rgb8())
        .collect();
    let a = batched.embed_images(&images).unwrap();
    let b = single.embed_images(&images).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!(max_abs_diff(x, y) < 1e-5, "batching changed a page's rows");
    }
}

fn real_config() -> ColPaliConfig {
    let path = common::fixture("colpali-v1.2-merged/config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "the real checkpoint's config is missing at {}: {e}",
            path.display()
        )
    });
    ColPaliConfig::from_json(&text).expect("the real config parses")
}

#[test]
fn the_real_config_parses_to_paligemma_3b_448_sizes() {
    let c = real_config();
    assert_eq!(
        (
            c.vision.hidden_size,
            c.vision.intermediate_size,
            c.vision.num_hidden_layers
        ),
        (1152, 4304, 27)
    );
    assert_eq!(
        (
            c.vision.num_attention_heads,
            c.vision.patch_size,
            c.vision.image_size
        ),
        (16, 14, 448)
    );
    assert_eq!(c.vision.num_patches(), 1024);
    assert_eq!(
        (
            c.text.hidden_size,
            c.text.intermediate_size,
            c.text.num_hidden_layers
        ),
        (2048, 16384, 18)
    );
    assert_eq!(
        (
            c.text.num_attention_heads,
            c.text.num_key_value_heads,
            c.text.head_dim
        ),
        (8, 1, 256)
    );
    // `_vocab_size` (257152) at the top loses to text_config.vocab_size.
    assert_eq!(c.text.vocab_size, 257_216);
    assert_eq!(
        (c.text.rope_theta, c.text.max_position_embeddings),
        (10_000.0, 8192)
    );
    assert_eq!(
        (c.projection_dim, c.image_token_index, c.embedding_dim),
        (2048, 257_152, 128)
    );
}

#[test]
fn the_model_asks_for_exactly_the_merged_checkpoint_tensors() {
    let cfg = real_config();
    // What the model asks the loader for, learnt by building it on a recorder (the loader's
    // own list: a tensor missing from it would never be loaded).
    let asked: Vec<(String, Vec<usize>)> = docusearch_agent::embed::weights::wanted(&cfg)
        .expect("the model builds at PaliGemma-3B-448 sizes")
        .into_iter()
        .map(|w| (w.name, w.shape))
        .collect();
    let names: HashSet<&str> = asked.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), asked.len(), "a tensor was asked for twice");

    // The layout transformers' own model has at the real config (written by the generator).
    let layout_path = common::fixture("colpali-reference/real_layout.json");
    let layout: HashMap<String, Vec<usize>> =
        serde_json::from_str(&std::fs::read_to_string(layout_path).unwrap()).unwrap();
    let missing: Vec<&String> = layout
        .keys()
        .filter(|k| !names.contains(k.as_str()))
        .collect();
    let extra: Vec<&&str> = names.iter().filter(|n| !layout.contains_key(**n)).collect();
    assert!(missing.is_empty(), "never asked for: {missing:?}");
    assert!(extra.is_empty(), "not in the checkpoint: {extra:?}");
    for (name, shape) in &asked {
        assert_eq!(&layout[name], shape, "shape of {name}");
    }
    assert_eq!(asked.len(), layout.len());
}

#[test]
fn model_image_size_reads_only_the_config() {
    assert_eq!(model_image_size(&model_config()).unwrap(), 56);
}

fn agent_command(home: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_docusearch-agent"));
    // A config file that does not exist would be an error; an empty one gives the defaults.
    let config = home.join("config.toml");
    std::fs::write(&config, "").unwrap();
    cmd.arg("--config").arg(&config);
    cmd.env("HF_HOME", home.join("hf"));
    cmd.env_remove("MODEL_NAME");
    cmd.env("DEVICE", "cpu");
    cmd
}

#[test]
fn embed_json_prints_the_documented_object() {
    let r = reference();
    let home = tempfile::tempdir().unwrap();
    let synthetic = common::fixture("colpali-reference/synthetic.png");
    let out = agent_command(home.path())
        .args(["embed", "--json", "--model"])
        .arg(model_dir())
        .arg("--image")
        .arg(&synthetic)
        .args([
            "--query",
            "What is R?",
            "--query",
            "How do I read a CSV file into a data frame?",
        ])
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "embed failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert!(
        v["model"].as_str().unwrap().ends_with("tiny-colpali"),
        "{}",
        v["model"]
    );
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["dtype"], "f32");
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["path"], synthetic.display().to_string());
    assert_eq!(images[0]["shape"], serde_json::json!([16 + 4, 128]));
    let emb = images[0]["embedding"].as_array().unwrap();
    assert_eq!(emb.len(), 20);
    assert_eq!(emb[0].as_array().unwrap().len(), 128);
    // The synthetic image is reference image 2: its first value, end to end.
    let want = reference_rows(&r, "image_2");
    assert!((emb[0][0].as_f64().unwrap() as f32 - want.data[0]).abs() < 1e-3);
    let queries = v["queries"].as_array().unwrap();
    assert_eq!(queries.len(), 2);
    assert_eq!(queries[0]["text"], "What is R?");
    assert_eq!(queries[0]["shape"], serde_json::json!([16, 128]));
    let scores = v["scores"].as_array().unwrap();
    assert_eq!(scores.len(), 2);
    assert_eq!(scores[0].as_array().unwrap().len(), 1);
    let want_score = r.json["scores"][0][2].as_f64().unwrap();
    assert!(
        (scores[0][0].as_f64().unwrap() - want_score).abs() < 1e-3,
        "{} vs {want_score}",
        scores[0][0]
    );
}

#[test]
fn embed_timings_reports_each_input_and_changes_no_vector() {
    let home = tempfile::tempdir().unwrap();
    let synthetic = common::fixture("colpali-reference/synthetic.png");
    let run = |timed: bool| {
        let mut cmd = agent_command(home.path());
        cmd.args(["embed", "--json", "--model"])
            .arg(model_dir())
            .arg("--image")
            .arg(&synthetic)
            .arg("--image")
            .arg(&synthetic)
            .args([
                "--query",
                "What is R?",
                "--query",
                "How do I read a CSV file?",
            ]);
        if timed {
            cmd.arg("--timings");
        }
        let out = cmd.output().expect("the binary runs");
        assert!(
            out.status.success(),
            "embed failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
        (v, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (plain, _) = run(false);
    assert!(plain.get("timings").is_none());
    let (timed, log) = run(true);
    let t = &timed["timings"];
    assert!(t["load_secs"].as_f64().unwrap() >= 0.0);
    assert_eq!(t["images_secs"].as_array().unwrap().len(), 2);
    assert_eq!(t["queries_secs"].as_array().unwrap().len(), 2);
    // scripts/bench_fullsize times the first page by this log line.
    assert!(log.contains("what=\"page\" n=1"), "{log}");
    // One input per forward gives the rows a batch gives.
    for key in ["images", "queries"] {
        for (a, b) in plain[key]
            .as_array()
            .unwrap()
            .iter()
            .zip(timed[key].as_array().unwrap())
        {
            assert_eq!(a["shape"], b["shape"]);
            let (a, b) = (
                a["embedding"][0][0].as_f64().unwrap(),
                b["embedding"][0][0].as_f64().unwrap(),
            );
            assert!((a - b).abs() < 1e-4, "{key}: {a} vs {b}");
        }
    }
}

#[test]
fn an_uncached_model_offline_fails_naming_the_repo_and_the_fix() {
    let home = tempfile::tempdir().unwrap();
    let repo = "vidore/colpali-v1.2-merged";
    // HF_HOME is process-wide: the child process gets an empty cache of its own.
    let config = home.path().join("offline.toml");
    std::fs::write(&config, "[model]\noffline = true\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_docusearch-agent"))
        .arg("--config")
        .arg(&config)
        .env("HF_HOME", home.path().join("hf"))
        .env_remove("MODEL_NAME")
        .args(["embed", "--query", "x", "--model", repo])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vidore/colpali-v1.2-merged"), "{err}");
    assert!(err.contains("offline"), "{err}");
    assert!(err.contains("model fetch"), "{err}");
}

#[test]
fn model_fetch_with_the_hub_unreachable_fails_naming_the_repo_and_the_fix() {
    let home = tempfile::tempdir().unwrap();
    // Nothing listens on port 9 of loopback: the connection is refused at once.
    let out = agent_command(home.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .args(["model", "fetch", "--model", "vidore/colpali-v1.2-merged"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vidore/colpali-v1.2-merged"), "{err}");
    assert!(err.contains("could not download"), "{err}");
    assert!(err.contains("local directory"), "{err}");
}

#[test]
fn the_half_precision_path_stays_close_to_the_reference() {
    // bf16 on the CPU runs the code GPUs run (candle's own kernels, softmax and norms in f32).
    let r = reference();
    let cfg = ModelConfig {
        dtype: docusearch_agent::config::DtypeChoice::Bf16,
        ..model_config()
    };
    let embedder = Embedder::load(&cfg).expect("tiny model loads in bf16");
    assert_eq!(embedder.dtype_name(), "bf16");
    let pages = embedder
        .embed_pixel_values(&r.tensors["pixel_values"])
        .expect("forward");
    let qs = queries(&r);
    let texts: Vec<&str> = qs.iter().map(String::as_str).collect();
    let got = embedder.embed_queries(&texts).expect("forward");
    let mut worst = 0f32;
    for (i, mv) in pages.iter().enumerate() {
        worst = worst.max(max_abs_diff(mv, &reference_rows(&r, &format!("image_{i}"))));
    }
    for (i, mv) in got.iter().enumerate() {
        worst = worst.max(max_abs_diff(mv, &reference_rows(&r, &format!("query_{i}"))));
    }
    // bf16 keeps 8 bits of mantissa: unit vectors agree to a few hundredths (0.017 measured).
    assert!(worst < 0.05, "bf16 max |diff| {worst}");
    let want = r.json["scores"][2][1].as_f64().unwrap() as f32;
    let s = got[2].maxsim(&pages[1]);
    assert!((s - want).abs() / want < 0.02, "bf16 score {s} vs {want}");
}

#[test]
fn a_missing_local_directory_or_file_is_named() {
    let missing = ModelConfig {
        name: "./no-such-model-dir".into(),
        ..model_config()
    };
    let err = Embedder::load(&missing).err().expect("no such directory");
    assert!(
        err.to_string().contains("no-such-model-dir") && err.to_string().contains("does not exist"),
        "{err}"
    );
    // A directory without weights: the file is named.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(model_dir().join(f), dir.path().join(f)).unwrap();
    }
    let cfg = ModelConfig {
        name: dir.path().display().to_string(),
        ..model_config()
    };
    let err = Embedder::load(&cfg).err().expect("no weights");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // The image size needs only config.json.
    assert_eq!(model_image_size(&cfg).unwrap(), 56);
}

#[test]
fn a_sharded_checkpoint_loads_through_its_index() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(model_dir().join(f), dir.path().join(f)).unwrap();
    }
    // Split the tiny weights the way the real checkpoint is split: language model apart.
    let all = candle_core::safetensors::load(model_dir().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    let mut shards: [HashMap<String, Tensor>; 2] = [HashMap::new(), HashMap::new()];
    let mut weight_map = serde_json::Map::new();
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    for (name, t) in all {
        let i = usize::from(!name.starts_with("model.language_model."));
        weight_map.insert(name.clone(), names[i].into());
        shards[i].insert(name, t);
    }
    for (i, shard) in shards.iter().enumerate() {
        candle_core::safetensors::save(shard, dir.path().join(names[i])).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let cfg = ModelConfig {
        name: dir.path().display().to_string(),
        ..model_config()
    };
    let embedder = Embedder::load(&cfg).expect("the sharded checkpoint loads");
    let got = embedder
        .embed_pixel_values(&r.tensors["pixel_values"])
        .unwrap();
    let d = max_abs_diff(&got[0], &reference_rows(&r, "image_0"));
    assert!(d < 1e-4, "sharded: max |diff| {d}");
}

/// The resize at the real sizes (a 150-DPI letter page down to 448×448) gives exactly Pillow's
/// bytes. Pillow comes with scripts/setup's environment.
#[test]
fn a_page_sized_resize_equals_pillow_byte_for_byte() {
    let python = docusearch_agent::runtime_paths::find_setup_python()
        .unwrap_or_else(|e| panic!("prerequisite missing for this test: {e}"));
    // A real rendered page would do too; a deterministic texture with sharp edges and gradients
    // exercises every rounding path.
    let (w, h) = (1275u32, 1650u32);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)) >> 7;
        image::Rgb([
            (v & 0xff) as u8,
            ((x * 255) / w) as u8,
            if (x / 37 + y / 23) % 2 == 0 { 250 } else { 3 },
        ])
    });
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("page.png");
    let raw = dir.path().join("pillow.raw");
    img.save(&png).unwrap();
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg("import sys; from PIL import Image; open(sys.argv[2],'wb').write(Image.open(sys.argv[1]).convert('RGB').resize((448,448), Image.BICUBIC).tobytes())")
        .arg(&png)
        .arg(&raw)
        .output()
        .expect("runs scripts/setup's Python");
    assert!(
        out.status.success(),
        "Pillow failed (run scripts/setup): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pillow = std::fs::read(&raw).unwrap();
    let ours = docusearch_agent::embed::preprocess::resize_for_model(&img, 448, 448);
    assert_eq!(pillow.len(), ours.as_raw().len());
    let differing = pillow
        .iter()
        .zip(ours.as_raw())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differing,
        0,
        "{differing} of {} bytes differ from Pillow",
        pillow.len()
    );
}

/// The loader (src/embed/weights.rs) gives exactly the values candle's own safetensors reader
/// gives, for every tensor the model asks for, in every compute dtype, from a checkpoint stored
/// in f32 (the tiny fixture) and one stored in bf16 (as the real checkpoint is).
#[test]
fn the_weights_loader_reads_exactly_what_candle_reads_in_every_dtype() {
    use docusearch_agent::embed::weights;
    let cfg = docusearch_agent::embed::read_config(&model_dir().join("config.json")).unwrap();
    let wanted = weights::wanted(&cfg).unwrap();
    let f32_file = model_dir().join("model.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let bf16_file = dir.path().join("model.safetensors");
    let stored = candle_core::safetensors::load(&f32_file, &Device::Cpu).unwrap();
    let as_bf16: HashMap<String, Tensor> = stored
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&as_bf16, &bf16_file).unwrap();

    for file in [&f32_file, &bf16_file] {
        let expected = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let got = weights::load(std::slice::from_ref(file), &wanted, dtype, &Device::Cpu)
                .expect("the tiny checkpoint loads");
            assert_eq!(got.len(), wanted.len());
            for w in &wanted {
                let g = &got[&w.name];
                assert_eq!(g.dtype(), dtype, "{}", w.name);
                assert_eq!(g.dims(), w.shape.as_slice(), "{}", w.name);
                let want = expected[&w.name].to_dtype(dtype).unwrap();
                let diff = (g.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(diff, 0.0, "{} from {} as {dtype:?}", w.name, file.display());
            }
        }
    }
}

#[test]
fn a_tensor_of_the_wrong_shape_is_refused_naming_it() {
    use docusearch_agent::embed::weights;
    let cfg = docusearch_agent::embed::read_config(&model_dir().join("config.json")).unwrap();
    let mut wanted = weights::wanted(&cfg).unwrap();
    wanted[0].shape.push(2);
    let name = wanted[0].name.clone();
    let err = weights::load(
        &[model_dir().join("model.safetensors")],
        &wanted,
        DType::F32,
        &Device::Cpu,
    )
    .expect_err("a shape mismatch is an error")
    .to_string();
    assert!(err.contains(&name) && err.contains("shape"), "{err}");
}

/// `gpu-check`'s CPU path end to end (the GPU machine runs the same code on CUDA): parity in f32
/// and bf16 against the reference, speed rows at a small size, and PDF pages rendered by PDFium
/// and embedded.
#[test]
fn gpu_check_runs_end_to_end_on_the_cpu() {
    let home = tempfile::tempdir().unwrap();
    let out = agent_command(home.path())
        .args(["gpu-check", "--device", "cpu", "--fixtures"])
        .arg(common::fixture(""))
        .arg("--size-config")
        .arg(model_dir().join("config.json"))
        .args(["--batches", "1,2", "--query-batch", "3", "--rounds", "1"])
        .arg("--document")
        .arg(common::fixture("corpus/asyRefCard.pdf"))
        .args(["--max-pages", "2"])
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gpu-check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |start: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no `{start}` row in:\n{stdout}"))
            .to_string()
    };
    assert!(row("gpu-check on cpu").contains("device = cpu"), "{stdout}");
    for dtype in ["f32", "bf16"] {
        let r = row(&format!("parity {dtype} max|diff|"));
        assert!(r.trim_end().ends_with("ok"), "{r}");
    }
    // Rates are printed as "N.NN/s": each must be a positive number.
    let rate = |r: &str| -> f64 {
        r.split_whitespace()
            .find_map(|w| w.strip_suffix("/s"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no rate in {r}"))
    };
    for start in ["pages at batch 1", "pages at batch 2", "queries at batch 3"] {
        assert!(rate(&row(start)) > 0.0, "{stdout}");
    }
    let corpus = row("2 PDF pages of 1 documents");
    assert!(rate(&corpus) > 0.0, "{corpus}");
}
