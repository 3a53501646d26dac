//! File operations in the session's home on a stream connection: read a
//! file or list a directory, archive a tree as tar, write a file
//! atomically, delete (see `sandcast_proto::files` for the protocol).
//!
//! Everything in the home belongs to the session's code, which runs as the
//! agent's uid and may race each step, so the home is hostile ground: every
//! path is resolved by [`beneath`] (a link leading out is refused, never
//! followed), below a resolved directory only single names relative to its
//! descriptor are used, nothing below it is followed, and devices, FIFOs and
//! sockets are refused or skipped without ever being opened in a way that
//! could block. Errors name the path as `~/…`, never a file's content.

mod beneath;

use std::ffi::{CStr, OsStr};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;
use sandcast_proto::files::{
    Chunk, ChunkCodec, EntryKind, FileOp, FileReply, HomePath, ListEntry, Listing, MAX_LISTING,
    Refusal,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use beneath::Home;

/// Bytes handed from a blocking reader to the connection at a time.
const PIECE: usize = 64 * 1024;

/// Pieces in flight between the blocking reader and the connection: enough
/// to keep both busy, few enough that a slow viewer holds little memory.
const PIECES_IN_FLIGHT: usize = 4;

/// Serves one file operation on `conn` (after the server's `Welcome`):
/// one [`FileReply`] line, then what the operation sends or receives.
/// `home` is the agent's `$HOME`. An error is returned only when the
/// connection failed, ended early or broke the protocol; refusals are
/// answers.
pub async fn serve<C>(mut conn: C, op: FileOp, home: &Path) -> anyhow::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let home = home.to_path_buf();
    let shown = op.path().to_string();
    let result = match op {
        FileOp::Read { path, max_bytes } => read(&mut conn, home, path, max_bytes).await,
        FileOp::Tar { path, max_bytes } => tar(&mut conn, home, path, max_bytes).await,
        FileOp::Write { path, max_bytes } => write(&mut conn, home, path, max_bytes).await,
        FileOp::Delete { path } => delete(&mut conn, home, path).await,
    };
    // Shut down even after an error so the server sees the end at once.
    let shut = conn.shutdown().await;
    result.with_context(|| format!("file stream on {shown}"))?;
    shut.with_context(|| format!("closing the file stream on {shown}"))
}

/// A refusal on its way to becoming a [`FileReply::Refused`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refused {
    reason: Refusal,
    detail: String,
}

impl Refused {
    fn new(reason: Refusal, detail: impl Into<String>) -> Refused {
        Refused {
            reason,
            detail: detail.into(),
        }
    }

    /// Why `doing` failed on `path`, from the kernel's error.
    fn errno(path: &HomePath, doing: &str, e: Errno) -> Refused {
        let (reason, detail) = match e {
            Errno::NOENT => (Refusal::NotFound, format!("{path} does not exist")),
            Errno::NOTDIR => (
                Refusal::Conflict,
                format!(
                    "a parent of {path} is a file, not a directory; choose another path or remove that file"
                ),
            ),
            Errno::XDEV => (
                Refusal::BadPath,
                format!(
                    "{path} leads out of the home through a symbolic link; only what is inside the home is served"
                ),
            ),
            Errno::LOOP => (
                Refusal::BadPath,
                format!(
                    "{path} passes through too many symbolic links, or one the agent does not follow"
                ),
            ),
            Errno::FBIG => (
                Refusal::TooLarge,
                format!("{path} is too large for the file system"),
            ),
            Errno::NOSPC | Errno::DQUOT => (
                Refusal::Failed,
                format!(
                    "no space left on the session's disk while {doing} {path}; free some space and try again"
                ),
            ),
            Errno::NOSYS => (
                Refusal::Failed,
                format!("{doing} {path}: this kernel lacks openat2 (Linux 5.6 or later is needed)"),
            ),
            e => (Refusal::Failed, format!("{doing} {path}: {e}")),
        };
        Refused { reason, detail }
    }

