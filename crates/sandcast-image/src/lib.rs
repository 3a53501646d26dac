//! Builds and checks sandcast root file system images.
//!
//! An image is a directory with three things:
//! - `rootfs/`: the root file system as a directory (the sandbox backend uses it);
//! - `rootfs.ext4`: the same as an ext4 image, made with `mkfs.ext4 -d`
//!   without mounting anything (a microVM's read-only root drive);
//! - `manifest.json`: what is in it ([`Manifest`]): every package with its
//!   version, the agent's version and digest, the build time and the ext4's
//!   SHA-256.
//!
//! [`build`] makes one from Debian's packages with `mmdebstrap` (Debian
//! bookworm by default; another suite, Ubuntu, and any mirror when asked).
//! Each step is skipped when its output exists and was made from the same
//! inputs, so an interrupted build resumes and an unchanged one is free.
//! [`check`] reads an image's manifest and refuses it, with the reason, when
//! it lacks what a session needs.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where the agent is installed inside every image.
pub const AGENT_PATH: &str = "/usr/local/bin/sandcast-agent";
/// Version of the manifest format.
pub const MANIFEST_FORMAT: u32 = 1;
/// File names inside an image directory.
pub const ROOTFS_DIR: &str = "rootfs";
/// The ext4 image's file name.
pub const ROOTFS_EXT4: &str = "rootfs.ext4";
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// Packages of the browser image.
pub const BROWSER_PACKAGES: &[&str] = &[
    "xvfb",
    "chromium",
    "x11vnc",
    "ca-certificates",
    "fonts-liberation",
    "fonts-dejavu-core",
    "fonts-noto-color-emoji",
];

/// Packages of the tiny test image: no browser, enough to run the agent.
pub const TINY_PACKAGES: &[&str] = &["busybox", "ca-certificates"];

/// Which image to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// Xvfb, Chromium, fonts, a VNC server, CA certificates and the agent.
    Browser,
    /// The agent on a minimal base; for fast tests, no browser.
    Tiny,
}

/// The distribution the packages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distro {
    /// Debian (default suite `bookworm`).
    Debian,
    /// Ubuntu (needs the `ubuntu-keyring` package on the build host).
    Ubuntu,
}

/// What to build. [`BuildOptions::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// The image directory to create or resume.
    pub output: PathBuf,
    /// Browser (default) or tiny.
    pub variant: Variant,
    /// Debian (default) or Ubuntu.
    pub distro: Distro,
    /// Suite; default `bookworm` for Debian, `noble` for Ubuntu.
    pub suite: Option<String>,
    /// Package mirror; default: the Debian mirror this host's apt uses (or
    /// `http://deb.debian.org/debian`), `http://archive.ubuntu.com/ubuntu`
    /// for Ubuntu.
    pub mirror: Option<String>,
    /// Extra packages on top of the variant's.
    pub extra_packages: Vec<String>,
    /// The agent binary to install (statically linked or linked against the
    /// image's glibc).
    pub agent_binary: PathBuf,
    /// The agent's version, for the manifest.
    pub agent_version: String,
    /// Free space left in the ext4 image, in MiB. Default 256.
    pub ext4_headroom_mib: u64,
}

impl BuildOptions {
    /// Options with the defaults: browser variant, Debian bookworm.
    pub fn new(
        output: impl Into<PathBuf>,
        agent_binary: impl Into<PathBuf>,
        agent_version: impl Into<String>,
    ) -> Self {
        BuildOptions {
            output: output.into(),
            variant: Variant::Browser,
            distro: Distro::Debian,
            suite: None,
            mirror: None,
            extra_packages: Vec::new(),
            agent_binary: agent_binary.into(),
            agent_version: agent_version.into(),
            ext4_headroom_mib: 256,
        }
    }

    fn suite(&self) -> String {
        self.suite.clone().unwrap_or_else(|| match self.distro {
            Distro::Debian => "bookworm".into(),
            Distro::Ubuntu => "noble".into(),
        })
    }

    fn mirror(&self) -> String {
        self.mirror.clone().unwrap_or_else(|| match self.distro {
            Distro::Debian => {
                host_debian_mirror().unwrap_or_else(|| "http://deb.debian.org/debian".into())
            }
            Distro::Ubuntu => "http://archive.ubuntu.com/ubuntu".into(),
        })
    }

