//! Office files. With LibreOffice (`soffice`), the agent converts them to PDF (a separate,
//! time-limited process) and they go through the PDF path. Without it, the worker reads the
//! text straight out of the OOXML or ODF package (a zip of XML parts): text only, no pages to
//! look at, and a note saying visual indexing needs LibreOffice.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use quick_xml::events::Event;
use quick_xml::Reader;

use super::protocol::{Emit, WorkerFailure};
use super::{DocumentInfo, ExtractError, Page};
use crate::types::DocFormat;

pub(crate) const NEEDS_LIBREOFFICE: &str =
    "visual indexing needs LibreOffice (soffice not found): only the text was indexed; install LibreOffice or set extract.libreoffice";

/// A decompressed XML part larger than this is refused (zip bombs).
const MAX_PART_BYTES: u64 = 256 << 20;

/// LibreOffice's `soffice`: the configured path, then PATH, then the usual install places.
pub fn find_soffice(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(c) = configured {
        if c.is_file() {
            return Some(c.to_path_buf());
        }
        tracing::warn!(path = %c.display(), "extract.libreoffice does not exist; looking elsewhere");
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .flat_map(|d| [d.join("soffice"), d.join("libreoffice")])
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        [
            "/Applications/LibreOffice.app/Contents/MacOS/soffice",
            "/usr/lib/libreoffice/program/soffice",
            "/opt/libreoffice/program/soffice",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    })
}

/// A PDF converted by LibreOffice, in a private temporary folder removed on drop.
#[derive(Debug)]
pub(crate) struct Converted {
    dir: PathBuf,
    pub pdf: PathBuf,
}

