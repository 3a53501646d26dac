//! Files in a session's home, moved over a stream connection.
//!
//! The server asks with [`Message::OpenStream`](crate::Message::OpenStream)
//! and a [`StreamTarget::File`](crate::StreamTarget::File) holding a
//! [`FileOp`]; the agent opens the stream connection and, after the
//! server's `Welcome`, answers with one [`FileReply`] line (JSON ended by
//! `\n`, at most [`MAX_REPLY_LEN`] bytes). What follows depends on the
//! answer: a file's bytes, a directory's [`Listing`], a tar archive, or, for
//! a write, the server's [`ChunkCodec`] chunks and then the agent's second
//! reply. Bulk bytes never pass through the control connection, and the
//! kernel's flow control paces each transfer on its own.
//!
//! Paths are [`HomePath`]s: checked lexically here (by the server before it
//! asks, and by the agent again), and resolved by the agent beneath the home
//! so that a symbolic link cannot lead out of it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

/// The session user's home, in a sandbox and in a microVM alike.
pub const SESSION_HOME: &str = "/home/sandcast";

/// Longest path accepted, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

/// Longest [`FileReply`] line, newline included.
pub const MAX_REPLY_LEN: usize = 16 * 1024;

/// Largest chunk of a write; the writer splits larger buffers.
pub const MAX_CHUNK: usize = 256 * 1024;

/// Most entries a directory listing holds; the rest are counted, not listed.
pub const MAX_LISTING: usize = 10_000;

/// A path in the session's home, as the components below the home joined
/// by `/` (empty for the home itself). Only ever made by [`HomePath::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HomePath(String);

impl HomePath {
    /// Checks `raw`: relative to the home, `~` or `~/…`, or absolute under
    /// [`SESSION_HOME`]. Refused: `..` (anywhere: a path never climbs), an
    /// absolute path elsewhere, a NUL byte, more than [`MAX_PATH_LEN`] bytes.
    /// Empty and `.` components are dropped.
    pub fn parse(raw: &str) -> Result<HomePath, String> {
        if raw.len() > MAX_PATH_LEN {
            return Err(format!(
                "the path is {} bytes; at most {MAX_PATH_LEN}",
                raw.len()
            ));
        }
        if raw.contains('\0') {
            return Err("the path contains a NUL byte".into());
        }
        let rest = if raw == "~" {
            ""
        } else if let Some(r) = raw.strip_prefix("~/") {
            r
        } else if raw.starts_with('/') {
            match raw.strip_prefix(SESSION_HOME) {
                Some(r) if r.is_empty() || r.starts_with('/') => r,
                _ => {
                    return Err(format!(
                        "{raw:?} is outside the session's home ({SESSION_HOME}); give a path relative to it"
                    ));
                }
            }
        } else {
            raw
        };
        let mut parts = Vec::new();
        for c in rest.split('/') {
            match c {
                "" | "." => {}
                ".." => return Err(format!("{raw:?} contains `..`; paths stay in the home")),
                c => parts.push(c),
            }
        }
        Ok(HomePath(parts.join("/")))
    }

    /// The path relative to the home (empty for the home itself).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the home itself.
    pub fn is_home(&self) -> bool {
        self.0.is_empty()
    }

    /// The components, outermost first.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// The path as the session sees it (`/home/sandcast/…`).
    pub fn absolute(&self) -> String {
        if self.0.is_empty() {
            SESSION_HOME.to_string()
        } else {
            format!("{SESSION_HOME}/{}", self.0)
        }
    }
}

impl TryFrom<String> for HomePath {
    type Error = String;
    fn try_from(s: String) -> Result<HomePath, String> {
        HomePath::parse(&s)
    }
}

impl From<HomePath> for String {
    /// As a person writes it: `~/…`.
    fn from(p: HomePath) -> String {
        p.to_string()
    }
}

impl std::fmt::Display for HomePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "~/{}", self.0)
    }
}

