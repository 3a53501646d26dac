//! A program in the session that opens a URL the way desktop programs do
//! (`xdg-open URL`, `$BROWSER URL`, `sensible-browser`, Python's
//! `webbrowser.open`) gets a new tab of the session's own browser, in
//! front, where the person in the viewer sees it: a command-line tool's
//! login opens its provider's sign-in page there, and the provider's
//! redirect to the tool's `127.0.0.1` listener stays on the session's
//! loopback.
//!
//! The agent puts small scripts by those names in a directory ahead of the
//! launch command's `PATH` (and `BROWSER` names one); each runs
//! `sandcast-agent open URL…`, which hands the URLs over a Unix socket to the
//! agent, which opens them through the browser's DevTools pipe. Anything in
//! the session may use the socket; it can only open tabs in its own
//! session's browser, whose URL filters still apply.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// The names a program looks for to open a URL.
pub const COMMANDS: [&str; 4] = [
    "xdg-open",
    "sensible-browser",
    "x-www-browser",
    "www-browser",
];

/// Longest URL accepted, in bytes.
pub const MAX_URL_LEN: usize = 8192;

/// How long `open` waits for the browser (it may still be starting).
const OPEN_DEADLINE: Duration = Duration::from_secs(30);

/// One URL to open, and where to say how it went.
#[derive(Debug)]
pub struct OpenRequest {
    /// A checked URL (see [`check_url`]).
    pub url: String,
    /// The new tab replaces every other page (a pooled session's claim:
    /// nothing of its warm-up stays, not even in the back history).
    pub replace: bool,
    /// `Err` names why the browser did not open it.
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// The scripts and socket, once installed.
#[derive(Debug, Clone)]
pub struct Opener {
    /// Directory holding the scripts, put ahead of `PATH`.
    pub bin_dir: PathBuf,
    /// The socket the agent listens on.
    pub socket: PathBuf,
}

impl Opener {
    /// Writes the scripts under `dir` (made 0700), each running `agent`.
    pub fn install(dir: &Path, agent: &Path) -> std::io::Result<Opener> {
        let bin_dir = dir.join("bin");
        let socket = dir.join("open.sock");
        std::fs::create_dir_all(&bin_dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let quote = |p: &Path| -> std::io::Result<String> {
            let s = p.to_str().filter(|s| !s.contains('\'')).ok_or_else(|| {
                std::io::Error::other(format!("{} cannot be quoted for sh", p.display()))
            })?;
            Ok(format!("'{s}'"))
        };
        let script = format!(
            "#!/bin/sh\n# Opens URLs in the session's browser.\nexec {} open --socket {} -- \"$@\"\n",
            quote(agent)?,
            quote(&socket)?
        );
        for name in COMMANDS {
            let path = bin_dir.join(name);
            std::fs::write(&path, &script)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(Opener { bin_dir, socket })
    }

    /// The environment a launch command gets: the scripts first on `PATH`,
    /// `BROWSER` naming one.
    pub fn env(&self, path: Option<&str>) -> Vec<(String, String)> {
        let bin = self.bin_dir.display().to_string();
        let path = match path {
            Some(p) if !p.is_empty() => format!("{bin}:{p}"),
            _ => bin.clone(),
        };
        vec![
            ("PATH".into(), path),
            ("BROWSER".into(), format!("{bin}/xdg-open")),
        ]
    }

    /// Removes the scripts and the socket.
    pub fn remove(&self) {
        if let Some(dir) = self.bin_dir.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Listens on the socket (replacing a stale one).
    pub fn bind(&self) -> std::io::Result<UnixListener> {
        let _ = std::fs::remove_file(&self.socket);
        UnixListener::bind(&self.socket)
    }

    /// Accepts connections until the listener fails, each a line per URL
    /// answered `ok` or `error: …`, and hands the URLs to `tx`.
    pub async fn serve(
        listener: UnixListener,
        tx: mpsc::Sender<OpenRequest>,
    ) -> std::io::Result<()> {
        loop {
            let (conn, _) = listener.accept().await?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = answer(conn, tx).await;
            });
        }
    }
}

async fn answer(conn: UnixStream, tx: mpsc::Sender<OpenRequest>) -> std::io::Result<()> {
    let (rd, mut wr) = conn.into_split();
    let mut lines = tokio::io::BufReader::new(rd.take(64 * MAX_URL_LEN as u64));
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let answer = match check_url(line.trim_end_matches('\n')) {
            Err(e) => Err(e),
            Ok(url) => {
                let (reply, rx) = oneshot::channel();
                if tx
                    .send(OpenRequest {
                        url,
                        replace: false,
                        reply,
                    })
                    .await
                    .is_err()
                {
                    Err("the agent is stopping".to_string())
                } else {
                    match tokio::time::timeout(OPEN_DEADLINE, rx).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(_)) => Err("the browser went away".to_string()),
                        Err(_) => Err("the browser did not open it within 30 s".to_string()),
                    }
                }
            }
        };
        let out = match answer {
            Ok(()) => "ok\n".to_string(),
            Err(e) => format!("error: {}\n", e.replace('\n', " ")),
        };
        wr.write_all(out.as_bytes()).await?;
    }
}

