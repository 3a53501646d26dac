//! Per-user profiles: a session created with `profile: true` has, as its
//! home, an ext4 image kept for its `user_id` under
//! `<data_dir>/profiles/` (0700; images and their records 0600), so the
//! browser's profile and a tool's dot-files outlive the session. The image
//! is made with `mkfs.ext4` at `[session] profile_mib` (its quota: a full
//! home is ENOSPC inside the session) and checked with `e2fsck -p` before
//! each use; its journal keeps it consistent when a session is killed
//! mid-write. At most one live session has a profile at a time (the
//! manager's rule).
//!
//! `GET /api/users/{user_id}/profile` says how big and how full it is
//! (`?archive=tar` exports it), `DELETE` wipes it, `PUT` imports a tar.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::api::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::manager::now_ms;

/// The profiles directory under a data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("profiles")
}

/// A user's files are named by a hash of the user id: any id the API
/// accepts makes a safe, fixed-length name.
fn key(user_id: &str) -> String {
    sandcast_proto::sha256_hex(user_id.as_bytes())[..32].to_string()
}

/// A user's image.
pub fn image(dir: &Path, user_id: &str) -> PathBuf {
    dir.join(format!("{}.ext4", key(user_id)))
}

fn meta_path(dir: &Path, user_id: &str) -> PathBuf {
    dir.join(format!("{}.json", key(user_id)))
}

/// What is kept beside an image.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Meta {
    /// Whose it is.
    pub user_id: String,
    /// Its size (the quota), in MiB.
    pub size_mib: u64,
    /// When it was made, milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// The last session that had it.
    pub last_session: Option<String>,
    /// When that session started, milliseconds since the Unix epoch.
    pub last_used_ms: Option<i64>,
}

fn read_meta(dir: &Path, user_id: &str) -> Option<Meta> {
    let bytes = std::fs::read(meta_path(dir, user_id)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn make_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

async fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<std::process::Output, String> {
    tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("running {program}: {e} (install e2fsprogs)"))
}

/// The user's image, made (`size_mib`) or checked, and recorded as used
/// by `session`. An image `e2fsck -p` cannot mend is refused, naming it.
pub async fn prepare(
    dir: &Path,
    user_id: &str,
    size_mib: u64,
    session: &str,
) -> Result<PathBuf, String> {
    make_dir(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let img = image(dir, user_id);
    let mut meta = match read_meta(dir, user_id) {
        Some(m) if img.exists() => m,
        _ => {
            let f = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&img)
            }
            .map_err(|e| format!("creating {}: {e}", img.display()))?;
            // Sparse: the host's disk holds what the session wrote.
            f.set_len(size_mib << 20)
                .map_err(|e| format!("sizing {}: {e}", img.display()))?;
            drop(f);
            let out = run(
                "mkfs.ext4",
                &[
                    "-q".as_ref(),
                    "-F".as_ref(),
                    "-m".as_ref(),
                    "0".as_ref(),
                    "-L".as_ref(),
                    "home".as_ref(),
                    img.as_os_str(),
                ],
            )
            .await?;
            if !out.status.success() {
                let _ = std::fs::remove_file(&img);
                return Err(format!(
                    "mkfs.ext4 {}: {}",
                    img.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Meta {
                user_id: user_id.to_string(),
                size_mib,
                created_ms: now_ms(),
                last_session: None,
                last_used_ms: None,
            }
        }
    };
    // 0: clean, 1: mended, 2: mended, reboot advised (not ours to do);
    // 4 and above: errors left, which a mount could make worse.
    let out = run("e2fsck", &["-p".as_ref(), img.as_os_str()]).await?;
    if out.status.code().is_none_or(|c| c >= 4) {
        return Err(format!(
            "the profile of {user_id:?} is damaged beyond e2fsck -p ({}): {}; wipe it with DELETE /api/users/{{user_id}}/profile",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    meta.last_session = Some(session.to_string());
    meta.last_used_ms = Some(now_ms());
    crate::auth::write_private(
        &meta_path(dir, user_id),
        &serde_json::to_vec(&meta).unwrap_or_default(),
    )
    .map_err(|e| format!("recording the profile: {e}"))?;
    Ok(img)
}

/// Bytes used and the total of an image's file system, from its superblock.
async fn usage(img: &Path) -> Result<(u64, u64), String> {
    let out = run("dumpe2fs", &["-h".as_ref(), img.as_os_str()]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_start_matches(':').trim().parse().ok())
    };
    match (
        field("Block count:"),
        field("Free blocks:"),
        field("Block size:"),
    ) {
        (Some(count), Some(free), Some(size)) => Ok(((count - free) * size, count * size)),
        _ => Err(format!("reading {}'s superblock", img.display())),
    }
}

/// Answer of `GET /api/users/{user_id}/profile`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProfileInfo {
    /// Whose it is.
    pub user_id: String,
    /// Its quota in MiB.
    pub size_mib: u64,
    /// Bytes in use (file system metadata included).
    pub used_bytes: u64,
    /// When it was made, milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// The last session that had it.
    pub last_session: Option<String>,
    /// When that session started, milliseconds since the Unix epoch.
    pub last_used_ms: Option<i64>,
    /// The session that has it now, if one runs.
    pub live_session: Option<String>,
}

/// Query of `GET /api/users/{user_id}/profile`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProfileQuery {
    /// `tar`: the profile's files as a tar archive (its export).
    archive: Option<String>,
}

fn check_user(user_id: &str) -> Result<(), ApiError> {
    crate::limits::check_name("user_id", user_id)
        .map_err(|e| ApiError::bad_request(e).detail(serde_json::json!({ "field": "user_id" })))
}

fn no_profile(user_id: &str) -> ApiError {
    ApiError::not_found(format!(
        "user {user_id:?} has no profile; a session created with \"profile\": true makes one"
    ))
}

/// Refuses while a session has the profile mounted: two mounts of one
/// ext4 file system would corrupt it.
fn not_in_use(state: &AppState, user_id: &str) -> Result<(), ApiError> {
    match state.manager.profile_session(user_id) {
        Some(id) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("session {id} has the profile of {user_id:?} now; delete it first"),
        )),
        None => Ok(()),
    }
}

/// A user's profile.
///
/// Its size and use, and the session that last had it; with
/// `archive=tar`, its files as a tar archive (only while no session has
/// it).
#[utoipa::path(
    get,
    path = "/api/users/{user_id}/profile",
    operation_id = "get_profile",
    tag = "profiles",
    security(("api_key" = [])),
    params(("user_id" = String, Path, description = "The operator's user id."), ProfileQuery),
    responses(
        (status = 200, description = "The profile (JSON), or its files as a tar archive.", body = ProfileInfo),
        (status = 400, description = "A malformed user id or archive.", body = ErrorBody),
        (status = 404, description = "The user has no profile.", body = ErrorBody),
        (status = 409, description = "A session has the profile now (export only).", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    UrlPath(user_id): UrlPath<String>,
    Query(q): Query<ProfileQuery>,
) -> Result<Response, ApiError> {
    check_user(&user_id)?;
    let dir = dir(&state.manager.config().data_dir);
    let meta = read_meta(&dir, &user_id).ok_or_else(|| no_profile(&user_id))?;
    let img = image(&dir, &user_id);
    match q.archive.as_deref() {
        None => {}
        Some("tar") => {
            not_in_use(&state, &user_id)?;
            return export(&img).await;
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "archive {other:?} is not \"tar\""
            )));
        }
    }
    let live = state.manager.profile_session(&user_id);
    Ok(axum::Json(info(user_id, meta, &img, live).await?).into_response())
}