    fn packages(&self) -> Vec<String> {
        let base = match self.variant {
            Variant::Browser => BROWSER_PACKAGES,
            Variant::Tiny => TINY_PACKAGES,
        };
        let mut p: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        p.extend(self.extra_packages.iter().cloned());
        p.sort();
        p.dedup();
        p
    }

    /// A digest of everything the root directory depends on.
    fn rootfs_key(&self) -> String {
        let key = serde_json::json!({
            "variant": self.variant,
            "distro": self.distro,
            "suite": self.suite(),
            "mirror": self.mirror(),
            "packages": self.packages(),
        });
        hex::encode(Sha256::digest(key.to_string().as_bytes()))
    }
}

/// The Debian mirror apt on this host uses, from its sources.
fn host_debian_mirror() -> Option<String> {
    let mut texts = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sources" || x == "list")
                && let Ok(t) = std::fs::read_to_string(&p)
            {
                texts.push(t);
            }
        }
    }
    texts.iter().flat_map(|t| t.lines()).find_map(|l| {
        let l = l.trim();
        let uri = if let Some(rest) = l.strip_prefix("URIs:") {
            rest.split_whitespace().next()
        } else if l.starts_with("deb ") {
            l.split_whitespace().find(|w| w.starts_with("http"))
        } else {
            None
        }?;
        (uri.ends_with("/debian") || uri.ends_with("/debian/"))
            .then(|| uri.trim_end_matches('/').to_owned())
    })
}

/// What an image contains, as recorded when it was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Which image.
    pub variant: Variant,
    /// Where the packages came from.
    pub distro: Distro,
    /// Suite.
    pub suite: String,
    /// Mirror.
    pub mirror: String,
    /// Installed packages and their versions (from dpkg's status).
    pub packages: BTreeMap<String, String>,
    /// The agent's version.
    pub agent_version: String,
    /// SHA-256 of the agent binary, hex.
    pub agent_sha256: String,
    /// Build time, seconds since the Unix epoch.
    pub built_at: u64,
    /// The ext4 image: its size in bytes.
    pub ext4_size: u64,
    /// SHA-256 of the ext4 image, hex.
    pub ext4_sha256: String,
    /// Digest of the inputs of the root directory (for caching).
    pub rootfs_key: String,
}

/// What an image must contain for a use.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Requirements {
    /// Packages that must be installed.
    pub packages: Vec<String>,
    /// The ext4 image must be there and match the manifest's size.
    pub ext4: bool,
    /// The ext4 image's digest must match the manifest (reads the whole file).
    pub verify_digest: bool,
    /// The root directory must be there with the agent in it.
    pub directory: bool,
}

impl Requirements {
    /// What a browser session needs: Xvfb, Chromium and the VNC server.
    pub fn browser() -> Self {
        Requirements {
            packages: ["xvfb", "chromium", "x11vnc", "ca-certificates"]
                .map(String::from)
                .to_vec(),
            ..Requirements::default()
        }
    }
}

/// Why an image cannot be built or used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image has no manifest.
    #[error("image {dir} has no manifest ({reason}); build it with `sandcast image build`")]
    NoManifest {
        /// The image directory.
        dir: PathBuf,
        /// The I/O or parse error.
        reason: String,
    },
    /// The manifest is of another format.
    #[error(
        "image {dir} has manifest format {found}, this sandcast reads format {expected}; rebuild the image"
    )]
    Format {
        /// The image directory.
        dir: PathBuf,
        /// Its format.
        found: u32,
        /// Ours.
        expected: u32,
    },
    /// Packages a session needs are not in the image.
    #[error("image {dir} lacks {}: rebuild it with `sandcast image build`", missing.join(", "))]
    MissingPackages {
        /// The image directory.
        dir: PathBuf,
        /// The missing packages.
        missing: Vec<String>,
    },
    /// A file of the image is missing or differs from the manifest.
    #[error("image {dir}: {reason}")]
    Damaged {
        /// The image directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A build step failed.
    #[error("image build step {step} failed: {reason}")]
    Step {
        /// The step.
        step: &'static str,
        /// Why, with the tool's own output.
        reason: String,
    },
    /// Bad options.
    #[error("invalid image build options: {0}")]
    Options(String),
}

