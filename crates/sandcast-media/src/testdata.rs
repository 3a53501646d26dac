//! Synthetic screen content: a page of text scrolling by a few pixels a
//! frame, the case that costs encoders most on a browser screen. Used by
//! the benchmarks and the encoder report so their figures are comparable.

use crate::capture::CapturedFrame;
use crate::convert::{I420Frame, bgra_to_i420};

/// A tall page of dark glyphs on white, as BGRA, viewed through a window.
#[derive(Debug, Clone)]
pub struct ScrollingText {
    width: u32,
    height: u32,
    page_rows: u32,
    page: Vec<u8>,
}

impl ScrollingText {
    /// A `width`x`height` view of a page ten screens tall.
    pub fn new(width: u32, height: u32) -> ScrollingText {
        Self::with_page_rows(width, height, height * 10)
    }

    /// A view of a page `page_rows` tall (rounded up to whole text lines)
    /// that repeats, so frame `page_rows / step` is frame 0 again and a
    /// short precomputed sequence loops without a jump.
    pub fn with_page_rows(width: u32, height: u32, page_rows: u32) -> ScrollingText {
        let page_rows = page_rows.div_ceil(16).max(1) * 16;
        let mut page = vec![0xffu8; (width * page_rows * 4) as usize];
        // Text: 8x16 cells holding one of 64 glyphs of thin strokes (as a
        // real font repeats its letters), with word and line breaks.
        let mut seed = 0x2545_f491_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let glyphs: Vec<[u8; 10]> = (0..64)
            .map(|_| {
                let mut g = [0u8; 10];
                // Two vertical strokes and two or three horizontal ones.
                let (v1, v2) = (next() % 6, next() % 6);
                for (row, bits) in g.iter_mut().enumerate() {
                    *bits = (1 << v1) | if row > 3 { 1 << v2 } else { 0 };
                }
                for _ in 0..2 + next() % 2 {
                    let row = (next() % 10) as usize;
                    g[row] = 0x3f;
                }
                g
            })
            .collect();
        for line in 0..page_rows / 16 {
            let cells = width / 8;
            // 3/8 to all of a line (60 to 159 glyphs at 1280 px).
            let line_len = cells * 3 / 8 + next() % (cells * 5 / 8).max(1);
            for cell in 0..line_len.min(cells) {
                let r = next();
                if r % 6 == 0 {
                    continue; // a space
                }
                let glyph = &glyphs[(r >> 8) as usize % glyphs.len()];
                for (gy, bits) in glyph.iter().enumerate() {
                    for gx in 0..6 {
                        if bits >> gx & 1 == 1 {
                            let (x, y) = (cell * 8 + gx + 1, line * 16 + gy as u32 + 3);
                            let i = ((y * width + x) * 4) as usize;
                            page[i..i + 4].copy_from_slice(&[0x30, 0x28, 0x20, 0]);
                        }
                    }
                }
            }
        }
        ScrollingText {
            width,
            height,
            page_rows,
            page,
        }
    }

    /// Frame `n`, scrolled by `step * n` pixels, as BGRA.
    pub fn bgra(&self, n: u32, step: u32) -> Vec<u8> {
        let row_bytes = (self.width * 4) as usize;
        let mut out = Vec::with_capacity(row_bytes * self.height as usize);
        for y in 0..self.height {
            let src = ((y + n * step) % self.page_rows) as usize * row_bytes;
            out.extend_from_slice(&self.page[src..src + row_bytes]);
        }
        out
    }

    /// Frame `n`, scrolled by `step * n` pixels, as I420.
    pub fn i420(&self, n: u32, step: u32) -> I420Frame {
        let bgra = self.bgra(n, step);
        let mut out = I420Frame::default();
        bgra_to_i420(
            &CapturedFrame {
                width: self.width,
                height: self.height,
                stride: self.width * 4,
                bgra: &bgra,
            },
            &mut out,
        )
        .expect("even, non-empty size");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_scroll_and_look_like_text() {
        let t = ScrollingText::new(64, 48);
        let a = t.bgra(0, 4);
        let b = t.bgra(1, 4);
        assert_ne!(a, b);
        // Frame 1 row 0 is frame 0 row 4.
        assert_eq!(&b[..64 * 4], &a[4 * 64 * 4..5 * 64 * 4]);
        let ink = a.chunks(4).filter(|p| p[0] == 0x30).count();
        assert!(ink > 64 * 48 / 20 && ink < 64 * 48 / 2, "ink {ink}");
    }
}