    fn io(path: &HomePath, doing: &str, e: &io::Error) -> Refused {
        match e.raw_os_error() {
            Some(n) => Refused::errno(path, doing, Errno::from_raw_os_error(n)),
            None => Refused::new(Refusal::Failed, format!("{doing} {path}: {e}")),
        }
    }

    fn special(path: &HomePath) -> Refused {
        Refused::new(
            Refusal::BadPath,
            format!(
                "{path} is a device, FIFO or socket; only regular files and directories are served"
            ),
        )
    }

    fn reply(self) -> FileReply {
        FileReply::refused(self.reason, self.detail)
    }
}

/// Runs filesystem work off the runtime's threads (a slow disk must not
/// stall the session's control connection).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Refused> + Send + 'static,
) -> Result<T, Refused> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(Refused::new(
            Refusal::Failed,
            format!("the agent's file task failed: {e}"),
        ))
    })
}

async fn send_reply<C: AsyncWrite + Unpin>(conn: &mut C, reply: &FileReply) -> io::Result<()> {
    conn.write_all(&reply.to_line()).await?;
    conn.flush().await
}

fn open_home(home: &Path, path: &HomePath) -> Result<Home, Refused> {
    Home::open(home).map_err(|e| {
        Refused::new(
            Refusal::Failed,
            format!(
                "the home {} cannot be opened ({e}), so {path} cannot be served",
                home.display()
            ),
        )
    })
}

/// What a path in the home resolved to.
enum Resolved {
    /// A regular file, open for reading, and its size.
    File(std::fs::File, u64),
    /// A directory, open for reading its entries.
    Dir(OwnedFd),
}

/// Resolves `path` for reading. It is first opened `O_PATH` (which opens
/// nothing: no FIFO can block, no device acts) and looked at; only a
/// regular file is then opened for reading, non-blocking, and must still be
/// the same file (the session may have swapped it in between).
fn resolve_for_reading(home: &Home, path: &HomePath) -> Result<Resolved, Refused> {
    let err = |e| Refused::errno(path, "opening", e);
    let fd = home.open_path(path, OFlags::PATH).map_err(err)?;
    let st = rustix::fs::fstat(&fd).map_err(err)?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => {
            let dir = rustix::fs::openat(
                &fd,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(err)?;
            Ok(Resolved::Dir(dir))
        }
        FileType::RegularFile => {
            let file = home
                .open_path(path, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY)
                .map_err(err)?;
            let now = rustix::fs::fstat(&file).map_err(err)?;
            if FileType::from_raw_mode(now.st_mode) != FileType::RegularFile {
                return Err(Refused::special(path));
            }
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
                return Err(Refused::new(
                    Refusal::Failed,
                    format!("{path} changed while it was opened; try again"),
                ));
            }
            Ok(Resolved::File(file.into(), now.st_size.max(0) as u64))
        }
        _ => Err(Refused::special(path)),
    }
}

// ---- read ----

/// What a read answers with.
enum ReadAnswer {
    /// A file to send, and its size.
    File(std::fs::File, u64),
    /// A directory's entries.
    Listing(Listing),
}

async fn read<C>(conn: &mut C, home: PathBuf, path: HomePath, max_bytes: u64) -> anyhow::Result<()>
where
    C: AsyncWrite + Unpin + Send,
{
    let p = path.clone();
    let resolved = blocking(move || {
        let home = open_home(&home, &p)?;
        match resolve_for_reading(&home, &p)? {
            Resolved::Dir(dir) => list(dir, &p).map(ReadAnswer::Listing),
            Resolved::File(_, size) if size > max_bytes => Err(Refused::new(
                Refusal::TooLarge,
                format!(
                    "{p} is {size} bytes, over the limit of {max_bytes}; ask for a larger limit"
                ),
            )),
            Resolved::File(file, size) => Ok(ReadAnswer::File(file, size)),
        }
    })
    .await;
    match resolved {
        Err(refused) => send_reply(conn, &refused.reply()).await?,
        Ok(ReadAnswer::Listing(listing)) => {
            send_reply(conn, &FileReply::Directory).await?;
            conn.write_all(&serde_json::to_vec(&listing)?).await?;
        }
        Ok(ReadAnswer::File(file, size)) => {
            send_reply(conn, &FileReply::File { size }).await?;
            // Exactly what was promised: a file that grew is cut at `size`,
            // one that shrank ends the stream early (the server sees it).
            let sent = pump(conn, move |out| copy_exact(file, size, out)).await?;
            if let Err(e) = sent {
                tracing::warn!("reading {path} stopped early: {e}");
            }
        }
    }
    Ok(())
}

