//! The store of a cluster: one PostgreSQL database shared by every node.
//!
//! The queries run on a small runtime of the store's own, over a pool of
//! connections (deadpool-postgres); a caller waits for its answer on a
//! channel. So the [`Store`] trait stays synchronous, as SQLite's
//! answers are, and no caller's task is ever polled by another runtime.
//! Schema changes are numbered like SQLite's and applied under an advisory
//! lock, so nodes started together migrate once.

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::{
    Cluster, NodeInfo, NodeLoad, NodeRow, PageQuery, Placement, Result, Row, State, Store,
    StoreError, TokenRow,
};
use crate::webhooks::{Delivery, DeliveryState, DeliveryUpdate, Head, NewDelivery, rfc3339};

/// The longest a query may take, waiting for a connection included: a
/// database that does not answer is an error, not a hung request.
const QUERY_TIMEOUT: Duration = Duration::from_secs(15);

/// Connections per node: its queries are short, and the database's own
/// limit is shared by every node.
const POOL_SIZE: usize = 8;

/// The schema, one step per entry, in order; never edited once released.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        user_id TEXT,
        provider TEXT,
        state TEXT NOT NULL,
        reason TEXT,
        spec TEXT NOT NULL,
        token_hash TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        ready_ms BIGINT,
        expires_ms BIGINT NOT NULL,
        stopped_ms BIGINT,
        ended_ms BIGINT,
        exit_code INTEGER,
        node TEXT NOT NULL
    );
    CREATE INDEX sessions_created ON sessions(created_ms, id);
    CREATE INDEX sessions_state_created ON sessions(state, created_ms, id);
    CREATE INDEX sessions_user_created ON sessions(user_id, created_ms, id);
    CREATE INDEX sessions_ended ON sessions(ended_ms) WHERE ended_ms IS NOT NULL;
    CREATE INDEX sessions_node_live ON sessions(node)
        WHERE state IN ('starting', 'ready', 'stopping');
    CREATE TABLE events (
        seq BIGSERIAL PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        at_ms BIGINT NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX events_session ON events(session_id, seq);
    CREATE TABLE webhook_deliveries (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        node TEXT NOT NULL,
        url TEXT NOT NULL,
        event TEXT NOT NULL,
        session_id TEXT NOT NULL,
        body TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_ms BIGINT,
        last_ms BIGINT,
        last_status INTEGER,
        last_error TEXT
    );
    CREATE INDEX webhook_deliveries_pending ON webhook_deliveries(node, url, seq)
        WHERE state = 'pending';
    CREATE INDEX webhook_deliveries_created ON webhook_deliveries(created_ms);
    CREATE TABLE tokens (
        seq BIGSERIAL,
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        token_hash TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT,
        revoked_ms BIGINT
    );
    CREATE INDEX tokens_session ON tokens(session_id, created_ms, seq);
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        api_url TEXT NOT NULL,
        public_url TEXT NOT NULL,
        webrtc TEXT NOT NULL,
        version TEXT NOT NULL,
        max_sessions INTEGER NOT NULL,
        sessions INTEGER NOT NULL DEFAULT 0,
        free_mib BIGINT NOT NULL DEFAULT 0,
        idle_millis INTEGER NOT NULL DEFAULT 0,
        draining BOOLEAN NOT NULL DEFAULT FALSE,
        lost BOOLEAN NOT NULL DEFAULT FALSE,
        joined_ms BIGINT NOT NULL,
        heartbeat_ms BIGINT NOT NULL
    );",
    // Which node keeps each user's profile (a file system on its disk).
    "CREATE TABLE profiles (
        user_id TEXT PRIMARY KEY,
        node TEXT NOT NULL
    );",
];

/// Taken while migrating: any number that no other user of the database
/// takes.
const MIGRATION_LOCK: i64 = 0x5a4d_6361_7374;

/// States in which a session holds a slot of its node.
const LIVE: &str = "('starting', 'ready', 'stopping')";

