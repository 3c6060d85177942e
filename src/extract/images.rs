//! Image files (inside the worker): one page each, EXIF orientation applied, transparency
//! composited on white, resized for the model. GIF and multi-page TIFF give their first frame.

use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use super::protocol::{Emit, WorkerFailure};
use super::{DocumentInfo, Page};
use crate::types::DocFormat;

pub(crate) fn extract(
    path: &Path,
    image_size: u32,
    keep_aspect: bool,
    notes: Vec<String>,
    out: &mut dyn Emit,
) -> Result<(), WorkerFailure> {
    let rgb = decode(path)?;
    let info = DocumentInfo {
        format: DocFormat::Image,
        num_pages: 1,
        title: None,
        visual: true,
        notes,
    };
    out.info(&info)?;
    let image = super::fit(&rgb, image_size, keep_aspect);
    out.page(&Page {
        number: 1,
        image: Some(image),
        text: String::new(),
        chunks: Vec::new(),
    })
}

/// Decodes by content (the parent already checked it is an image), upright and opaque.
pub(crate) fn decode(path: &Path) -> Result<RgbImage, WorkerFailure> {
    let corrupt = |e: &dyn std::fmt::Display| WorkerFailure::Corrupt {
        format: "image".into(),
        detail: e.to_string(),
    };
    let reader = ImageReader::open(path)
        .map_err(|e| WorkerFailure::Unreadable {
            detail: e.to_string(),
        })?
        .with_guessed_format()
        .map_err(|e| WorkerFailure::Unreadable {
            detail: e.to_string(),
        })?;
    // The reader's default limits (512 MiB per allocation) refuse decompression bombs.
    let mut decoder = reader.into_decoder().map_err(|e| corrupt(&e))?;
    let orientation = decoder.orientation().map_err(|e| corrupt(&e))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| corrupt(&e))?;
    img.apply_orientation(orientation);
    Ok(flatten_on_white(img))
}

/// Composites any alpha channel over white (what a viewer shows on a page).
pub(crate) fn flatten_on_white(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = u32::from(p[3]);
        for c in 0..3 {
            o[c] = ((u32::from(p[c]) * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transparent_pixels_become_white_and_opaque_ones_stay() {
        let mut rgba = image::RgbaImage::new(3, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(1, 0, image::Rgba([10, 20, 30, 255]));
        rgba.put_pixel(2, 0, image::Rgba([0, 0, 0, 128]));
        let out = flatten_on_white(DynamicImage::ImageRgba8(rgba));
        assert_eq!(out.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(1, 0).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(2, 0).0, [127, 127, 127]);
    }
}
