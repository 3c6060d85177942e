//! Checks the parent can make without parsing: the file exists, is not empty or too large, its
//! first bytes match its extension, and a PDF still has its end-of-file marker.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::protocol::WorkKind;
use super::ExtractError;
use crate::types::DocFormat;

const HEAD: usize = 8192;
/// PDF writers put `%%EOF` at the very end; a little slack for trailing junk.
const PDF_TAIL: u64 = 4096;

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
const OLE_MAGIC: &[u8] = &[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1];

/// Validates the file against its extension and says how the worker should treat it.
pub(crate) fn check_file(
    path: &Path,
    format: DocFormat,
    max_bytes: u64,
) -> Result<WorkKind, ExtractError> {
    let unreadable = |source| ExtractError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(ExtractError::Unsupported {
            path: path.to_path_buf(),
            detail: "not a regular file".into(),
        });
    }
    let size = meta.len();
    if size == 0 {
        return Err(ExtractError::Empty {
            path: path.to_path_buf(),
        });
    }
    if size > max_bytes {
        return Err(ExtractError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: max_bytes,
        });
    }
    let mut head = Vec::with_capacity(HEAD);
    (&mut file)
        .take(HEAD as u64)
        .read_to_end(&mut head)
        .map_err(unreadable)?;
    let lie = |expected: &str| ExtractError::WrongContent {
        path: path.to_path_buf(),
        expected: expected.to_string(),
        found: describe(&head).to_string(),
    };
    match format {
        DocFormat::Pdf => {
            if !is_pdf(&head) {
                return Err(lie("a PDF document"));
            }
            let mut tail = Vec::new();
            file.seek(SeekFrom::Start(size.saturating_sub(PDF_TAIL)))
                .map_err(unreadable)?;
            file.read_to_end(&mut tail).map_err(unreadable)?;
            if memchr(&tail, b"%%EOF").is_none() {
                return Err(ExtractError::Truncated {
                    path: path.to_path_buf(),
                    detail: "a PDF must end with %%EOF; this one stops short (still being copied, or cut off)".into(),
                });
            }
            Ok(WorkKind::Pdf)
        }
        // Any image format is decoded by its content; only non-images are refused.
        DocFormat::Image => match image::guess_format(&head) {
            Ok(_) => Ok(WorkKind::Image),
            Err(_) => Err(lie("an image")),
        },
        DocFormat::Docx
        | DocFormat::Pptx
        | DocFormat::Xlsx
        | DocFormat::Odt
        | DocFormat::Odp
        | DocFormat::Ods => {
            if head.starts_with(ZIP_MAGIC) {
                Ok(WorkKind::OfficeText)
            } else {
                Err(lie(&format!("a .{} office package", format.as_str())))
            }
        }
        DocFormat::Doc | DocFormat::Ppt => {
            if head.starts_with(OLE_MAGIC) {
                Ok(WorkKind::OfficeText)
            } else {
                Err(lie(&format!("a legacy .{} office file", format.as_str())))
            }
        }
        DocFormat::Text
        | DocFormat::Markdown
        | DocFormat::Html
        | DocFormat::Csv
        | DocFormat::Json => {
            if looks_like_text(&head) {
                Ok(WorkKind::Text)
            } else {
                Err(lie("text"))
            }
        }
    }
}

fn is_pdf(head: &[u8]) -> bool {
    // PDFium, like Acrobat, accepts the header anywhere in the first KiB.
    memchr(&head[..head.len().min(1024)], b"%PDF-").is_some()
}

fn looks_like_text(head: &[u8]) -> bool {
    let utf16_bom = head.starts_with(&[0xFF, 0xFE]) || head.starts_with(&[0xFE, 0xFF]);
    utf16_bom || (!head.contains(&0) && !is_pdf(head) && image::guess_format(head).is_err())
}

/// What the first bytes look like, for the "extension lies" message.
pub(crate) fn describe(head: &[u8]) -> &'static str {
    if is_pdf(head) {
        return "a PDF document";
    }
    if let Ok(f) = image::guess_format(head) {
        return match f {
            image::ImageFormat::Png => "a PNG image",
            image::ImageFormat::Jpeg => "a JPEG image",
            image::ImageFormat::Gif => "a GIF image",
            image::ImageFormat::WebP => "a WebP image",
            image::ImageFormat::Tiff => "a TIFF image",
            image::ImageFormat::Bmp => "a BMP image",
            _ => "an image",
        };
    }
    if head.starts_with(ZIP_MAGIC) {
        return "a ZIP package";
    }
    if head.starts_with(OLE_MAGIC) {
        return "a legacy Office (OLE) file";
    }
    if head.contains(&0) {
        return "binary data";
    }
    "text"
}

fn memchr(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_what_the_bytes_are() {
        assert_eq!(describe(b"%PDF-1.7\n"), "a PDF document");
        assert_eq!(describe(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), "a PNG image");
        assert_eq!(describe(b"PK\x03\x04rest"), "a ZIP package");
        assert_eq!(describe(b"hello world"), "text");
        assert_eq!(describe(b"a\0b"), "binary data");
        assert!(looks_like_text(b"plain words"));
        assert!(!looks_like_text(b"%PDF-1.4"));
    }
}