/// What the API shows of a profile.
async fn info(
    user_id: String,
    meta: Meta,
    img: &Path,
    live_session: Option<String>,
) -> Result<ProfileInfo, ApiError> {
    let (used_bytes, _) = usage(img).await.map_err(ApiError::internal)?;
    Ok(ProfileInfo {
        live_session,
        user_id,
        size_mib: meta.size_mib,
        used_bytes,
        created_ms: meta.created_ms,
        last_session: meta.last_session,
        last_used_ms: meta.last_used_ms,
    })
}

/// The profile's files as a tar stream, read from a mount in a namespace
/// of its own (read-only).
async fn export(img: &Path) -> Result<Response, ApiError> {
    let mut child = sandcast_host::image::in_private_mount(
        img,
        "ro",
        r#"tar -C "$m" --exclude=./lost+found --numeric-owner -cf - ."#,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .map_err(|e| ApiError::internal(format!("running unshare: {e}")))?;
    let stdout = child.stdout.take().expect("piped");
    // The child is reaped when the stream ends (kill_on_drop if cut short).
    let stream =
        tokio_util::io::ReaderStream::new(stdout).chain(futures::stream::once(async move {
            let _ = child.wait().await;
            Ok::<_, std::io::Error>(bytes::Bytes::new())
        }));
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-tar")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Wipe a user's profile.
///
/// The image and its record go; the next session with a profile for this
/// user starts empty.
#[utoipa::path(
    delete,
    path = "/api/users/{user_id}/profile",
    operation_id = "wipe_profile",
    tag = "profiles",
    security(("api_key" = [])),
    params(("user_id" = String, Path, description = "The operator's user id.")),
    responses(
        (status = 204, description = "Wiped."),
        (status = 400, description = "A malformed user id.", body = ErrorBody),
        (status = 404, description = "The user has no profile.", body = ErrorBody),
        (status = 409, description = "A session has the profile now.", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    UrlPath(user_id): UrlPath<String>,
) -> Result<Response, ApiError> {
    check_user(&user_id)?;
    not_in_use(&state, &user_id)?;
    let dir = dir(&state.manager.config().data_dir);
    if read_meta(&dir, &user_id).is_none() {
        return Err(no_profile(&user_id));
    }
    std::fs::remove_file(meta_path(&dir, &user_id))
        .map_err(|e| ApiError::internal(format!("wiping the profile: {e}")))?;
    let _ = std::fs::remove_file(image(&dir, &user_id));
    // In a cluster, the user's next profile may be made on any node.
    if let Some(c) = state.manager.store().cluster() {
        c.unpin_profile(&user_id)?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Import a user's profile.
///
/// The body is a tar archive (as an export gives); the profile is made if
/// needed and its files replaced by the archive's (owners not kept).
#[utoipa::path(
    put,
    path = "/api/users/{user_id}/profile",
    operation_id = "import_profile",
    tag = "profiles",
    security(("api_key" = [])),
    params(("user_id" = String, Path, description = "The operator's user id.")),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses(
        (status = 200, description = "Imported.", body = ProfileInfo),
        (status = 400, description = "A malformed user id, or the body is not a tar archive that fits.", body = ErrorBody),
        (status = 409, description = "A session has the profile now.", body = ErrorBody),
    )
)]
pub async fn put(
    State(state): State<AppState>,
    UrlPath(user_id): UrlPath<String>,
    body: Body,
) -> Result<Response, ApiError> {
    check_user(&user_id)?;
    // Held for the import: no session may take the profile meanwhile.
    let _claim = state
        .manager
        .claim_profile(&user_id, "an import")
        .map_err(|id| {
            ApiError::new(
                StatusCode::CONFLICT,
                format!("session {id} has the profile of {user_id:?} now; delete it first"),
            )
        })?;
    // In a cluster the profile is kept here from now on (a request for a
    // profile another node keeps was forwarded there before this).
    if let Some(c) = state.manager.store().cluster() {
        let kept = c.pin_profile(&user_id)?;
        if kept != c.node_id() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("node {kept} keeps the profile of {user_id:?}; try again"),
            ));
        }
    }
    let cfg = state.manager.config();
    let dir = dir(&cfg.data_dir);
    let img = prepare(&dir, &user_id, cfg.session.profile_mib, "import")
        .await
        .map_err(ApiError::internal)?;
    // Extracted as root into the profile's own file system, in a mount
    // namespace of its own; GNU tar keeps members inside the directory
    // (no `..`, no absolute names, links made last).
    let mut child = sandcast_host::image::in_private_mount(
        &img,
        "",
        r#"find "$m" -mindepth 1 -maxdepth 1 ! -name lost+found -exec rm -rf -- {} +
tar -C "$m" --no-same-owner -xf -"#,
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .map_err(|e| ApiError::internal(format!("running unshare: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut body = body.into_data_stream();
    let mut cut = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                if stdin.write_all(&c).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                cut = Some(e.to_string());
                break;
            }
        }
    }
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if let Some(e) = cut {
        return Err(ApiError::bad_request(format!("reading the body: {e}")));
    }
    if !out.status.success() {
        return Err(ApiError::bad_request(format!(
            "the archive could not be imported: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let meta = read_meta(&dir, &user_id).ok_or_else(|| no_profile(&user_id))?;
    Ok(axum::Json(info(user_id, meta, &img, None).await?).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_image_is_made_once_checked_each_time_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sc-profiles-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let img = prepare(&dir, "alice", 8, "s1").await.unwrap();
        assert_eq!(img, image(&dir, "alice"));
        assert_ne!(image(&dir, "alice"), image(&dir, "bob"));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&img), 0o600);
        assert_eq!(mode(&meta_path(&dir, "alice")), 0o600);
        let (used, total) = usage(&img).await.unwrap();
        assert_eq!(total, 8 << 20);
        assert!(used > 0 && used < total, "{used}");
        // A second use keeps the file system and records the session.
        std::fs::write(dir.join("marker"), b"x").unwrap();
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let before = inode(&img);
        prepare(&dir, "alice", 8, "s2").await.unwrap();
        assert_eq!(inode(&img), before);
        assert_eq!(
            read_meta(&dir, "alice").unwrap().last_session.as_deref(),
            Some("s2")
        );
        // A damaged superblock is refused, naming the way out.
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(1024)).unwrap();
        std::io::Write::write_all(&mut f, &[0u8; 1024]).unwrap();
        drop(f);
        let err = prepare(&dir, "alice", 8, "s3").await.unwrap_err();
        assert!(err.contains("DELETE /api/users"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
