//! The file operations on real files in a temporary home, through an
//! in-memory connection. `base/outside` stands for `/etc` and for another
//! session's home: nothing there may be read, changed or removed.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use futures::SinkExt;
use sandcast_proto::files::{Chunk, ChunkCodec, FileOp, FileReply, HomePath, Listing, Refusal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::FramedWrite;

use super::*;

/// Nothing here waits on purpose: the bound only turns a hang into a failure.
const HANG: Duration = Duration::from_secs(20);

const SECRET: &[u8] = b"root:x:0:0:outside the home\n";

struct Fixture {
    base: tempfile::TempDir,
}

impl Fixture {
    /// A home, and beside it `outside/secret` and `outside/dir/inner`.
    fn new() -> Fixture {
        let base = tempfile::tempdir().unwrap();
        fs::create_dir(base.path().join("home")).unwrap();
        fs::create_dir_all(base.path().join("outside/dir")).unwrap();
        fs::write(base.path().join("outside/secret"), SECRET).unwrap();
        fs::write(base.path().join("outside/dir/inner"), SECRET).unwrap();
        Fixture { base }
    }

    fn home(&self) -> PathBuf {
        self.base.path().join("home")
    }

    fn outside(&self) -> PathBuf {
        self.base.path().join("outside")
    }

    /// Everything outside is as it was made.
    fn outside_untouched(&self) {
        let o = self.outside();
        assert_eq!(fs::read(o.join("secret")).unwrap(), SECRET);
        assert_eq!(fs::read(o.join("dir/inner")).unwrap(), SECRET);
        let mut names: Vec<_> = fs::read_dir(&o)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["dir", "secret"]);
        assert_eq!(fs::read_dir(o.join("dir")).unwrap().count(), 1);
    }

    /// No temporary file of a write is left anywhere in the home.
    fn no_temp_left(&self) {
        fn walk(dir: &Path) {
            for e in fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                assert!(!name.contains(".sandcast-"), "left behind: {name}");
                if e.file_type().unwrap().is_dir() {
                    walk(&e.path());
                }
            }
        }
        walk(&self.home());
    }

    /// Runs `op` with nothing sent by the server; returns the first reply
    /// and every byte after it.
    async fn run(&self, op: FileOp) -> (FileReply, Vec<u8>) {
        let (agent, mut server) = tokio::io::duplex(64 * 1024);
        let home = self.home();
        let client = async {
            let mut all = Vec::new();
            server.read_to_end(&mut all).await.unwrap();
            all
        };
        let (_, all) = tokio::time::timeout(HANG, async {
            tokio::join!(serve(agent, op, &home), client)
        })
        .await
        .expect("the operation hung");
        let mut buf = BytesMut::from(&all[..]);
        let reply = FileReply::take_line(&mut buf)
            .unwrap()
            .expect("no reply line");
        (reply, buf.to_vec())
    }

    async fn read(&self, path: &str) -> (FileReply, Vec<u8>) {
        self.run(FileOp::Read {
            path: hp(path),
            max_bytes: u64::MAX,
        })
        .await
    }

    /// Writes `data` in chunks of `chunk` bytes, ending it only with `end`.
    /// Returns the replies and the serve's result.
    async fn write_with(
        &self,
        path: &str,
        max_bytes: u64,
        data: &[u8],
        chunk: usize,
        end: bool,
    ) -> (Vec<FileReply>, anyhow::Result<()>) {
        let (agent, server) = tokio::io::duplex(64 * 1024);
        let (mut rx, tx) = tokio::io::split(server);
        let home = self.home();
        let op = FileOp::Write {
            path: hp(path),
            max_bytes,
        };
        let send = async move {
            let mut frames = FramedWrite::new(tx, ChunkCodec);
            for piece in data.chunks(chunk) {
                // The agent may stop reading early (a refusal): so may we.
                if frames
                    .send(Chunk::Data(Bytes::copy_from_slice(piece)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if end {
                let _ = frames.send(Chunk::End).await;
            }
            // Dropping the writer half ends the connection from our side
            // only when the reader half goes too; shut it down instead.
            let _ = frames.into_inner().shutdown().await;
        };
        let receive = async move {
            let mut all = Vec::new();
            rx.read_to_end(&mut all).await.unwrap();
            let mut buf = BytesMut::from(&all[..]);
            let mut replies = Vec::new();
            while let Some(r) = FileReply::take_line(&mut buf).unwrap() {
                replies.push(r);
            }
            assert!(buf.is_empty(), "bytes after the replies");
            replies
        };
        let (served, (), replies) = tokio::time::timeout(HANG, async {
            tokio::join!(serve(agent, op, &home), send, receive)
        })
        .await
        .expect("the write hung");
        (replies, served)
    }

    async fn write(&self, path: &str, data: &[u8]) -> Vec<FileReply> {
        let (replies, served) = self.write_with(path, u64::MAX, data, 100_000, true).await;
        served.unwrap();
        replies
    }

    async fn tar(&self, path: &str, max_bytes: u64) -> (FileReply, Vec<u8>) {
        self.run(FileOp::Tar {
            path: hp(path),
            max_bytes,
        })
        .await
    }

    async fn delete(&self, path: &str) -> FileReply {
        let (reply, rest) = self.run(FileOp::Delete { path: hp(path) }).await;
        assert!(rest.is_empty());
        reply
    }
}

fn hp(s: &str) -> HomePath {
    HomePath::parse(s).unwrap()
}

#[track_caller]
fn assert_refused(reply: &FileReply, want: Refusal) {
    match reply {
        FileReply::Refused { reason, detail } => {
            assert_eq!(*reason, want, "{detail}");
            assert!(detail.contains("~/"), "the detail names the path: {detail}");
            assert!(
                !detail.contains("outside the home"),
                "the detail shows no content: {detail}"
            );
        }
        other => panic!("expected a refusal ({want:?}), got {other:?}"),
    }
}

/// Some bytes that are not all alike.
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn a_file_is_read_whole_and_a_directory_listed_in_order() {
    let f = Fixture::new();
    let h = f.home();
    fs::create_dir(h.join("docs")).unwrap();
    fs::write(h.join("docs/b.txt"), b"bee").unwrap();
    fs::write(h.join("docs/a.txt"), b"hello").unwrap();
    fs::create_dir(h.join("docs/sub")).unwrap();
    symlink(f.outside(), h.join("docs/link")).unwrap();

    let (reply, body) = f.read("docs/a.txt").await;
    assert_eq!(reply, FileReply::File { size: 5 });
    assert_eq!(body, b"hello");

    let (reply, body) = f.read("~/docs").await;
    assert_eq!(reply, FileReply::Directory);
    let listing: Listing = serde_json::from_slice(&body).unwrap();
    assert_eq!(listing.path, "docs");
    assert_eq!(listing.omitted, 0);
    let got: Vec<_> = listing
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.kind, e.size))
        .collect();
    assert_eq!(
        got,
        [
            ("a.txt", EntryKind::File, 5),
            ("b.txt", EntryKind::File, 3),
            // Listed as what it is, not followed out of the home.
            ("link", EntryKind::Symlink, 0),
            ("sub", EntryKind::Directory, 0),
        ]
    );
    assert!(listing.entries[0].modified_ms > 1_600_000_000_000);

    let (reply, _) = f.read("").await;
    assert_eq!(reply, FileReply::Directory, "the home itself is listed");
    assert_refused(&f.read("nope").await.0, Refusal::NotFound);
    assert_refused(&f.read("docs/a.txt/x").await.0, Refusal::Conflict);
}