/// The PostgreSQL store of one node.
pub struct PgStore {
    node: String,
    pool: Pool,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which a caller's async task may not.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn pg(e: impl std::fmt::Display) -> StoreError {
    StoreError::Postgres(e.to_string())
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        // The server's own message (and its detail) says what is wrong;
        // the client's wrapper alone often says only "db error".
        match e.as_db_error() {
            Some(db) => StoreError::Postgres(match db.detail() {
                Some(d) => format!("{}: {d}", db.message()),
                None => db.message().to_string(),
            }),
            None => pg(e),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> StoreError {
        pg(e)
    }
}

impl PgStore {
    /// Connects to `url` (a `postgres://` URL or key-value string), as
    /// node `node`, and brings the schema up to date.
    pub fn open(url: &str, node: &str) -> Result<PgStore> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| pg(format!("store: not a PostgreSQL URL ({e})")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sandcast-store")
            .enable_all()
            .build()?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(QUERY_TIMEOUT))
            .create_timeout(Some(QUERY_TIMEOUT))
            .build()
            .map_err(pg)?;
        let store = PgStore {
            node: node.to_string(),
            pool,
            runtime: Some(runtime),
        };
        let pool = store.pool.clone();
        store.run(async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            // "already exists, skipping" on every start is not news.
            tx.batch_execute("SET LOCAL client_min_messages = warning")
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS sandcast_migrations (version INTEGER PRIMARY KEY)",
            )
            .await?;
            let done: i32 = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM sandcast_migrations",
                    &[],
                )
                .await?
                .get(0);
            if done as usize > MIGRATIONS.len() {
                return Err(pg(format!(
                    "the database has schema version {done}, newer than this sandcast's {}: upgrade this node",
                    MIGRATIONS.len()
                )));
            }
            for (i, m) in MIGRATIONS.iter().enumerate().skip(done as usize) {
                tx.batch_execute(m).await?;
                tx.execute(
                    "INSERT INTO sandcast_migrations (version) VALUES ($1)",
                    &[&(i as i32 + 1)],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })?;
        Ok(store)
    }

    /// Runs `f` on the store's runtime and waits for it.
    fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let rt = self.runtime.as_ref().expect("taken only on drop");
        rt.spawn(async move {
            let out = match tokio::time::timeout(QUERY_TIMEOUT, f).await {
                Ok(out) => out,
                Err(_) => Err(pg(format!(
                    "the database did not answer within {} s",
                    QUERY_TIMEOUT.as_secs()
                ))),
            };
            let _ = tx.send(out);
        });
        rx.recv().map_err(|_| pg("the store's runtime stopped"))?
    }

    /// Runs one statement; returns the rows it changed.
    fn execute(
        &self,
        sql: &'static str,
        args: Vec<Box<dyn tokio_postgres::types::ToSql + Send + Sync>>,
    ) -> Result<u64> {
        let pool = self.pool.clone();
        self.run(async move {
            let c = pool.get().await?;
            let stmt = c.prepare_cached(sql).await?;
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                args.iter().map(|a| a.as_ref() as _).collect();
            Ok(c.execute(&stmt, &refs).await?)
        })
    }

    /// Runs one query and reads its rows with `read`.
    fn query<T, R>(
        &self,
        sql: String,
        args: Vec<Box<dyn tokio_postgres::types::ToSql + Send + Sync>>,
        read: R,
    ) -> Result<Vec<T>>
    where
        T: Send + 'static,
        R: Fn(&tokio_postgres::Row) -> Result<T> + Send + 'static,
    {
        let pool = self.pool.clone();
        self.run(async move {
            let c = pool.get().await?;
            let stmt = c.prepare_cached(&sql).await?;
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                args.iter().map(|a| a.as_ref() as _).collect();
            c.query(&stmt, &refs).await?.iter().map(read).collect()
        })
    }
}

/// Boxes query arguments, which must outlive the caller's borrow.
macro_rules! args {
    ($($a:expr),* $(,)?) => {
        vec![$(Box::new($a) as Box<dyn tokio_postgres::types::ToSql + Send + Sync>),*]
    };
}

const SELECT: &str = "SELECT id, user_id, provider, state, reason, spec, token_hash,
    created_ms, ready_ms, expires_ms, stopped_ms, exit_code, node FROM sessions";

fn read_row(r: &tokio_postgres::Row) -> Result<Row> {
    Ok(Row {
        id: r.try_get(0)?,
        user_id: r.try_get(1)?,
        provider: r.try_get(2)?,
        state: State::parse(r.try_get(3)?),
        reason: r.try_get(4)?,
        spec: serde_json::from_str(r.try_get(5)?)?,
        token_hash: r.try_get(6)?,
        created_ms: r.try_get(7)?,
        ready_ms: r.try_get(8)?,
        expires_ms: r.try_get(9)?,
        stopped_ms: r.try_get(10)?,
        exit_code: r.try_get(11)?,
        node: r.try_get(12)?,
    })
}

fn read_token(r: &tokio_postgres::Row) -> Result<Option<TokenRow>> {
    // A role this version does not know opens nothing.
    let Some(role) = crate::tokens::Role::from_name(r.try_get(2)?) else {
        return Ok(None);
    };
    Ok(Some(TokenRow {
        id: r.try_get(0)?,
        session_id: r.try_get(1)?,
        role,
        token_hash: r.try_get(3)?,
        created_ms: r.try_get(4)?,
        expires_ms: r.try_get(5)?,
        revoked_ms: r.try_get(6)?,
    }))
}

async fn insert_session(
    tx: &tokio_postgres::Transaction<'_>,
    row: Row,
    node: String,
) -> Result<()> {
    let spec = serde_json::to_string(&row.spec)?;
    tx.execute(
        "INSERT INTO sessions (id, user_id, provider, state, reason, spec, token_hash,
            created_ms, ready_ms, expires_ms, stopped_ms, node)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        &[
            &row.id,
            &row.user_id,
            &row.provider,
            &row.state.as_str(),
            &row.reason,
            &spec,
            &row.token_hash,
            &row.created_ms,
            &row.ready_ms,
            &row.expires_ms,
            &row.stopped_ms,
            &node,
        ],
    )
    .await?;
    Ok(())
}

impl Store for PgStore {
    fn ping(&self) -> Result<()> {
        self.query("SELECT 1".into(), args![], |_| Ok(())).map(drop)
    }

