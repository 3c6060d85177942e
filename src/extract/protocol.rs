//! The pipe between the agent and its renderer child.
//!
//! Requests: one JSON object a line on the child's stdin. The reply to each on its stdout:
//! frames of `tag: u8, len: u32 LE, payload`: `I` (document info, JSON), then one `P` per page
//! (`number, width, height, text_len` as u32 LE, the text as UTF-8, then `width*height*3` RGB
//! bytes; width = height = 0 for a text-only page), then `D` (done) or `E` (failure, JSON),
//! after which the child reads the next request.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{DocumentInfo, Page};
use crate::types::DocFormat;

/// How the worker treats the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum WorkKind {
    Pdf,
    Image,
    /// Text from the OOXML/ODF package itself (no LibreOffice).
    OfficeText,
    Text,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkRequest {
    /// The file the worker reads (a converted PDF for office files).
    pub source: PathBuf,
    /// The format reported in the document info (the original file's).
    pub format: DocFormat,
    pub kind: WorkKind,
    pub render_dpi: u32,
    pub image_size: u32,
    pub max_pages: u32,
    pub pdfium_path: PathBuf,
    /// Notes the parent already knows, passed through into the document info.
    pub notes: Vec<String>,
    /// Render and send only this page (1-based): a thumbnail.
    #[serde(default)]
    pub only_page: Option<u32>,
    /// Keep the page's proportions, its longest side `image_size` (a thumbnail), instead of
    /// the model's square.
    #[serde(default)]
    pub keep_aspect: bool,
}

/// A failure the worker understood and reports in-band.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum WorkerFailure {
    Encrypted,
    Corrupt { format: String, detail: String },
    TooManyPages { pages: u32 },
    Unreadable { detail: String },
    Setup { detail: String },
    Unsupported { detail: String },
}

/// Where the worker's stages send what they produce.
pub(crate) trait Emit {
    fn info(&mut self, info: &DocumentInfo) -> Result<(), WorkerFailure>;
    fn page(&mut self, page: &Page) -> Result<(), WorkerFailure>;
}

pub(crate) enum Frame {
    Info(DocumentInfo),
    Page(Page),
    Done,
    Failed(WorkerFailure),
}

const TAG_INFO: u8 = b'I';
const TAG_PAGE: u8 = b'P';
const TAG_DONE: u8 = b'D';
const TAG_FAILED: u8 = b'E';

/// Larger frames are refused: a confused child must not make the agent allocate gigabytes.
const MAX_TEXT_BYTES: usize = 64 << 20;
const MAX_IMAGE_SIDE: u32 = 4096;

fn write_frame(w: &mut impl Write, tag: u8, payload: &[&[u8]]) -> io::Result<()> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len).map_err(|_| io::Error::other("frame too large"))?;
    w.write_all(&[tag])?;
    w.write_all(&len.to_le_bytes())?;
    for p in payload {
        w.write_all(p)?;
    }
    w.flush()
}

pub(crate) fn write_info(w: &mut impl Write, info: &DocumentInfo) -> io::Result<()> {
    let json = serde_json::to_vec(info).map_err(io::Error::other)?;
    write_frame(w, TAG_INFO, &[&json])
}

pub(crate) fn write_page(w: &mut impl Write, page: &Page) -> io::Result<()> {
    let (width, height, rgb): (u32, u32, &[u8]) = match &page.image {
        Some(img) => (img.width(), img.height(), img.as_raw()),
        None => (0, 0, &[]),
    };
    // Cut an absurdly long text at a character boundary, so it stays valid UTF-8.
    let mut cut = page.text.len().min(MAX_TEXT_BYTES);
    while !page.text.is_char_boundary(cut) {
        cut -= 1;
    }
    let text = &page.text.as_bytes()[..cut];
    let mut header = Vec::with_capacity(16);
    for v in [page.number, width, height, text.len() as u32] {
        header.extend_from_slice(&v.to_le_bytes());
    }
    write_frame(w, TAG_PAGE, &[&header, text, rgb])
}

