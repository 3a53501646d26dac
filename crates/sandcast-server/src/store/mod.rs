//! The session store. Sessions and their events outlive the processes that
//! ran them, so a restarted server knows what was running and can say what
//! became of it.
//!
//! [`Store`] is every query the server makes; [`sqlite::SqliteStore`] (one
//! file beside the server, nothing to set up) and
//! [`postgres::PgStore`] (shared by the nodes of a cluster, which also
//! implements [`Cluster`]) are its two implementations, and `suite` is the
//! one set of tests both pass.

pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod suite;
pub mod testing;

use serde::{Deserialize, Serialize};

use crate::webhooks::{Delivery, DeliveryUpdate, Head, NewDelivery};

/// Opens the configured store: PostgreSQL as this node when `store` is a
/// PostgreSQL URL, else the SQLite file in `data_dir`.
pub fn open(config: &crate::Config) -> Result<std::sync::Arc<dyn Store>> {
    Ok(if config.clustered() {
        std::sync::Arc::new(postgres::PgStore::open(&config.store, &node_id(config))?)
    } else {
        std::sync::Arc::new(sqlite::SqliteStore::open(
            &config.data_dir.join("sandcast.sqlite"),
        )?)
    })
}

/// This node's id: `[cluster] node_id`, else the host name and the
/// server's instance id (two servers on one host are two nodes).
pub fn node_id(config: &crate::Config) -> String {
    if !config.cluster.node_id.is_empty() {
        return config.cluster.node_id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), config.host_config().instance)
}

/// Counts by state name as a database groups them, with every state (0
/// for those it had none of).
fn every_state(counts: &[(String, i64)]) -> Vec<(State, i64)> {
    State::ALL
        .iter()
        .map(|s| {
            let n = counts
                .iter()
                .filter(|(name, _)| name == s.as_str())
                .map(|(_, n)| n)
                .sum();
            (*s, n)
        })
        .collect()
}