/// Which steps a build ran and which it skipped because their outputs were
/// up to date.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildReport {
    /// The image's manifest.
    pub manifest: Manifest,
    /// Steps that ran.
    pub ran: Vec<&'static str>,
    /// Steps skipped as up to date.
    pub skipped: Vec<&'static str>,
}

/// Builds (or resumes, or confirms) an image; see the crate documentation.
pub fn build(opts: &BuildOptions) -> Result<Manifest, ImageError> {
    build_with_report(opts).map(|r| r.manifest)
}

/// [`build`], saying which steps ran.
pub fn build_with_report(opts: &BuildOptions) -> Result<BuildReport, ImageError> {
    let agent = std::fs::read(&opts.agent_binary).map_err(|e| {
        ImageError::Options(format!("agent binary {}: {e}", opts.agent_binary.display()))
    })?;
    if let Some(bad) = opts.packages().into_iter().find(|p| {
        p.is_empty()
            || !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
    }) {
        return Err(ImageError::Options(format!("bad package name {bad:?}")));
    }
    let agent_sha256 = hex::encode(Sha256::digest(&agent));
    let out = &opts.output;
    std::fs::create_dir_all(out).map_err(|e| step_io("prepare", out, e))?;
    let previous: Option<Manifest> = std::fs::read(out.join(MANIFEST))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut ran = Vec::new();
    let mut skipped = Vec::new();

    // Step 1: the root directory from packages.
    let key = opts.rootfs_key();
    let rootfs = out.join(ROOTFS_DIR);
    let marker = rootfs.join(".sandcast-rootfs-key");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(key.as_str()) {
        skipped.push("bootstrap");
    } else {
        bootstrap(opts, out, &key)?;
        ran.push("bootstrap");
    }

    // Step 2: the agent, as /usr/local/bin/sandcast-agent and the VM's init.
    let agent_dst = rootfs.join(AGENT_PATH.trim_start_matches('/'));
    let current = std::fs::read(&agent_dst)
        .ok()
        .map(|b| hex::encode(Sha256::digest(&b)));
    if current.as_deref() == Some(agent_sha256.as_str()) {
        skipped.push("agent");
    } else {
        install_agent(&rootfs, &agent)?;
        ran.push("agent");
    }

    // Step 3: the ext4 image, made from the directory without mounting.
    let ext4 = out.join(ROOTFS_EXT4);
    let up_to_date = previous.as_ref().is_some_and(|m| {
        m.rootfs_key == key
            && m.agent_sha256 == agent_sha256
            && std::fs::metadata(&ext4).is_ok_and(|md| md.len() == m.ext4_size)
    });
    let (ext4_size, ext4_sha256) = if up_to_date {
        skipped.push("ext4");
        let m = previous.as_ref().expect("checked");
        (m.ext4_size, m.ext4_sha256.clone())
    } else {
        let _ = std::fs::remove_file(out.join(MANIFEST));
        make_ext4(&rootfs, &ext4, opts.ext4_headroom_mib)?;
        ran.push("ext4");
        let size = std::fs::metadata(&ext4)
            .map_err(|e| step_io("ext4", &ext4, e))?
            .len();
        (
            size,
            sha256_file(&ext4).map_err(|e| step_io("ext4", &ext4, e))?,
        )
    };

    // Step 4: the manifest.
    let packages = installed_packages(&rootfs)?;
    let built_at = match (&previous, up_to_date) {
        (Some(m), true) => m.built_at,
        _ => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        variant: opts.variant,
        distro: opts.distro,
        suite: opts.suite(),
        mirror: opts.mirror(),
        packages,
        agent_version: opts.agent_version.clone(),
        agent_sha256,
        built_at,
        ext4_size,
        ext4_sha256,
        rootfs_key: key,
    };
    let tmp = out.join(format!("{MANIFEST}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&manifest).expect("manifest serialises"),
    )
    .and_then(|()| std::fs::rename(&tmp, out.join(MANIFEST)))
    .map_err(|e| step_io("manifest", &out.join(MANIFEST), e))?;
    Ok(BuildReport {
        manifest,
        ran,
        skipped,
    })
}

fn step_io(step: &'static str, path: &Path, e: std::io::Error) -> ImageError {
    ImageError::Step {
        step,
        reason: format!("{}: {e}", path.display()),
    }
}

fn run(step: &'static str, cmd: &mut Command) -> Result<(), ImageError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| ImageError::Step {
        step,
        reason: format!("cannot run {shown}: {e}"),
    })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
    Err(ImageError::Step {
        step,
        reason: format!(
            "{shown} failed ({}): {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ),
    })
}

