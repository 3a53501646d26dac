//! The store of a single host: one SQLite file beside the server, with
//! migrations.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};

use super::{Outcome, PageQuery, Result, Row, Spec, State, Store, TokenRow};
use crate::webhooks::{Delivery, DeliveryState, DeliveryUpdate, Head, NewDelivery, rfc3339};

/// The SQLite store.
pub struct SqliteStore {
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

impl SqliteStore {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        // SQLite gives its WAL and shared-memory files the database's mode.
        restrict_files(path)?;
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        migrations().to_latest(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }
}

impl Store for SqliteStore {
    fn ping(&self) -> Result<()> {
        self.conn
            .lock()
            .unwrap()
            .query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }

    fn insert(&self, row: &Row) -> Result<()> {
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

    fn set_state(&self, id: &str, state: State, reason: Option<&str>, now_ms: i64) -> Result<bool> {
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

    fn set_token_hash(&self, id: &str, hash: &str) -> Result<()> {
        self.conn.lock().unwrap().execute(
            "UPDATE sessions SET token_hash = ?2 WHERE id = ?1",
            params![id, hash],
        )?;
        Ok(())
    }

    fn set_exit_code(&self, id: &str, code: Option<i32>) -> Result<()> {
        self.conn.lock().unwrap().execute(
            "UPDATE sessions SET exit_code = ?2 WHERE id = ?1",
            params![id, code],
        )?;
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Option<Row>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare_cached(&format!("{SELECT} WHERE id = ?1"))?;
        let row = stmt.query_row([id], read_row).optional()?;
        row.map(finish).transpose()
    }

    fn page(&self, q: &PageQuery) -> Result<Vec<Row>> {
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

    fn count_by_state(&self) -> Result<Vec<(State, i64)>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt =
            conn.prepare_cached("SELECT state, COUNT(*) FROM sessions GROUP BY state")?;
        let counts: Vec<(String, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<std::result::Result<_, _>>()?;
        Ok(super::every_state(&counts))
    }

    fn ended_before(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<String>> {
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

    fn delete(&self, id: &str) -> Result<bool> {
        let n = self
            .conn
            .lock()
            .unwrap()
            .execute("DELETE FROM sessions WHERE id = ?1", [id])?;
        Ok(n > 0)
    }

    fn exists(&self, id: &str) -> Result<bool> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?;
        Ok(stmt.exists([id])?)
    }

    fn add_event(&self, id: &str, kind: &str, data: &serde_json::Value, now_ms: i64) -> Result<()> {
        self.conn.lock().unwrap().execute(
            "INSERT INTO events (session_id, at_ms, kind, data) VALUES (?1, ?2, ?3, ?4)",
            params![id, now_ms, kind, data.to_string()],
        )?;
        Ok(())
    }

    fn events(&self, id: &str) -> Result<Vec<(i64, String, serde_json::Value)>> {
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

    fn reconcile(&self, reason: &str, now_ms: i64) -> Result<Vec<String>> {
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

    fn insert_token(&self, t: &TokenRow) -> Result<()> {
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

    fn tokens(&self, session_id: &str) -> Result<Vec<TokenRow>> {
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

    fn revoke_token(&self, session_id: &str, token_id: &str, now_ms: i64) -> Result<bool> {
        let n = self.conn.lock().unwrap().execute(
            "UPDATE tokens SET revoked_ms = COALESCE(revoked_ms, ?3)
             WHERE session_id = ?1 AND id = ?2",
            params![session_id, token_id, now_ms],
        )?;
        Ok(n > 0)
    }

    fn enqueue_deliveries(&self, deliveries: &[NewDelivery]) -> Result<()> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction()?;
        for d in deliveries {
            tx.execute(
                "INSERT INTO webhook_deliveries (id, url, event, session_id, body, created_ms, state, next_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?6)",
                params![d.id, d.url, d.event, d.session_id, d.body, d.created_ms],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn delivery_heads(&self) -> Result<Vec<Head>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare_cached(
            "SELECT d.seq, d.id, d.url, d.event, d.session_id, d.body, d.created_ms, d.attempts,
                COALESCE(d.next_ms, d.created_ms)
             FROM webhook_deliveries d
             JOIN (SELECT MIN(seq) AS seq FROM webhook_deliveries WHERE state = 'pending'
                   GROUP BY url) h ON d.seq = h.seq
             ORDER BY d.seq",
        )?;
        let heads = stmt
            .query_map([], |r| {
                Ok(Head {
                    seq: r.get(0)?,
                    delivery: NewDelivery {
                        id: r.get(1)?,
                        url: r.get(2)?,
                        event: r.get(3)?,
                        session_id: r.get(4)?,
                        body: r.get(5)?,
                        created_ms: r.get(6)?,
                    },
                    attempts: r.get(7)?,
                    next_ms: r.get(8)?,
                })
            })?
            .collect::<std::result::Result<_, _>>()?;
        Ok(heads)
    }

    fn update_delivery(&self, seq: i64, u: &DeliveryUpdate) -> Result<()> {
        let (attempted, last_ms, last_status) = match u.attempt {
            Some((at, status)) => (true, Some(at), status),
            None => (false, None, None),
        };
        self.conn.lock().unwrap().execute(
            "UPDATE webhook_deliveries SET state = ?2, attempts = ?3, next_ms = ?4,
                last_ms = CASE WHEN ?5 THEN ?6 ELSE last_ms END,
                last_status = CASE WHEN ?5 THEN ?7 ELSE last_status END,
                last_error = ?8
             WHERE seq = ?1",
            params![
                seq,
                u.state.as_str(),
                u.attempts,
                u.next_ms,
                attempted,
                last_ms,
                last_status,
                u.error
            ],
        )?;
        Ok(())
    }

    fn prune_deliveries(&self, cutoff_ms: i64) -> Result<usize> {
        Ok(self.conn.lock().unwrap().execute(
            "DELETE FROM webhook_deliveries WHERE created_ms < ?1 AND state != 'pending'",
            [cutoff_ms],
        )?)
    }

    fn recent_deliveries(&self, limit: usize) -> Result<Vec<Delivery>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare_cached(
            "SELECT id, url, event, session_id, state, attempts, created_ms, last_ms, last_status,
                last_error, next_ms
             FROM webhook_deliveries ORDER BY seq DESC LIMIT ?1",
        )?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                let state = DeliveryState::parse(&r.get::<_, String>(4)?);
                Ok(Delivery {
                    id: r.get(0)?,
                    url: r.get(1)?,
                    event: r.get(2)?,
                    session_id: r.get(3)?,
                    state,
                    attempts: r.get(5)?,
                    created_at: rfc3339(r.get(6)?),
                    last_attempt_at: r.get::<_, Option<i64>>(7)?.map(rfc3339),
                    last_status: r.get(8)?,
                    last_error: r.get(9)?,
                    next_attempt_at: r
                        .get::<_, Option<i64>>(10)?
                        .filter(|_| state == DeliveryState::Pending)
                        .map(rfc3339),
                })
            })?
            .collect::<std::result::Result<_, _>>()?;
        Ok(rows)
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
            node: String::new(),
        },
        r.get(5)?,
    ))
}

fn finish((mut row, spec): RawRow) -> Result<Row> {
    row.spec = serde_json::from_str(&spec)?;
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::suite;

    /// The store suite, a test per case, each on a file of its own.
    #[test]
    fn sqlite_passes_the_store_suite() {
        for (name, case) in suite::CASES {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("db.sqlite");
            eprintln!("case {name}");
            case(&|| Box::new(SqliteStore::open(&path).unwrap()));
        }
    }

    #[test]
    fn database_files_are_private() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("sc-store-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("db.sqlite");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = SqliteStore::open(&path).unwrap();
        s.insert(&Row::for_test("a")).unwrap();
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
    }
}