impl Drop for Converted {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `soffice --headless --convert-to pdf` with its own profile (so a running LibreOffice
/// does not get in the way) under the render time limit.
pub(crate) fn convert_to_pdf(
    soffice: &Path,
    path: &Path,
    timeout: Duration,
) -> Result<Converted, ExtractError> {
    let failed = |detail: String| ExtractError::Conversion {
        path: path.to_path_buf(),
        detail,
    };
    let dir = super::isolate::private_temp_dir()
        .map_err(|e| failed(format!("no temporary folder: {e}")))?;
    let out_dir = dir.join("out");
    let mut converted = Converted {
        dir: dir.clone(),
        pdf: PathBuf::new(),
    };
    let log = std::fs::File::create(dir.join("soffice.log")).map_err(|e| failed(e.to_string()))?;
    let log2 = log.try_clone().map_err(|e| failed(e.to_string()))?;
    let mut cmd = Command::new(soffice);
    cmd.arg(format!(
        "-env:UserInstallation=file://{}",
        dir.join("profile").display()
    ))
    .args([
        "--headless",
        "--norestore",
        "--nolockcheck",
        "--convert-to",
        "pdf",
        "--outdir",
    ])
    .arg(&out_dir)
    .arg(path)
    .stdin(Stdio::null())
    .stdout(log)
    .stderr(log2);
    let status = super::isolate::run_with_timeout(cmd, timeout).map_err(|e| match e {
        super::isolate::TimedRun::Spawn(e) => {
            failed(format!("could not start {}: {e}", soffice.display()))
        }
        super::isolate::TimedRun::Timeout => {
            failed(format!("took longer than {} s", timeout.as_secs()))
        }
    })?;
    let stem = path.file_stem().unwrap_or_default();
    let pdf = out_dir.join(stem).with_extension("pdf");
    if !status.success() || !pdf.is_file() {
        let log = std::fs::read_to_string(dir.join("soffice.log")).unwrap_or_default();
        let tail: String = log
            .chars()
            .rev()
            .take(500)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(failed(format!(
            "{status}, no PDF written; soffice said: {}",
            tail.trim()
        )));
    }
    converted.pdf = pdf;
    Ok(converted)
}

/// Text pages straight from an OOXML or ODF package (inside the worker).
pub(crate) fn extract_text(
    path: &Path,
    format: DocFormat,
    notes: Vec<String>,
    out: &mut dyn Emit,
) -> Result<(), WorkerFailure> {
    let file = std::fs::File::open(path).map_err(|e| WorkerFailure::Unreadable {
        detail: e.to_string(),
    })?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| corrupt(format, format!("not a valid package: {e}")))?;
    let pages = match format {
        DocFormat::Docx => vec![xml_text(
            &part(&mut zip, format, "word/document.xml")?,
            &DOCX,
        )],
        DocFormat::Pptx => numbered_parts(&zip, "ppt/slides/slide")
            .into_iter()
            .map(|name| Ok(xml_text(&part(&mut zip, format, &name)?, &PPTX)))
            .collect::<Result<_, _>>()?,
        DocFormat::Xlsx => {
            let shared = match zip.index_for_name("xl/sharedStrings.xml") {
                Some(_) => shared_strings(&part(&mut zip, format, "xl/sharedStrings.xml")?),
                None => Vec::new(),
            };
            numbered_parts(&zip, "xl/worksheets/sheet")
                .into_iter()
                .map(|name| Ok(sheet_text(&part(&mut zip, format, &name)?, &shared)))
                .collect::<Result<_, _>>()?
        }
        DocFormat::Odt | DocFormat::Odp | DocFormat::Ods => {
            let rules = match format {
                DocFormat::Odp => &ODP,
                DocFormat::Ods => &ODS,
                _ => &ODT,
            };
            walk(&part(&mut zip, format, "content.xml")?, rules)
        }
        other => {
            return Err(WorkerFailure::Unsupported {
                detail: format!(".{} needs LibreOffice", other.as_str()),
            })
        }
    };
    // A presentation without slides has no pages (and gives no records).
    let info = DocumentInfo {
        format,
        num_pages: pages.len() as u32,
        title: None,
        visual: false,
        notes,
    };
    out.info(&info)?;
    for (i, text) in pages.into_iter().enumerate() {
        out.page(&Page {
            number: i as u32 + 1,
            image: None,
            text,
            chunks: Vec::new(),
        })?;
    }
    Ok(())
}

fn corrupt(format: DocFormat, detail: String) -> WorkerFailure {
    WorkerFailure::Corrupt {
        format: format!(".{} package", format.as_str()),
        detail,
    }
}

fn part(
    zip: &mut zip::ZipArchive<std::fs::File>,
    format: DocFormat,
    name: &str,
) -> Result<Vec<u8>, WorkerFailure> {
    let entry = zip
        .by_name(name)
        .map_err(|e| corrupt(format, format!("{name}: {e}")))?;
    let mut bytes = Vec::new();
    entry
        .take(MAX_PART_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| corrupt(format, format!("{name}: {e}")))?;
    if bytes.len() as u64 > MAX_PART_BYTES {
        return Err(corrupt(
            format,
            format!("{name} unpacks to more than {} MiB", MAX_PART_BYTES >> 20),
        ));
    }
    Ok(bytes)
}

/// `prefix1.xml`, `prefix2.xml`, ... in numeric order (slides, sheets).
fn numbered_parts(zip: &zip::ZipArchive<std::fs::File>, prefix: &str) -> Vec<String> {
    let mut found: Vec<(u32, String)> = zip
        .file_names()
        .filter_map(|n| {
            let num = n.strip_prefix(prefix)?.strip_suffix(".xml")?.parse().ok()?;
            Some((num, n.to_string()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, n)| n).collect()
}

/// How text is laid out in one XML vocabulary (local names, prefixes ignored).
struct Rules {
    /// Text counts only inside these elements (None: everywhere).
    text_in: Option<&'static [&'static str]>,
    /// Text inside these is skipped (deleted text, field codes, annotations).
    skip: &'static [&'static str],
    /// End of these elements ends a line.
    line_end: &'static [&'static str],
    /// These (empty) elements stand for a tab, a line break or a space.
    tab: &'static [&'static str],
    newline: &'static [&'static str],
    space: &'static [&'static str],
    /// Each of these starts a new page (ODP slides, ODS sheets).
    page: Option<&'static str>,
}