#[tokio::test]
async fn a_file_over_the_limit_is_refused_and_an_empty_one_is_sent() {
    let f = Fixture::new();
    fs::write(f.home().join("big"), pattern(1000)).unwrap();
    fs::write(f.home().join("empty"), b"").unwrap();
    let (reply, body) = f
        .run(FileOp::Read {
            path: hp("big"),
            max_bytes: 999,
        })
        .await;
    assert_refused(&reply, Refusal::TooLarge);
    assert!(body.is_empty());
    assert_eq!(f.read("empty").await, (FileReply::File { size: 0 }, vec![]));
}

#[tokio::test]
async fn a_long_listing_keeps_the_first_names_and_counts_the_rest() {
    let f = Fixture::new();
    let dir = f.home().join("many");
    fs::create_dir(&dir).unwrap();
    let n = MAX_LISTING + 7;
    for i in 0..n {
        fs::write(dir.join(format!("{i:06}")), b"").unwrap();
    }
    let (reply, body) = f.read("many").await;
    assert_eq!(reply, FileReply::Directory);
    let listing: Listing = serde_json::from_slice(&body).unwrap();
    assert_eq!(listing.entries.len(), MAX_LISTING);
    assert_eq!(listing.omitted, 7);
    assert_eq!(listing.entries[0].name, "000000");
    assert_eq!(
        listing.entries.last().unwrap().name,
        format!("{:06}", MAX_LISTING - 1)
    );
}