    fn insert(&self, row: &Row) -> Result<()> {
        let (pool, row, node) = (self.pool.clone(), row.clone(), self.node.clone());
        self.run(async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            insert_session(&tx, row, node).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn set_state(&self, id: &str, state: State, reason: Option<&str>, now_ms: i64) -> Result<bool> {
        let pool = self.pool.clone();
        let (id, reason) = (id.to_string(), reason.map(str::to_string));
        self.run(async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            // Locked: another node's move of the same session waits.
            let Some(current) = tx
                .query_opt("SELECT state FROM sessions WHERE id = $1 FOR UPDATE", &[&id])
                .await?
            else {
                return Ok(false);
            };
            if !State::parse(current.get(0)).can_become(state) {
                return Ok(false);
            }
            tx.execute(
                "UPDATE sessions SET state = $2, reason = COALESCE($3, reason),
                    ready_ms = CASE WHEN $2 = 'ready' THEN $4 ELSE ready_ms END,
                    stopped_ms = CASE WHEN $2 IN ('stopped', 'completed') THEN $4 ELSE stopped_ms END,
                    ended_ms = CASE WHEN $2 IN ('stopped', 'failed', 'completed')
                        THEN COALESCE(ended_ms, $4) ELSE ended_ms END
                 WHERE id = $1",
                &[&id, &state.as_str(), &reason, &now_ms],
            )
            .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn set_token_hash(&self, id: &str, hash: &str) -> Result<()> {
        self.execute(
            "UPDATE sessions SET token_hash = $2 WHERE id = $1",
            args![id.to_string(), hash.to_string()],
        )
        .map(drop)
    }

    fn set_exit_code(&self, id: &str, code: Option<i32>) -> Result<()> {
        self.execute(
            "UPDATE sessions SET exit_code = $2 WHERE id = $1",
            args![id.to_string(), code],
        )
        .map(drop)
    }

    fn get(&self, id: &str) -> Result<Option<Row>> {
        let rows = self.query(
            format!("{SELECT} WHERE id = $1"),
            args![id.to_string()],
            read_row,
        )?;
        Ok(rows.into_iter().next())
    }

    fn page(&self, q: &PageQuery) -> Result<Vec<Row>> {
        let mut clauses = Vec::new();
        let mut args: Vec<Box<dyn tokio_postgres::types::ToSql + Send + Sync>> = Vec::new();
        if let Some((created, id)) = &q.after {
            clauses.push(format!(
                "(created_ms, id) < (${}, ${})",
                args.len() + 1,
                args.len() + 2
            ));
            args.push(Box::new(*created));
            args.push(Box::new(id.clone()));
        }
        if !q.states.is_empty() {
            clauses.push(format!("state = ANY(${})", args.len() + 1));
            let states: Vec<String> = q.states.iter().map(|s| s.as_str().to_string()).collect();
            args.push(Box::new(states));
        }
        if let Some(u) = &q.user_id {
            clauses.push(format!("user_id = ${}", args.len() + 1));
            args.push(Box::new(u.clone()));
        }
        let filter = if clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", clauses.join(" AND "))
        };
        let limit = format!("${}", args.len() + 1);
        args.push(Box::new(q.limit as i64));
        self.query(
            format!("{SELECT}{filter} ORDER BY created_ms DESC, id DESC LIMIT {limit}"),
            args,
            read_row,
        )
    }

    fn count_by_state(&self) -> Result<Vec<(State, i64)>> {
        let counts = self.query(
            "SELECT state, COUNT(*) FROM sessions GROUP BY state".into(),
            args![],
            |r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)?)),
        )?;
        Ok(super::every_state(&counts))
    }

