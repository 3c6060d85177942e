//! Extraction on real files through the real isolated worker and the real PDFium library:
//! page counts, rendered pages that are not blank, text, chunks, every bad input, and a
//! renderer that crashes or hangs costing only its own file.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use docusearch_agent::config::ExtractConfig;
use docusearch_agent::extract::{
    self, chunk_page, find_soffice, ExtractError, ExtractEvent, ExtractOptions, Extractor, Page,
};
use docusearch_agent::types::DocFormat;
use image::RgbImage;

use crate::common;

const SIZE: u32 = 448;

fn options() -> ExtractOptions {
    let cfg = ExtractConfig {
        pdfium_path: Some(common::pdfium_path()),
        ..ExtractConfig::default()
    };
    ExtractOptions::from_config(
        &cfg,
        SIZE,
        PathBuf::from(env!("CARGO_BIN_EXE_docusearch-agent")),
    )
}

fn extractor() -> Extractor {
    Extractor::new(options()).expect("extractor starts")
}

/// Everything one extraction produced, in the order it arrived.
struct Collected {
    info: extract::DocumentInfo,
    events_info_first: bool,
    pages: Vec<Page>,
}

fn collect(ex: &Extractor, path: &Path) -> Result<Collected, ExtractError> {
    let mut pages = Vec::new();
    let mut seen_info = None;
    let mut info_first = true;
    let info = ex.extract(path, &mut |ev| {
        match ev {
            ExtractEvent::Info(i) => {
                info_first &= pages.is_empty();
                seen_info = Some(i);
            }
            ExtractEvent::Page(p) => {
                info_first &= seen_info.is_some();
                pages.push(p);
            }
        }
        ControlFlow::Continue(())
    })?;
    assert_eq!(
        seen_info.as_ref(),
        Some(&info),
        "the Info event and the returned info agree"
    );
    Ok(Collected {
        info,
        events_info_first: info_first,
        pages,
    })
}

/// Fraction of pixels that are not (near) white.
fn ink(img: &RgbImage) -> f64 {
    let dark = img
        .pixels()
        .filter(|p| p.0.iter().any(|&c| c < 200))
        .count();
    dark as f64 / (img.width() * img.height()) as f64
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

#[test]
fn corpus_pdfs_have_their_pages_rendered_non_blank_with_text() {
    let ex = extractor();
    for (name, expected_pages, first_words) in [
        ("R-intro.pdf", 113, "An Introduction to R"),
        ("R-data.pdf", 41, "R Data Import/Export"),
        ("asyRefCard.pdf", 3, "Asymptote Reference Card"),
        ("xfig-howto.pdf", 24, "Using XFig"),
    ] {
        let got = collect(&ex, &common::corpus().join(name)).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            got.events_info_first,
            "{name}: Info must come before the pages"
        );
        assert_eq!(got.info.format, DocFormat::Pdf);
        assert!(
            got.info.visual && got.info.notes.is_empty(),
            "{name}: {:?}",
            got.info
        );
        assert_eq!(got.info.num_pages, expected_pages, "{name}");
        assert_eq!(got.pages.len(), expected_pages as usize, "{name}");
        let numbers: Vec<u32> = got.pages.iter().map(|p| p.number).collect();
        assert_eq!(
            numbers,
            (1..=expected_pages).collect::<Vec<_>>(),
            "{name}: pages in order"
        );
        for p in &got.pages {
            let img = p
                .image
                .as_ref()
                .unwrap_or_else(|| panic!("{name} p{}: no image", p.number));
            assert_eq!(img.dimensions(), (SIZE, SIZE), "{name} p{}", p.number);
        }
        // Every page of these manuals carries text, so none renders blank and all have text
        // (the R manuals have a few deliberately blank pages: held to most, not all).
        let inked = got
            .pages
            .iter()
            .filter(|p| ink(p.image.as_ref().unwrap()) > 0.002)
            .count();
        let texted = got.pages.iter().filter(|p| words(&p.text) > 0).count();
        assert!(
            inked * 10 >= got.pages.len() * 9,
            "{name}: only {inked} of {} pages show ink",
            got.pages.len()
        );
        assert!(
            texted * 10 >= got.pages.len() * 9,
            "{name}: only {texted} pages have text"
        );
        for p in &got.pages {
            // Where the PDF has text, the page shows ink.
            if words(&p.text) > 0 {
                assert!(
                    ink(p.image.as_ref().unwrap()) > 0.0001,
                    "{name} p{} has text but renders blank",
                    p.number
                );
            }
        }
        let first: String = got.pages[0]
            .text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            first.starts_with(first_words),
            "{name}: page 1 text starts {:?}",
            &first[..first.len().min(60)]
        );
        assert!(
            !got.pages[0].text.contains('\r'),
            "line ends are normalised"
        );
    }
}