/// Sends at most `size` bytes of `file` to `out`; an early end is an error.
fn copy_exact(file: std::fs::File, size: u64, out: &mut PieceWriter) -> io::Result<()> {
    let mut exact = Exact::new(file, size);
    io::copy(&mut exact, out)?;
    out.flush()
}

/// A directory's entries, the first [`MAX_LISTING`] by name, links not followed.
fn list(dir: OwnedFd, path: &HomePath) -> Result<Listing, Refused> {
    use std::collections::BinaryHeap;
    let err = |e| Refused::errno(path, "listing", e);
    let mut entries = rustix::fs::Dir::new(dir).map_err(err)?;
    // A max-heap bounded to MAX_LISTING keeps the smallest names, so a
    // huge directory costs bounded memory. Names that are not UTF-8 are
    // shown lossily; the raw bytes are kept to look the entry up.
    let mut kept: BinaryHeap<(String, Vec<u8>)> = BinaryHeap::new();
    let mut omitted = 0u64;
    for entry in entries.by_ref() {
        let entry = entry.map_err(err)?;
        let raw = entry.file_name().to_bytes();
        if raw == b"." || raw == b".." {
            continue;
        }
        kept.push((String::from_utf8_lossy(raw).into_owned(), raw.to_vec()));
        if kept.len() > MAX_LISTING {
            kept.pop();
            omitted += 1;
        }
    }
    let dirfd = entries.fd().map_err(err)?;
    let mut out = Vec::with_capacity(kept.len());
    for (name, raw) in kept.into_sorted_vec() {
        let st = match rustix::fs::statat(dirfd, raw.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Removed since it was read: not there any more.
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(err(e)),
        };
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => EntryKind::File,
            FileType::Directory => EntryKind::Directory,
            FileType::Symlink => EntryKind::Symlink,
            _ => EntryKind::Other,
        };
        out.push(ListEntry {
            name,
            kind,
            size: if kind == EntryKind::File {
                st.st_size.max(0) as u64
            } else {
                0
            },
            modified_ms: st.st_mtime.saturating_mul(1000) + st.st_mtime_nsec as i64 / 1_000_000,
        });
    }
    Ok(Listing {
        path: path.as_str().to_string(),
        entries: out,
        omitted,
    })
}

// ---- blocking producer → connection ----

/// Runs `produce` on a blocking thread, writing what it makes to `conn` as
/// it comes. Returns `produce`'s own result; the outer error is the
/// connection's. When the connection fails, the producer's next write fails
/// and it stops.
async fn pump<C, F>(conn: &mut C, produce: F) -> io::Result<io::Result<()>>
where
    C: AsyncWrite + Unpin,
    F: FnOnce(&mut PieceWriter) -> io::Result<()> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Bytes>(PIECES_IN_FLIGHT);
    let task = tokio::task::spawn_blocking(move || {
        let mut out = PieceWriter::new(tx);
        let produced = produce(&mut out);
        if produced.is_err() {
            // What was read before the error still goes out.
            out.poison();
        }
        produced
    });
    let mut sent = Ok(());
    while let Some(piece) = rx.recv().await {
        if let Err(e) = conn.write_all(&piece).await {
            sent = Err(e);
            break;
        }
    }
    drop(rx);
    let produced = task.await.unwrap_or_else(|e| Err(io::Error::other(e)));
    sent?;
    conn.flush().await?;
    Ok(produced)
}