#[tokio::test]
async fn a_write_of_several_mib_in_chunks_reads_back_equal() {
    let f = Fixture::new();
    let data = pattern(5 * 1024 * 1024 + 123);
    let (replies, served) = f
        .write_with("new/deeper/blob.bin", u64::MAX, &data, 200_000, true)
        .await;
    served.unwrap();
    assert_eq!(
        replies,
        [
            FileReply::Ready,
            FileReply::Done {
                size: data.len() as u64
            }
        ]
    );
    let (reply, body) = f.read("new/deeper/blob.bin").await;
    assert_eq!(
        reply,
        FileReply::File {
            size: data.len() as u64
        }
    );
    assert!(body == data, "the bytes read back differ");
    f.no_temp_left();
}

#[tokio::test]
async fn a_write_replaces_a_file_and_keeps_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    let target = f.home().join("script.sh");
    fs::write(&target, b"old").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o751)).unwrap();
    assert_eq!(
        f.write("script.sh", b"new content").await,
        [FileReply::Ready, FileReply::Done { size: 11 }]
    );
    assert_eq!(fs::read(&target).unwrap(), b"new content");
    let mode = fs::metadata(&target).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o751);
    // An empty file is a file too.
    assert_eq!(
        f.write("empty", b"").await,
        [FileReply::Ready, FileReply::Done { size: 0 }]
    );
    assert_eq!(fs::read(f.home().join("empty")).unwrap(), b"");
}

#[tokio::test]
async fn a_write_cut_off_before_its_end_leaves_the_old_file() {
    let f = Fixture::new();
    let target = f.home().join("notes.txt");
    fs::write(&target, b"the old notes").unwrap();
    let (replies, served) = f
        .write_with("notes.txt", u64::MAX, &pattern(300_000), 64 * 1024, false)
        .await;
    assert_eq!(replies, [FileReply::Ready]);
    let err = format!("{:#}", served.unwrap_err());
    assert!(err.contains("ended before the end"), "{err}");
    assert_eq!(fs::read(&target).unwrap(), b"the old notes");
    f.no_temp_left();
}

#[tokio::test]
async fn a_write_over_the_limit_is_refused_and_leaves_nothing() {
    let f = Fixture::new();
    let (replies, served) = f
        .write_with("big.bin", 100_000, &pattern(300_000), 64 * 1024, true)
        .await;
    served.unwrap();
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0], FileReply::Ready);
    assert_refused(&replies[1], Refusal::TooLarge);
    assert!(!f.home().join("big.bin").exists());
    f.no_temp_left();
}

#[tokio::test]
async fn a_write_onto_a_directory_or_below_a_file_conflicts() {
    let f = Fixture::new();
    fs::create_dir(f.home().join("dir")).unwrap();
    fs::write(f.home().join("file"), b"x").unwrap();
    for path in ["dir", "file/below", "file/below/deeper", ""] {
        let replies = f.write(path, b"data").await;
        assert_eq!(replies.len(), 1, "{path}: {replies:?}");
        assert_refused(&replies[0], Refusal::Conflict);
    }
    assert!(f.home().join("dir").is_dir());
    assert_eq!(fs::read(f.home().join("file")).unwrap(), b"x");
    f.no_temp_left();
}

/// Links out of the home, each standing for a way out: to a directory
/// outside, relative, absolute, to `/`, and to a file outside.
fn plant_escapes(f: &Fixture) {
    let h = f.home();
    symlink(f.outside(), h.join("out")).unwrap();
    symlink("../outside", h.join("up")).unwrap();
    symlink("/", h.join("root")).unwrap();
    symlink(f.outside().join("secret"), h.join("passwd")).unwrap();
    // Inside, then out: a chain is judged where it ends.
    fs::create_dir(h.join("d")).unwrap();
    symlink("../up", h.join("d/hop")).unwrap();
}

