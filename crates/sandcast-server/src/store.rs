//! The session store: one SQLite file with migrations. Sessions and their
//! events outlive the processes that ran them, so a restarted server knows
//! what was running and can say what became of it.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};
use serde::{Deserialize, Serialize};

/// Lifecycle of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Backend and agent are starting.
    Starting,
    /// Display, browser and VNC server are up.
    Ready,
    /// It could not start or broke; `reason` says why.
    Failed,
    /// Being stopped.
    Stopping,
    /// Ended.
    Stopped,
    /// Its launch command exited (`complete_on: "launch_exit"`), with
    /// `exit_code`; what it was to collect is kept for `result_ttl_seconds`.
    Completed,
}

impl State {
    /// Every state, for metrics.
    pub const ALL: [State; 6] = [
        State::Starting,
        State::Ready,
        State::Failed,
        State::Stopping,
        State::Stopped,
        State::Completed,
    ];

    /// The name used in JSON and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Failed => "failed",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Completed => "completed",
        }
    }

    fn parse(s: &str) -> State {
        State::from_name(s).unwrap_or(State::Stopped)
    }

    /// The state of a name as [`State::as_str`] gives it.
    pub fn from_name(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether a streaming viewer (WebRTC, the WebSocket video stream and
    /// its input socket) may connect. While the session starts too: the
    /// connection is then up by the time the browser first draws, and the
    /// first picture follows at once instead of a connect later.
    pub fn takes_stream_viewers(self) -> bool {
        matches!(self, State::Starting | State::Ready)
    }

    /// Whether processes may still exist for a session in this state.
    pub fn is_live(self) -> bool {
        matches!(self, State::Starting | State::Ready | State::Stopping)
    }

    /// Whether a move from `self` to `next` is allowed. Ended sessions stay
    /// ended (a completed one keeps saying so); a failed session can only be
    /// stopped.
    pub fn can_become(self, next: State) -> bool {
        use State::*;
        matches!(
            (self, next),
            (Starting, Ready | Failed | Stopping | Stopped | Completed)
                | (Ready, Failed | Stopping | Stopped | Completed)
                | (Failed, Stopping | Stopped)
                | (Stopping, Stopped)
        )
    }
}

/// What was asked for when the session was created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// Page the browser opens.
    pub start_url: String,
    /// Display width.
    pub width: u32,
    /// Display height.
    pub height: u32,
    /// Kiosk mode.
    pub kiosk: bool,
    /// Command beside the browser.
    pub launch: Option<Vec<String>>,
    /// Seconds without a viewer before it stops.
    pub idle_timeout_seconds: u64,
    /// Where outbound traffic may go (`true`/`false` in rows of earlier
    /// versions read as `"internet"`/`"none"`).
    pub egress: sandcast_backend::Egress,
    /// The display's keyboard layout (`de`, `us(intl)`); none is US.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyboard_layout: Option<String>,
    /// What ends the session with an outcome, and how.
    #[serde(default, skip_serializing_if = "Outcome::is_none")]
    pub outcome: Outcome,
    /// The user whose profile is the session's home (`profile: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Downloads and file choosers reach the viewer (rows of earlier
    /// versions had them on).
    #[serde(default = "transfers_default")]
    pub transfers: bool,
    /// The session's video is recorded (see [`crate::recording`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub record: bool,
    /// Seconds its recording is kept after it ended; none: `[recording]
    /// ttl_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording_ttl_seconds: Option<u64>,
}

fn transfers_default() -> bool {
    true
}

impl Spec {
    /// A session of the configured defaults: no request said otherwise.
    pub fn from_defaults(s: &crate::config::SessionDefaults) -> Spec {
        Spec {
            start_url: s.start_url.clone(),
            width: s.width,
            height: s.height,
            kiosk: false,
            launch: None,
            idle_timeout_seconds: s.idle_timeout_seconds,
            egress: s.egress.clone(),
            keyboard_layout: None,
            outcome: Default::default(),
            profile: None,
            transfers: true,
            record: false,
            recording_ttl_seconds: None,
        }
    }
}