/// The blocking side of [`pump`]: buffers writes into pieces, stops at a
/// byte limit, and once poisoned refuses every write (so nothing, not even
/// a tar end marker written on drop, follows an error).
struct PieceWriter {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
    written: u64,
    limit: u64,
    poisoned: bool,
}

impl PieceWriter {
    fn new(tx: mpsc::Sender<Bytes>) -> PieceWriter {
        PieceWriter {
            tx,
            buf: BytesMut::new(),
            written: 0,
            limit: u64::MAX,
            poisoned: false,
        }
    }

    fn poison(&mut self) {
        self.poisoned = true;
        // What is buffered is within the limit and before the error: the
        // receiver gets it, and sees the stream end early.
        let _ = self.send();
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = self.buf.split().freeze();
        self.tx
            .blocking_send(piece)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the connection closed"))
    }
}

impl Write for PieceWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.poisoned {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream was stopped",
            ));
        }
        if self.written + data.len() as u64 > self.limit {
            self.poison();
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("over the limit of {} bytes", self.limit),
            ));
        }
        self.buf.extend_from_slice(data);
        self.written += data.len() as u64;
        if self.buf.len() >= PIECE {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.poisoned {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream was stopped",
            ));
        }
        self.send()
    }
}

/// A reader of exactly `left` bytes of a file: it stops there even if the
/// file grew, and fails if the file ends sooner (so a tar header's size is
/// never contradicted by its data).
struct Exact {
    file: std::fs::File,
    left: u64,
}

impl Exact {
    fn new(file: std::fs::File, left: u64) -> Exact {
        Exact { file, left }
    }
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was sent",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

// ---- tar ----

async fn tar<C>(conn: &mut C, home: PathBuf, path: HomePath, max_bytes: u64) -> anyhow::Result<()>
where
    C: AsyncWrite + Unpin + Send,
{
    let p = path.clone();
    let resolved = blocking(move || {
        let home = open_home(&home, &p)?;
        resolve_for_reading(&home, &p)
    })
    .await;
    let resolved = match resolved {
        Ok(r) => r,
        Err(refused) => return Ok(send_reply(conn, &refused.reply()).await?),
    };
    send_reply(conn, &FileReply::Archive).await?;
    let p = path.clone();
    let produced = pump(conn, move |out| {
        out.limit = max_bytes;
        let mut builder = tar::Builder::new(out);
        let archived = match resolved {
            Resolved::Dir(dir) => archive_tree(&mut builder, dir),
            Resolved::File(file, size) => {
                let name = p.components().last().unwrap_or("file").to_string();
                let st = rustix::fs::fstat(&file)?;
                let mut header = header_for(&st, tar::EntryType::Regular, size);
                builder.append_data(&mut header, name, Exact::new(file, size))
            }
        };
        // Without the end marker, the receiver knows the archive is cut
        // short; the builder writes one on drop unless its writer is
        // poisoned.
        match archived.and_then(|()| builder.finish()) {
            Ok(()) => builder.get_mut().flush(),
            Err(e) => {
                builder.get_mut().poison();
                Err(e)
            }
        }
    })
    .await?;
    if let Err(e) = produced {
        // The path and the reason only: never what was in the files.
        tracing::warn!("the archive of {path} stopped early: {e}");
    }
    Ok(())
}

fn header_for(st: &Stat, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(st.st_mode & 0o7777);
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_uid(u64::from(st.st_uid));
    h.set_gid(u64::from(st.st_gid));
    h
}

/// Archives everything below `root` with paths relative to it, depth
/// first, each entry reached by its single name from its directory's
/// descriptor with `O_NOFOLLOW`: links are archived as links and never
/// followed, devices, FIFOs and sockets are skipped, entries that vanish
/// or change kind meanwhile are skipped.
fn archive_tree<W: Write>(builder: &mut tar::Builder<W>, root: OwnedFd) -> io::Result<()> {
    let mut stack = vec![(rustix::fs::Dir::new(root)?, PathBuf::new())];
    while let Some((dir, prefix)) = stack.last_mut() {
        let entry = match dir.next() {
            None => {
                stack.pop();
                continue;
            }
            Some(entry) => entry?,
        };
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let rel = prefix.join(OsStr::from_bytes(name.to_bytes()));
        if let Some(sub) = archive_entry(builder, dir.fd()?, name, &rel)? {
            stack.push((rustix::fs::Dir::new(sub)?, rel));
        }
    }
    Ok(())
}

/// Archives one entry; a directory's descriptor is returned to descend into.
fn archive_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: rustix::fd::BorrowedFd<'_>,
    name: &CStr,
    rel: &Path,
) -> io::Result<Option<OwnedFd>> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let nofollow = OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => {
            let sub = match rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | nofollow,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                // Gone or replaced by something else since the stat.
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let mut header = header_for(&st, tar::EntryType::Directory, 0);
            builder.append_data(&mut header, rel, io::empty())?;
            Ok(Some(sub))
        }
        FileType::Symlink => {
            let target = match rustix::fs::readlinkat(dir, name, Vec::new()) {
                Ok(t) => t,
                Err(Errno::NOENT | Errno::INVAL) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let mut header = header_for(&st, tar::EntryType::Symlink, 0);
            let target = OsStr::from_bytes(target.as_bytes());
            builder.append_link(&mut header, rel, target)?;
            Ok(None)
        }
        FileType::RegularFile => {
            // Non-blocking, so a FIFO swapped in after the stat cannot hang
            // the walk; it is then skipped by the check below.
            let fd = match rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | nofollow,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(Errno::NOENT | Errno::LOOP) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let st = rustix::fs::fstat(&fd)?;
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                return Ok(None);
            }
            let size = st.st_size.max(0) as u64;
            let mut header = header_for(&st, tar::EntryType::Regular, size);
            builder.append_data(&mut header, rel, Exact::new(fd.into(), size))?;
            Ok(None)
        }
        _ => Ok(None),
    }
}