#[test]
fn a_rendered_page_matches_pdfium_rendering_it_directly() {
    // The worker's picture is PDFium's own 150-DPI render, resized for the model.
    let path = common::corpus().join("asyRefCard.pdf");
    let got = collect(&extractor(), &path).unwrap();
    let (pdfium, _) = extract::pdfium::load(Some(&common::pdfium_path())).unwrap();
    let doc = pdfium.load_pdf_from_file(&path, None).unwrap();
    let page = doc.pages().get(1).unwrap();
    let cfg = pdfium_render::prelude::PdfRenderConfig::new().scale_page_by_factor(150.0 / 72.0);
    let direct = page
        .render_with_config(&cfg)
        .unwrap()
        .as_image()
        .unwrap()
        .to_rgb8();
    let expected = docusearch_agent::embed::preprocess::resize_for_model(&direct, SIZE, SIZE);
    assert_eq!(got.pages[1].image.as_ref().unwrap(), &expected);
}

#[test]
fn page_text_is_what_pypdfium2_reads() {
    // DocuSearch read page text with pypdfium2's `get_text_range()`; the records must carry the
    // same text. Checked on every page of three corpus PDFs against the real pypdfium2
    // (xfig-howto.pdf has characters without a Unicode value, which its text leaves out).
    let python = docusearch_agent::runtime_paths::find_setup_python()
        .unwrap_or_else(|e| panic!("prerequisite missing for this test: {e}"));
    let ex = extractor();
    for name in ["R-data.pdf", "asyRefCard.pdf", "xfig-howto.pdf"] {
        let path = common::corpus().join(name);
        let script = "import json, sys, pypdfium2 as p
\
            d = p.PdfDocument(sys.argv[1])
\
            print(json.dumps([d[i].get_textpage().get_text_range() for i in range(len(d))]))";
        let out = std::process::Command::new(&python)
            .args(["-c", script])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pypdfium2 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
        let got = collect(&ex, &path).unwrap();
        assert_eq!(got.pages.len(), expected.len());
        for (p, want) in got.pages.iter().zip(&expected) {
            assert_eq!(
                p.text,
                want.replace("\r\n", "\n"),
                "{name} page {}",
                p.number
            );
        }
    }
}

