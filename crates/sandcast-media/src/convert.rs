//! BGRA to I420 colour conversion (the `yuv` crate, BT.601 limited range,
//! which is what H.264 and VP8 decoders assume without colour metadata).

use yuv::{
    BufferStoreMut, YuvConversionMode, YuvPlanarImageMut, YuvRange, YuvStandardMatrix,
    bgra_to_yuv420,
};

use crate::capture::CapturedFrame;
use crate::error::{Error, Result};

/// A planar 4:2:0 picture with tightly packed planes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct I420Frame {
    /// Width in pixels (even).
    pub width: u32,
    /// Height in pixels (even).
    pub height: u32,
    /// Luma, `width` bytes a row.
    pub y: Vec<u8>,
    /// Blue-difference chroma, `width / 2` bytes a row.
    pub u: Vec<u8>,
    /// Red-difference chroma, `width / 2` bytes a row.
    pub v: Vec<u8>,
}

impl I420Frame {
    /// A black picture of this size (rounded down to even sides).
    pub fn new(width: u32, height: u32) -> I420Frame {
        let mut f = I420Frame::default();
        f.resize(width, height);
        f
    }

    fn resize(&mut self, width: u32, height: u32) {
        let (w, h) = (width & !1, height & !1);
        let (cw, ch) = (w as usize / 2, h as usize / 2);
        self.width = w;
        self.height = h;
        self.y.resize(w as usize * h as usize, 16);
        self.u.resize(cw * ch, 128);
        self.v.resize(cw * ch, 128);
    }

    /// Bytes a row of the chroma planes.
    pub fn chroma_stride(&self) -> u32 {
        self.width / 2
    }
}

/// Converts a captured screen into `out`, resizing it as needed.
///
/// Encoders need even sides; an odd last row or column is left out.
pub fn bgra_to_i420(src: &CapturedFrame<'_>, out: &mut I420Frame) -> Result<()> {
    out.resize(src.width, src.height);
    if out.width == 0 || out.height == 0 {
        return Err(Error::BadSize {
            width: src.width,
            height: src.height,
            min_width: 2,
            min_height: 2,
            max_width: u16::MAX.into(),
            max_height: u16::MAX.into(),
        });
    }
    let cw = out.chroma_stride();
    let (w, h) = (out.width, out.height);
    let mut planar = YuvPlanarImageMut {
        y_plane: BufferStoreMut::Borrowed(&mut out.y),
        y_stride: w,
        u_plane: BufferStoreMut::Borrowed(&mut out.u),
        u_stride: cw,
        v_plane: BufferStoreMut::Borrowed(&mut out.v),
        v_stride: cw,
        width: w,
        height: h,
    };
    let rows = &src.bgra[..(h as usize - 1) * src.stride as usize + w as usize * 4];
    bgra_to_yuv420(
        &mut planar,
        rows,
        src.stride,
        YuvRange::Limited,
        YuvStandardMatrix::Bt601,
        YuvConversionMode::Balanced,
    )
    .map_err(|e| Error::Unsupported(format!("BGRA to I420 at {w}x{h}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_land_on_bt601_limited_values() {
        // 4x2: white, black, pure red, pure blue in 2x2 blocks.
        let mut bgra = Vec::new();
        for _row in 0..2 {
            bgra.extend_from_slice(&[255, 255, 255, 0, 255, 255, 255, 0]);
            bgra.extend_from_slice(&[0, 0, 255, 0, 0, 0, 255, 0]);
        }
        let src = CapturedFrame {
            width: 4,
            height: 2,
            stride: 16,
            bgra: &bgra,
        };
        let mut out = I420Frame::default();
        bgra_to_i420(&src, &mut out).unwrap();
        assert_eq!((out.width, out.height), (4, 2));
        assert!((out.y[0] as i32 - 235).abs() <= 1, "white Y {}", out.y[0]);
        assert!((out.u[0] as i32 - 128).abs() <= 1, "white U {}", out.u[0]);
        assert!((out.y[2] as i32 - 81).abs() <= 2, "red Y {}", out.y[2]);
        assert!(out.v[1] > 230, "red V {}", out.v[1]);
    }

    #[test]
    fn odd_sizes_are_cropped_to_even() {
        let bgra = vec![0u8; 5 * 3 * 4];
        let src = CapturedFrame {
            width: 5,
            height: 3,
            stride: 20,
            bgra: &bgra,
        };
        let mut out = I420Frame::default();
        bgra_to_i420(&src, &mut out).unwrap();
        assert_eq!(
            (out.width, out.height, out.y.len(), out.u.len()),
            (4, 2, 8, 2)
        );
        assert_eq!(out.y[0], 16);
    }

    #[test]
    fn a_one_pixel_screen_is_refused() {
        let bgra = vec![0u8; 4];
        let src = CapturedFrame {
            width: 1,
            height: 1,
            stride: 4,
            bgra: &bgra,
        };
        let err = bgra_to_i420(&src, &mut I420Frame::default()).unwrap_err();
        assert!(err.to_string().contains("1x1"), "{err}");
    }
}