// ---- write ----

/// Where a write lands: the directory, the file's name in it and the
/// temporary file being written there.
struct Target {
    dir: OwnedFd,
    name: String,
    temp: String,
}

impl Target {
    fn remove_temp(&self) {
        // Best effort: the temporary's name is ours, and it is in a
        // directory the session owns anyway.
        let _ = rustix::fs::unlinkat(&self.dir, self.temp.as_str(), AtFlags::empty());
    }
}

/// Resolves where `path` is written and creates its temporary file.
fn prepare_write(home: &Home, path: &HomePath) -> Result<(Target, std::fs::File), Refused> {
    if path.is_home() {
        return Err(Refused::new(
            Refusal::Conflict,
            "~/ is the home directory; give a file's path in it",
        ));
    }
    let err = |e| Refused::errno(path, "writing", e);
    let (mut dir, mut name) = home.parent(path, true).map_err(err)?;
    let mut mode = None;
    match rustix::fs::statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => {}
        Err(e) => return Err(err(e)),
        Ok(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => mode = Some(st.st_mode & 0o777),
            FileType::Directory => {
                return Err(Refused::new(
                    Refusal::Conflict,
                    format!(
                        "{path} is a directory; give a file's path, or delete the directory first"
                    ),
                ));
            }
            FileType::Symlink => {
                // A link is followed where it stays inside: the file it
                // leads to is replaced, and the link stays a link.
                let fd = home.open_path(path, OFlags::PATH).map_err(|e| match e {
                    Errno::NOENT => Refused::new(
                        Refusal::Conflict,
                        format!("{path} is a symbolic link to nothing; delete it or write where it leads"),
                    ),
                    e => err(e),
                })?;
                let st = rustix::fs::fstat(&fd).map_err(err)?;
                match FileType::from_raw_mode(st.st_mode) {
                    FileType::RegularFile => {}
                    FileType::Directory => {
                        return Err(Refused::new(
                            Refusal::Conflict,
                            format!("{path} leads to a directory; give a file's path"),
                        ));
                    }
                    _ => return Err(Refused::special(path)),
                }
                let real = home.locate(&fd).map_err(err)?;
                (dir, name) = home.parent(&real, false).map_err(err)?;
                mode = Some(st.st_mode & 0o777);
            }
            _ => return Err(Refused::special(path)),
        },
    }
    let (temp, file) = create_temp(&dir, &name).map_err(err)?;
    let target = Target { dir, name, temp };
    // A replaced file keeps its permissions; a new one gets the umask's.
    if let Some(mode) = mode
        && let Err(e) = rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))
    {
        target.remove_temp();
        return Err(err(e));
    }
    Ok((target, file))
}