#[test]
fn pages_stream_and_the_sink_can_stop_early() {
    let ex = extractor();
    let mut seen = 0;
    let err = ex
        .extract(&common::corpus().join("R-intro.pdf"), &mut |ev| {
            if let ExtractEvent::Page(_) = ev {
                seen += 1;
                if seen == 2 {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        })
        .expect_err("stopped early");
    assert!(matches!(err, ExtractError::Stopped { .. }), "{err}");
    assert!(!err.is_permanent(), "stopping is not the file's fault");
    assert_eq!(seen, 2, "no page after the sink said stop");
}

#[test]
fn chunks_of_a_real_page_have_the_configured_size_and_overlap() {
    let got = collect(&extractor(), &common::corpus().join("R-intro.pdf")).unwrap();
    // The extractor cuts each page's text into chunks numbered across the document.
    let all: Vec<_> = got.pages.iter().flat_map(|p| p.chunks.clone()).collect();
    let o = options();
    for p in &got.pages {
        let first = p.chunks.first().map(|c| c.chunk_index).unwrap_or(0);
        let again = chunk_page(
            p.number,
            &p.text,
            o.chunk_size,
            o.chunk_overlap,
            o.max_chunk_chars,
            first,
        );
        assert_eq!(p.chunks, again, "page {}", p.number);
    }
    assert_eq!(
        all.iter().map(|c| c.chunk_index).collect::<Vec<_>>(),
        (0..all.len() as u32).collect::<Vec<_>>()
    );
    // A page with more than one chunk: full-size chunks that share exactly `overlap` words.
    let page = got
        .pages
        .iter()
        .find(|p| words(&p.text) > 300)
        .expect("a page with 300+ words");
    let chunks = chunk_page(page.number, &page.text, 250, 50, 20_000, 10);
    let page_words: Vec<&str> = page.text.split_whitespace().collect();
    assert!(chunks.len() >= 2);
    assert_eq!(chunks[0].chunk_index, 10);
    assert_eq!(chunks[0].word_count, 250);
    assert_eq!(chunks[0].text, page_words[..250].join(" "));
    assert_eq!(
        chunks[1]
            .text
            .split_whitespace()
            .take(50)
            .collect::<Vec<_>>(),
        page_words[200..250].to_vec()
    );
    let last = chunks.last().unwrap();
    assert_eq!(
        last.text.split_whitespace().last(),
        page_words.last().copied(),
        "the last word is kept"
    );
    assert!(chunks
        .iter()
        .all(|c| c.page == page.number && c.word_count <= 250));
}

#[test]
fn corpus_images_are_one_page_each() {
    let ex = extractor();
    for name in ["global-settings.png", "scatter-plot.png"] {
        let got = collect(&ex, &common::corpus().join(name)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (got.info.format, got.info.num_pages, got.info.visual),
            (DocFormat::Image, 1, true)
        );
        assert_eq!(got.pages.len(), 1);
        let img = got.pages[0].image.as_ref().unwrap();
        assert_eq!(img.dimensions(), (SIZE, SIZE));
        assert!(ink(img) > 0.01, "{name} renders blank");
    }
}

/// A PNG 40 wide, 20 high: left half red, right half blue, carrying the given EXIF orientation.
fn oriented_png(orientation: u16) -> Vec<u8> {
    use image::ImageEncoder;
    let img = RgbImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            image::Rgb([255, 0, 0])
        } else {
            image::Rgb([0, 0, 255])
        }
    });
    // Little-endian TIFF header, one IFD entry: Orientation (0x0112), SHORT, 1 value.
    let mut exif = b"II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0".to_vec();
    exif.extend_from_slice(&orientation.to_le_bytes());
    exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut out = Vec::new();
    let mut enc = image::codecs::png::PngEncoder::new(&mut out);
    enc.set_exif_metadata(exif).expect("PNG carries EXIF");
    enc.write_image(img.as_raw(), 40, 20, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

#[test]
fn image_exif_orientation_is_applied_and_alpha_lands_on_white() {
    let dir = tempfile::tempdir().unwrap();
    let ex = extractor();
    // Orientation 6: the camera was turned, the picture is shown rotated 90° clockwise, so the
    // left (red) half ends up on top.
    let rotated = dir.path().join("rotated.png");
    std::fs::write(&rotated, oriented_png(6)).unwrap();
    let img = collect(&ex, &rotated)
        .unwrap()
        .pages
        .remove(0)
        .image
        .unwrap();
    let (top, bottom) = (
        img.get_pixel(SIZE / 2, SIZE / 8),
        img.get_pixel(SIZE / 2, SIZE * 7 / 8),
    );
    assert!(top[0] > 200 && top[2] < 50, "top should be red, is {top:?}");
    assert!(
        bottom[2] > 200 && bottom[0] < 50,
        "bottom should be blue, is {bottom:?}"
    );
    let upright = dir.path().join("upright.png");
    std::fs::write(&upright, oriented_png(1)).unwrap();
    let img = collect(&ex, &upright)
        .unwrap()
        .pages
        .remove(0)
        .image
        .unwrap();
    assert!(
        img.get_pixel(SIZE / 8, SIZE / 2)[0] > 200,
        "orientation 1 keeps red on the left"
    );

    let transparent = dir.path().join("clear.png");
    let rgba = image::RgbaImage::from_fn(8, 8, |x, _| {
        image::Rgba([0, 0, 0, if x < 4 { 0 } else { 255 }])
    });
    rgba.save(&transparent).unwrap();
    let img = collect(&ex, &transparent)
        .unwrap()
        .pages
        .remove(0)
        .image
        .unwrap();
    assert_eq!(
        img.get_pixel(10, SIZE / 2).0,
        [255, 255, 255],
        "transparent becomes white"
    );
    assert_eq!(
        img.get_pixel(SIZE - 10, SIZE / 2).0,
        [0, 0, 0],
        "opaque black stays black"
    );
}

#[test]
fn text_files_are_text_only_pages() {
    let dir = tempfile::tempdir().unwrap();
    let ex = extractor();
    let cases = [
        ("notes.txt", "plain words here\nsecond line", DocFormat::Text, "plain words here second line"),
        ("readme.md", "# Title\n\nSome *markdown* text", DocFormat::Markdown, "# Title Some *markdown* text"),
        ("data.csv", "a,b\n1,2", DocFormat::Csv, "a,b 1,2"),
        ("doc.json", "{\"k\": \"value\"}", DocFormat::Json, "{\"k\": \"value\"}"),
        (
            "page.html",
            "<html><head><title>Hi</title><script>x()</script></head><body><p>Hello &amp; bye</p></body></html>",
            DocFormat::Html,
            "Hello & bye",
        ),
    ];
    for (name, content, format, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let got = collect(&ex, &path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (got.info.format, got.info.num_pages, got.info.visual),
            (format, 1, false),
            "{name}"
        );
        assert!(got.pages[0].image.is_none());
        assert_eq!(
            got.pages[0]
                .text
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            expected,
            "{name}"
        );
    }
}

/// Copies a real OOXML package, replacing one XML part.
fn patch_package(src: &Path, dst: &Path, part: &str, patch: impl Fn(String) -> String) {
    let mut zin = zip::ZipArchive::new(std::fs::File::open(src).unwrap()).unwrap();
    let mut zout = zip::ZipWriter::new(std::fs::File::create(dst).unwrap());
    for i in 0..zin.len() {
        let mut entry = zin.by_index(i).unwrap();
        let name = entry.name().to_string();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
        if name == part {
            bytes = patch(String::from_utf8(bytes).unwrap()).into_bytes();
        }
        zout.start_file(name, zip::write::SimpleFileOptions::default())
            .unwrap();
        zout.write_all(&bytes).unwrap();
    }
    zout.finish().unwrap();
}

#[test]
fn office_files_convert_with_libreoffice_or_fall_back_to_their_text() {
    let dir = tempfile::tempdir().unwrap();
    let docx = dir.path().join("report.docx");
    patch_package(
        &common::corpus().join("default.docx"),
        &docx,
        "word/document.xml",
        |xml| {
            xml.replacen(
            "<w:body>",
            "<w:body><w:p><w:r><w:t>Quarterly report on lighthouse maintenance</w:t></w:r></w:p>\
             <w:p><w:r><w:t>Second paragraph</w:t></w:r></w:p>",
            1,
        )
        },
    );
    let ex = extractor();
    let got = collect(&ex, &docx).unwrap_or_else(|e| panic!("{e}"));
    let text: String = got
        .pages
        .iter()
        .map(|p| p.text.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(got.info.format, DocFormat::Docx);
    assert!(
        text.contains("Quarterly report on lighthouse maintenance")
            && text.contains("Second paragraph"),
        "{text:?}"
    );
    match find_soffice(None) {
        Some(soffice) => {
            // Converted to PDF by LibreOffice, then rendered like any PDF.
            assert_eq!(ex.soffice(), Some(soffice.as_path()));
            assert!(
                got.info.visual && got.info.notes.is_empty(),
                "{:?}",
                got.info
            );
            assert!(got.pages.iter().all(|p| p
                .image
                .as_ref()
                .is_some_and(|i| i.dimensions() == (SIZE, SIZE))));
            assert!(ink(got.pages[0].image.as_ref().unwrap()) > 0.001);
        }
        None => {
            // This machine has no LibreOffice: the text-only fallback, and the note that says why.
            assert!(ex.soffice().is_none());
            assert!(ex
                .office_note()
                .is_some_and(|n| n.contains("visual indexing needs LibreOffice")));
            assert!(!got.info.visual);
            assert!(
                got.info
                    .notes
                    .iter()
                    .any(|n| n.contains("visual indexing needs LibreOffice")),
                "{:?}",
                got.info.notes
            );
            assert_eq!((got.info.num_pages, got.pages.len()), (1, 1));
            assert!(got.pages[0].image.is_none());
            assert_eq!(
                text.trim(),
                "Quarterly report on lighthouse maintenance\nSecond paragraph"
            );

            // The real templates as they are: an empty Word document, a presentation with no slides.
            let empty = collect(&ex, &common::corpus().join("default.docx")).unwrap();
            assert_eq!((empty.info.num_pages, empty.pages[0].text.trim()), (1, ""));
            let deck = collect(&ex, &common::corpus().join("default.pptx")).unwrap();
            assert_eq!(
                (deck.info.format, deck.info.num_pages, deck.pages.len()),
                (DocFormat::Pptx, 0, 0)
            );
            // A legacy binary .doc cannot be read without LibreOffice: refused, saying so.
            let doc = dir.path().join("old.doc");
            let mut ole = vec![0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1];
            ole.resize(512, 0);
            std::fs::write(&doc, ole).unwrap();
            let err = collect(&ex, &doc).err().expect("a .doc needs LibreOffice");
            assert!(
                matches!(err, ExtractError::Unsupported { .. })
                    && err.to_string().contains("LibreOffice"),
                "{err}"
            );
        }
    }
}

#[test]
fn an_office_file_libreoffice_cannot_convert_still_gives_its_text() {
    // `false` stands in for a LibreOffice that exits without writing a PDF (as a Writer-only
    // install does with a presentation): the agent says so and keeps the package's text.
    let failing = ["/usr/bin/false", "/bin/false"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("`false`");
    let dir = tempfile::tempdir().unwrap();
    let docx = dir.path().join("memo.docx");
    patch_package(
        &common::corpus().join("default.docx"),
        &docx,
        "word/document.xml",
        |xml| {
            xml.replacen(
                "<w:body>",
                "<w:body><w:p><w:r><w:t>Budget memo</w:t></w:r></w:p>",
                1,
            )
        },
    );
    let mut opts = options();
    opts.libreoffice = Some(failing.clone());
    let ex = Extractor::new(opts).unwrap();
    assert_eq!(ex.soffice(), Some(failing.as_path()));
    assert!(ex.office_note().is_none());
    let got = collect(&ex, &docx).unwrap_or_else(|e| panic!("{e}"));
    assert!(!got.info.visual);
    assert!(
        got.info
            .notes
            .iter()
            .any(|n| n.contains("visual indexing failed") && n.contains("no PDF written")),
        "{:?}",
        got.info.notes
    );
    assert_eq!(got.pages[0].text.trim(), "Budget memo");
    // A legacy .doc has no text to fall back on: the conversion failure is the answer.
    let doc = dir.path().join("old.doc");
    let mut ole = vec![0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1];
    ole.resize(512, 0);
    std::fs::write(&doc, ole).unwrap();
    let err = expect_failure(&ex, &doc);
    assert!(
        matches!(err, ExtractError::Conversion { .. }) && err.is_permanent(),
        "{err}"
    );
}

// ---- bad inputs ------------------------------------------------------------------------------

fn expect_failure(ex: &Extractor, path: &Path) -> ExtractError {
    let err = match collect(ex, path) {
        Ok(c) => panic!("{} should fail, got {:?}", path.display(), c.info),
        Err(e) => e,
    };
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "message names the file: {err}"
    );
    err
}

#[test]
fn empty_truncated_corrupt_and_lying_files_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let ex = extractor();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let real = std::fs::read(common::corpus().join("R-data.pdf")).unwrap();
    let png = std::fs::read(common::corpus().join("global-settings.png")).unwrap();

    let err = expect_failure(&ex, &write("empty.pdf", b""));
    assert!(
        matches!(err, ExtractError::Empty { .. }) && err.is_permanent(),
        "{err}"
    );
    assert_eq!(err.reason(), "empty file");

    let err = expect_failure(&ex, &write("cut.pdf", &real[..real.len() / 2]));
    assert!(
        matches!(err, ExtractError::Truncated { .. }) && err.is_permanent(),
        "{err}"
    );

    // Intact header and end marker, damaged body: PDFium itself refuses it.
    let mut garbage = b"%PDF-1.5\n".to_vec();
    garbage.extend((0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    garbage.extend_from_slice(b"\n%%EOF\n");
    let err = expect_failure(&ex, &write("garbage.pdf", &garbage));
    assert!(
        matches!(err, ExtractError::Corrupt { .. }) && err.is_permanent(),
        "{err}"
    );

    let err = expect_failure(&ex, &write("picture.pdf", &png));
    assert!(
        matches!(err, ExtractError::WrongContent { .. }) && err.is_permanent(),
        "{err}"
    );
    assert!(err.to_string().contains("PNG"), "{err}");

    let err = expect_failure(&ex, &write("notes.png", b"just some text, not a picture"));
    assert!(matches!(err, ExtractError::WrongContent { .. }), "{err}");
    assert!(err.reason().contains("content is text"), "{}", err.reason());

    let err = expect_failure(&ex, &write("letter.docx", &real));
    assert!(
        matches!(err, ExtractError::WrongContent { .. }) && err.to_string().contains("PDF"),
        "{err}"
    );

    let err = expect_failure(&ex, &write("broken.png", &png[..png.len() / 3]));
    assert!(matches!(err, ExtractError::Corrupt { .. }), "{err}");

    let err = expect_failure(&ex, &write("zip.docx", b"PK\x03\x04 not really a zip"));
    assert!(matches!(err, ExtractError::Corrupt { .. }), "{err}");

    let err = expect_failure(&ex, &write("archive.xyz", b"whatever"));
    assert!(matches!(err, ExtractError::Unsupported { .. }), "{err}");

    // Gone before we got to it: worth a retry, not a permanent failure.
    let err = expect_failure(&ex, &dir.path().join("vanished.pdf"));
    assert!(
        matches!(err, ExtractError::Unreadable { .. }) && !err.is_permanent(),
        "{err}"
    );
}

#[test]
fn limits_refuse_with_a_reason() {
    let corpus = common::corpus();
    let mut opts = options();
    opts.max_file_bytes = 512 * 1024;
    let err = expect_failure(&Extractor::new(opts).unwrap(), &corpus.join("R-intro.pdf"));
    assert!(
        matches!(err, ExtractError::TooLarge { size: 632_012, .. }) && err.is_permanent(),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("0.6 MiB is above the 0.5 MiB limit (extract.max_file_mb)"),
        "{err}"
    );
    assert_eq!(err.reason(), "too large: 0.6 MiB > 0.5 MiB");

    let mut opts = options();
    opts.max_pages = 2;
    let err = expect_failure(
        &Extractor::new(opts).unwrap(),
        &corpus.join("asyRefCard.pdf"),
    );
    assert!(
        matches!(
            err,
            ExtractError::TooManyPages {
                pages: 3,
                limit: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.reason(), "too many pages: 3 > 2");
}

// ---- an encrypted PDF, made here with the standard security handler (RC4, 40-bit, rev 2) ----

const PAD: [u8; 32] = [
    0x28, 0xBF, 0x4E, 0x5E, 0x4E, 0x75, 0x8A, 0x41, 0x64, 0x00, 0x4E, 0x56, 0xFF, 0xFA, 0x01, 0x08,
    0x2E, 0x2E, 0x00, 0xB6, 0xD0, 0x68, 0x3E, 0x80, 0x2F, 0x0C, 0xA9, 0xFE, 0x64, 0x53, 0x69, 0x7A,
];

fn padded(password: &[u8]) -> Vec<u8> {
    password
        .iter()
        .chain(PAD.iter())
        .take(32)
        .copied()
        .collect()
}

fn md5(parts: &[&[u8]]) -> [u8; 16] {
    use md5::Digest;
    let mut h = md5::Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn rc4(key: &[u8], data: &[u8]) -> Vec<u8> {
    use rc4::{KeyInit, StreamCipher};
    let mut out = data.to_vec();
    match key.len() {
        5 => rc4::Rc4::<rc4::consts::U5>::new(key.into()).apply_keystream(&mut out),
        10 => rc4::Rc4::<rc4::consts::U10>::new(key.into()).apply_keystream(&mut out),
        n => panic!("no RC4 key of {n} bytes here"),
    }
    out
}

/// A one-page PDF (Helvetica as font F1) with the given content stream, and optionally an
/// encryption dictionary (object 6) and file ID.
fn build_pdf(media: [u32; 2], stream: &[u8], encrypt: Option<(String, String)>) -> Vec<u8> {
    let mut pdf = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    let mut obj = |pdf: &mut Vec<u8>, body: &[u8]| {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n", offsets.len()).as_bytes());
        pdf.extend_from_slice(body);
        pdf.extend_from_slice(b"\nendobj\n");
    };
    obj(&mut pdf, b"<< /Type /Catalog /Pages 2 0 R >>");
    obj(&mut pdf, b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>");
    let page = format!(
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {} {}] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        media[0], media[1]
    );
    obj(&mut pdf, page.as_bytes());
    let mut body = format!("<< /Length {} >>\nstream\n", stream.len()).into_bytes();
    body.extend_from_slice(stream);
    body.extend_from_slice(b"\nendstream");
    obj(&mut pdf, &body);
    obj(
        &mut pdf,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    );
    let mut trailer_extra = String::new();
    if let Some((dict, id)) = &encrypt {
        obj(&mut pdf, dict.as_bytes());
        trailer_extra = format!(" /Encrypt 6 0 R /ID [<{id}> <{id}>]");
    }
    let xref = pdf.len();
    pdf.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", offsets.len() + 1).as_bytes(),
    );
    for off in &offsets {
        pdf.extend_from_slice(format!("{off:010} 00000 n \n").as_bytes());
    }
    let trailer = format!(
        "trailer\n<< /Size {} /Root 1 0 R{trailer_extra} >>\nstartxref\n{xref}\n%%EOF\n",
        offsets.len() + 1
    );
    pdf.extend_from_slice(trailer.as_bytes());
    pdf
}

/// A one-page PDF whose content stream is encrypted for user password `user_pw` (PDF 1.7
/// §7.6.3, algorithms 2, 3 and 4).
pub(crate) fn encrypted_pdf(user_pw: &[u8], text: &str) -> Vec<u8> {
    let id = *b"0123456789abcdef";
    let p: i32 = -44; // print + copy allowed, the rest not
    let owner_key = &md5(&[&padded(b"owner")])[..5];
    let o = rc4(owner_key, &padded(user_pw));
    let key = md5(&[&padded(user_pw), &o, &p.to_le_bytes(), &id])[..5].to_vec();
    let u = rc4(&key, &PAD);
    let object_key = md5(&[&key, &4u32.to_le_bytes()[..3], &[0, 0]])[..10].to_vec();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02X}")).collect::<String>();
    let content = format!("BT /F1 24 Tf 20 100 Td ({text}) Tj ET");
    let stream = rc4(&object_key, content.as_bytes());
    let dict = format!(
        "<< /Filter /Standard /V 1 /R 2 /O <{}> /U <{}> /P {p} >>",
        hex(&o),
        hex(&u)
    );
    build_pdf([300, 200], &stream, Some((dict, hex(&id))))
}

#[test]
fn a_password_protected_pdf_fails_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.pdf");
    std::fs::write(&path, encrypted_pdf(b"sesame", "Hidden words")).unwrap();

    // The file really is encrypted: with its password PDFium reads it, without it refuses.
    let (pdfium, _) = extract::pdfium::load(Some(&common::pdfium_path())).unwrap();
    let doc = pdfium
        .load_pdf_from_file(&path, Some("sesame"))
        .expect("opens with its password");
    assert_eq!(
        doc.pages().get(0).unwrap().text().unwrap().all().trim(),
        "Hidden words"
    );
    drop(doc);
    assert!(pdfium.load_pdf_from_file(&path, None).is_err());

    let err = expect_failure(&extractor(), &path);
    assert!(
        matches!(err, ExtractError::Encrypted { .. }) && err.is_permanent(),
        "{err}"
    );
    assert_eq!(err.reason(), "password protected");
    assert!(err.to_string().contains("password"), "{err}");
}

// ---- a renderer that crashes or hangs costs one file ------------------------------------------

/// One file's result and how many pages reached the sink.
type Outcome = (Result<extract::DocumentInfo, ExtractError>, usize);

/// Runs the files in order as the pipeline would: each gets its outcome, none stops the rest.
fn run_queue(ex: &Extractor, files: &[PathBuf]) -> Vec<Outcome> {
    files
        .iter()
        .map(|f| {
            let mut pages = 0;
            let r = ex.extract(f, &mut |ev| {
                if let ExtractEvent::Page(_) = ev {
                    pages += 1;
                }
                ControlFlow::Continue(())
            });
            (r, pages)
        })
        .collect()
}

/// Runs `before`, then a copy of asyRefCard.pdf on which the worker crashes or hangs, then
/// `after`, all through one extractor (returned, to count its workers).
fn queue_with_a_bad_file(
    fault: &str,
    timeout: Duration,
    before: &[&str],
    after: &[&str],
) -> (tempfile::TempDir, Extractor, Vec<Outcome>) {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("hostile.pdf");
    std::fs::copy(common::corpus().join("asyRefCard.pdf"), &bad).unwrap();
    let mut opts = options();
    opts.render_timeout = timeout;
    opts.worker_env.push((
        extract::TEST_FAULT_ENV.into(),
        format!("{fault}:hostile.pdf"),
    ));
    let ex = Extractor::new(opts).unwrap();
    let mut files: Vec<PathBuf> = before.iter().map(|n| common::corpus().join(n)).collect();
    files.push(bad);
    files.extend(after.iter().map(|n| common::corpus().join(n)));
    let results = run_queue(&ex, &files);
    (dir, ex, results)
}

/// The file the worker died on fails for good, and the error names it and the signal.
fn assert_crashed_on_hostile_pdf(err: &ExtractError) {
    assert!(
        matches!(err, ExtractError::Crashed { .. }) && err.is_permanent(),
        "{err}"
    );
    assert!(
        err.to_string().contains("hostile.pdf") && err.to_string().contains("SIGABRT"),
        "{err}"
    );
}

#[test]
fn a_renderer_that_crashes_fails_its_file_and_the_next_file_is_processed() {
    let (_dir, ex, results) = queue_with_a_bad_file(
        "crash",
        Duration::from_secs(300),
        &[],
        &["asyRefCard.pdf", "xfig-howto.pdf"],
    );
    let (first, pages) = &results[0];
    assert_crashed_on_hostile_pdf(first.as_ref().expect_err("the crashing file fails"));
    assert_eq!(*pages, 1, "the page sent before the crash was delivered");
    assert_eq!(
        results[1].0.as_ref().map(|i| i.num_pages).ok(),
        Some(3),
        "the same document, unharmed, renders"
    );
    assert_eq!(results[1].1, 3);
    assert_eq!(results[2].0.as_ref().map(|i| i.num_pages).ok(), Some(24));
    assert_eq!(results[2].1, 24);
    assert_eq!(
        ex.workers_started(),
        2,
        "the crashed worker was replaced, and its replacement served both later files"
    );
}

#[test]
fn a_crash_in_a_reused_worker_fails_its_file_only_and_delivers_no_page_twice() {
    // The worker that rendered the first file is reused for the hostile one and dies on it; the
    // file gets one more try in a fresh worker (a reused one may die of what earlier files left
    // behind), which dies too, so the file fails. The page that reached the sink before the
    // first crash is not sent again by the second try.
    let (_dir, ex, results) = queue_with_a_bad_file(
        "crash",
        Duration::from_secs(300),
        &["xfig-howto.pdf"],
        &["asyRefCard.pdf"],
    );
    assert_eq!(results[0].0.as_ref().map(|i| i.num_pages).ok(), Some(24));
    let (second, pages) = &results[1];
    assert_crashed_on_hostile_pdf(second.as_ref().expect_err("the crashing file fails"));
    assert_eq!(*pages, 1, "page 1 reached the sink once, across both tries");
    assert_eq!(results[2].0.as_ref().map(|i| i.num_pages).ok(), Some(3));
    assert_eq!(results[2].1, 3);
    assert_eq!(
        ex.workers_started(),
        3,
        "one for the first file, a fresh one for the retry, one after that"
    );
}

#[test]
fn one_worker_serves_a_queue_of_documents_of_every_kind() {
    // Starting a worker costs about a page's rendering; a worker that finished a document
    // cleanly (or refused it with a reason) takes the next one. What comes out is what a
    // fresh worker gives.
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "plain words here").unwrap();
    let corrupt = dir.path().join("broken.pdf");
    // Intact header and end marker, damaged body: the worker's PDFium refuses it.
    let mut garbage = b"%PDF-1.5\n".to_vec();
    garbage.extend((0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    garbage.extend_from_slice(b"\n%%EOF\n");
    std::fs::write(&corrupt, garbage).unwrap();
    let ex = extractor();
    let first = collect(&ex, &common::corpus().join("asyRefCard.pdf")).unwrap();
    assert_eq!(
        collect(&ex, &notes).unwrap().pages[0].text,
        "plain words here"
    );
    assert_eq!(
        collect(&ex, &common::corpus().join("scatter-plot.png"))
            .unwrap()
            .pages
            .len(),
        1
    );
    assert!(matches!(
        expect_failure(&ex, &corrupt),
        ExtractError::Corrupt { .. }
    ));
    let again = collect(&ex, &common::corpus().join("asyRefCard.pdf")).unwrap();
    assert_eq!(ex.workers_started(), 1, "one worker for all five files");
    for (a, b) in first.pages.iter().zip(&again.pages) {
        assert_eq!(
            (&a.text, &a.image),
            (&b.text, &b.image),
            "page {}",
            a.number
        );
    }
    assert_eq!(again.pages.len(), 3);
    // Clones share the kept worker.
    let clone = ex.clone();
    collect(&clone, &notes).unwrap();
    assert_eq!(clone.workers_started(), 1);
}

#[test]
fn a_renderer_that_hangs_is_stopped_at_the_time_limit_and_the_next_file_is_processed() {
    // Generous for the healthy file on a busy machine; the hanging one never finishes.
    // The hostile file comes second, to a reused worker: a hang is not retried.
    let (_dir, ex, mut results) = queue_with_a_bad_file(
        "hang",
        Duration::from_secs(20),
        &["asyRefCard.pdf"],
        &["asyRefCard.pdf"],
    );
    assert_eq!(results.remove(0).1, 3);
    let err = results[0].0.as_ref().expect_err("the hanging file fails");
    assert!(
        matches!(err, ExtractError::Timeout { seconds: 20, .. }) && err.is_permanent(),
        "{err}"
    );
    assert_eq!(err.reason(), "renderer timed out after 20 s");
    assert_eq!(
        results[1].0.as_ref().map(|i| i.num_pages).ok(),
        Some(3),
        "the next file is processed"
    );
    assert_eq!(results[1].1, 3);
    assert_eq!(
        ex.workers_started(),
        2,
        "the hung worker was killed, not retried, and replaced for the next file"
    );
}

#[test]
fn downstream_time_does_not_count_against_the_render_limit() {
    // A slow sink (the model embedding a page) must not make the renderer time out.
    let mut opts = options();
    opts.render_timeout = Duration::from_secs(5);
    let ex = Extractor::new(opts).unwrap();
    let mut pages = 0;
    let info = ex
        .extract(&common::corpus().join("asyRefCard.pdf"), &mut |ev| {
            if let ExtractEvent::Page(_) = ev {
                pages += 1;
                std::thread::sleep(Duration::from_millis(2500));
            }
            ControlFlow::Continue(())
        })
        .expect("7.5 s in the sink, a fraction of a second of rendering");
    assert_eq!((info.num_pages, pages), (3, 3));
}

#[test]
fn a_page_too_big_for_the_memory_bound_fails_its_file_only() {
    // A 3800-pt (53-inch) square poster renders to 7917×7917 pixels at 150 DPI: 188 MB for
    // PDFium's bitmap (resized in place, never copied), more than a 200 MiB bound allows with
    // the worker's own memory. The worker runs out, the agent reports it for that file and
    // carries on.
    let dir = tempfile::tempdir().unwrap();
    let poster = dir.path().join("poster.pdf");
    std::fs::write(
        &poster,
        build_pdf(
            [3800, 3800],
            b"BT /F1 200 Tf 100 1500 Td (POSTER) Tj ET",
            None,
        ),
    )
    .unwrap();
    let mut opts = options();
    opts.worker_memory_mb = 200;
    let ex = Extractor::new(opts).unwrap();
    // A worker that already rendered a document takes the poster (and, dying on it, hands it
    // to a fresh one before the file is blamed).
    assert_eq!(
        collect(&ex, &common::corpus().join("xfig-howto.pdf"))
            .unwrap()
            .pages
            .len(),
        24
    );
    let err = expect_failure(&ex, &poster);
    assert!(
        matches!(err, ExtractError::OutOfMemory { limit_mb: 200, .. }) && err.is_permanent(),
        "{err}"
    );
    assert_eq!(
        err.reason(),
        "renderer needed more than its 200 MiB memory bound (extract.worker_memory_mb)"
    );
    assert_eq!(
        collect(&ex, &common::corpus().join("asyRefCard.pdf"))
            .unwrap()
            .info
            .num_pages,
        3
    );
    // With the default bound the poster is fine, and its big text shows.
    let got = collect(&extractor(), &poster).unwrap();
    assert_eq!(got.pages[0].text.trim(), "POSTER");
    assert!(ink(got.pages[0].image.as_ref().unwrap()) > 0.001);
}