const DOCX: Rules = Rules {
    text_in: Some(&["t"]),
    skip: &["delText", "instrText"],
    line_end: &["p"],
    tab: &["tab"],
    newline: &["br", "cr"],
    space: &[],
    page: None,
};
const PPTX: Rules = Rules {
    text_in: Some(&["t"]),
    skip: &[],
    line_end: &["p"],
    tab: &[],
    newline: &["br"],
    space: &[],
    page: None,
};
const ODT: Rules = Rules {
    text_in: Some(&["body"]),
    skip: &["annotation", "tracked-changes"],
    line_end: &["p", "h", "table-row"],
    tab: &["tab", "table-cell"],
    newline: &["line-break"],
    space: &["s"],
    page: None,
};
const ODP: Rules = Rules {
    page: Some("page"),
    ..ODT
};
const ODS: Rules = Rules {
    page: Some("table"),
    ..ODT
};

/// All text of one XML part, laid out by `rules`, as pages.
fn walk(xml: &[u8], rules: &Rules) -> Vec<String> {
    let mut reader = Reader::from_reader(xml);
    let mut buf = Vec::new();
    let mut pages: Vec<String> = Vec::new();
    let mut cur = String::new();
    let (mut inside, mut skipping, mut seen_page) = (0usize, 0usize, false);
    let has = |list: &[&str], name: &[u8]| list.iter().any(|n| n.as_bytes() == name);
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e)) => {
                let name = e.local_name();
                let name = name.as_ref();
                if rules.page.is_some_and(|p| p.as_bytes() == name) {
                    // Anything before the first slide or sheet joins it.
                    if seen_page {
                        pages.push(std::mem::take(&mut cur));
                    }
                    seen_page = true;
                }
                if rules.text_in.is_some_and(|l| has(l, name)) {
                    inside += 1;
                }
                if has(rules.skip, name) {
                    skipping += 1;
                }
            }
            Ok(Event::Empty(e)) => {
                let name = e.local_name();
                let name = name.as_ref();
                if has(rules.tab, name) {
                    cur.push('\t');
                } else if has(rules.newline, name) || has(rules.line_end, name) {
                    cur.push('\n');
                } else if has(rules.space, name) {
                    cur.push(' ');
                }
            }
            Ok(Event::End(e)) => {
                let name = e.local_name();
                let name = name.as_ref();
                if rules.text_in.is_some_and(|l| has(l, name)) {
                    inside = inside.saturating_sub(1);
                }
                if has(rules.skip, name) {
                    skipping = skipping.saturating_sub(1);
                }
                if has(rules.line_end, name) {
                    cur.push('\n');
                } else if has(rules.tab, name) {
                    cur.push('\t');
                }
            }
            Ok(Event::Text(t)) if skipping == 0 && (rules.text_in.is_none() || inside > 0) => {
                match t.unescape() {
                    Ok(s) => cur.push_str(&s),
                    Err(_) => cur.push_str(&String::from_utf8_lossy(&t)),
                }
            }
            Ok(Event::CData(t)) if skipping == 0 && (rules.text_in.is_none() || inside > 0) => {
                cur.push_str(&String::from_utf8_lossy(&t));
            }
            Ok(Event::Eof) => break,
            // A damaged part still gives the text read so far.
            Err(_) => break,
            _ => {}
        }
        buf.clear();
    }
    pages.push(cur);
    pages
}

fn xml_text(xml: &[u8], rules: &Rules) -> String {
    walk(xml, rules).join("\n")
}

