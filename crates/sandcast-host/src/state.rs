//! What was made for each session, on disk, so that `stop` and a `reap`
//! after a restart know exactly what to remove. The records live in the
//! backend's state directory, which is the instance's own.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use sandcast_backend::{BackendError, Egress};
use serde::{Deserialize, Serialize};

/// One session's host resources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Session id.
    pub id: String,
    /// Network namespace name.
    pub netns: String,
    /// Host-side veth.
    pub veth: String,
    /// Index of the session's /30.
    pub block: u32,
    /// Host end address.
    pub host_addr: Ipv4Addr,
    /// Session end address.
    pub session_addr: Ipv4Addr,
    /// Where its traffic may go (`true`/`false` in records of earlier versions).
    pub egress: Egress,
    /// The cgroup directories, one per hierarchy.
    pub cgroup_dirs: Vec<PathBuf>,
    /// The backend's per-session files, removed on stop (the sandbox's home,
    /// tmp and generated config).
    #[serde(default)]
    pub files_dir: PathBuf,
    /// The backend's first host process (bwrap, Firecracker) once started.
    #[serde(default)]
    pub pid: Option<u32>,
    /// What else the backend made, in its own form.
    #[serde(default)]
    pub backend: serde_json::Value,
    /// The session's host uid (and gid), claimed from the uid range.
    #[serde(default)]
    pub uid: Option<u32>,
}

/// The directory of session records under a state dir.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("sessions")
}

fn path(state_dir: &Path, id: &str) -> PathBuf {
    dir(state_dir).join(format!("{id}.json"))
}

impl Record {
    /// Writes the record atomically (temp file and rename).
    pub fn save(&self, state_dir: &Path) -> Result<(), BackendError> {
        let final_path = path(state_dir, &self.id);
        let tmp = final_path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).expect("record serialises");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &final_path))
            .map_err(|e| BackendError::io(format!("writing {}", final_path.display()), e))
    }

    /// Removes the record file (missing is fine).
    pub fn delete(state_dir: &Path, id: &str) -> Result<(), BackendError> {
        let p = path(state_dir, id);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(BackendError::io(format!("removing {}", p.display()), e))
            }
            _ => Ok(()),
        }
    }

    /// The record of `id`, when there is a readable one.
    pub fn load(state_dir: &Path, id: &str) -> Option<Record> {
        let bytes = std::fs::read(path(state_dir, id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Whether a record exists for `id`.
    pub fn exists(state_dir: &Path, id: &str) -> bool {
        path(state_dir, id).exists()
    }

    /// Every readable record; unreadable ones are returned by file name so the
    /// caller can report them.
    pub fn load_all(state_dir: &Path) -> (Vec<Record>, Vec<PathBuf>) {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        let Ok(rd) = std::fs::read_dir(dir(state_dir)) else {
            return (good, bad);
        };
        for e in rd.filter_map(Result::ok) {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            {
                Some(r) => good.push(r),
                None => bad.push(p),
            }
        }
        good.sort_by(|a, b| a.id.cmp(&b.id));
        (good, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_files_are_reported() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir(t.path())).unwrap();
        let r = Record {
            id: "s1".into(),
            netns: "sandcast-s1".into(),
            veth: "sc-01234567".into(),
            block: 3,
            host_addr: "100.64.0.13".parse().unwrap(),
            session_addr: "100.64.0.14".parse().unwrap(),
            egress: Egress::Internet,
            cgroup_dirs: vec!["/sys/fs/cgroup/sandcast/s1".into()],
            files_dir: "/data/s1/sandbox".into(),
            pid: Some(42),
            backend: serde_json::json!({"jail": "/srv/jail/s1"}),
            uid: Some(2_000_123),
        };
        r.save(t.path()).unwrap();
        std::fs::write(dir(t.path()).join("broken.json"), "{").unwrap();
        let (good, bad) = Record::load_all(t.path());
        assert_eq!(good, vec![r]);
        assert_eq!(bad, vec![dir(t.path()).join("broken.json")]);
        assert!(Record::exists(t.path(), "s1"));
        Record::delete(t.path(), "s1").unwrap();
        Record::delete(t.path(), "s1").unwrap();
        assert!(!Record::exists(t.path(), "s1"));
    }

    #[test]
    fn records_of_earlier_versions_still_read() {
        let old = r#"{"id":"s2","netns":"sandcast-s2","veth":"sc-01234567","block":1,
            "host_addr":"100.64.0.5","session_addr":"100.64.0.6","egress":false,
            "cgroup_dirs":[],"files_dir":"/d","pid":null}"#;
        let r: Record = serde_json::from_str(old).unwrap();
        assert_eq!(r.egress, Egress::None);
        assert_eq!(r.backend, serde_json::Value::Null);
    }
}