/// Creates `.<name>.sandcast-<unique>` next to the target (mode 0666 less
/// the umask, as any new file), `O_EXCL` so an existing entry (a link
/// planted by the session) is never opened.
fn create_temp(dir: &OwnedFd, name: &str) -> Result<(String, std::fs::File), Errno> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // Leaves room for the suffix within the 255 bytes a name may have.
    let mut short = name.len().min(200);
    while !name.is_char_boundary(short) {
        short -= 1;
    }
    for _ in 0..16 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let temp = format!(
            ".{}.sandcast-{:x}{:x}{:x}",
            &name[..short],
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        match rustix::fs::openat(
            dir,
            temp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o666),
        ) {
            Ok(fd) => return Ok((temp, fd.into())),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::EXIST)
}

/// How a write's chunks ended.
enum Received {
    /// `End` arrived after this many bytes.
    Complete(u64),
    /// Nothing more can be done on the connection.
    Broken(anyhow::Error),
    /// The reply to send.
    Refused(Refused),
}

async fn write<C>(conn: &mut C, home: PathBuf, path: HomePath, max_bytes: u64) -> anyhow::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let p = path.clone();
    let prepared = blocking(move || prepare_write(&open_home(&home, &p)?, &p)).await;
    let (target, file) = match prepared {
        Ok(t) => t,
        Err(refused) => return Ok(send_reply(conn, &refused.reply()).await?),
    };
    if let Err(e) = send_reply(conn, &FileReply::Ready).await {
        target.remove_temp();
        return Err(e.into());
    }
    let received = receive(
        &mut *conn,
        tokio::fs::File::from_std(file),
        &path,
        max_bytes,
    )
    .await;
    let size = match received {
        Received::Complete(size) => size,
        Received::Broken(e) => {
            target.remove_temp();
            return Err(e.context("nothing was written"));
        }
        Received::Refused(refused) => {
            target.remove_temp();
            return Ok(send_reply(conn, &refused.reply()).await?);
        }
    };
    let renamed = blocking(move || {
        // Atomic: a reader sees the old file or the new one, never half.
        let done = rustix::fs::renameat(
            &target.dir,
            target.temp.as_str(),
            &target.dir,
            target.name.as_str(),
        );
        done.map_err(|e| {
            target.remove_temp();
            match e {
                Errno::ISDIR => Refused::new(
                    Refusal::Conflict,
                    format!("{path} became a directory while it was written; nothing was replaced"),
                ),
                e => Refused::errno(&path, "replacing", e),
            }
        })
    })
    .await;
    let reply = match renamed {
        Ok(()) => FileReply::Done { size },
        Err(refused) => refused.reply(),
    };
    send_reply(conn, &reply).await?;
    Ok(())
}

/// Reads the chunks into `file` up to `End`, then fsyncs it.
async fn receive<C>(
    conn: &mut C,
    mut file: tokio::fs::File,
    path: &HomePath,
    max_bytes: u64,
) -> Received
where
    C: AsyncRead + Unpin,
{
    let mut chunks = FramedRead::new(conn, ChunkCodec);
    let mut size = 0u64;
    let disk = |e: io::Error| Received::Refused(Refused::io(path, "writing", &e));
    loop {
        match chunks.next().await {
            Some(Ok(Chunk::Data(data))) => {
                size += data.len() as u64;
                if size > max_bytes {
                    return Received::Refused(Refused::new(
                        Refusal::TooLarge,
                        format!(
                            "{path} would be over the limit of {max_bytes} bytes; nothing was written"
                        ),
                    ));
                }
                if let Err(e) = file.write_all(&data).await {
                    return disk(e);
                }
            }
            Some(Ok(Chunk::End)) => break,
            Some(Err(e)) => {
                return Received::Broken(anyhow::Error::new(e).context("reading the chunks"));
            }
            None => {
                return Received::Broken(anyhow::anyhow!(
                    "the connection ended before the end of {path}"
                ));
            }
        }
    }
    // Errors of writes still in flight surface here (a full disk, often).
    if let Err(e) = file.flush().await {
        return disk(e);
    }
    if let Err(e) = file.sync_all().await {
        return disk(e);
    }
    Received::Complete(size)
}

