//! A throw-away PostgreSQL server for tests: `initdb` into a temporary
//! directory and `postgres` listening on a Unix socket there alone (no TCP
//! port), run as the `postgres` user of Debian's package, removed on drop.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `postgresql-15` puts its programs.
pub const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running throw-away server.
pub struct TestPostgres {
    dir: PathBuf,
    child: Child,
    uid: u32,
    gid: u32,
}

/// The uid and gid of the `postgres` user; PostgreSQL refuses to run as
/// root.
fn postgres_user() -> Option<(u32, u32)> {
    let name = std::ffi::CString::new("postgres").ok()?;
    // SAFETY: getpwnam returns null or a pointer to a static record, read
    // at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null, as checked.
    let pw = unsafe { &*pw };
    Some((pw.pw_uid, pw.pw_gid))
}

impl TestPostgres {
    /// Starts one; `Err` says why it could not (so a test can say why it
    /// is skipped): PostgreSQL 15 is not installed, or did not start.
    pub fn start() -> Result<TestPostgres, String> {
        let bin = Path::new(BIN);
        if !bin.join("postgres").exists() {
            return Err(format!(
                "no {BIN}/postgres: install the Debian package postgresql-15 (scripts/test does)"
            ));
        }
        let (uid, gid) = postgres_user()
            .ok_or("no `postgres` user: install the Debian package postgresql-15")?;
        let dir = std::env::temp_dir().join(format!("sandcast-pg-{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        let data = dir.join("data");
        let out = Command::new(bin.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data)
            .uid(uid)
            .gid(gid)
            .env_clear()
            .env("LANG", "C.UTF-8")
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let child = Command::new(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&dir)
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ])
            .uid(uid)
            .gid(gid)
            .env_clear()
            .env("LANG", "C.UTF-8")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("postgres: {e}"))?;
        let pg = TestPostgres {
            dir,
            child,
            uid,
            gid,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .arg("-h")
                .arg(&pg.dir)
                .args(["-U", "postgres", "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(pg);
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(pg.dir.join("server.log")).unwrap_or_default();
                return Err(format!("postgres did not start within 30 s: {log}"));
            }
            // pg_isready is the readiness check PostgreSQL offers; there is
            // no event to wait for.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`TestPostgres::start`], or none, said visibly, when this machine
    /// cannot run one; `SANDCAST_REQUIRE_POSTGRES` (set by `scripts/test`,
    /// which installs PostgreSQL) makes that a failure instead.
    pub fn start_or_skip() -> Option<TestPostgres> {
        match TestPostgres::start() {
            Ok(pg) => Some(pg),
            Err(why) if std::env::var_os("SANDCAST_REQUIRE_POSTGRES").is_none() => {
                eprintln!("SKIPPED: no PostgreSQL server for this test: {why}");
                None
            }
            Err(why) => panic!("SANDCAST_REQUIRE_POSTGRES is set: {why}"),
        }
    }

    /// Makes a new, empty database and returns its connection string.
    pub fn database(&self, name: &str) -> String {
        let out = Command::new(Path::new(BIN).join("psql"))
            .arg("-h")
            .arg(&self.dir)
            .args(["-U", "postgres", "-q", "-c"])
            .arg(format!("CREATE DATABASE \"{name}\""))
            .uid(self.uid)
            .gid(self.gid)
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "CREATE DATABASE {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(name)
    }

    /// The `postgres://` URL of database `name` (over the Unix socket).
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres:///{name}?host={}&user=postgres",
            self.dir.display()
        )
    }

    /// The directory of its socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown (clients are disconnected).
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
