//! PDF pages through PDFium (inside the worker): rendered at the configured DPI, resized for the
//! model, and their text.

use std::path::Path;

use pdfium_render::prelude::*;

use super::protocol::{Emit, WorkerFailure};
use super::{DocumentInfo, Page};
use crate::embed::preprocess::{resize_pixels, ChannelOrder, Pixels};
use crate::types::DocFormat;

/// Longest side of a rendered page, in pixels (a US Letter page at 150 DPI is 1650).
const MAX_RENDER_SIDE: f32 = 8000.0;

/// What the PDF stage needs to know.
pub(crate) struct PdfJob<'a> {
    pub path: &'a Path,
    pub format: DocFormat,
    pub render_dpi: u32,
    pub image_size: u32,
    pub max_pages: u32,
    pub notes: Vec<String>,
    pub only_page: Option<u32>,
    pub keep_aspect: bool,
}

/// Renders every page in order, handing each to `out` as soon as it is ready.
pub(crate) fn extract(
    pdfium: &Pdfium,
    job: PdfJob<'_>,
    out: &mut dyn Emit,
) -> Result<(), WorkerFailure> {
    let doc = pdfium
        .load_pdf_from_file(job.path, None)
        .map_err(load_failure)?;
    let pages = doc.pages();
    let num_pages = pages.len().max(0) as u32;
    if num_pages > job.max_pages {
        return Err(WorkerFailure::TooManyPages { pages: num_pages });
    }
    let title = doc
        .metadata()
        .get(PdfDocumentMetadataTagType::Title)
        .map(|t| t.value().trim().to_string())
        .filter(|t| !t.is_empty());
    let info = DocumentInfo {
        format: job.format,
        num_pages,
        title,
        visual: true,
        notes: job.notes,
    };
    out.info(&info)?;

    let dpi_scale = job.render_dpi as f32 / 72.0;
    // One bitmap buffer for the whole document, grown as needed: PDFium renders into it and
    // the resize reads it in place, with no copy in between.
    let mut buffer: Vec<u8> = Vec::new();
    // A thumbnail asks for one page: the others are not even loaded.
    let numbers = match job.only_page {
        Some(n) => n.max(1)..=n.min(num_pages),
        None => 1..=num_pages,
    };
    for number in numbers {
        let page = pages
            .get((number - 1) as PdfPageIndex)
            .map_err(|e| WorkerFailure::Corrupt {
                format: "PDF".into(),
                detail: format!("page {number}: load: {e}"),
            })?;
        let corrupt = |what: &str, e: PdfiumError| WorkerFailure::Corrupt {
            format: "PDF".into(),
            detail: format!("page {number}: {what}: {e}"),
        };
        // Posters and CAD sheets would need gigabytes at full DPI, and the model sees
        // `image_size` pixels anyway: such pages are rendered smaller.
        let longest = page.width().value.max(page.height().value).max(1.0);
        let scale = dpi_scale.min(MAX_RENDER_SIDE / longest);
        // The size pdfium-render's `scale_page_by_factor` gives.
        let width = ((page.width().value * scale).round() as i32).max(1);
        let height = ((page.height().value * scale).round() as i32).max(1);
        // PDFium's native 3-byte BGR, as pypdfium2 renders by default: asking PDFium to
        // reverse the byte order takes it off its fast paths; the resize swaps for free.
        let stride = (width as usize * 3).div_ceil(4) * 4;
        let len = stride * height as usize;
        if buffer.len() < len {
            buffer.resize(len, 0);
        }
        let config = PdfRenderConfig::new()
            .set_fixed_size(width, height)
            .set_format(PdfBitmapFormat::BGR);
        {
            let mut bitmap =
                PdfBitmap::from_bytes(width, height, PdfBitmapFormat::BGR, &mut buffer[..len])
                    .map_err(|e| corrupt("bitmap", e))?;
            page.render_into_bitmap_with_config(&mut bitmap, &config)
                .map_err(|e| corrupt("render", e))?;
        }
        let (out_w, out_h) =
            super::fitted_size(width as u32, height as u32, job.image_size, job.keep_aspect);
        let image = resize_pixels(
            Pixels {
                bytes: &buffer[..len],
                width: width as usize,
                height: height as usize,
                stride,
                order: ChannelOrder::Bgr,
            },
            out_w,
            out_h,
        );
        let text = page_text(&page).map_err(|e| corrupt("text", e))?;
        out.page(&Page {
            number,
            image: Some(image),
            text,
            chunks: Vec::new(),
        })?;
    }
    Ok(())
}

/// Every character PDFium finds on the page, in content order, with the spaces and line breaks
/// it infers: what `FPDFText_GetText` (pypdfium2's `get_text_range`, which DocuSearch used)
/// returns. pdfium-render's `all()` would drop text outside the page box, and it does not
/// expose the text page's handle for one `FPDFText_GetText` call, so the page's character
/// list is read as `FPDFText_GetText` reads it. Line ends become `\n`.
fn page_text(page: &PdfPage) -> Result<String, PdfiumError> {
    let text = page.text()?;
    let chars = text.chars();
    let mut out = String::with_capacity(chars.len());
    out.extend(
        chars
            .iter()
            .filter_map(|c| c.unicode_char())
            // Characters PDFium found no Unicode value for (U+0000) are not in its text
            // buffer, so FPDFText_GetText leaves them out; xfig-howto.pdf has some.
            .filter(|&c| c != '\0')
            // FPDFText_GetText writes PDFium's end-of-line hyphen marker (U+0002) as U+FFFE.
            .map(|c| if c == '\u{2}' { '\u{fffe}' } else { c }),
    );
    Ok(out.replace("\r\n", "\n"))
}

fn load_failure(e: PdfiumError) -> WorkerFailure {
    match e {
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::PasswordError) => {
            WorkerFailure::Encrypted
        }
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::FileError) => {
            WorkerFailure::Unreadable {
                detail: "PDFium could not open the file".into(),
            }
        }
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::SecurityError) => {
            WorkerFailure::Unsupported {
                detail: "unsupported PDF security handler".into(),
            }
        }
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::FormatError) => {
            WorkerFailure::Corrupt {
                format: "PDF".into(),
                detail: "PDFium cannot parse it (damaged structure)".into(),
            }
        }
        other => WorkerFailure::Corrupt {
            format: "PDF".into(),
            detail: other.to_string(),
        },
    }
}