/// What ends a session with an outcome (`complete_on`), and what is kept
/// of it. Part of [`Spec`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// `launch_exit`: the launch command runs once and its exit completes
    /// the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_on: Option<CompleteOn>,
    /// A non-zero exit fails the session (default) or completes it too.
    #[serde(default)]
    pub nonzero_exit: NonzeroExit,
    /// Paths in the session's home copied out when it completes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub collect: Vec<sandcast_proto::HomePath>,
    /// Seconds the collected files are kept.
    #[serde(default)]
    pub result_ttl_seconds: u64,
}

impl Outcome {
    /// Nothing asked for.
    pub fn is_none(&self) -> bool {
        self.complete_on.is_none() && self.collect.is_empty()
    }
}

/// What completes a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CompleteOn {
    /// The launch command's exit.
    LaunchExit,
}

/// What a launch command's non-zero exit makes of the session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NonzeroExit {
    /// `failed`, with the exit code in the reason.
    #[default]
    Failed,
    /// `completed` all the same; `exit_code` says how.
    Completed,
}

/// One stored session.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Session id.
    pub id: String,
    /// Operator's user id.
    pub user_id: Option<String>,
    /// Provider preset name.
    pub provider: Option<String>,
    /// Current state.
    pub state: State,
    /// Why it failed or stopped.
    pub reason: Option<String>,
    /// The request.
    pub spec: Spec,
    /// SHA-256 of the viewer token, hex.
    pub token_hash: String,
    /// Times in milliseconds since the epoch.
    pub created_ms: i64,
    /// When it became ready.
    pub ready_ms: Option<i64>,
    /// When its TTL ends.
    pub expires_ms: i64,
    /// When it ended.
    pub stopped_ms: Option<i64>,
    /// The launch command's exit code, once a session with `complete_on`
    /// saw it exit.
    pub exit_code: Option<i32>,
}

/// Which sessions `GET /api/sessions` lists, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageQuery {
    /// Most rows.
    pub limit: usize,
    /// Only sessions created before this one, as (created_ms, id).
    pub after: Option<(i64, String)>,
    /// Only sessions in one of these states (any when empty).
    pub states: Vec<State>,
    /// Only sessions of this user.
    pub user_id: Option<String>,
}

/// The store.
pub struct Store {
    conn: Mutex<Connection>,
}

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            "CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            user_id TEXT,
            provider TEXT,
            state TEXT NOT NULL,
            reason TEXT,
            spec TEXT NOT NULL,
            token_hash TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            ready_ms INTEGER,
            expires_ms INTEGER NOT NULL,
            stopped_ms INTEGER
        );
        CREATE INDEX sessions_state ON sessions(state);
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            at_ms INTEGER NOT NULL,
            kind TEXT NOT NULL,
            data TEXT NOT NULL
        );
        CREATE INDEX events_session ON events(session_id, seq);",
        ),
        // When a session ended (stopped or failed), for retention; indexes
        // for paging newest first, by state and by user.
        M::up(
            "ALTER TABLE sessions ADD COLUMN ended_ms INTEGER;
            UPDATE sessions SET ended_ms = COALESCE(stopped_ms, created_ms)
                WHERE state IN ('stopped', 'failed');
            DROP INDEX sessions_state;
            CREATE INDEX sessions_created ON sessions(created_ms, id);
            CREATE INDEX sessions_state_created ON sessions(state, created_ms, id);
            CREATE INDEX sessions_user_created ON sessions(user_id, created_ms, id);
            CREATE INDEX sessions_ended ON sessions(ended_ms) WHERE ended_ms IS NOT NULL;",
        ),
        // The launch command's exit code of a completed session.
        M::up("ALTER TABLE sessions ADD COLUMN exit_code INTEGER;"),
        // Webhook deliveries (`webhooks`): written when the event happens,
        // so a restart loses none. No reference to `sessions`: a delivery
        // outlives the retention of its session's row.
        M::up(
            "CREATE TABLE webhook_deliveries (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            url TEXT NOT NULL,
            event TEXT NOT NULL,
            session_id TEXT NOT NULL,
            body TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_ms INTEGER,
            last_ms INTEGER,
            last_status INTEGER,
            last_error TEXT
        );
        CREATE INDEX webhook_deliveries_pending ON webhook_deliveries(url, seq)
            WHERE state = 'pending';
        CREATE INDEX webhook_deliveries_created ON webhook_deliveries(created_ms);",
        ),
        // Per-session tokens with a role (`tokens`): only their hashes.
        // They go with their session's row.
        M::up(
            "CREATE TABLE tokens (
            id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            token_hash TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            expires_ms INTEGER,
            revoked_ms INTEGER
        );
        CREATE INDEX tokens_session ON tokens(session_id, created_ms);",
        ),
    ])
}