const ESCAPES: &[&str] = &[
    "out",
    "out/secret",
    "out/dir/inner",
    "up/secret",
    "up/dir",
    "passwd",
    "d/hop/secret",
];

#[tokio::test]
async fn reads_and_archives_through_links_out_of_the_home_are_refused() {
    let f = Fixture::new();
    plant_escapes(&f);
    let root_file = if Path::new("/etc/hostname").exists() {
        "root/etc/hostname"
    } else {
        "root/proc/self/status"
    };
    for path in ESCAPES.iter().copied().chain([root_file, "root"]) {
        let (reply, body) = f.read(path).await;
        assert_refused(&reply, Refusal::BadPath);
        assert!(body.is_empty(), "{path}");
        let (reply, body) = f.tar(path, u64::MAX).await;
        assert_refused(&reply, Refusal::BadPath);
        assert!(body.is_empty(), "{path}");
    }
    f.outside_untouched();
}

#[tokio::test]
async fn writes_through_links_out_of_the_home_are_refused() {
    let f = Fixture::new();
    plant_escapes(&f);
    for path in
        ESCAPES
            .iter()
            .copied()
            .chain(["out/new", "out/dir/new", "up/new/deeper", "root/tmp/new"])
    {
        let replies = f.write(path, b"overwritten").await;
        assert_eq!(replies.len(), 1, "{path}: {replies:?}");
        assert_refused(&replies[0], Refusal::BadPath);
    }
    f.outside_untouched();
    assert!(!Path::new("/tmp/new").exists());
    // The links themselves are left as they were.
    let passwd = fs::symlink_metadata(f.home().join("passwd")).unwrap();
    assert!(passwd.file_type().is_symlink());
    f.no_temp_left();
}

#[tokio::test]
async fn deletes_through_links_out_of_the_home_are_refused_and_links_themselves_go() {
    let f = Fixture::new();
    plant_escapes(&f);
    for path in [
        "out/secret",
        "out/dir",
        "up/dir/inner",
        "d/hop/secret",
        "root/tmp",
    ] {
        assert_refused(&f.delete(path).await, Refusal::BadPath);
    }
    f.outside_untouched();
    // The link is removed, never what it leads to.
    for link in ["out", "up", "passwd", "root", "d/hop"] {
        assert_eq!(f.delete(link).await, FileReply::Done { size: 0 }, "{link}");
        assert!(fs::symlink_metadata(f.home().join(link)).is_err(), "{link}");
    }
    f.outside_untouched();
}

#[tokio::test]
async fn links_that_stay_inside_are_followed() {
    let f = Fixture::new();
    let h = f.home();
    fs::create_dir_all(h.join("real/sub")).unwrap();
    fs::write(h.join("real/sub/f.txt"), b"inside").unwrap();
    // a -> b -> real, and a link to a file through the chain.
    symlink("b", h.join("a")).unwrap();
    symlink("real", h.join("b")).unwrap();
    fs::create_dir(h.join("x")).unwrap();
    symlink("../a/sub/f.txt", h.join("x/cfg")).unwrap();

    assert_eq!(
        f.read("a/sub/f.txt").await,
        (FileReply::File { size: 6 }, b"inside".to_vec())
    );
    assert_eq!(f.read("a/sub").await.0, FileReply::Directory);

    assert_eq!(
        f.write("a/sub/g.txt", b"gee").await[1],
        FileReply::Done { size: 3 }
    );
    assert_eq!(fs::read(h.join("real/sub/g.txt")).unwrap(), b"gee");
    // Writing to a link replaces the file it leads to; the link stays.
    assert_eq!(
        f.write("x/cfg", b"changed").await[1],
        FileReply::Done { size: 7 }
    );
    assert_eq!(fs::read(h.join("real/sub/f.txt")).unwrap(), b"changed");
    assert!(
        fs::symlink_metadata(h.join("x/cfg"))
            .unwrap()
            .file_type()
            .is_symlink()
    );

    assert_eq!(f.delete("a/sub/g.txt").await, FileReply::Done { size: 0 });
    assert!(!h.join("real/sub/g.txt").exists());
    f.no_temp_left();
}

