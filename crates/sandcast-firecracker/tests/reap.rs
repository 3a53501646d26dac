//! Reaping after a server crash. Alone in its test binary: reaping removes
//! every `fc-` namespace and cgroup not kept, so it must not run beside other
//! tests' sessions.

mod common;

use std::time::Duration;

use common::*;
use sandcast_backend::Backend;
use sandcast_firecracker::FirecrackerBackend;
use tokio::net::UnixListener;

#[tokio::test]
async fn reap_removes_a_session_the_server_forgot() {
    let dir = TestDir::new("reap");
    let backend = FirecrackerBackend::new(config(&dir.0)).unwrap();
    let keep_id = session_id("kept");
    let lost_id = session_id("lost");
    let keep_spec = launch_spec(&backend, &dir.0, &keep_id);
    let lost_spec = launch_spec(&backend, &dir.0, &lost_id);
    let _l1 = UnixListener::bind(&keep_spec.agent_socket).unwrap();
    let _l2 = UnixListener::bind(&lost_spec.agent_socket).unwrap();
    let kept = backend.start(&keep_spec).await.unwrap();
    let lost = backend.start(&lost_spec).await.unwrap();
    let lost_pid = lost.pid().unwrap();
    // A jailed session is found from its record too.
    let jailed = FirecrackerBackend::new(jailed_config(&dir.0)).unwrap();
    let jailed_id = session_id("lostjailed");
    let jailed_spec = launch_spec(&jailed, &dir.0, &jailed_id);
    let _l3 = UnixListener::bind(&jailed_spec.agent_socket).unwrap();
    let lost_jailed = jailed.start(&jailed_spec).await.unwrap();
    let jailed_pid = lost_jailed.pid().unwrap();
    assert!(jail_dir(&dir.0, &jailed_id).exists());

    // A restarted server has a new backend and knows only the kept session.
    let after_restart = FirecrackerBackend::new(config(&dir.0)).unwrap();
    let removed = after_restart
        .reap(std::slice::from_ref(&keep_id))
        .await
        .unwrap();
    // Checked before this test yields, so the jailed session's own exit
    // watcher (which cleans up a VM that died) cannot have removed it.
    assert!(!jail_dir(&dir.0, &jailed_id).exists(), "{removed:?}");
    assert!(
        removed
            .iter()
            .any(|r| r.contains(&format!("process {lost_pid}"))),
        "{removed:?}"
    );
    let mut exited = lost.exited();
    exited.wait_for(|e| e.is_some()).await.unwrap();
    assert!(!process_alive(lost_pid));
    assert!(!netns_exists(&lost_id));
    assert!(!cgroup_exists(&lost_id));
    assert!(!lost_spec.session_dir.join("writable.ext4").exists());
    assert!(
        removed
            .iter()
            .any(|r| r.contains(&format!("process {jailed_pid}"))),
        "{removed:?}"
    );
    lost_jailed
        .exited()
        .wait_for(|e| e.is_some())
        .await
        .unwrap();
    assert!(!process_alive(jailed_pid));
    assert!(!netns_exists(&jailed_id));
    assert!(!cgroup_exists(&jailed_id));

    assert!(process_alive(kept.pid().unwrap()));
    assert!(netns_exists(&keep_id));
    kept.stop(Duration::from_secs(5)).await.unwrap();
    assert!(!netns_exists(&keep_id));
}