/// Creates the database file (and its WAL and shared-memory files when
/// they exist) with mode 0600, also when an older run made them wider:
/// they hold viewer token hashes and every session's history.
fn restrict_files(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Errors of the store.
pub type Result<T> = std::result::Result<T, StoreError>;

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// Migrations failed.
    #[error("database migration: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    /// Stored JSON did not parse.
    #[error("stored record: {0}")]
    Json(#[from] serde_json::Error),
    /// The database file could not be made private.
    #[error("database file: {0}")]
    Io(#[from] std::io::Error),
}

impl Store {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        // SQLite gives its WAL and shared-memory files the database's mode.
        restrict_files(path)?;
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        migrations().to_latest(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// The connection, for a module that keeps a table of its own in this
    /// file ([`crate::webhooks`]).
    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap()
    }

    /// Whether the database answers.
    pub fn ping(&self) -> Result<()> {
        self.conn
            .lock()
            .unwrap()
            .query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }

    /// Adds a new session.
    pub fn insert(&self, row: &Row) -> Result<()> {
        self.conn.lock().unwrap().execute(
            "INSERT INTO sessions (id, user_id, provider, state, reason, spec, token_hash,
                created_ms, ready_ms, expires_ms, stopped_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                row.id,
                row.user_id,
                row.provider,
                row.state.as_str(),
                row.reason,
                serde_json::to_string(&row.spec)?,
                row.token_hash,
                row.created_ms,
                row.ready_ms,
                row.expires_ms,
                row.stopped_ms
            ],
        )?;
        Ok(())
    }

    /// Moves a session to `state` if the transition is allowed; returns
    /// whether it moved. `reason` is kept only when given.
    pub fn set_state(
        &self,
        id: &str,
        state: State,
        reason: Option<&str>,
        now_ms: i64,
    ) -> Result<bool> {
        let conn = self.conn.lock().unwrap();
        let current: Option<String> = conn
            .query_row("SELECT state FROM sessions WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(current) = current else {
            return Ok(false);
        };
        if !State::parse(&current).can_become(state) {
            return Ok(false);
        }
        conn.execute(
            "UPDATE sessions SET state = ?2, reason = COALESCE(?3, reason),
                ready_ms = CASE WHEN ?2 = 'ready' THEN ?4 ELSE ready_ms END,
                stopped_ms = CASE WHEN ?2 IN ('stopped', 'completed') THEN ?4 ELSE stopped_ms END,
                ended_ms = CASE WHEN ?2 IN ('stopped', 'failed', 'completed')
                    THEN COALESCE(ended_ms, ?4) ELSE ended_ms END
             WHERE id = ?1",
            params![id, state.as_str(), reason, now_ms],
        )?;
        Ok(true)
    }

    /// Replaces a session's viewer token hash.
    pub fn set_token_hash(&self, id: &str, hash: &str) -> Result<()> {
        self.conn.lock().unwrap().execute(
            "UPDATE sessions SET token_hash = ?2 WHERE id = ?1",
            params![id, hash],
        )?;
        Ok(())
    }

    /// Records the launch command's exit code.
    pub fn set_exit_code(&self, id: &str, code: Option<i32>) -> Result<()> {
        self.conn.lock().unwrap().execute(
            "UPDATE sessions SET exit_code = ?2 WHERE id = ?1",
            params![id, code],
        )?;
        Ok(())
    }

    /// One session.
    pub fn get(&self, id: &str) -> Result<Option<Row>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare_cached(&format!("{SELECT} WHERE id = ?1"))?;
        let row = stmt.query_row([id], read_row).optional()?;
        row.map(finish).transpose()
    }

    /// One page of sessions, newest first (ties broken by id).
    pub fn page(&self, q: &PageQuery) -> Result<Vec<Row>> {
        use rusqlite::types::Value;
        let mut clauses = Vec::new();
        let mut args: Vec<Value> = Vec::new();
        if let Some((created, id)) = &q.after {
            clauses.push("(created_ms, id) < (?, ?)".to_string());
            args.push(Value::Integer(*created));
            args.push(Value::Text(id.clone()));
        }
        if !q.states.is_empty() {
            let marks = vec!["?"; q.states.len()].join(", ");
            clauses.push(format!("state IN ({marks})"));
            args.extend(q.states.iter().map(|s| Value::Text(s.as_str().into())));
        }
        if let Some(u) = &q.user_id {
            clauses.push("user_id = ?".into());
            args.push(Value::Text(u.clone()));
        }
        let filter = if clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", clauses.join(" AND "))
        };
        args.push(Value::Integer(q.limit as i64));
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare_cached(&format!(
            "{SELECT}{filter} ORDER BY created_ms DESC, id DESC LIMIT ?"
        ))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), read_row)?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        rows.into_iter().map(finish).collect()
    }

    /// How many sessions are in each state.
    pub fn count_by_state(&self) -> Result<Vec<(State, i64)>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt =
            conn.prepare_cached("SELECT state, COUNT(*) FROM sessions GROUP BY state")?;
        let counts: Vec<(String, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<std::result::Result<_, _>>()?;
        Ok(State::ALL
            .iter()
            .map(|s| {
                let n = counts
                    .iter()
                    .filter(|(name, _)| name == s.as_str())
                    .map(|(_, n)| n)
                    .sum();
                (*s, n)
            })
            .collect())
    }

    /// Up to `limit` sessions that ended (stopped or failed) at or before
    /// `cutoff_ms`, oldest first.
    pub fn ended_before(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<String>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare_cached(
            "SELECT id FROM sessions WHERE ended_ms <= ?1
                AND state IN ('stopped', 'failed', 'completed')
             ORDER BY ended_ms LIMIT ?2",
        )?;
        let ids = stmt
            .query_map(params![cutoff_ms, limit as i64], |r| r.get(0))?
            .collect::<std::result::Result<_, _>>()?;
        Ok(ids)
    }

    /// Removes a session and its events; returns whether it existed.
    pub fn delete(&self, id: &str) -> Result<bool> {
        let n = self
            .conn
            .lock()
            .unwrap()
            .execute("DELETE FROM sessions WHERE id = ?1", [id])?;
        Ok(n > 0)
    }

    /// Whether a session is recorded.
    pub fn exists(&self, id: &str) -> Result<bool> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?;
        Ok(stmt.exists([id])?)
    }

    /// Records an event.
    pub fn add_event(
        &self,
        id: &str,
        kind: &str,
        data: &serde_json::Value,
        now_ms: i64,
    ) -> Result<()> {
        self.conn.lock().unwrap().execute(
            "INSERT INTO events (session_id, at_ms, kind, data) VALUES (?1, ?2, ?3, ?4)",
            params![id, now_ms, kind, data.to_string()],
        )?;
        Ok(())
    }

    /// Events of a session in order: (at_ms, kind, data).
    pub fn events(&self, id: &str) -> Result<Vec<(i64, String, serde_json::Value)>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare_cached(
            "SELECT at_ms, kind, data FROM events WHERE session_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt
            .query_map([id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(at, kind, data)| Ok((at, kind, serde_json::from_str(&data)?)))
            .collect()
    }

    /// After a restart: every session that may have had processes becomes
    /// stopped with `reason`. Returns their ids.
    pub fn reconcile(&self, reason: &str, now_ms: i64) -> Result<Vec<String>> {
        let conn = self.conn.lock().unwrap();
        let ids: Vec<String> = conn
            .prepare("SELECT id FROM sessions WHERE state IN ('starting', 'ready', 'stopping', 'failed') AND stopped_ms IS NULL")?
            .query_map([], |r| r.get(0))?
            .collect::<std::result::Result<_, _>>()?;
        for id in &ids {
            conn.execute(
                "UPDATE sessions SET state = 'stopped', stopped_ms = ?2,
                    ended_ms = COALESCE(ended_ms, ?2),
                    reason = CASE WHEN state = 'failed' THEN reason ELSE ?3 END
                 WHERE id = ?1",
                params![id, now_ms, reason],
            )?;
        }
        Ok(ids)
    }
}