/// What the server asks of a file stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FileOp {
    /// A file's bytes ([`FileReply::File`]), or a directory's [`Listing`]
    /// ([`FileReply::Directory`]). A file larger than `max_bytes` is refused.
    Read {
        /// What to read.
        path: HomePath,
        /// Largest file sent.
        max_bytes: u64,
    },
    /// A directory (or a file) as a tar archive ([`FileReply::Archive`]),
    /// symbolic links kept as links; the archive stops with an error once
    /// it would pass `max_bytes`.
    Tar {
        /// What to archive.
        path: HomePath,
        /// Largest archive sent.
        max_bytes: u64,
    },
    /// Replace a file (parents made as needed) with the chunks that follow
    /// [`FileReply::Ready`]; nothing changes unless every chunk arrived and
    /// the end was sent. Answered with [`FileReply::Done`].
    Write {
        /// Where to write.
        path: HomePath,
        /// Largest file accepted.
        max_bytes: u64,
    },
    /// Remove a file, or a directory with everything in it
    /// ([`FileReply::Done`]).
    Delete {
        /// What to remove.
        path: HomePath,
    },
}

impl FileOp {
    /// The path the operation is on.
    pub fn path(&self) -> &HomePath {
        match self {
            FileOp::Read { path, .. }
            | FileOp::Tar { path, .. }
            | FileOp::Write { path, .. }
            | FileOp::Delete { path } => path,
        }
    }
}

/// Why the agent refused or failed an operation; the server's status code
/// follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The path leads out of the home, or names a device, FIFO or socket.
    BadPath,
    /// Nothing is there.
    NotFound,
    /// Over the size limit.
    TooLarge,
    /// The path is there but of the wrong kind (a directory to write over,
    /// a file where a parent directory must be).
    Conflict,
    /// Anything else (out of space, I/O error).
    Failed,
}

/// The agent's answer line on a file stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum FileReply {
    /// `size` bytes of the file follow, then the stream ends.
    File {
        /// The file's size.
        size: u64,
    },
    /// A [`Listing`] as JSON follows, then the stream ends.
    Directory,
    /// A tar archive follows; a stream that ends before the archive's end
    /// marker was cut short by an error.
    Archive,
    /// Send the chunks.
    Ready,
    /// Written or removed.
    Done {
        /// Bytes written (0 for a removal).
        size: u64,
    },
    /// Nothing was done.
    Refused {
        /// Why, as a kind.
        reason: Refusal,
        /// Why, in words (naming the path, never a file's content).
        detail: String,
    },
}

impl FileReply {
    /// A refusal.
    pub fn refused(reason: Refusal, detail: impl Into<String>) -> FileReply {
        FileReply::Refused {
            reason,
            detail: detail.into(),
        }
    }

    /// The reply as its line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Takes one reply line off the front of `buf` when a whole one is
    /// there (`Ok(None)`: read more). An over-long or malformed line is an
    /// error: the peer is not trusted to be well-behaved.
    pub fn take_line(buf: &mut BytesMut) -> Result<Option<FileReply>, String> {
        let Some(end) = buf.iter().position(|&b| b == b'\n') else {
            if buf.len() >= MAX_REPLY_LEN {
                return Err(format!("a reply line over {MAX_REPLY_LEN} bytes"));
            }
            return Ok(None);
        };
        if end >= MAX_REPLY_LEN {
            return Err(format!("a reply line over {MAX_REPLY_LEN} bytes"));
        }
        let line = buf.split_to(end + 1);
        serde_json::from_slice(&line[..end])
            .map(Some)
            .map_err(|e| format!("a malformed reply line: {e}"))
    }
}

/// What kind of thing a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link (not followed).
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// One entry of a [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    /// Its name in the directory.
    pub name: String,
    /// What it is.
    pub kind: EntryKind,
    /// Its size in bytes (a file's length; 0 for the rest).
    pub size: u64,
    /// Last modification, milliseconds since the Unix epoch.
    pub modified_ms: i64,
}

/// A directory's entries, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// The directory, relative to the home.
    pub path: String,
    /// At most [`MAX_LISTING`] entries.
    pub entries: Vec<ListEntry>,
    /// Entries left out past [`MAX_LISTING`].
    #[serde(default)]
    pub omitted: u64,
}

/// The chunks of a write: `u32 big-endian length | bytes`, at most
/// [`MAX_CHUNK`] bytes each; a chunk of length 0 ends the file. An end is
/// needed, so a connection that breaks midway never leaves half a file.
#[derive(Debug, Default)]
pub struct ChunkCodec;

/// A decoded chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// File bytes.
    Data(Bytes),
    /// The file is complete.
    End,
}

