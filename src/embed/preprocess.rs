//! Image preprocessing shared by extraction and the model: the exact resize the reference does.

use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

/// Resizes to exactly `width`×`height` (aspect ratio not kept, nothing cropped) with the bicubic
/// (Catmull-Rom, antialiased when shrinking) filter that PIL's `Image.resize(BICUBIC)` uses.
pub fn resize_for_model(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.width() == width && img.height() == height {
        return img.clone();
    }
    let src = Image::from_vec_u8(img.width(), img.height(), img.as_raw().clone(), PixelType::U8x3)
        .expect("an RgbImage buffer is always width*height*3 bytes");
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .expect("same pixel type on both sides");
    RgbImage::from_raw(width, height, dst.into_vec()).expect("buffer sized by the resizer")
}