    fn ended_before(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<String>> {
        self.query(
            "SELECT id FROM sessions WHERE ended_ms <= $1
                AND state IN ('stopped', 'failed', 'completed')
             ORDER BY ended_ms, id LIMIT $2"
                .into(),
            args![cutoff_ms, limit as i64],
            |r| Ok(r.try_get(0)?),
        )
    }

    fn delete(&self, id: &str) -> Result<bool> {
        Ok(self.execute("DELETE FROM sessions WHERE id = $1", args![id.to_string()])? > 0)
    }

    fn exists(&self, id: &str) -> Result<bool> {
        Ok(!self
            .query(
                "SELECT 1 FROM sessions WHERE id = $1".into(),
                args![id.to_string()],
                |_| Ok(()),
            )?
            .is_empty())
    }

    fn add_event(&self, id: &str, kind: &str, data: &serde_json::Value, now_ms: i64) -> Result<()> {
        self.execute(
            "INSERT INTO events (session_id, at_ms, kind, data) VALUES ($1, $2, $3, $4)",
            args![id.to_string(), now_ms, kind.to_string(), data.to_string()],
        )
        .map(drop)
    }

    fn events(&self, id: &str) -> Result<Vec<(i64, String, serde_json::Value)>> {
        self.query(
            "SELECT at_ms, kind, data FROM events WHERE session_id = $1 ORDER BY seq".into(),
            args![id.to_string()],
            |r| {
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    serde_json::from_str(r.try_get(2)?)?,
                ))
            },
        )
    }

    fn reconcile(&self, reason: &str, now_ms: i64) -> Result<Vec<String>> {
        self.query(
            "UPDATE sessions SET state = 'stopped', stopped_ms = $2,
                ended_ms = COALESCE(ended_ms, $2),
                reason = CASE WHEN state = 'failed' THEN reason ELSE $3 END
             WHERE node = $1 AND state IN ('starting', 'ready', 'stopping', 'failed')
                AND stopped_ms IS NULL
             RETURNING id"
                .into(),
            args![self.node.clone(), now_ms, reason.to_string()],
            |r| Ok(r.try_get(0)?),
        )
        .map(|mut ids: Vec<String>| {
            ids.sort();
            ids
        })
    }

    fn insert_token(&self, t: &TokenRow) -> Result<()> {
        self.execute(
            "INSERT INTO tokens (id, session_id, role, token_hash, created_ms, expires_ms, revoked_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            args![
                t.id.clone(),
                t.session_id.clone(),
                t.role.as_str().to_string(),
                t.token_hash.clone(),
                t.created_ms,
                t.expires_ms,
                t.revoked_ms
            ],
        )
        .map(drop)
    }

    fn tokens(&self, session_id: &str) -> Result<Vec<TokenRow>> {
        Ok(self
            .query(
                "SELECT id, session_id, role, token_hash, created_ms, expires_ms, revoked_ms
                 FROM tokens WHERE session_id = $1 ORDER BY created_ms, seq"
                    .into(),
                args![session_id.to_string()],
                read_token,
            )?
            .into_iter()
            .flatten()
            .collect())
    }

    fn revoke_token(&self, session_id: &str, token_id: &str, now_ms: i64) -> Result<bool> {
        Ok(self.execute(
            "UPDATE tokens SET revoked_ms = COALESCE(revoked_ms, $3)
             WHERE session_id = $1 AND id = $2",
            args![session_id.to_string(), token_id.to_string(), now_ms],
        )? > 0)
    }

    fn enqueue_deliveries(&self, deliveries: &[NewDelivery]) -> Result<()> {
        let (pool, ds, node) = (self.pool.clone(), deliveries.to_vec(), self.node.clone());
        self.run(async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            for d in &ds {
                tx.execute(
                    "INSERT INTO webhook_deliveries (id, node, url, event, session_id, body,
                        created_ms, state, next_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $7)",
                    &[
                        &d.id,
                        &node,
                        &d.url,
                        &d.event,
                        &d.session_id,
                        &d.body,
                        &d.created_ms,
                    ],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn delivery_heads(&self) -> Result<Vec<Head>> {
        self.query(
            "SELECT d.seq, d.id, d.url, d.event, d.session_id, d.body, d.created_ms, d.attempts,
                COALESCE(d.next_ms, d.created_ms)
             FROM webhook_deliveries d
             JOIN (SELECT MIN(seq) AS seq FROM webhook_deliveries
                   WHERE state = 'pending' AND node = $1 GROUP BY url) h ON d.seq = h.seq
             ORDER BY d.seq"
                .into(),
            args![self.node.clone()],
            |r| {
                Ok(Head {
                    seq: r.try_get(0)?,
                    delivery: NewDelivery {
                        id: r.try_get(1)?,
                        url: r.try_get(2)?,
                        event: r.try_get(3)?,
                        session_id: r.try_get(4)?,
                        body: r.try_get(5)?,
                        created_ms: r.try_get(6)?,
                    },
                    attempts: r.try_get::<_, i32>(7)? as u32,
                    next_ms: r.try_get(8)?,
                })
            },
        )
    }

    fn update_delivery(&self, seq: i64, u: &DeliveryUpdate) -> Result<()> {
        let (attempted, last_ms, last_status) = match u.attempt {
            Some((at, status)) => (true, Some(at), status.map(i32::from)),
            None => (false, None, None),
        };
        self.execute(
            "UPDATE webhook_deliveries SET state = $2, attempts = $3, next_ms = $4,
                last_ms = CASE WHEN $5 THEN $6 ELSE last_ms END,
                last_status = CASE WHEN $5 THEN $7 ELSE last_status END,
                last_error = $8
             WHERE seq = $1",
            args![
                seq,
                u.state.as_str().to_string(),
                u.attempts as i32,
                u.next_ms,
                attempted,
                last_ms,
                last_status,
                u.error.clone()
            ],
        )
        .map(drop)
    }

    fn prune_deliveries(&self, cutoff_ms: i64) -> Result<usize> {
        Ok(self.execute(
            "DELETE FROM webhook_deliveries WHERE created_ms < $1 AND state != 'pending'",
            args![cutoff_ms],
        )? as usize)
    }

    fn recent_deliveries(&self, limit: usize) -> Result<Vec<Delivery>> {
        self.query(
            "SELECT id, url, event, session_id, state, attempts, created_ms, last_ms, last_status,
                last_error, next_ms
             FROM webhook_deliveries ORDER BY seq DESC LIMIT $1"
                .into(),
            args![limit as i64],
            |r| {
                let state = DeliveryState::parse(r.try_get(4)?);
                Ok(Delivery {
                    id: r.try_get(0)?,
                    url: r.try_get(1)?,
                    event: r.try_get(2)?,
                    session_id: r.try_get(3)?,
                    state,
                    attempts: r.try_get::<_, i32>(5)? as u32,
                    created_at: rfc3339(r.try_get(6)?),
                    last_attempt_at: r.try_get::<_, Option<i64>>(7)?.map(rfc3339),
                    last_status: r.try_get::<_, Option<i32>>(8)?.map(|s| s as u16),
                    last_error: r.try_get(9)?,
                    next_attempt_at: r
                        .try_get::<_, Option<i64>>(10)?
                        .filter(|_| state == DeliveryState::Pending)
                        .map(rfc3339),
                })
            },
        )
    }

    fn cluster(&self) -> Option<&dyn Cluster> {
        Some(self)
    }
}

/// Nodes with the sessions placed on each that have not ended, as
/// [`read_node`] reads them.
fn select_nodes() -> String {
    format!(
        "SELECT n.id, n.api_url, n.public_url, n.webrtc, n.version, n.max_sessions,
            n.sessions, n.free_mib, n.idle_millis, n.draining, n.lost, n.heartbeat_ms,
            (SELECT COUNT(*) FROM sessions s WHERE s.node = n.id AND s.state IN {LIVE})
         FROM nodes n"
    )
}

fn read_node(r: &tokio_postgres::Row) -> Result<NodeRow> {
    Ok(NodeRow {
        info: NodeInfo {
            id: r.try_get(0)?,
            api_url: r.try_get(1)?,
            public_url: r.try_get(2)?,
            webrtc: serde_json::from_str(r.try_get(3)?)?,
            version: r.try_get(4)?,
            max_sessions: r.try_get::<_, i32>(5)? as u32,
        },
        load: NodeLoad {
            sessions: r.try_get::<_, i32>(6)? as u32,
            free_mib: r.try_get::<_, i64>(7)? as u64,
            idle_millis: r.try_get::<_, i32>(8)? as u32,
        },
        draining: r.try_get(9)?,
        lost: r.try_get(10)?,
        heartbeat_ms: r.try_get(11)?,
        placed: r.try_get::<_, i64>(12)? as u32,
    })
}

/// A candidate node under its row lock: its room and free memory.
struct Candidate {
    id: String,
    free_slots: i64,
    free_mib: i64,
}

/// Locks the rows of `ids` (in id order, so that two placements never
/// wait for each other in a cycle), then counts each one's free slots from
/// the sessions placed on it. Two statements: under READ COMMITTED a
/// statement sees the data of its start, so a count in the locking
/// statement would miss the session that the placement it waited for
/// inserted.
async fn lock_and_count(
    tx: &tokio_postgres::Transaction<'_>,
    ids: &[String],
) -> Result<Vec<Candidate>> {
    tx.execute(
        "SELECT id FROM nodes WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        &[&ids],
    )
    .await?;
    let rows = tx
        .query(
            &format!(
                "SELECT n.id, n.max_sessions::BIGINT - COUNT(s.id), n.free_mib
                 FROM nodes n
                 LEFT JOIN sessions s ON s.node = n.id AND s.state IN {LIVE}
                 WHERE n.id = ANY($1) AND NOT n.draining AND NOT n.lost
                 GROUP BY n.id, n.max_sessions, n.free_mib"
            ),
            &[&ids],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Candidate {
                id: r.try_get(0)?,
                free_slots: r.try_get(1)?,
                free_mib: r.try_get(2)?,
            })
        })
        .collect()
}

