//! Plain-text formats (inside the worker): TXT, Markdown, CSV and JSON as they are, HTML with
//! its markup removed. One text-only page per file.

use std::path::Path;

use super::protocol::{Emit, WorkerFailure};
use super::{DocumentInfo, Page};
use crate::types::DocFormat;

pub(crate) fn extract(
    path: &Path,
    format: DocFormat,
    notes: Vec<String>,
    out: &mut dyn Emit,
) -> Result<(), WorkerFailure> {
    let bytes = std::fs::read(path).map_err(|e| WorkerFailure::Unreadable {
        detail: e.to_string(),
    })?;
    let raw = decode(&bytes);
    let (title, text) = match format {
        DocFormat::Html => html_to_text(&raw),
        _ => (None, raw),
    };
    let info = DocumentInfo {
        format,
        num_pages: 1,
        title,
        visual: false,
        notes,
    };
    out.info(&info)?;
    out.page(&Page {
        number: 1,
        image: None,
        text,
        chunks: Vec::new(),
    })
}

/// UTF-8 (BOM dropped) or UTF-16 with a BOM; anything else is read as UTF-8 with replacement
/// characters rather than refused (old Latin-1 notes are still worth indexing).
pub(crate) fn decode(bytes: &[u8]) -> String {
    let utf16 = |be: bool| {
        let units: Vec<u16> = bytes[2..]
            .chunks_exact(2)
            .map(|c| {
                if be {
                    u16::from_be_bytes([c[0], c[1]])
                } else {
                    u16::from_le_bytes([c[0], c[1]])
                }
            })
            .collect();
        String::from_utf16_lossy(&units)
    };
    if bytes.starts_with(&[0xFF, 0xFE]) {
        utf16(false)
    } else if bytes.starts_with(&[0xFE, 0xFF]) {
        utf16(true)
    } else {
        let b = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]).unwrap_or(bytes);
        String::from_utf8_lossy(b).into_owned()
    }
}

/// The visible text of an HTML page, and its `<title>`. Scripts, styles and comments are
/// dropped; block elements end a line; common entities are decoded.
pub(crate) fn html_to_text(html: &str) -> (Option<String>, String) {
    let mut out = String::with_capacity(html.len() / 2);
    let mut title = None;
    let lower = html.to_ascii_lowercase();
    let mut i = 0;
    while i < html.len() {
        let rest = &html[i..];
        if rest.starts_with("<!--") {
            i += rest.find("-->").map_or(rest.len(), |e| e + 3);
            continue;
        }
        if rest.starts_with('<') {
            let (end, inner_end) = rest
                .find('>')
                .map_or((rest.len(), rest.len()), |e| (e + 1, e));
            let tag = lower[i + 1..i + inner_end].trim_start_matches('/');
            let name: String = tag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            let closing = rest.as_bytes().get(1) == Some(&b'/');
            if !closing && matches!(name.as_str(), "script" | "style" | "title") {
                let close = format!("</{name}");
                let body_end = lower[i + end..]
                    .find(&close)
                    .map_or(html.len(), |p| i + end + p);
                if name == "title" {
                    let t = decode_entities(html[i + end..body_end].trim());
                    title = Some(t.split_whitespace().collect::<Vec<_>>().join(" "))
                        .filter(|t| !t.is_empty());
                }
                i = body_end;
                continue;
            }
            if matches!(
                name.as_str(),
                "p" | "br"
                    | "div"
                    | "li"
                    | "tr"
                    | "h1"
                    | "h2"
                    | "h3"
                    | "h4"
                    | "h5"
                    | "h6"
                    | "table"
                    | "section"
                    | "article"
                    | "pre"
                    | "blockquote"
                    | "hr"
                    | "ul"
                    | "ol"
            ) {
                out.push('\n');
            } else if matches!(name.as_str(), "td" | "th") {
                out.push(' ');
            }
            i += end;
            continue;
        }
        let next = rest.find('<').unwrap_or(rest.len());
        out.push_str(&decode_entities(&rest[..next]));
        i += next;
    }
    (title, out)
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp..];
        let semi = after.find(';').filter(|&p| p <= 10);
        let decoded = semi.and_then(|p| {
            let name = &after[1..p];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some(' '),
                _ if name.starts_with("#x") || name.starts_with("#X") => {
                    u32::from_str_radix(&name[2..], 16)
                        .ok()
                        .and_then(char::from_u32)
                }
                _ if name.starts_with('#') => name[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            c.map(|c| (c, p + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &after[len..];
            }
            None => {
                out.push('&');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_keeps_visible_text_only() {
        let html = "<html><head><title>My &amp; Page</title><style>p{color:red}</style>\
            <script>var x = '<p>no</p>';</script></head><body><!-- hidden --><h1>Head</h1>\
            <p>One&nbsp;two &lt;three&gt; &#233;&#x41;</p><P>Upper</P></body></html>";
        let (title, text) = html_to_text(html);
        assert_eq!(title.as_deref(), Some("My & Page"));
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(words, vec!["Head", "One", "two", "<three>", "éA", "Upper"]);
    }

    #[test]
    fn decodes_boms() {
        assert_eq!(decode(b"\xEF\xBB\xBFhi"), "hi");
        assert_eq!(decode(&[0xFF, 0xFE, b'h', 0, b'i', 0]), "hi");
        assert_eq!(decode(&[0xFE, 0xFF, 0, b'h', 0, b'i']), "hi");
    }
}