pub(crate) fn write_done(w: &mut impl Write) -> io::Result<()> {
    write_frame(w, TAG_DONE, &[])
}

pub(crate) fn write_failure(w: &mut impl Write, failure: &WorkerFailure) -> io::Result<()> {
    let json = serde_json::to_vec(failure).map_err(io::Error::other)?;
    write_frame(w, TAG_FAILED, &[&json])
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Reads the next frame; `Ok(None)` at a clean end of stream (before any tag byte).
pub(crate) fn read_frame(r: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut tag = [0u8; 1];
    if r.read(&mut tag)? == 0 {
        return Ok(None);
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    let max = 16 + MAX_TEXT_BYTES + (MAX_IMAGE_SIDE as usize).pow(2) * 3;
    if len > max {
        return Err(bad(format!(
            "frame of {len} bytes is larger than any valid one"
        )));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    let frame = match tag[0] {
        TAG_INFO => Frame::Info(serde_json::from_slice(&payload).map_err(|e| bad(e.to_string()))?),
        TAG_DONE => Frame::Done,
        TAG_FAILED => {
            Frame::Failed(serde_json::from_slice(&payload).map_err(|e| bad(e.to_string()))?)
        }
        TAG_PAGE => {
            if payload.len() < 16 {
                return Err(bad("short page header"));
            }
            let (number, width, height, text_len) = (
                u32_at(&payload, 0),
                u32_at(&payload, 4),
                u32_at(&payload, 8),
                u32_at(&payload, 12) as usize,
            );
            if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
                return Err(bad(format!("page image {width}x{height} is too large")));
            }
            let image_len = width as usize * height as usize * 3;
            if payload.len() != 16 + text_len + image_len {
                return Err(bad("page frame length does not match its header"));
            }
            let text = String::from_utf8(payload[16..16 + text_len].to_vec())
                .map_err(|_| bad("page text is not UTF-8"))?;
            let image = if width == 0 || height == 0 {
                None
            } else {
                let rgb = payload[16 + text_len..].to_vec();
                Some(
                    image::RgbImage::from_raw(width, height, rgb)
                        .ok_or_else(|| bad("page image size"))?,
                )
            };
            Frame::Page(Page {
                number,
                image,
                text,
                chunks: Vec::new(),
            })
        }
        other => return Err(bad(format!("unknown frame tag {other}"))),
    };
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let info = DocumentInfo {
            format: DocFormat::Pdf,
            num_pages: 2,
            title: Some("T".into()),
            visual: true,
            notes: vec!["n".into()],
        };
        let img = image::RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut buf = Vec::new();
        write_info(&mut buf, &info).unwrap();
        write_page(
            &mut buf,
            &Page {
                number: 1,
                image: Some(img.clone()),
                text: "héllo".into(),
                chunks: Vec::new(),
            },
        )
        .unwrap();
        write_page(
            &mut buf,
            &Page {
                number: 2,
                image: None,
                text: String::new(),
                chunks: Vec::new(),
            },
        )
        .unwrap();
        write_failure(&mut buf, &WorkerFailure::Encrypted).unwrap();
        write_done(&mut buf).unwrap();
        let mut r = &buf[..];
        assert!(matches!(read_frame(&mut r).unwrap(), Some(Frame::Info(i)) if i == info));
        match read_frame(&mut r).unwrap() {
            Some(Frame::Page(p)) => {
                assert_eq!((p.number, p.text.as_str()), (1, "héllo"));
                assert_eq!(p.image.unwrap(), img);
            }
            _ => panic!("expected page 1"),
        }
        assert!(
            matches!(read_frame(&mut r).unwrap(), Some(Frame::Page(p)) if p.number == 2 && p.image.is_none())
        );
        assert!(matches!(
            read_frame(&mut r).unwrap(),
            Some(Frame::Failed(WorkerFailure::Encrypted))
        ));
        assert!(matches!(read_frame(&mut r).unwrap(), Some(Frame::Done)));
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn a_lying_length_is_refused_before_allocating() {
        let mut buf = vec![TAG_PAGE];
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_frame(&mut &buf[..]).is_err());
    }
}