impl Decoder for ChunkCodec {
    type Item = Chunk;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Chunk>, std::io::Error> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > MAX_CHUNK {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a chunk of {len} bytes; at most {MAX_CHUNK}"),
            ));
        }
        if len == 0 {
            src.advance(4);
            return Ok(Some(Chunk::End));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        Ok(Some(Chunk::Data(src.split_to(len).freeze())))
    }
}

impl Encoder<Chunk> for ChunkCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: Chunk, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        match item {
            Chunk::End => dst.put_u32(0),
            Chunk::Data(mut data) => {
                while !data.is_empty() {
                    let part = data.split_to(data.len().min(MAX_CHUNK));
                    dst.put_u32(part.len() as u32);
                    dst.extend_from_slice(&part);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_in_the_home() {
        for (raw, want) in [
            ("a/b.txt", "a/b.txt"),
            ("./a//b/", "a/b"),
            ("~", ""),
            ("~/", ""),
            ("~/.config/tool/token.json", ".config/tool/token.json"),
            ("/home/sandcast", ""),
            ("/home/sandcast/x", "x"),
            ("", ""),
        ] {
            assert_eq!(HomePath::parse(raw).unwrap().as_str(), want, "{raw:?}");
        }
        for raw in [
            "..",
            "a/../../etc/passwd",
            "a/..",
            "/etc/passwd",
            "/home/sandcastle/x",
            "/home",
            "a\0b",
        ] {
            let err = HomePath::parse(raw).unwrap_err();
            assert!(!err.is_empty(), "{raw:?}");
        }
        // `~root` is a name here, not another user's home.
        assert_eq!(HomePath::parse("~root/x").unwrap().as_str(), "~root/x");
    }

    #[test]
    fn an_overlong_path_is_refused_by_its_length() {
        let long = "a/".repeat(MAX_PATH_LEN);
        assert!(HomePath::parse(&long).unwrap_err().contains("at most 4096"));
    }

    #[test]
    fn a_home_path_does_not_deserialize_around_its_checks() {
        let op: Result<FileOp, _> = serde_json::from_str(r#"{"op":"delete","path":"../../etc"}"#);
        assert!(op.is_err());
        let op: FileOp = serde_json::from_str(r#"{"op":"delete","path":"~/x/"}"#).unwrap();
        assert_eq!(op.path().as_str(), "x");
        assert_eq!(serde_json::to_value(&op).unwrap()["path"], "~/x");
    }

    #[test]
    fn reply_lines_are_taken_whole_and_bounded() {
        let mut buf = BytesMut::new();
        let line = FileReply::File { size: 7 }.to_line();
        buf.extend_from_slice(&line[..5]);
        assert_eq!(FileReply::take_line(&mut buf), Ok(None));
        buf.extend_from_slice(&line[5..]);
        buf.extend_from_slice(b"content");
        assert_eq!(
            FileReply::take_line(&mut buf),
            Ok(Some(FileReply::File { size: 7 }))
        );
        assert_eq!(&buf[..], b"content");

        let mut long = BytesMut::from(&vec![b' '; MAX_REPLY_LEN][..]);
        assert!(FileReply::take_line(&mut long).is_err());
        let mut bad = BytesMut::from(&b"{\"status\":\"nope\"}\n"[..]);
        assert!(FileReply::take_line(&mut bad).is_err());
    }

    #[test]
    fn chunks_round_trip_split_at_the_limit_and_end() {
        let mut codec = ChunkCodec;
        let mut wire = BytesMut::new();
        let data = Bytes::from(vec![7u8; MAX_CHUNK + 10]);
        codec.encode(Chunk::Data(data), &mut wire).unwrap();
        codec.encode(Chunk::End, &mut wire).unwrap();
        let mut got = Vec::new();
        // Fed a byte at a time, as a slow connection would.
        let mut src = BytesMut::new();
        for b in wire {
            src.put_u8(b);
            while let Some(c) = codec.decode(&mut src).unwrap() {
                got.push(c);
            }
        }
        assert_eq!(got.len(), 3);
        assert!(matches!(&got[0], Chunk::Data(d) if d.len() == MAX_CHUNK));
        assert!(matches!(&got[1], Chunk::Data(d) if d.len() == 10));
        assert_eq!(got[2], Chunk::End);
    }

    #[test]
    fn an_oversized_chunk_is_an_error_before_it_is_buffered() {
        let mut src = BytesMut::new();
        src.put_u32(MAX_CHUNK as u32 + 1);
        assert!(ChunkCodec.decode(&mut src).is_err());
    }
}