/// The freest of `candidates`: most free slots, then most free memory.
fn freest(candidates: Vec<Candidate>) -> Option<String> {
    candidates
        .into_iter()
        .filter(|c| c.free_slots > 0)
        .max_by_key(|c| (c.free_slots, c.free_mib))
        .map(|c| c.id)
}

impl Cluster for PgStore {
    fn node_id(&self) -> &str {
        &self.node
    }

    fn join(&self, node: &NodeInfo, now_ms: i64) -> Result<()> {
        let webrtc = serde_json::to_string(&node.webrtc)?;
        self.execute(
            "INSERT INTO nodes (id, api_url, public_url, webrtc, version, max_sessions,
                joined_ms, heartbeat_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
             ON CONFLICT (id) DO UPDATE SET api_url = $2, public_url = $3, webrtc = $4,
                version = $5, max_sessions = $6, joined_ms = $7, heartbeat_ms = $7,
                lost = FALSE",
            args![
                node.id.clone(),
                node.api_url.clone(),
                node.public_url.clone(),
                webrtc,
                node.version.clone(),
                node.max_sessions as i32,
                now_ms
            ],
        )
        .map(drop)
    }

    fn heartbeat(&self, load: &NodeLoad, now_ms: i64) -> Result<bool> {
        Ok(self.execute(
            "UPDATE nodes SET sessions = $2, free_mib = $3, idle_millis = $4, heartbeat_ms = $5
             WHERE id = $1 AND NOT lost",
            args![
                self.node.clone(),
                load.sessions as i32,
                load.free_mib as i64,
                load.idle_millis as i32,
                now_ms
            ],
        )? > 0)
    }

    fn nodes(&self) -> Result<Vec<NodeRow>> {
        self.query(
            format!("{} ORDER BY n.id", select_nodes()),
            args![],
            read_node,
        )
    }

    fn node(&self, node_id: &str) -> Result<Option<NodeRow>> {
        let rows = self.query(
            format!("{} WHERE n.id = $1", select_nodes()),
            args![node_id.to_string()],
            read_node,
        )?;
        Ok(rows.into_iter().next())
    }

    fn set_draining(&self, node_id: &str, draining: bool) -> Result<bool> {
        Ok(self.execute(
            "UPDATE nodes SET draining = $2 WHERE id = $1",
            args![node_id.to_string(), draining],
        )? > 0)
    }

