//! The Chroma HTTP API v2 client against a real `chroma run`: setup, the collection schema,
//! reads and writes, the server's errors, and what happens when nobody answers.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use docusearch_agent::chroma::client::{
    self, ChromaClient, ChromaError, CollectionOptions, GetRequest, Include, Record, RetryPolicy,
    Space,
};
use docusearch_agent::config::ChromaConfig;
use docusearch_agent::records;
use serde_json::{json, Map, Value};

use crate::common;

fn client(url: &str) -> ChromaClient {
    ChromaClient::new(url, &ChromaConfig::default()).expect("client for a valid URL")
}

fn record(id: &str, embedding: Vec<f32>, meta: Value) -> Record {
    Record {
        id: id.into(),
        embedding,
        document: Some(format!("text of {id}")),
        metadata: meta.as_object().cloned().unwrap_or_default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_creates_tenant_database_and_a_cosine_collection_without_blob_indexes() {
    let chroma = common::start_chroma();
    let mut cfg = ChromaConfig::default();
    cfg.tenant = "agents_tenant".into();
    cfg.database = "agents_db".into();
    let c = ChromaClient::new(&chroma.url(), &cfg).unwrap();
    c.heartbeat().await.expect("heartbeat");
    assert!(!c.version().await.unwrap().is_empty());
    assert!(
        c.max_batch_size().await.unwrap() > 100,
        "pre-flight max_batch_size"
    );

    // Neither exists yet: the first use fails with the server's own message (a 4xx).
    let options = records::collection_options();
    let err = c
        .get_or_create_collection_with("visual_collection", &options)
        .await
        .unwrap_err();
    assert!(matches!(err.status(), Some(400..=499)), "{err}");
    assert!(!err.is_transient());
    assert!(
        err.to_string()
            .contains("Database [agents_db] does not exist"),
        "{err}"
    );

    c.ensure_tenant_and_database().await.expect("creates both");
    c.ensure_tenant_and_database().await.expect("idempotent");
    let col = c
        .get_or_create_collection_with("visual_collection", &options)
        .await
        .unwrap();
    assert_eq!(col.name, "visual_collection");
    let mut unindexed = col.unindexed_string_keys.clone();
    unindexed.sort();
    assert_eq!(unindexed, ["full_embeddings", "full_text"]);
    let again = c
        .get_or_create_collection_with("visual_collection", &options)
        .await
        .unwrap();
    assert_eq!(
        again.id, col.id,
        "get-or-create returns the existing collection"
    );

    // The schema is what the server stored, not what we asked for: ask it.
    let raw: Value = reqwest::get(format!(
        "{}/api/v2/tenants/agents_tenant/databases/agents_db/collections/visual_collection",
        chroma.url()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(raw["configuration_json"]["hnsw"]["space"], "cosine");
    assert_eq!(
        raw["schema"]["keys"]["full_embeddings"]["string"]["string_inverted_index"]["enabled"],
        false
    );

    // Filtering on an unindexed key is refused by the server, with its reason.
    col.upsert(&[record(
        "r1",
        vec![1.0, 0.0],
        json!({"full_embeddings": "x", "doc_id": "d"}),
    )])
    .await
    .unwrap();
    let err = col
        .get_where(json!({"full_embeddings": "x"}), &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("indexing is disabled"), "{err}");
    // Indexed keys still filter.
    assert_eq!(
        col.get_where(json!({"doc_id": "d"}), &[])
            .await
            .unwrap()
            .ids,
        ["r1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_round_trip_and_server_errors_carry_the_server_message() {
    let chroma = common::start_chroma();
    let c = client(&chroma.url());
    c.ensure_tenant_and_database().await.unwrap();
    let col = c.get_or_create_collection("records_test").await.unwrap();
    assert_eq!(col.count().await.unwrap(), 0);
    assert!(
        col.unindexed_string_keys.is_empty(),
        "the client's own defaults index every string"
    );

    let recs = vec![
        record(
            "a",
            vec![1.0, 0.0, 0.0],
            json!({"doc_id": "d1", "page": 1, "s": "x"}),
        ),
        record("b", vec![0.0, 1.0, 0.0], json!({"doc_id": "d1", "page": 2})),
        record("c", vec![0.0, 0.0, 1.0], json!({"doc_id": "d2", "page": 1})),
    ];
    assert_eq!(
        col.add(&recs).await.unwrap(),
        1,
        "three small records: one request"
    );
    assert_eq!(col.count().await.unwrap(), 3);

    // add of an existing id is ignored by Chroma; upsert replaces and merges metadata.
    col.add(&[record(
        "a",
        vec![0.5, 0.5, 0.0],
        json!({"doc_id": "changed"}),
    )])
    .await
    .unwrap();
    col.upsert(&[record(
        "b",
        vec![0.0, 1.0, 0.0],
        json!({"page": 20, "s": Value::Null}),
    )])
    .await
    .unwrap();
    let got = col
        .get(&GetRequest {
            ids: Some(vec!["a".into(), "b".into()]),
            include: vec![Include::Metadatas, Include::Documents, Include::Embeddings],
            ..GetRequest::default()
        })
        .await
        .unwrap();
    let meta = |id: &str| -> Map<String, Value> {
        let i = got.ids.iter().position(|x| x == id).unwrap();
        got.metadatas.as_ref().unwrap()[i].clone().unwrap()
    };
    assert_eq!(meta("a")["doc_id"], "d1", "add did not overwrite");
    assert_eq!(meta("b")["page"], 20);
    assert_eq!(meta("b")["doc_id"], "d1", "upsert merged the untouched key");
    assert!(
        !meta("b").contains_key("s") || meta("b")["s"].is_null(),
        "null removed the key"
    );
    assert_eq!(got.documents.as_ref().unwrap().len(), 2);
    assert_eq!(got.embeddings.as_ref().unwrap()[0].len(), 3);

    // where + query.
    let d1 = col.get_where(json!({"doc_id": "d1"}), &[]).await.unwrap();
    assert_eq!(d1.ids.len(), 2);
    let q = col
        .query(
            &[vec![0.0, 0.0, 1.0]],
            2,
            None,
            &[Include::Distances, Include::Metadatas],
        )
        .await
        .unwrap();
    assert_eq!(q.ids[0][0], "c");
    assert!(
        q.distances.unwrap()[0][0].unwrap() < 1e-4,
        "cosine distance of the same vector"
    );
    let q = col
        .query(
            &[vec![0.0, 0.0, 1.0]],
            5,
            Some(json!({"doc_id": "d1"})),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(q.ids[0].len(), 2, "the filter applies to the query");
    assert!(!q.ids[0].contains(&"c".to_string()));

    // Deletes by id and by where.
    col.delete_ids(&["a".to_string()]).await.unwrap();
    col.delete_where(json!({"doc_id": "d2"})).await.unwrap();
    assert_eq!(col.count().await.unwrap(), 1);

    // A 4xx answer: not transient, and it says what the server said.
    let err = col
        .upsert(&[record("z", vec![1.0; 7], json!({}))])
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("dimension of 3, got 7"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_collection_with_another_space_or_dimension_is_refused() {
    let chroma = common::start_chroma();
    let c = client(&chroma.url());
    // What an older client would have made: l2 space (Chroma's default).
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/api/v2/tenants/default_tenant/databases/default_database/collections",
            chroma.url()
        ))
        .json(&json!({"name": "visual_collection", "configuration": {"hnsw": {"space": "l2"}}}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let err = c
        .get_or_create_collection("visual_collection")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ChromaError::CollectionMismatch { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("l2 space") && msg.contains("cosine") && msg.contains("visual_collection"),
        "{msg}"
    );
    // Asked for l2, it is what was wanted.
    let l2 = CollectionOptions {
        space: Space::L2,
        ..CollectionOptions::default()
    };
    c.get_or_create_collection_with("visual_collection", &l2)
        .await
        .expect("l2 when l2 is asked for");

    // What DocuSearch itself makes (`metadata={"hnsw:space": "cosine"}`) is used as it is.
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/api/v2/tenants/default_tenant/databases/default_database/collections",
            chroma.url()
        ))
        .json(&json!({"name": "docusearch_made", "metadata": {"hnsw:space": "cosine"}}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let existing = c
        .get_or_create_collection("docusearch_made")
        .await
        .expect("cosine is fine");
    assert!(
        existing.unindexed_string_keys.is_empty(),
        "an existing collection keeps its schema"
    );

    let col = c.get_or_create_collection("text_collection").await.unwrap();
    col.upsert(&[record("a", vec![0.1; 128], json!({}))])
        .await
        .unwrap();
    let opts = CollectionOptions {
        dimension: Some(64),
        ..CollectionOptions::default()
    };
    let err = c
        .get_or_create_collection_with("text_collection", &opts)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("dimension 64") && err.to_string().contains("dimension 128"),
        "{err}"
    );
    let opts = CollectionOptions {
        dimension: Some(128),
        ..CollectionOptions::default()
    };
    c.get_or_create_collection_with("text_collection", &opts)
        .await
        .expect("same dimension is fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_transient_and_retried_a_bounded_number_of_times() {
    // A port nobody listens on.
    let port = common::free_port();
    let c = client(&format!("http://127.0.0.1:{port}")).with_retry(RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(20),
    });
    let err = c.heartbeat().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        matches!(
            err,
            ChromaError::Unreachable {
                kind: "cannot connect",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains(&port.to_string()),
        "names the server: {err}"
    );
    assert_eq!(
        c.retries(),
        2,
        "three attempts in all, then the error is returned"
    );
}

/// A listener that answers `n` requests with 200 and returns each request's head, lowercased
/// (the headers are ours to check; no Chroma behaviour is imitated beyond a 200 answer).
fn record_requests(n: usize) -> (u16, std::thread::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::thread::spawn(move || {
        (0..n)
            .map(|_| {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut chunk).unwrap();
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = br#"{"nanosecond heartbeat":1}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                s.write_all(head.as_bytes()).unwrap();
                s.write_all(body).unwrap();
                String::from_utf8_lossy(&buf).to_lowercase()
            })
            .collect()
    });
    (port, seen)
}

#[test]
fn the_auth_token_goes_out_in_both_headers() {
    // The client, the one-off probe, and the blocking probe called inside a runtime: one
    // heartbeat request, the same headers.
    let (port, seen) = record_requests(3);
    let url = format!("http://127.0.0.1:{port}");
    let mut cfg = ChromaConfig::default();
    cfg.auth_token = Some("Tok-123".into());
    let c = ChromaClient::new(&url, &cfg).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(c.heartbeat()).expect("heartbeat");
    let timeout = Duration::from_secs(5);
    rt.block_on(client::probe(&url, Some("Tok-123"), timeout))
        .expect("probe");
    rt.block_on(async { client::probe_blocking(&url, Some("Tok-123"), timeout) })
        .expect("blocking probe inside a runtime");
    for request in seen.join().unwrap() {
        assert!(request.starts_with("get /api/v2/heartbeat "), "{request}");
        assert!(
            request.contains("authorization: bearer tok-123"),
            "{request}"
        );
        assert!(request.contains("x-chroma-token: tok-123"), "{request}");
    }
}

#[test]
fn a_failed_heartbeat_says_why_in_a_few_words() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = client::probe_blocking(
        &format!("http://127.0.0.1:{port}"),
        None,
        Duration::from_secs(2),
    )
    .unwrap_err();
    assert_eq!(err.heartbeat_reason(), "connection refused or unreachable");

    // A server that accepts and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let err = client::probe_blocking(&url, None, Duration::from_millis(300)).unwrap_err();
    assert_eq!(err.heartbeat_reason(), "no answer to the heartbeat in time");
    drop(listener);

    let err = ChromaError::Status {
        what: "heartbeat".into(),
        status: 401,
        message: "m".into(),
    };
    assert_eq!(
        err.heartbeat_reason(),
        "heartbeat answered HTTP 401 Unauthorized"
    );
}