#[tokio::test]
async fn a_fifo_a_socket_and_a_dangling_link_are_refused_without_blocking() {
    let f = Fixture::new();
    let h = f.home();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        h.join("fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(h.join("sock")).unwrap();
    symlink("fifo", h.join("to-fifo")).unwrap();
    symlink("nowhere", h.join("dangling")).unwrap();
    for path in ["fifo", "sock", "to-fifo"] {
        assert_refused(&f.read(path).await.0, Refusal::BadPath);
        assert_refused(&f.tar(path, u64::MAX).await.0, Refusal::BadPath);
        let replies = f.write(path, b"x").await;
        assert_refused(&replies[0], Refusal::BadPath);
    }
    assert_refused(&f.read("dangling").await.0, Refusal::NotFound);
    assert_refused(&f.write("dangling", b"x").await[0], Refusal::Conflict);
    // Still a FIFO: nothing was written over it.
    let st = fs::symlink_metadata(h.join("fifo")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&st.file_type()));
    // Delete removes one like any other file.
    assert_eq!(f.delete("fifo").await, FileReply::Done { size: 0 });
}

#[tokio::test]
async fn delete_of_a_tree_removes_links_in_it_not_their_targets() {
    let f = Fixture::new();
    let h = f.home();
    fs::create_dir_all(h.join("proj/a/b/c")).unwrap();
    fs::write(h.join("proj/a/b/c/deep.txt"), b"deep").unwrap();
    fs::write(h.join("proj/top.txt"), b"top").unwrap();
    symlink(f.outside(), h.join("proj/out")).unwrap();
    symlink(f.outside().join("secret"), h.join("proj/a/secret")).unwrap();
    symlink("/", h.join("proj/a/b/root")).unwrap();
    fs::write(h.join("keep.txt"), b"keep").unwrap();

    assert_eq!(f.delete("proj").await, FileReply::Done { size: 0 });
    assert!(fs::symlink_metadata(h.join("proj")).is_err());
    assert_eq!(fs::read(h.join("keep.txt")).unwrap(), b"keep");
    f.outside_untouched();

    assert_refused(&f.delete("proj").await, Refusal::NotFound);
    assert_refused(&f.delete("~").await, Refusal::BadPath);
    assert!(h.is_dir());
}