    fn place(
        &self,
        row: &Row,
        candidates: usize,
        fresh_after_ms: i64,
        exclude: &[String],
    ) -> Result<Placement> {
        let pool = self.pool.clone();
        let (row, exclude) = (row.clone(), exclude.to_vec());
        let k = candidates.max(1);
        self.run(async move {
            let mut c = pool.get().await?;
            let eligible: Vec<String> = c
                .query(
                    "SELECT id FROM nodes WHERE NOT draining AND NOT lost
                        AND heartbeat_ms >= $1 AND NOT (id = ANY($2))",
                    &[&fresh_after_ms, &exclude],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let user = row.spec.profile.clone();
            let pinned: Option<String> = match &user {
                Some(u) => c
                    .query_opt("SELECT node FROM profiles WHERE user_id = $1", &[u])
                    .await?
                    .map(|r| r.get(0)),
                None => None,
            };
            // K at random first; only when none of them has room, all of
            // them (in a transaction of its own, so locks are only ever
            // taken in id order). A pinned profile allows its node alone.
            let rounds = match &pinned {
                Some(n) if eligible.contains(n) => vec![vec![n.clone()]],
                Some(n) => return Ok(Placement::Pinned(n.clone())),
                None => {
                    let mut sample = eligible.clone();
                    {
                        use rand::seq::SliceRandom;
                        sample.shuffle(&mut rand::rng());
                    }
                    sample.truncate(k);
                    sample.sort();
                    let mut rounds = vec![sample];
                    if eligible.len() > k {
                        let mut all = eligible;
                        all.sort();
                        rounds.push(all);
                    }
                    rounds
                }
            };
            let mut placed = None;
            for ids in rounds {
                let tx = c.transaction().await?;
                // Draining and lost are read again under the lock: a drain
                // that just committed is seen.
                let locked = lock_and_count(&tx, &ids).await?;
                if let Some(node) = freest(locked) {
                    insert_session(&tx, row.clone(), node.clone()).await?;
                    tx.commit().await?;
                    placed = Some(node);
                    break;
                }
                tx.rollback().await?;
            }
            let Some(node) = placed else {
                return Ok(match pinned {
                    Some(n) => Placement::Pinned(n),
                    None => Placement::Full,
                });
            };
            // A first profile session keeps the profile where it went;
            // of two racing for one user, the first pin wins and the
            // other's row goes (it was never started).
            if let (Some(u), None) = (&user, &pinned) {
                c.execute(
                    "INSERT INTO profiles (user_id, node) VALUES ($1, $2)
                     ON CONFLICT (user_id) DO NOTHING",
                    &[u, &node],
                )
                .await?;
                let kept: String = c
                    .query_one("SELECT node FROM profiles WHERE user_id = $1", &[u])
                    .await?
                    .get(0);
                if kept != node {
                    c.execute("DELETE FROM sessions WHERE id = $1", &[&row.id])
                        .await?;
                    return Ok(Placement::Pinned(kept));
                }
            }
            Ok(Placement::Placed(node))
        })
    }

    fn profile_node(&self, user_id: &str) -> Result<Option<String>> {
        Ok(self
            .query(
                "SELECT node FROM profiles WHERE user_id = $1".into(),
                args![user_id.to_string()],
                |r| Ok(r.try_get(0)?),
            )?
            .into_iter()
            .next())
    }

    fn pin_profile(&self, user_id: &str) -> Result<String> {
        self.execute(
            "INSERT INTO profiles (user_id, node) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING",
            args![user_id.to_string(), self.node.clone()],
        )?;
        self.profile_node(user_id)?
            .ok_or_else(|| pg(format!("the profile pin of {user_id:?} vanished")))
    }

    fn unpin_profile(&self, user_id: &str) -> Result<()> {
        self.execute(
            "DELETE FROM profiles WHERE user_id = $1 AND node = $2",
            args![user_id.to_string(), self.node.clone()],
        )
        .map(drop)
    }

    fn fail_lost(&self, cutoff_ms: i64, reason: &str, now_ms: i64) -> Result<Vec<String>> {
        let (pool, me, reason) = (self.pool.clone(), self.node.clone(), reason.to_string());
        self.run(async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            // SKIP LOCKED: when several nodes notice at once, one does it.
            let lost: Vec<String> = tx
                .query(
                    "SELECT id FROM nodes WHERE NOT lost AND heartbeat_ms < $1 AND id != $2
                     FOR UPDATE SKIP LOCKED",
                    &[&cutoff_ms, &me],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut failed = Vec::new();
            for node in &lost {
                tx.execute("UPDATE nodes SET lost = TRUE WHERE id = $1", &[node])
                    .await?;
                let rows = tx
                    .query(
                        "UPDATE sessions SET state = 'failed', reason = $2,
                            ended_ms = COALESCE(ended_ms, $3)
                         WHERE node = $1 AND state IN ('starting', 'ready')
                         RETURNING id",
                        &[node, &reason, &now_ms],
                    )
                    .await?;
                failed.extend(rows.iter().map(|r| r.get::<_, String>(0)));
                // A session that was being stopped has ended with its node.
                tx.execute(
                    "UPDATE sessions SET state = 'stopped', reason = COALESCE(reason, $2),
                        stopped_ms = $3, ended_ms = COALESCE(ended_ms, $3)
                     WHERE node = $1 AND state = 'stopping'",
                    &[node, &reason, &now_ms],
                )
                .await?;
                tx.execute(
                    "UPDATE webhook_deliveries SET node = $2 WHERE node = $1 AND state = 'pending'",
                    &[node, &me],
                )
                .await?;
            }
            tx.commit().await?;
            failed.sort();
            Ok(failed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::suite;
    use crate::store::testing::TestPostgres;

    /// The store suite, each case on a database of its own.
    #[test]
    fn postgres_passes_the_store_suite() {
        let Some(pg) = TestPostgres::start_or_skip() else {
            return;
        };
        for (i, (name, case)) in suite::CASES.iter().enumerate() {
            let url = pg.database(&format!("case{i}"));
            eprintln!("case {name}");
            case(&|| Box::new(PgStore::open(&url, "n1").unwrap()));
        }
    }

    fn info(id: &str, max_sessions: u32) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            api_url: format!("http://{id}:8080"),
            public_url: format!("https://{id}.example"),
            webrtc: vec!["127.0.0.1:3478".into()],
            version: "test".into(),
            max_sessions,
        }
    }

    /// Nodes `ids` with `max` slots each, joined at time 1000.
    fn cluster(url: &str, nodes: &[(&str, u32)]) -> Vec<PgStore> {
        nodes
            .iter()
            .map(|(id, max)| {
                let s = PgStore::open(url, id).unwrap();
                s.join(&info(id, *max), 1000).unwrap();
                s
            })
            .collect()
    }

    fn placed(s: &PgStore) -> Vec<(String, u32)> {
        s.nodes()
            .unwrap()
            .into_iter()
            .map(|n| (n.info.id, n.placed))
            .collect()
    }

    /// 30 creates at once through three nodes: each lands exactly once,
    /// and no node gets more than its slots, although every placement read
    /// the same figures.
    #[test]
    fn concurrent_placements_never_overfill_a_node() {
        let Some(pg) = TestPostgres::start_or_skip() else {
            return;
        };
        let url = pg.database("place");
        let nodes = cluster(&url, &[("a", 4), ("b", 4), ("c", 2)]);
        let results: Vec<(String, Option<String>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..30)
                .map(|i| {
                    let store = &nodes[i % 3];
                    scope.spawn(move || {
                        let row = Row::for_test(&format!("s{i:02}"));
                        let at = match store.place(&row, 2, 0, &[]).unwrap() {
                            Placement::Placed(n) => Some(n),
                            _ => None,
                        };
                        (row.id, at)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ok: Vec<_> = results.iter().filter(|(_, at)| at.is_some()).collect();
        assert_eq!(ok.len(), 10, "every slot used once: {results:?}");
        assert_eq!(
            placed(&nodes[0]),
            [("a".into(), 4), ("b".into(), 4), ("c".into(), 2)]
        );
        for (id, at) in &results {
            let row = nodes[0].get(id).unwrap();
            match at {
                Some(node) => assert_eq!(&row.unwrap().node, node, "{id}"),
                None => assert!(row.is_none(), "{id} was refused but stored"),
            }
        }
    }

    /// Placement spreads by room: with every node a candidate the load is
    /// even; with two of three it never strays far.
    #[test]
    fn placement_goes_to_the_freest_candidate() {
        let Some(pg) = TestPostgres::start_or_skip() else {
            return;
        };
        for (k, spread) in [(3, 0), (2, 2)] {
            let url = pg.database(&format!("spread{k}"));
            let nodes = cluster(&url, &[("a", 10), ("b", 10), ("c", 10)]);
            for i in 0..12 {
                let row = Row::for_test(&format!("s{i}"));
                assert!(matches!(
                    nodes[i % 3].place(&row, k, 0, &[]).unwrap(),
                    Placement::Placed(_)
                ));
            }
            let counts: Vec<u32> = placed(&nodes[0]).iter().map(|(_, n)| *n).collect();
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= spread, "k = {k}: {counts:?}");
            assert_eq!(counts.iter().sum::<u32>(), 12);
        }
    }

    /// Draining, lost, silent and excluded nodes get nothing new; an
    /// ended session frees its slot.
    #[test]
    fn placement_skips_draining_lost_stale_and_excluded_nodes() {
        let Some(pg) = TestPostgres::start_or_skip() else {
            return;
        };
        let url = pg.database("skip");
        let nodes = cluster(&url, &[("a", 1), ("b", 5), ("c", 5), ("d", 5)]);
        let a = &nodes[0];
        assert!(a.set_draining("b", true).unwrap());
        assert!(!a.set_draining("zz", true).unwrap());
        // c is silent since 1000; d is fresh.
        nodes[3].heartbeat(&NodeLoad::default(), 5000).unwrap();
        nodes[0].heartbeat(&NodeLoad::default(), 5000).unwrap();
        let fresh_after = 4000;
        let place = |id: &str, exclude: &[String]| match a
            .place(&Row::for_test(id), 4, fresh_after, exclude)
            .unwrap()
        {
            Placement::Placed(n) => Some(n),
            Placement::Full => None,
            p => panic!("{p:?}"),
        };
        assert_eq!(place("s1", &[]).as_deref(), Some("d"), "d has most room");
        assert_eq!(place("s2", &["d".into()]).as_deref(), Some("a"));
        assert_eq!(place("s3", &["d".into()]), None, "a is full");
        a.set_state("s2", State::Stopped, None, 6000).unwrap();
        assert_eq!(place("s4", &["d".into()]).as_deref(), Some("a"));
        assert!(a.set_draining("b", false).unwrap());
        nodes[1].heartbeat(&NodeLoad::default(), 5000).unwrap();
        assert_eq!(place("s5", &["d".into()]).as_deref(), Some("b"));
    }

    fn with_profile(id: &str, user: &str) -> Row {
        let base = Row::for_test(id);
        Row {
            spec: crate::store::Spec {
                profile: Some(user.into()),
                ..base.spec
            },
            ..base
        }
    }

    /// A user's profile sessions all go to the node of the first one, also
    /// when they race; a node that cannot take one means none is placed.
    #[test]
    fn profile_sessions_follow_their_profile() {
        let Some(pg) = TestPostgres::start_or_skip() else {
            return;
        };
        let url = pg.database("pins");
        let nodes = cluster(&url, &[("a", 3), ("b", 3), ("c", 3)]);
        let Placement::Placed(home) = nodes[0]
            .place(&with_profile("p0", "alice"), 3, 0, &[])
            .unwrap()
        else {
            panic!("placed");
        };
        for (i, node) in nodes.iter().enumerate().skip(1) {
            let got = node.place(&with_profile(&format!("p{i}"), "alice"), 3, 0, &[]);
            assert_eq!(got.unwrap(), Placement::Placed(home.clone()));
        }
        assert_eq!(
            nodes[0]
                .place(&with_profile("p3", "alice"), 3, 0, &[])
                .unwrap(),
            Placement::Pinned(home.clone()),
            "its node is full"
        );
        assert_eq!(nodes[1].profile_node("alice").unwrap(), Some(home.clone()));
        assert_eq!(nodes[1].profile_node("nobody").unwrap(), None);
        // Eight racing first sessions of one user: all on one node.
        let got: Vec<Placement> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let store = &nodes[i % 3];
                    scope.spawn(move || {
                        store
                            .place(&with_profile(&format!("q{i}"), "bob"), 1, 0, &[])
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let bob = nodes[0].profile_node("bob").unwrap().expect("pinned");
        for p in &got {
            match p {
                Placement::Placed(n) | Placement::Pinned(n) => assert_eq!(n, &bob, "{got:?}"),
                Placement::Full => {}
            }
        }
        let rows = nodes[0]
            .page(&PageQuery {
                limit: 100,
                ..PageQuery::default()
            })
            .unwrap();
        let bobs: Vec<&Row> = rows
            .iter()
            .filter(|r| r.spec.profile.as_deref() == Some("bob"))
            .collect();
        assert!(
            !bobs.is_empty() && bobs.iter().all(|r| r.node == bob),
            "{bobs:?}"
        );
        // An import pins to the node it reaches first; only that node unpins.
        let (b, c) = (&nodes[1], &nodes[2]);
        assert_eq!(b.pin_profile("carol").unwrap(), "b");
        assert_eq!(c.pin_profile("carol").unwrap(), "b");
        c.unpin_profile("carol").unwrap();
        assert_eq!(c.profile_node("carol").unwrap().as_deref(), Some("b"));
        b.unpin_profile("carol").unwrap();
        assert_eq!(c.profile_node("carol").unwrap(), None);
    }

    /// A silent node is declared lost once (by whichever node looks
    /// first): its live sessions fail, its pending deliveries move to the
    /// node that noticed; its own heartbeat then says so, and it rejoins.
    #[test]
    fn a_lost_node_fails_its_sessions_once_and_rejoins() {
        let Some(pg) = TestPostgres::start_or_skip() else {
            return;
        };
        let url = pg.database("lost");
        let nodes = cluster(&url, &[("a", 5), ("b", 5)]);
        let (a, b) = (&nodes[0], &nodes[1]);
        a.set_draining("a", true).unwrap();
        for id in ["s1", "s2", "s3"] {
            assert_eq!(
                b.place(&Row::for_test(id), 2, 0, &[]).unwrap(),
                Placement::Placed("b".into())
            );
        }
        b.set_state("s2", State::Stopping, None, 1500).unwrap();
        b.set_state("s3", State::Ready, None, 1500).unwrap();
        b.set_state("s3", State::Stopped, None, 1600).unwrap();
        b.enqueue_deliveries(&[NewDelivery {
            id: "d1".into(),
            url: "http://hook/".into(),
            event: "ready".into(),
            session_id: "s1".into(),
            body: "{}".into(),
            created_ms: 1200,
        }])
        .unwrap();
        assert!(a.delivery_heads().unwrap().is_empty());
        assert!(a.heartbeat(&NodeLoad::default(), 9000).unwrap());
        assert_eq!(a.fail_lost(5000, "node lost", 9000).unwrap(), ["s1"]);
        assert!(a.fail_lost(5000, "node lost", 9001).unwrap().is_empty());
        let s1 = a.get("s1").unwrap().unwrap();
        assert_eq!(
            (s1.state, s1.reason.as_deref()),
            (State::Failed, Some("node lost"))
        );
        assert_eq!(a.get("s2").unwrap().unwrap().state, State::Stopped);
        assert_eq!(a.get("s3").unwrap().unwrap().reason, None, "ended before");
        assert_eq!(a.delivery_heads().unwrap()[0].delivery.id, "d1");
        assert!(b.delivery_heads().unwrap().is_empty());
        assert!(a.nodes().unwrap()[1].lost);
        assert!(a.node("b").unwrap().unwrap().lost);
        assert!(a.node("zz").unwrap().is_none());
        assert!(
            !b.heartbeat(&NodeLoad::default(), 9500).unwrap(),
            "b hears it was lost"
        );
        b.join(&info("b", 5), 9600).unwrap();
        assert!(b.heartbeat(&NodeLoad::default(), 9700).unwrap());
        let row = a.nodes().unwrap().remove(1);
        assert!(!row.lost && !row.draining);
        assert!(a.nodes().unwrap()[0].draining, "a's drain is kept");
        // b restarted: only its own sessions are reconciled.
        a.set_draining("a", false).unwrap();
        a.place(&Row::for_test("on-a"), 1, 9000, &["b".into()])
            .unwrap();
        assert_eq!(b.reconcile("restart", 9800).unwrap(), ["s1"]);
        assert_eq!(a.reconcile("restart", 9800).unwrap(), ["on-a"]);
        assert_eq!(
            a.get("s1").unwrap().unwrap().reason.as_deref(),
            Some("node lost")
        );
    }
}
