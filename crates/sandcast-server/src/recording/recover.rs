//! How much of a segment file is whole: its init segment and every
//! fragment (`moof` followed by its `mdat`) up to the first that is cut
//! short. A server killed while writing leaves a fragment in part; the file
//! is truncated to the length found here, which every player reads.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use mp4_atom::{FourCC, Header, ReadFrom};

/// The length of the whole part of `path`: `None` when not even the init
/// segment (`ftyp` + `moov`) is complete.
pub fn complete_length(path: &Path) -> std::io::Result<Option<u64>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut pos = 0u64;
    let mut complete = None;
    let mut saw_moov = false;
    let mut after_moof = false;
    loop {
        f.seek(SeekFrom::Start(pos))?;
        let header = match <Option<Header>>::read_from(&mut f) {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) => break,
        };
        let body_at = f.stream_position()?;
        // A box that runs to the end of the file is never written here.
        let Some(size) = header.size else { break };
        let end = body_at.saturating_add(size as u64);
        if end > len {
            break;
        }
        pos = end;
        if header.kind == FourCC::new(b"moov") {
            saw_moov = true;
            complete = Some(end);
        } else if header.kind == FourCC::new(b"moof") {
            after_moof = true;
        } else if header.kind == FourCC::new(b"mdat") && after_moof && saw_moov {
            after_moof = false;
            complete = Some(end);
        }
    }
    Ok(complete)
}

/// Truncates `path` to its whole part (and syncs it); removes a file
/// without a complete init segment. Returns the length kept.
pub fn truncate(path: &Path) -> std::io::Result<u64> {
    match complete_length(path)? {
        Some(n) => {
            let f = std::fs::OpenOptions::new().write(true).open(path)?;
            if f.metadata()?.len() != n {
                f.set_len(n)?;
                f.sync_all()?;
            }
            Ok(n)
        }
        None => {
            std::fs::remove_file(path)?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::mux::{Frame, Muxer, Output, testing};

    /// A file of an init segment and three fragments, and the length after
    /// each part.
    fn recording(path: &Path) -> Vec<u64> {
        let mut m = Muxer::new();
        let mut file = Vec::new();
        let mut ends = Vec::new();
        let frames = testing::h264(160, 120, 90);
        let mut outs = Vec::new();
        for (data, keyframe, capture_us) in &frames {
            outs.extend(
                m.push(Frame {
                    data,
                    keyframe: *keyframe,
                    width: 160,
                    height: 120,
                    capture_us: *capture_us,
                })
                .unwrap(),
            );
        }
        outs.extend(m.finish(None));
        for o in outs {
            match o {
                Output::Segment { init, .. } => file.extend(init),
                Output::Fragment { bytes, .. } => file.extend(bytes),
            }
            ends.push(file.len() as u64);
        }
        std::fs::write(path, &file).unwrap();
        ends
    }

    #[test]
    fn a_file_cut_anywhere_is_truncated_to_its_last_complete_fragment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.mp4");
        let ends = recording(&path);
        assert_eq!(ends.len(), 4, "init and three fragments");
        let whole = std::fs::read(&path).unwrap();
        assert_eq!(complete_length(&path).unwrap(), Some(ends[3]));
        // Cut inside each part, and exactly at each boundary.
        for cut in [
            1,
            ends[0] - 1,
            ends[0],
            ends[0] + 5,
            ends[1] - 1,
            ends[1],
            ends[2] + 100,
            ends[3] - 1,
        ] {
            std::fs::write(&path, &whole[..cut as usize]).unwrap();
            let expect = ends.iter().rev().copied().find(|&e| e <= cut);
            assert_eq!(complete_length(&path).unwrap(), expect, "cut at {cut}");
            let kept = truncate(&path).unwrap();
            match expect {
                Some(n) => {
                    assert_eq!(kept, n);
                    assert_eq!(std::fs::read(&path).unwrap(), whole[..n as usize]);
                }
                None => assert!(!path.exists(), "no init segment: removed"),
            }
        }
    }
}
