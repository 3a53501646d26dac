//! Server instances on one host: two servers with their own data
//! directories never touch each other's sessions, firewall or cgroups, even
//! when one is killed and restarted; and a soak of create/delete cycles and
//! servers killed mid-start leaves nothing that no live session owns.

use std::time::Duration;

use sandcast_e2e::{
    Server, ServerOptions, agent_process, input_page, leftovers, wait_no_leftovers,
};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(60);

fn ready_session(s: &Server) -> (String, Value) {
    let created = s.create(&json!({ "start_url": input_page(), "kiosk": true }));
    let id = created["id"].as_str().expect("id").to_string();
    s.wait_state(&id, "ready", READY);
    (id, created)
}

/// `/viewer/{id}/state` with the session's viewer token.
fn viewer_state(s: &Server, id: &str, created: &Value) -> Value {
    let token = created["viewer_token"].as_str().expect("viewer_token");
    let r = s.raw(
        "GET",
        &format!("/viewer/{id}/state"),
        &[("authorization", &format!("Bearer {token}"))],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// A server that stops removes its table and cgroup parents; one that was
/// killed leaves them, and its next start and stop remove them.
#[test]
fn a_stopped_server_leaves_no_table_or_cgroup_parent() {
    let mut s = Server::start_default();
    let (id, _) = ready_session(&s);
    let held = s.instance_leftovers();
    assert!(
        held.iter().any(|l| l.starts_with("nftables table"))
            && held.iter().any(|l| l.starts_with("cgroup")),
        "a live session's instance holds a table and a cgroup parent: {held:?}"
    );
    s.restart();
    s.wait_state(&id, "stopped", Duration::from_secs(30));
    let (id, _) = ready_session(&s);
    assert_eq!(s.terminate(Duration::from_secs(30)), Some(0));
    let left = leftovers(&id);
    assert!(left.is_empty(), "the session left:\n{}", left.join("\n"));
    let left = s.instance_leftovers();
    assert!(left.is_empty(), "the stopped server left: {left:?}");
}

#[test]
fn two_servers_on_one_host_leave_each_other_alone() {
    let a = Server::start_default();
    let mut b = a.start_beside(ServerOptions::default());
    assert_ne!(a.instance(), b.instance(), "two data dirs, one instance id");
    let (ida, created_a) = ready_session(&a);
    let (idb, _) = ready_session(&b);
    let agent_a = agent_process(&ida).expect("agent of a's session");
    // Each server's table lists its own session only.
    let (veth_a, veth_b) = (a.veth(&ida), b.veth(&idb));
    assert_eq!(a.nft_set("sessions"), vec![veth_a.clone()]);
    assert_eq!(b.nft_set("sessions"), vec![veth_b.clone()]);

    // kill -9 of b, then a restart: b reaps its own session and nothing of a's.
    b.restart();
    b.wait_state(&idb, "stopped", Duration::from_secs(30));
    let left = wait_no_leftovers(&idb, Duration::from_secs(20));
    assert!(left.is_empty(), "b's session left:\n{}", left.join("\n"));
    assert!(
        b.nft_set("sessions").is_empty(),
        "{:?}",
        b.nft_set("sessions")
    );

    // a's session: still ready, same agent, viewer state served, firewall
    // elements in place, host resources all there.
    assert_eq!(a.session(&ida)["state"], "ready");
    assert_eq!(agent_process(&ida).map(|p| p.pid), Some(agent_a.pid));
    let state = viewer_state(&a, &ida, &created_a);
    assert_eq!(state["state"], "ready", "{state:#}");
    assert_eq!(a.nft_set("sessions"), vec![veth_a.clone()]);
    assert!(
        leftovers(&ida).iter().any(|l| l.starts_with("netns")),
        "a's namespace is gone"
    );

    // b works again, and its new session does not disturb a's either.
    let (idb2, _) = ready_session(&b);
    assert_eq!(b.nft_set("sessions"), vec![b.veth(&idb2)]);
    assert_eq!(a.nft_set("sessions"), vec![veth_a]);
    assert_eq!(a.session(&ida)["state"], "ready");
    assert_eq!(viewer_state(&a, &ida, &created_a)["state"], "ready");

    for (s, id) in [(&a, &ida), (&b, &idb2)] {
        s.delete(id);
        let left = wait_no_leftovers(id, Duration::from_secs(20));
        assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
    }
}

/// A count from the environment, or `default`.
fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Create/delete cycles of the soak (issue figure: 100). Not `SANDCAST_*`:
/// the server refuses environment variables it does not know.
const SOAK_CYCLES: (&str, usize) = ("E2E_SOAK_CYCLES", 10);
/// Server kills mid-start, each followed by a restart (issue figure: 20).
const SOAK_KILLS: (&str, usize) = ("E2E_SOAK_KILLS", 4);

#[test]
fn soak_of_cycles_and_killed_starts_leaves_nothing() {
    let cycles = count(SOAK_CYCLES.0, SOAK_CYCLES.1);
    let kills = count(SOAK_KILLS.0, SOAK_KILLS.1);
    eprintln!(
        "soak: {cycles} create/delete cycles, {kills} kills mid-start \
         ({} and {} to change)",
        SOAK_CYCLES.0, SOAK_KILLS.0
    );
    let mut s = Server::start_default();
    let started = std::time::Instant::now();
    for i in 0..cycles {
        let (id, _) = ready_session(&s);
        s.delete(&id);
        let left = wait_no_leftovers(&id, Duration::from_secs(20));
        assert!(left.is_empty(), "cycle {i} left:\n{}", left.join("\n"));
    }
    let per_cycle = started.elapsed() / cycles.max(1) as u32;
    for i in 0..kills {
        let created = s.create(&json!({ "start_url": input_page(), "kiosk": true }));
        let id = created["id"].as_str().expect("id").to_string();
        // Kill at a different step of the start each time: right after the
        // request, once its namespace or cgroup exists, once its agent runs.
        match i % 3 {
            0 => {}
            1 => {
                s.wait_session(&id, READY, "host resources", |_| {
                    (!leftovers(&id).is_empty()).then_some(true)
                });
            }
            _ => {
                s.wait_session(&id, READY, "an agent", |_| agent_process(&id).map(|_| true));
            }
        }
        s.restart();
        s.wait_state(&id, "stopped", Duration::from_secs(30));
        let left = wait_no_leftovers(&id, Duration::from_secs(20));
        assert!(left.is_empty(), "kill {i} left:\n{}", left.join("\n"));
    }
    // Nothing that no live session owns: no firewall element, record or file.
    assert!(
        s.nft_set("sessions").is_empty(),
        "{:?}",
        s.nft_set("sessions")
    );
    assert!(s.nft_set("internet").is_empty());
    let files = s.session_files();
    assert!(files.is_empty(), "files left: {files:?}");
    eprintln!("soak: {per_cycle:?} per create/ready/delete cycle on average");
}