/// A store URL with its password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The last `@` before the query ends the user information (a password
    // may hold an unescaped `@` of its own).
    let head = rest.split('?').next().unwrap_or(rest);
    match head.rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((name, _)) => format!("{scheme}://{name}:***@{}", &rest[at + 1..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

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

    pub(crate) fn parse(s: &str) -> State {
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
    /// The node that runs it, in a cluster ([`Cluster`]); empty on a
    /// single host.
    pub node: String,
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

/// Errors of the store.
pub type Result<T> = std::result::Result<T, StoreError>;

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// SQLite's migrations failed.
    #[error("database migration: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    /// PostgreSQL said no, or could not be reached.
    #[error("database: {0}")]
    Postgres(String),
    /// Stored JSON did not parse.
    #[error("stored record: {0}")]
    Json(#[from] serde_json::Error),
    /// The database file could not be made private.
    #[error("database file: {0}")]
    Io(#[from] std::io::Error),
}

/// Every query the server makes of its store.
///
/// Calls block until the database answered: they are short (one row or
/// one page), and callers that write a session's state in order rely on
/// each write having happened when the call returns.
pub trait Store: Send + Sync {
    /// Whether the database answers.
    fn ping(&self) -> Result<()>;
    /// Adds a new session (on this node, in a cluster).
    fn insert(&self, row: &Row) -> Result<()>;
    /// Moves a session to `state` if the transition is allowed; returns
    /// whether it moved. `reason` is kept only when given.
    fn set_state(&self, id: &str, state: State, reason: Option<&str>, now_ms: i64) -> Result<bool>;
    /// Replaces a session's viewer token hash.
    fn set_token_hash(&self, id: &str, hash: &str) -> Result<()>;
    /// Records the launch command's exit code.
    fn set_exit_code(&self, id: &str, code: Option<i32>) -> Result<()>;
    /// One session.
    fn get(&self, id: &str) -> Result<Option<Row>>;
    /// One page of sessions, newest first (ties broken by id).
    fn page(&self, q: &PageQuery) -> Result<Vec<Row>>;
    /// How many sessions are in each state.
    fn count_by_state(&self) -> Result<Vec<(State, i64)>>;
    /// Up to `limit` sessions that ended (stopped, failed or completed) at
    /// or before `cutoff_ms`, oldest first.
    fn ended_before(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<String>>;
    /// Removes a session, its events and tokens; returns whether it existed.
    fn delete(&self, id: &str) -> Result<bool>;
    /// Whether a session is recorded.
    fn exists(&self, id: &str) -> Result<bool>;
    /// Records an event.
    fn add_event(&self, id: &str, kind: &str, data: &serde_json::Value, now_ms: i64) -> Result<()>;
    /// Events of a session in order: (at_ms, kind, data).
    fn events(&self, id: &str) -> Result<Vec<(i64, String, serde_json::Value)>>;
    /// After a restart: every session of this node that may have had
    /// processes becomes stopped with `reason`. Returns their ids.
    fn reconcile(&self, reason: &str, now_ms: i64) -> Result<Vec<String>>;
    /// Records a token.
    fn insert_token(&self, t: &TokenRow) -> Result<()>;
    /// A session's tokens, oldest first (revoked and expired ones too).
    fn tokens(&self, session_id: &str) -> Result<Vec<TokenRow>>;
    /// Revokes a session's token (a second revocation keeps the first
    /// time); returns whether the session has that token.
    fn revoke_token(&self, session_id: &str, token_id: &str, now_ms: i64) -> Result<bool>;
    /// Writes webhook deliveries, due at once, all or none; this node
    /// sends them.
    fn enqueue_deliveries(&self, deliveries: &[NewDelivery]) -> Result<()>;
    /// The oldest pending delivery of every endpoint that this node sends,
    /// due or not.
    fn delivery_heads(&self) -> Result<Vec<Head>>;
    /// Records what became of a delivery.
    fn update_delivery(&self, seq: i64, update: &DeliveryUpdate) -> Result<()>;
    /// Removes delivered and failed deliveries of events before
    /// `cutoff_ms`; returns how many.
    fn prune_deliveries(&self, cutoff_ms: i64) -> Result<usize>;
    /// The `limit` most recent deliveries, newest event first.
    fn recent_deliveries(&self, limit: usize) -> Result<Vec<Delivery>>;
    /// The nodes' side of the store, when it is shared by a cluster.
    fn cluster(&self) -> Option<&dyn Cluster> {
        None
    }
}

/// The store shared by the nodes of a cluster: the nodes, placement, and
/// what happens when a node is lost.
pub trait Cluster: Send + Sync {
    /// This node's id.
    fn node_id(&self) -> &str;
    /// Writes this node's row (new, or again after a restart) as alive and
    /// not lost; `draining` is kept from an earlier row.
    fn join(&self, node: &NodeInfo, now_ms: i64) -> Result<()>;
    /// Refreshes this node's figures. `false`: the cluster took this node
    /// for lost meanwhile (its sessions were failed); it must reap them
    /// and [`Cluster::join`] again.
    fn heartbeat(&self, load: &NodeLoad, now_ms: i64) -> Result<bool>;
    /// Every node, by id.
    fn nodes(&self) -> Result<Vec<NodeRow>>;
    /// One node.
    fn node(&self, node_id: &str) -> Result<Option<NodeRow>>;
    /// Whether new sessions may be placed on a node; returns whether it
    /// exists.
    fn set_draining(&self, node_id: &str, draining: bool) -> Result<bool>;
    /// Places a new session: picks the node with the most free slots
    /// among `candidates` random live, not draining nodes whose heartbeat
    /// is newer than `fresh_after_ms` and that are not in `exclude`, and
    /// inserts `row` on it in the same transaction. The slots are counted
    /// from the sessions themselves, under a lock of the candidates' rows:
    /// concurrent placements never overfill a node, and stale heartbeat
    /// figures cannot send every create to the same one.
    ///
    /// A session with a profile goes where its user's profile is (the
    /// first one's node keeps it), or nowhere.
    fn place(
        &self,
        row: &Row,
        candidates: usize,
        fresh_after_ms: i64,
        exclude: &[String],
    ) -> Result<Placement>;
    /// The node that keeps `user_id`'s profile, if any does.
    fn profile_node(&self, user_id: &str) -> Result<Option<String>>;
    /// Keeps `user_id`'s profile on this node unless another node keeps it
    /// already; returns the node that does.
    fn pin_profile(&self, user_id: &str) -> Result<String>;
    /// This node no longer keeps `user_id`'s profile.
    fn unpin_profile(&self, user_id: &str) -> Result<()>;
    /// Marks nodes whose last heartbeat is older than `cutoff_ms` lost and
    /// fails their live sessions with `reason`; pending webhook deliveries
    /// of a lost node are sent by this one. Returns the failed sessions.
    fn fail_lost(&self, cutoff_ms: i64, reason: &str, now_ms: i64) -> Result<Vec<String>>;
}

/// Where a new session went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Inserted on this node.
    Placed(String),
    /// No node has room.
    Full,
    /// Its user's profile is on this node, which cannot take it now
    /// (draining, lost, silent, full, or excluded).
    Pinned(String),
}

/// What a node says of itself when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeInfo {
    /// Its id (`[cluster] node_id`).
    pub id: String,
    /// Where other nodes reach its API (`[cluster] api_url`).
    pub api_url: String,
    /// Where viewers reach it (`public_url`).
    pub public_url: String,
    /// Its WebRTC addresses (UDP, and ICE-TCP when on).
    pub webrtc: Vec<String>,
    /// Its sandcast version.
    pub version: String,
    /// Most sessions it runs.
    pub max_sessions: u32,
}

/// A node's changing figures, sent with each heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeLoad {
    /// Sessions it runs now.
    pub sessions: u32,
    /// Memory available on its host, MiB.
    pub free_mib: u64,
    /// Idle CPU of its host, thousandths of a core.
    pub idle_millis: u32,
}

/// One node as the store has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRow {
    /// What it said when it joined.
    #[serde(flatten)]
    pub info: NodeInfo,
    /// Its last figures.
    pub load: NodeLoad,
    /// Sessions placed on it that have not ended (reservations included).
    pub placed: u32,
    /// No new sessions are placed on it.
    pub draining: bool,
    /// Its heartbeat stopped and its sessions were failed.
    pub lost: bool,
    /// Its last heartbeat, ms since the epoch.
    pub heartbeat_ms: i64,
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
            node: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn a_store_url_is_shown_without_its_password() {
        assert_eq!(
            redact_url("postgres://sc:s3cret@db:5432/sc"),
            "postgres://sc:***@db:5432/sc"
        );
        assert_eq!(redact_url("postgres://sc@db/sc"), "postgres://sc@db/sc");
        assert_eq!(
            redact_url("postgres://sc:p@ss@db/sc?sslmode=disable"),
            "postgres://sc:***@db/sc?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres:///sc?host=/run/postgresql"),
            "postgres:///sc?host=/run/postgresql"
        );
    }
}