/// `xl/sharedStrings.xml`: one string per `si`, phonetic runs left out.
fn shared_strings(xml: &[u8]) -> Vec<String> {
    let mut reader = Reader::from_reader(xml);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let (mut cur, mut in_t, mut in_rph) = (String::new(), false, false);
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e)) => match e.local_name().as_ref() {
                b"si" => cur.clear(),
                b"t" => in_t = true,
                b"rPh" => in_rph = true,
                _ => {}
            },
            Ok(Event::End(e)) => match e.local_name().as_ref() {
                b"si" => out.push(std::mem::take(&mut cur)),
                b"t" => in_t = false,
                b"rPh" => in_rph = false,
                _ => {}
            },
            Ok(Event::Text(t)) if in_t && !in_rph => {
                cur.push_str(&t.unescape().map(|s| s.into_owned()).unwrap_or_default())
            }
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
        buf.clear();
    }
    out
}

/// One worksheet as lines of tab-separated cell values.
fn sheet_text(xml: &[u8], shared: &[String]) -> String {
    let mut reader = Reader::from_reader(xml);
    let mut buf = Vec::new();
    let mut out = String::new();
    let mut cell_type: Vec<u8> = Vec::new();
    let (mut in_v, mut in_is_t, mut first_in_row) = (false, false, true);
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e)) => match e.local_name().as_ref() {
                b"row" => first_in_row = true,
                b"c" => {
                    cell_type = e
                        .try_get_attribute("t")
                        .ok()
                        .flatten()
                        .map(|a| a.value.into_owned())
                        .unwrap_or_default();
                    if !first_in_row {
                        out.push('\t');
                    }
                    first_in_row = false;
                }
                b"v" => in_v = true,
                b"t" => in_is_t = true,
                _ => {}
            },
            Ok(Event::End(e)) => match e.local_name().as_ref() {
                b"row" => out.push('\n'),
                b"v" => in_v = false,
                b"t" => in_is_t = false,
                _ => {}
            },
            Ok(Event::Text(t)) if in_v || in_is_t => {
                let s = t.unescape().map(|s| s.into_owned()).unwrap_or_default();
                if in_v && cell_type == b"s" {
                    if let Some(v) = s.trim().parse::<usize>().ok().and_then(|i| shared.get(i)) {
                        out.push_str(v);
                    }
                } else {
                    out.push_str(&s);
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
        buf.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docx_text_skips_deleted_text_and_field_codes() {
        let xml = br#"<w:document xmlns:w="w"><w:body><w:p><w:r><w:t>Hello</w:t><w:tab/><w:t xml:space="preserve">big </w:t></w:r><w:r><w:delText>gone</w:delText><w:instrText>PAGE</w:instrText><w:t>world &amp; more</w:t></w:r></w:p><w:p><w:r><w:t>Next</w:t></w:r></w:p></w:body></w:document>"#;
        assert_eq!(xml_text(xml, &DOCX), "Hello\tbig world & more\nNext\n");
    }

    #[test]
    fn odp_gives_one_page_per_slide() {
        let xml = br#"<office:document-content><office:body><office:presentation><draw:page><draw:frame><text:p>One<text:s/>a</text:p></draw:frame></draw:page><draw:page><text:p>Two</text:p><office:annotation><text:p>note</text:p></office:annotation></draw:page></office:presentation></office:body></office:document-content>"#;
        let pages = walk(xml, &ODP);
        assert_eq!(
            pages.iter().map(|p| p.trim()).collect::<Vec<_>>(),
            vec!["One a", "Two"]
        );
    }

    #[test]
    fn xlsx_cells_resolve_shared_strings() {
        let shared = shared_strings(
            br#"<sst><si><t>name</t></si><si><r><t>ri</t></r><r><t>ch</t></r><rPh><t>x</t></rPh></si></sst>"#,
        );
        assert_eq!(shared, vec!["name", "rich"]);
        let sheet = br#"<worksheet><sheetData><row><c t="s"><v>0</v></c><c><v>42</v></c></row><row><c t="inlineStr"><is><t>inline</t></is></c><c t="s"><v>1</v></c></row></sheetData></worksheet>"#;
        assert_eq!(sheet_text(sheet, &shared), "name\t42\ninline\trich\n");
    }
}