#[tokio::test]
async fn a_tar_of_a_directory_unpacks_to_the_same_tree_with_links_kept() {
    let f = Fixture::new();
    let h = f.home();
    let blob = pattern(300_000);
    fs::create_dir_all(h.join("proj/sub/empty")).unwrap();
    fs::write(h.join("proj/a.txt"), b"alpha").unwrap();
    fs::write(h.join("proj/sub/b.bin"), &blob).unwrap();
    symlink("a.txt", h.join("proj/link")).unwrap();
    symlink(f.outside(), h.join("proj/out")).unwrap();
    let long = "n".repeat(150);
    fs::write(h.join("proj/sub").join(&long), b"long name").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        h.join("proj/fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();

    let (reply, body) = f.tar("proj", u64::MAX).await;
    assert_eq!(reply, FileReply::Archive);
    let unpacked = f.base.path().join("unpacked");
    tar::Archive::new(&body[..]).unpack(&unpacked).unwrap();

    assert_eq!(fs::read(unpacked.join("a.txt")).unwrap(), b"alpha");
    assert!(fs::read(unpacked.join("sub/b.bin")).unwrap() == blob);
    assert_eq!(
        fs::read(unpacked.join("sub").join(&long)).unwrap(),
        b"long name"
    );
    assert!(unpacked.join("sub/empty").is_dir());
    assert_eq!(
        fs::read_link(unpacked.join("link")).unwrap(),
        Path::new("a.txt")
    );
    // Archived as the link it is; nothing from outside came along.
    assert_eq!(fs::read_link(unpacked.join("out")).unwrap(), f.outside());
    assert!(
        fs::symlink_metadata(unpacked.join("fifo")).is_err(),
        "the FIFO is skipped"
    );
    let mut names: Vec<_> = fs::read_dir(&unpacked)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a.txt", "link", "out", "sub"]);

    // A single file is archived under its name.
    let (reply, body) = f.tar("proj/a.txt", u64::MAX).await;
    assert_eq!(reply, FileReply::Archive);
    let mut archive = tar::Archive::new(&body[..]);
    let mut entries = archive.entries().unwrap();
    let mut entry = entries.next().unwrap().unwrap();
    assert_eq!(entry.path().unwrap(), Path::new("a.txt"));
    let mut content = Vec::new();
    std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
    assert_eq!(content, b"alpha");
}

#[tokio::test]
async fn a_tar_past_its_limit_stops_without_an_end_marker() {
    let f = Fixture::new();
    let h = f.home();
    fs::create_dir(h.join("proj")).unwrap();
    for i in 0..4 {
        fs::write(h.join(format!("proj/{i}.bin")), pattern(100_000)).unwrap();
    }
    let (reply, body) = f.tar("proj", 250_000).await;
    assert_eq!(reply, FileReply::Archive);
    assert!(body.len() <= 250_000, "{} bytes sent", body.len());
    assert!(!body.ends_with(&[0; 1024]), "an end marker was sent");
    // The same tree within its limit is whole.
    let (_, whole) = f.tar("proj", 1 << 20).await;
    assert!(whole.len() > 400_000 && whole.ends_with(&[0; 1024]));
}

#[tokio::test]
async fn a_path_with_parent_components_never_gets_here() {
    // The protocol type refuses it before any operation exists.
    assert!(HomePath::parse("a/../../outside/secret").is_err());
    assert!(
        serde_json::from_str::<FileOp>(r#"{"op":"read","path":"../outside","max_bytes":1}"#)
            .is_err()
    );
}

/// While the session swaps a directory of the home with a link out of it
/// as fast as it can, no operation reads, writes or removes anything
/// outside: each lands inside or is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_swapping_a_directory_for_a_link_out_never_gets_through() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    let f = Fixture::new();
    let h = f.home();
    fs::create_dir(h.join("swap")).unwrap();
    fs::write(h.join("swap/secret"), b"inside").unwrap();
    symlink(f.outside(), h.join("alt")).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, a, b) = (stop.clone(), h.join("swap"), h.join("alt"));
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &a,
                    rustix::fs::CWD,
                    &b,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .unwrap();
                swaps += 1;
            }
            swaps
        })
    };

    let allowed = |r: &FileReply| match r {
        FileReply::Refused { reason, .. } => {
            matches!(
                reason,
                Refusal::BadPath | Refusal::NotFound | Refusal::Conflict
            )
        }
        _ => true,
    };
    for i in 0..150 {
        let (reply, body) = f.read("swap/secret").await;
        assert!(allowed(&reply), "{reply:?}");
        assert!(
            body.is_empty() || body == b"inside" || body.starts_with(b"over"),
            "read {body:?}"
        );

        let (reply, body) = f.tar("swap", u64::MAX).await;
        assert!(allowed(&reply), "{reply:?}");
        assert!(
            !body.windows(SECRET.len()).any(|w| w == SECRET),
            "the archive holds the secret"
        );

        let data = format!("overwritten {i}");
        for reply in f.write("swap/secret", data.as_bytes()).await {
            assert!(allowed(&reply), "{reply:?}");
        }
        for reply in f.write("swap/dir/inner", data.as_bytes()).await {
            assert!(allowed(&reply), "{reply:?}");
        }
        if i % 10 == 0 {
            let reply = f.delete("swap/secret").await;
            assert!(allowed(&reply), "{reply:?}");
            let reply = f.delete("swap/dir").await;
            assert!(allowed(&reply), "{reply:?}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 0);
    f.outside_untouched();
    f.no_temp_left();
}

#[tokio::test]
async fn a_full_disk_is_reported_as_no_space_left() {
    // `/dev/full` fails every write with ENOSPC, as a full disk does.
    let Ok(full) = fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("no /dev/full here; skipped");
        return;
    };
    let (mut agent, server) = tokio::io::duplex(1 << 20);
    let mut frames = FramedWrite::new(server, ChunkCodec);
    for _ in 0..4 {
        frames
            .send(Chunk::Data(Bytes::from(pattern(100_000))))
            .await
            .unwrap();
    }
    frames.send(Chunk::End).await.unwrap();
    let got = receive(
        &mut agent,
        tokio::fs::File::from_std(full),
        &hp("x.bin"),
        u64::MAX,
    )
    .await;
    let Received::Refused(refused) = got else {
        panic!("a write to a full disk was not refused");
    };
    assert_eq!(refused.reason, Refusal::Failed);
    assert!(refused.detail.contains("no space left") && refused.detail.contains("~/x.bin"));
    let quota = Refused::errno(&hp("x.bin"), "writing", Errno::DQUOT);
    assert!(quota.detail.contains("no space left"), "{}", quota.detail);
}