/// One stored per-session token: its public id and role, never the
/// secret (only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// Public id, for listing and revoking.
    pub id: String,
    /// The session it opens.
    pub session_id: String,
    /// What it may do.
    pub role: crate::tokens::Role,
    /// SHA-256 of the token, hex.
    pub token_hash: String,
    /// Times in milliseconds since the epoch.
    pub created_ms: i64,
    /// When it stops opening the session; none: with the session.
    pub expires_ms: Option<i64>,
    /// When it was revoked.
    pub revoked_ms: Option<i64>,
}

impl Store {
    /// Records a token.
    pub fn insert_token(&self, t: &TokenRow) -> Result<()> {
        self.conn.lock().unwrap().execute(
            "INSERT INTO tokens (id, session_id, role, token_hash, created_ms, expires_ms, revoked_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                t.id,
                t.session_id,
                t.role.as_str(),
                t.token_hash,
                t.created_ms,
                t.expires_ms,
                t.revoked_ms
            ],
        )?;
        Ok(())
    }

    /// A session's tokens, oldest first (revoked and expired ones too).
    pub fn tokens(&self, session_id: &str) -> Result<Vec<TokenRow>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare_cached(
            "SELECT id, session_id, role, token_hash, created_ms, expires_ms, revoked_ms
             FROM tokens WHERE session_id = ?1 ORDER BY created_ms, rowid",
        )?;
        let rows = stmt
            .query_map([session_id], |r| {
                let role: String = r.get(2)?;
                // A role this version does not know opens nothing.
                let Some(role) = crate::tokens::Role::from_name(&role) else {
                    return Ok(None);
                };
                Ok(Some(TokenRow {
                    id: r.get(0)?,
                    session_id: r.get(1)?,
                    role,
                    token_hash: r.get(3)?,
                    created_ms: r.get(4)?,
                    expires_ms: r.get(5)?,
                    revoked_ms: r.get(6)?,
                }))
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows.into_iter().flatten().collect())
    }

    /// Revokes a session's token (a second revocation keeps the first
    /// time); returns whether the session has that token.
    pub fn revoke_token(&self, session_id: &str, token_id: &str, now_ms: i64) -> Result<bool> {
        let n = self.conn.lock().unwrap().execute(
            "UPDATE tokens SET revoked_ms = COALESCE(revoked_ms, ?3)
             WHERE session_id = ?1 AND id = ?2",
            params![session_id, token_id, now_ms],
        )?;
        Ok(n > 0)
    }
}