/// Runs mmdebstrap into a fresh temporary directory and moves it in place,
/// so an interrupted run never leaves a half-made root that looks complete.
fn bootstrap(opts: &BuildOptions, out: &Path, key: &str) -> Result<(), ImageError> {
    let tmp = out.join(format!("{ROOTFS_DIR}.tmp"));
    let rootfs = out.join(ROOTFS_DIR);
    for d in [&tmp, &rootfs] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(|e| step_io("bootstrap", d, e))?;
        }
    }
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg(match opts.variant {
        Variant::Browser => "--variant=apt",
        Variant::Tiny => "--variant=essential",
    })
    .arg(format!("--include={}", opts.packages().join(",")))
    .arg("--aptopt=APT::Install-Recommends \"false\"")
    // Documentation and manual pages are of no use in a session.
    .arg("--dpkgopt=path-exclude=/usr/share/man/*")
    .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
    .arg("--dpkgopt=path-include=/usr/share/doc/*/copyright")
    .arg("--dpkgopt=path-exclude=/usr/share/locale/*")
    .arg("--dpkgopt=path-include=/usr/share/locale/locale.alias");
    if opts.distro == Distro::Ubuntu {
        cmd.arg("--components=main,universe")
            .arg("--keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg");
    }
    cmd.arg(opts.suite()).arg(&tmp).arg(opts.mirror());
    if let Err(e) = run("bootstrap", &mut cmd) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Runtime settings every session expects.
    let files: [(&str, &str); 3] = [
        ("etc/hostname", "sandcast\n"),
        (
            "etc/hosts",
            "127.0.0.1 localhost\n127.0.1.1 sandcast\n::1 localhost\n",
        ),
        ("etc/resolv.conf", "nameserver 1.1.1.1\n"),
    ];
    for (name, text) in files {
        let p = tmp.join(name);
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, text).map_err(|e| step_io("bootstrap", &p, e))?;
    }
    add_session_user(&tmp)?;
    std::fs::write(tmp.join(".sandcast-rootfs-key"), key)
        .map_err(|e| step_io("bootstrap", &tmp, e))?;
    std::fs::rename(&tmp, &rootfs).map_err(|e| step_io("bootstrap", &rootfs, e))
}

/// The unprivileged user sessions run the browser as (uid 1000).
fn add_session_user(root: &Path) -> Result<(), ImageError> {
    use std::io::Write;
    let append = |name: &str, line: &str| -> Result<(), ImageError> {
        let p = root.join(name);
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        if text.lines().any(|l| l.starts_with("sandcast:")) {
            return Ok(());
        }
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&p)
            .and_then(|mut f| writeln!(f, "{line}"))
            .map_err(|e| step_io("bootstrap", &p, e))
    };
    append(
        "etc/passwd",
        "sandcast:x:1000:1000:sandcast session:/home/sandcast:/bin/sh",
    )?;
    append("etc/group", "sandcast:x:1000:")?;
    append("etc/shadow", "sandcast:!:19000:0:99999:7:::")?;
    let home = root.join("home/sandcast");
    std::fs::create_dir_all(&home).map_err(|e| step_io("bootstrap", &home, e))?;
    std::os::unix::fs::chown(&home, Some(1000), Some(1000))
        .map_err(|e| step_io("bootstrap", &home, e))
}

fn install_agent(rootfs: &Path, agent: &[u8]) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let dst = rootfs.join(AGENT_PATH.trim_start_matches('/'));
    let parent = dst.parent().expect("has a parent");
    std::fs::create_dir_all(parent).map_err(|e| step_io("agent", parent, e))?;
    let tmp = dst.with_extension("tmp");
    std::fs::write(&tmp, agent)
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| std::fs::rename(&tmp, &dst))
        .map_err(|e| step_io("agent", &dst, e))?;
    // The agent is also the microVM's init, for kernels booted without `init=`.
    let init = rootfs.join("sbin/init");
    if init.symlink_metadata().is_ok() {
        std::fs::remove_file(&init).map_err(|e| step_io("agent", &init, e))?;
    }
    std::os::unix::fs::symlink(AGENT_PATH, &init).map_err(|e| step_io("agent", &init, e))
}