/// What may be opened: `http`, `https`, `file` and `about` URLs of at most
/// [`MAX_URL_LEN`] bytes without control characters; an absolute path
/// becomes a `file` URL. Whatever else the browser's URL filters refuse,
/// they refuse here too.
pub fn check_url(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("no URL given".into());
    }
    if raw.len() > MAX_URL_LEN {
        return Err(format!(
            "a URL of {} bytes; at most {MAX_URL_LEN}",
            raw.len()
        ));
    }
    if raw.chars().any(char::is_control) {
        return Err("the URL contains control characters".into());
    }
    if raw.starts_with('/') {
        return Ok(format!("file://{raw}"));
    }
    let scheme = raw.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http" | "https" | "file" | "about") => Ok(raw.to_string()),
        Some(s) => Err(format!(
            "cannot open {s}: URLs here; http, https, file and about ones open in the browser"
        )),
        None => Err(format!(
            "{raw:?} is not a URL (no scheme); give http://… or an absolute path"
        )),
    }
}

/// `sandcast-agent open [--socket PATH] [--] URL…`: the scripts' side.
/// Returns the process's exit code: 0 when every URL opened.
pub fn client_main(args: &[String]) -> u8 {
    let mut socket = None;
    let mut urls = Vec::new();
    let mut it = args.iter();
    let mut flags = true;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--socket" if flags => socket = it.next().cloned(),
            "--" if flags => flags = false,
            _ => urls.push(a.clone()),
        }
    }
    let Some(socket) = socket else {
        eprintln!("sandcast-agent open: --socket PATH is needed");
        return 2;
    };
    if urls.is_empty() {
        eprintln!("usage: xdg-open URL");
        return 1;
    }
    let conn = match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xdg-open: the session's browser cannot be reached at {socket}: {e}");
            return 3;
        }
    };
    let _ = conn.set_read_timeout(Some(OPEN_DEADLINE + Duration::from_secs(5)));
    let mut writer = &conn;
    let mut reader = BufReader::new(&conn);
    let mut code = 0;
    for url in &urls {
        let mut answer = String::new();
        if writeln!(writer, "{url}").is_err() || reader.read_line(&mut answer).is_err() {
            eprintln!("xdg-open: the agent did not answer for {url}");
            return 4;
        }
        if let Some(e) = answer.trim_end().strip_prefix("error: ") {
            eprintln!("xdg-open: {url}: {e}");
            code = 4;
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_paths_become_file_urls() {
        assert_eq!(
            check_url("https://example.org/a?b").unwrap(),
            "https://example.org/a?b"
        );
        assert_eq!(check_url(" HTTP://x/ \n").unwrap(), "HTTP://x/");
        assert_eq!(
            check_url("/home/sandcast/a.html").unwrap(),
            "file:///home/sandcast/a.html"
        );
        assert!(
            check_url("javascript:alert(1)")
                .unwrap_err()
                .contains("javascript")
        );
        assert!(
            check_url("chrome://settings")
                .unwrap_err()
                .contains("chrome")
        );
        assert!(check_url("example.org").unwrap_err().contains("no scheme"));
        assert!(check_url("").is_err());
        assert!(check_url("http://a/\u{7}").is_err());
        assert!(check_url(&format!("http://a/{}", "x".repeat(MAX_URL_LEN))).is_err());
    }

    #[tokio::test]
    async fn a_script_hands_its_urls_to_the_agent_and_reports_refusals() {
        let dir = std::env::temp_dir().join(format!("sc-opener-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let opener = Opener::install(&dir, Path::new("/bin/true")).unwrap();
        for name in COMMANDS {
            let text = std::fs::read_to_string(opener.bin_dir.join(name)).unwrap();
            assert!(text.contains("'/bin/true' open --socket"), "{text}");
        }
        let env = opener.env(Some("/usr/bin"));
        assert_eq!(env[0].1, format!("{}:/usr/bin", opener.bin_dir.display()));
        assert!(env[1].1.ends_with("/bin/xdg-open"));

        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(Opener::serve(opener.bind().unwrap(), tx));
        // The browser's side: opens the first, refuses the second.
        tokio::spawn(async move {
            let mut n = 0;
            while let Some(req) = rx.recv().await {
                n += 1;
                let _ = req.reply.send(if n == 1 {
                    Ok(())
                } else {
                    Err("blocked".into())
                });
            }
        });
        let socket = opener.socket.display().to_string();
        let run = |urls: Vec<&str>| {
            let mut args = vec!["--socket".to_string(), socket.clone(), "--".into()];
            args.extend(urls.into_iter().map(String::from));
            tokio::task::spawn_blocking(move || client_main(&args))
        };
        assert_eq!(run(vec!["https://example.org/"]).await.unwrap(), 0);
        assert_eq!(run(vec!["https://example.org/2"]).await.unwrap(), 4);
        // Refused before the browser is asked.
        assert_eq!(run(vec!["javascript:1"]).await.unwrap(), 4);
        assert_eq!(run(vec![]).await.unwrap(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