const SELECT: &str = "SELECT id, user_id, provider, state, reason, spec, token_hash,
    created_ms, ready_ms, expires_ms, stopped_ms, exit_code FROM sessions";

type RawRow = (Row, String);

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    let state: String = r.get(3)?;
    Ok((
        Row {
            id: r.get(0)?,
            user_id: r.get(1)?,
            provider: r.get(2)?,
            state: State::parse(&state),
            reason: r.get(4)?,
            spec: Spec {
                start_url: String::new(),
                width: 0,
                height: 0,
                kiosk: false,
                launch: None,
                idle_timeout_seconds: 0,
                egress: sandcast_backend::Egress::None,
                keyboard_layout: None,
                outcome: Outcome::default(),
                profile: None,
                transfers: true,
                record: false,
                recording_ttl_seconds: None,
            },
            token_hash: r.get(6)?,
            created_ms: r.get(7)?,
            ready_ms: r.get(8)?,
            expires_ms: r.get(9)?,
            stopped_ms: r.get(10)?,
            exit_code: r.get(11)?,
        },
        r.get(5)?,
    ))
}

fn finish((mut row, spec): RawRow) -> Result<Row> {
    row.spec = serde_json::from_str(&spec)?;
    Ok(row)
}

#[cfg(test)]
impl Row {
    /// A session just created, with the smallest spec, for the tests of
    /// every module that stores sessions.
    pub(crate) fn for_test(id: &str) -> Row {
        Row {
            id: id.into(),
            user_id: None,
            provider: None,
            state: State::Starting,
            reason: None,
            spec: Spec {
                start_url: "about:blank".into(),
                width: 800,
                height: 600,
                kiosk: false,
                launch: None,
                idle_timeout_seconds: 60,
                egress: sandcast_backend::Egress::None,
                keyboard_layout: None,
                outcome: Outcome::default(),
                profile: None,
                transfers: true,
                record: false,
                recording_ttl_seconds: None,
            },
            token_hash: "ab".into(),
            created_ms: 1,
            ready_ms: None,
            expires_ms: 100,
            stopped_ms: None,
            exit_code: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> Row {
        let base = Row::for_test(id);
        Row {
            user_id: Some("u".into()),
            spec: Spec {
                launch: Some(vec!["xterm".into()]),
                egress: sandcast_backend::Egress::Internet,
                ..base.spec
            },
            ..base
        }
    }

    fn temp_db() -> (std::path::PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!("sc-store-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("db.sqlite")).unwrap();
        (dir, store)
    }

    #[test]
    fn transitions() {
        use State::*;
        assert!(Starting.can_become(Ready));
        assert!(Ready.can_become(Stopping));
        assert!(Stopping.can_become(Stopped));
        assert!(!Stopped.can_become(Ready));
        assert!(!Failed.can_become(Ready));
        assert!(!Stopping.can_become(Ready));
        assert!(!Ready.can_become(Starting));
    }

    #[test]
    fn rows_round_trip_and_states_move_only_forward() {
        let (dir, s) = temp_db();
        s.insert(&row("a")).unwrap();
        assert_eq!(s.get("a").unwrap().unwrap(), row("a"));
        assert!(s.insert(&row("a")).is_err(), "duplicate id");
        assert!(s.set_state("a", State::Ready, None, 5).unwrap());
        assert_eq!(s.get("a").unwrap().unwrap().ready_ms, Some(5));
        assert!(
            s.set_state("a", State::Failed, Some("browser crash loop"), 6)
                .unwrap()
        );
        assert!(!s.set_state("a", State::Ready, None, 7).unwrap());
        let a = s.get("a").unwrap().unwrap();
        assert_eq!(a.state, State::Failed);
        assert_eq!(a.reason.as_deref(), Some("browser crash loop"));
        assert!(!s.set_state("nope", State::Ready, None, 7).unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reconcile_stops_live_sessions_and_survives_reopen() {
        let (dir, s) = temp_db();
        s.insert(&row("a")).unwrap();
        s.insert(&row("b")).unwrap();
        s.set_state("b", State::Stopping, None, 2).unwrap();
        s.set_state("b", State::Stopped, Some("deleted"), 3)
            .unwrap();
        s.add_event("a", "state", &serde_json::json!({"state": "starting"}), 1)
            .unwrap();
        drop(s);
        let s = Store::open(&dir.join("db.sqlite")).unwrap();
        let ids = s.reconcile("server restarted", 9).unwrap();
        assert_eq!(ids, ["a"]);
        let a = s.get("a").unwrap().unwrap();
        assert_eq!(a.state, State::Stopped);
        assert_eq!(a.reason.as_deref(), Some("server restarted"));
        assert_eq!(
            s.get("b").unwrap().unwrap().reason.as_deref(),
            Some("deleted")
        );
        assert_eq!(s.events("a").unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pages_are_newest_first_filtered_and_complete() {
        let (dir, s) = temp_db();
        // 25 sessions, several created in the same millisecond.
        for i in 0..25 {
            let mut r = row(&format!("s{i:02}"));
            r.created_ms = 1000 + i / 3;
            r.user_id = Some(if i % 2 == 0 { "even" } else { "odd" }.into());
            s.insert(&r).unwrap();
            if i % 5 == 0 {
                s.set_state(&r.id, State::Stopped, None, 2000).unwrap();
            }
        }
        let mut q = PageQuery {
            limit: 4,
            ..PageQuery::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = s.page(&q).unwrap();
            seen.extend(page.iter().map(|r| (r.created_ms, r.id.clone())));
            match page.last() {
                Some(last) if page.len() == q.limit => {
                    q.after = Some((last.created_ms, last.id.clone()))
                }
                _ => break,
            }
        }
        let mut want = seen.clone();
        want.sort();
        want.reverse();
        want.dedup();
        assert_eq!(seen, want, "newest first, no repeats");
        assert_eq!(seen.len(), 25);

        let stopped = s
            .page(&PageQuery {
                limit: 100,
                states: vec![State::Stopped],
                ..PageQuery::default()
            })
            .unwrap();
        assert_eq!(stopped.len(), 5);
        assert!(stopped.iter().all(|r| r.state == State::Stopped));
        let odd_starting = s
            .page(&PageQuery {
                limit: 100,
                states: vec![State::Starting, State::Ready],
                user_id: Some("odd".into()),
                ..PageQuery::default()
            })
            .unwrap();
        assert_eq!(odd_starting.len(), 10);
        assert!(
            odd_starting
                .iter()
                .all(|r| r.user_id.as_deref() == Some("odd"))
        );
        let counts = s.count_by_state().unwrap();
        assert!(counts.contains(&(State::Stopped, 5)));
        assert!(counts.contains(&(State::Starting, 20)));
        assert!(counts.contains(&(State::Ready, 0)));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn ended_sessions_age_out_with_their_events() {
        let (dir, s) = temp_db();
        for id in ["live", "failed", "stopped", "late"] {
            s.insert(&row(id)).unwrap();
            s.add_event(id, "state", &serde_json::json!({}), 1).unwrap();
        }
        s.set_state("failed", State::Failed, Some("x"), 10).unwrap();
        s.set_state("stopped", State::Stopped, None, 20).unwrap();
        s.set_state("late", State::Stopped, None, 50).unwrap();
        // Stopping a failed session keeps the time it ended.
        s.set_state("failed", State::Stopped, None, 40).unwrap();
        assert_eq!(s.ended_before(9, 10).unwrap(), Vec::<String>::new());
        assert_eq!(s.ended_before(30, 10).unwrap(), ["failed", "stopped"]);
        assert_eq!(s.ended_before(30, 1).unwrap(), ["failed"]);
        assert!(s.delete("failed").unwrap());
        assert!(!s.delete("failed").unwrap());
        assert!(!s.exists("failed").unwrap());
        assert!(s.events("failed").unwrap().is_empty());
        assert_eq!(s.events("live").unwrap().len(), 1);
        let ids = s.reconcile("restart", 60).unwrap();
        assert_eq!(ids, ["live"]);
        assert_eq!(s.ended_before(60, 10).unwrap(), ["stopped", "late", "live"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tokens_are_kept_per_session_revoked_once_and_go_with_the_session() {
        use crate::tokens::Role;
        let (dir, s) = temp_db();
        s.insert(&row("a")).unwrap();
        s.insert(&row("b")).unwrap();
        let tok = |id: &str, session: &str, role, created| TokenRow {
            id: id.into(),
            session_id: session.into(),
            role,
            token_hash: format!("hash-{id}"),
            created_ms: created,
            expires_ms: (role == Role::View).then_some(99),
            revoked_ms: None,
        };
        s.insert_token(&tok("t2", "a", Role::Control, 2)).unwrap();
        s.insert_token(&tok("t1", "a", Role::View, 1)).unwrap();
        s.insert_token(&tok("t3", "b", Role::Automation, 1))
            .unwrap();
        assert!(
            s.insert_token(&tok("t4", "nope", Role::View, 1)).is_err(),
            "a token needs its session"
        );
        assert!(s.insert_token(&tok("t1", "b", Role::View, 1)).is_err());
        let a = s.tokens("a").unwrap();
        assert_eq!(
            a,
            [
                tok("t1", "a", Role::View, 1),
                tok("t2", "a", Role::Control, 2)
            ]
        );
        assert!(s.revoke_token("a", "t1", 10).unwrap());
        assert!(s.revoke_token("a", "t1", 20).unwrap());
        assert_eq!(s.tokens("a").unwrap()[0].revoked_ms, Some(10));
        assert!(!s.revoke_token("a", "t3", 10).unwrap(), "b's token");
        assert!(!s.revoke_token("a", "zz", 10).unwrap());
        assert_eq!(s.tokens("b").unwrap()[0].revoked_ms, None);
        assert!(s.delete("a").unwrap());
        assert!(s.tokens("a").unwrap().is_empty());
        assert_eq!(s.tokens("b").unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn database_files_are_private() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("sc-store-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("db.sqlite");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = Store::open(&path).unwrap();
        s.insert(&row("a")).unwrap();
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            assert_eq!(
                e.metadata().unwrap().mode() & 0o777,
                0o600,
                "{:?}",
                e.file_name()
            );
        }
        assert!(dir.join("db.sqlite-wal").exists());
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