/// Size of a directory tree in bytes (files' apparent sizes plus a block per
/// entry for metadata).
fn tree_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let md = e.path().symlink_metadata()?;
            total += 4096;
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                total += md.len();
            }
        }
    }
    Ok(total)
}

fn make_ext4(rootfs: &Path, ext4: &Path, headroom_mib: u64) -> Result<(), ImageError> {
    let bytes = tree_size(rootfs).map_err(|e| step_io("ext4", rootfs, e))?;
    // ext4 metadata and block rounding need about a tenth more.
    let mib = (bytes + bytes / 10).div_ceil(1 << 20) + headroom_mib;
    let tmp = ext4.with_extension("ext4.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::File::create(&tmp)
        .and_then(|f| f.set_len(mib << 20))
        .map_err(|e| step_io("ext4", &tmp, e))?;
    let result = run(
        "ext4",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "sandcast-root", "-E", "root_owner=0:0"])
            // A read-only root needs no journal.
            .args(["-O", "^has_journal"])
            .arg("-d")
            .arg(rootfs)
            .arg(&tmp),
    )
    .and_then(|()| std::fs::rename(&tmp, ext4).map_err(|e| step_io("ext4", ext4, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Installed packages and versions from a root's dpkg status file.
fn installed_packages(rootfs: &Path) -> Result<BTreeMap<String, String>, ImageError> {
    let status = rootfs.join("var/lib/dpkg/status");
    let text = std::fs::read_to_string(&status).map_err(|e| step_io("manifest", &status, e))?;
    Ok(parse_dpkg_status(&text))
}

/// Parses dpkg's status file: packages whose status is `install ok installed`.
pub fn parse_dpkg_status(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stanza in text.split("\n\n") {
        let mut name = None;
        let mut version = None;
        let mut installed = false;
        for line in stanza.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Status: ") {
                installed = v.trim() == "install ok installed";
            }
        }
        if let (Some(n), Some(v), true) = (name, version, installed) {
            out.insert(n.to_owned(), v.to_owned());
        }
    }
    out
}

/// Reads an image's manifest and checks it against `req`; the error says
/// exactly what is missing or wrong.
pub fn check(image_dir: &Path, req: &Requirements) -> Result<Manifest, ImageError> {
    let path = image_dir.join(MANIFEST);
    let manifest: Manifest = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|reason| ImageError::NoManifest {
            dir: image_dir.to_owned(),
            reason,
        })?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(ImageError::Format {
            dir: image_dir.to_owned(),
            found: manifest.format,
            expected: MANIFEST_FORMAT,
        });
    }
    let missing: Vec<String> = req
        .packages
        .iter()
        .filter(|p| !manifest.packages.contains_key(*p))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(ImageError::MissingPackages {
            dir: image_dir.to_owned(),
            missing,
        });
    }
    let damaged = |reason: String| ImageError::Damaged {
        dir: image_dir.to_owned(),
        reason,
    };
    if req.ext4 || req.verify_digest {
        let ext4 = image_dir.join(ROOTFS_EXT4);
        let md =
            std::fs::metadata(&ext4).map_err(|e| damaged(format!("{}: {e}", ext4.display())))?;
        if md.len() != manifest.ext4_size {
            return Err(damaged(format!(
                "{} is {} bytes, the manifest says {}",
                ext4.display(),
                md.len(),
                manifest.ext4_size
            )));
        }
        if req.verify_digest {
            let digest =
                sha256_file(&ext4).map_err(|e| damaged(format!("{}: {e}", ext4.display())))?;
            if digest != manifest.ext4_sha256 {
                return Err(damaged(format!(
                    "{} has SHA-256 {digest}, the manifest says {}",
                    ext4.display(),
                    manifest.ext4_sha256
                )));
            }
        }
    }
    if req.directory {
        let agent = image_dir
            .join(ROOTFS_DIR)
            .join(AGENT_PATH.trim_start_matches('/'));
        if !agent.is_file() {
            return Err(damaged(format!("the agent {} is missing", agent.display())));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(packages: &[&str]) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            variant: Variant::Tiny,
            distro: Distro::Debian,
            suite: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
            packages: packages
                .iter()
                .map(|p| (p.to_string(), "1.0".to_string()))
                .collect(),
            agent_version: "0.1.0".into(),
            agent_sha256: "00".into(),
            built_at: 0,
            ext4_size: 4,
            ext4_sha256: hex::encode(Sha256::digest(b"ext4")),
            rootfs_key: String::new(),
        }
    }

    fn image_dir(name: &str, m: &Manifest) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sc-image-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(MANIFEST), serde_json::to_vec(m).unwrap()).unwrap();
        std::fs::write(d.join(ROOTFS_EXT4), b"ext4").unwrap();
        d
    }

    #[test]
    fn check_refuses_an_image_without_the_browser_naming_what_is_missing() {
        let d = image_dir(
            "nobrowser",
            &manifest(&["busybox", "ca-certificates", "x11vnc"]),
        );
        let e = check(&d, &Requirements::browser()).unwrap_err();
        match &e {
            ImageError::MissingPackages { missing, .. } => {
                assert_eq!(missing, &["xvfb", "chromium"])
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("lacks xvfb, chromium"), "{e}");
        let ok = check(
            &d,
            &Requirements {
                packages: vec!["busybox".into()],
                ext4: true,
                verify_digest: true,
                directory: false,
            },
        );
        assert!(ok.is_ok(), "{ok:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn check_notices_a_changed_or_missing_ext4_and_a_missing_manifest() {
        let d = image_dir("damaged", &manifest(&["busybox"]));
        std::fs::write(d.join(ROOTFS_EXT4), b"EXT4").unwrap();
        let req = Requirements {
            verify_digest: true,
            ..Requirements::default()
        };
        let e = check(&d, &req).unwrap_err();
        assert!(e.to_string().contains("has SHA-256"), "{e}");
        std::fs::remove_file(d.join(ROOTFS_EXT4)).unwrap();
        let e = check(&d, &req).unwrap_err();
        assert!(e.to_string().contains(ROOTFS_EXT4), "{e}");
        std::fs::remove_file(d.join(MANIFEST)).unwrap();
        let e = check(&d, &req).unwrap_err();
        assert!(matches!(e, ImageError::NoManifest { .. }), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn dpkg_status_gives_installed_packages_only() {
        let status = "Package: busybox\nStatus: install ok installed\nVersion: 1:1.35.0-4+b3\n\n\
                      Package: removed\nStatus: deinstall ok config-files\nVersion: 2\n\n\
                      Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.36-9+deb12u10\n";
        let p = parse_dpkg_status(status);
        assert_eq!(p.len(), 2);
        assert_eq!(p["busybox"], "1:1.35.0-4+b3");
        assert_eq!(p["libc6"], "2.36-9+deb12u10");
    }

    #[test]
    fn options_have_documented_defaults_and_a_stable_key() {
        let mut o = BuildOptions::new("/tmp/x", "/bin/true", "1");
        assert_eq!(o.suite(), "bookworm");
        assert!(o.mirror().starts_with("http"), "{}", o.mirror());
        assert!(o.packages().contains(&"chromium".to_string()));
        let key = o.rootfs_key();
        assert_eq!(key, o.rootfs_key());
        o.extra_packages.push("curl".into());
        assert_ne!(key, o.rootfs_key());
        o.distro = Distro::Ubuntu;
        assert_eq!(o.suite(), "noble");
        assert_eq!(o.mirror(), "http://archive.ubuntu.com/ubuntu");
    }

    #[test]
    fn bad_package_names_and_agents_are_refused_before_building() {
        let mut o = BuildOptions::new("/tmp/sc-image-never", "/bin/true", "1");
        o.extra_packages.push("x; rm -rf /".into());
        let e = build(&o).unwrap_err();
        assert!(
            e.to_string().contains("bad package name \"x; rm -rf /\""),
            "{e}"
        );
        let o = BuildOptions::new("/tmp/sc-image-never", "/nonexistent/agent", "1");
        let e = build(&o).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/agent"), "{e}");
        assert!(!Path::new("/tmp/sc-image-never").exists());
    }
}
