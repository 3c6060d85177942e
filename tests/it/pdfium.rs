//! PDFium loading in one place: found where setup put it; a clear error listing where it looked.

use std::path::PathBuf;

use docusearch_agent::extract::pdfium;
use docusearch_agent::runtime_paths;

use crate::common;

#[test]
fn pdfium_loads_from_setup_location_and_renders_a_real_pdf() {
    let path = common::pdfium_path();
    let (lib, found) = pdfium::load(Some(&path)).expect("PDFium binds");
    assert_eq!(found, path);
    let doc = lib
        .load_pdf_from_file(&common::corpus().join("asyRefCard.pdf"), None)
        .expect("opens a real PDF");
    assert_eq!(doc.pages().len(), 3);
}

#[test]
fn pdfium_lookup_order_starts_with_the_configured_path() {
    let configured = PathBuf::from("/configured/libpdfium.so");
    let c = runtime_paths::pdfium_candidates(Some(&configured));
    assert_eq!(c[0].1.as_deref(), Some(configured.as_path()));
    assert!(c[0].0.contains("extract.pdfium_path"));
    assert!(c[1].0.contains("PDFIUM_DYNAMIC_LIB_PATH"));
    assert!(c[2].0.contains("next to the executable"));
    assert!(c.iter().any(|(why, _)| why.contains("scripts/setup")));
}

#[test]
fn pdfium_missing_lists_every_place_looked() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a/libpdfium.so");
    let b = dir.path().join("b/libpdfium.so");
    let err = runtime_paths::first_existing(
        "the PDFium library",
        0,
        vec![
            ("first".into(), Some(a.clone())),
            ("second".into(), Some(b.clone())),
        ],
    )
    .expect_err("nothing exists");
    let msg = err.to_string();
    assert!(
        msg.contains(&a.display().to_string()) && msg.contains("first"),
        "{msg}"
    );
    assert!(
        msg.contains(&b.display().to_string()) && msg.contains("second"),
        "{msg}"
    );
    assert!(msg.contains("scripts/setup"), "{msg}");
}

#[test]
fn a_file_that_is_not_pdfium_fails_to_bind_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libpdfium.so");
    std::fs::write(&fake, b"not a shared library").unwrap();
    let msg = match pdfium::load(Some(&fake)) {
        Ok(_) => panic!("a text file bound as PDFium"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains(&fake.display().to_string()) && msg.contains("scripts/setup"),
        "{msg}"
    );
}

#[test]
fn a_configured_path_that_is_missing_is_an_error_not_a_fallback() {
    // Even though scripts/setup's library exists on this machine, an explicit setting wins.
    common::pdfium_path();
    let bogus = PathBuf::from("/definitely/not/libpdfium.so");
    let err = runtime_paths::find_pdfium(Some(&bogus)).expect_err("explicit path is missing");
    let msg = err.to_string();
    assert!(
        msg.contains("/definitely/not/libpdfium.so") && msg.contains("extract.pdfium_path"),
        "{msg}"
    );
    assert_eq!(err.looked.len(), 1, "{msg}");
}