// ---- delete ----

async fn delete<C>(conn: &mut C, home: PathBuf, path: HomePath) -> anyhow::Result<()>
where
    C: AsyncWrite + Unpin + Send,
{
    let p = path.clone();
    let done = blocking(move || {
        if p.is_home() {
            return Err(Refused::new(
                Refusal::BadPath,
                "~/ is the home itself and cannot be deleted; delete what is in it",
            ));
        }
        let home = open_home(&home, &p)?;
        let (dir, name) = home
            .parent(&p, false)
            .map_err(|e| Refused::errno(&p, "deleting", e))?;
        remove(&dir, &name).map_err(|e| Refused::errno(&p, "deleting", e))
    })
    .await;
    let reply = match done {
        Ok(()) => FileReply::Done { size: 0 },
        Err(refused) => refused.reply(),
    };
    send_reply(conn, &reply).await?;
    Ok(())
}

/// Times a directory's removal is retried when the session keeps adding to
/// it; past that the error is reported.
const REMOVE_RETRIES: usize = 8;

/// Removes `name` in `dir`: a file or link is unlinked (a link itself,
/// never what it leads to); a directory is emptied depth first by single
/// names from each directory's descriptor, opened `O_NOFOLLOW`, then removed.
fn remove(dir: &OwnedFd, name: &str) -> Result<(), Errno> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Err(Errno::ISDIR) => {}
        r => return r,
    }
    for _ in 0..REMOVE_RETRIES {
        empty_dir(dir.as_fd(), name)?;
        match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
            // Filled again while it was emptied.
            Err(Errno::NOTEMPTY) => continue,
            r => return r,
        }
    }
    Err(Errno::NOTEMPTY)
}

/// Removes everything inside directory `name` of `parent`.
fn empty_dir(parent: rustix::fd::BorrowedFd<'_>, name: &str) -> Result<(), Errno> {
    let open = |at: rustix::fd::BorrowedFd<'_>, n: &CStr| {
        rustix::fs::openat(
            at,
            n,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let name = std::ffi::CString::new(name).map_err(|_| Errno::INVAL)?;
    let mut stack = vec![rustix::fs::Dir::new(open(parent, &name)?)?];
    // Each level's directory stays open while its subdirectory is emptied;
    // a finished subdirectory is removed from its parent's descriptor.
    let mut names: Vec<std::ffi::CString> = Vec::new();
    while let Some(dir) = stack.last_mut() {
        let Some(entry) = dir.next() else {
            stack.pop();
            if let (Some(parent), Some(n)) = (stack.last(), names.pop()) {
                match rustix::fs::unlinkat(parent.fd()?, n.as_c_str(), AtFlags::REMOVEDIR) {
                    // Refilled meanwhile: the caller's retry goes round again.
                    Ok(()) | Err(Errno::NOENT | Errno::NOTEMPTY) => {}
                    Err(e) => return Err(e),
                }
            }
            continue;
        };
        let entry = entry?;
        let n = entry.file_name();
        if n == c"." || n == c".." {
            continue;
        }
        let at = dir.fd()?;
        match rustix::fs::unlinkat(at, n, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(Errno::ISDIR) => match open(at, n) {
                Ok(sub) => {
                    let n = n.to_owned();
                    stack.push(rustix::fs::Dir::new(sub)?);
                    names.push(n);
                }
                // Replaced by a file or link since: the retry removes it.
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => {}
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
