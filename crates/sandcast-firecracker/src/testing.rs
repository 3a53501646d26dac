//! A Firecracker double for tests: an HTTP server on a Unix socket that checks
//! every request against Firecracker's published OpenAPI specification and
//! answers as Firecracker does.
//!
//! Firecracker cannot boot a guest on hosts without a usable KVM, so the
//! backend is tested against this double. It is faithful where it matters to
//! sandcast:
//! - every request's method and path must be in the spec, and its JSON body
//!   must validate against the spec's schema for that operation (required
//!   fields, types, enums, ranges). Like Firecracker, whose request types
//!   refuse unknown fields, unknown properties are refused too;
//! - answers are `204 No Content` on success and `400` with
//!   `{"fault_message": "..."}` otherwise;
//! - the state rules sandcast depends on: pre-boot resources cannot change
//!   after `InstanceStart`; `InstanceStart` needs a boot source and a kernel
//!   that is an ELF file; a drive's backing file must exist; the vsock socket
//!   is bound at `PUT /vsock`; snapshots need a paused VM, and loading one is
//!   only allowed on a fresh process; MMDS data is not part of a snapshot;
//! - the hybrid vsock: host-initiated `CONNECT <port>\n` on `uds_path` is
//!   answered `OK <port>\n` when the simulated guest listens on that port, and
//!   the simulated guest agent connects out to `<uds_path>_<port>`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// The Firecracker release whose specification the fixture holds.
pub const SPEC_VERSION: &str = "1.16.1";

/// The specification fixture's text (the file at [`spec_fixture_path`]).
const SPEC_FIXTURE: &str = include_str!("../../../fixtures/firecracker/firecracker-v1.16.1.yaml");

/// Path of the specification fixture in the source tree.
pub fn spec_fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/firecracker")
        .join(format!("firecracker-v{SPEC_VERSION}.yaml"))
}

/// One operation of the specification.
struct Operation {
    /// Path template split into segments; `{name}` segments match anything.
    segments: Vec<String>,
    method: Method,
    /// The body's validator and whether a body is required.
    body: Option<(jsonschema::Validator, bool)>,
}

/// Firecracker's API specification, compiled for checking requests.
pub struct Spec {
    version: String,
    operations: Vec<Operation>,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spec")
            .field("version", &self.version)
            .field("operations", &self.operations.len())
            .finish()
    }
}

impl Spec {
    /// Loads and compiles a Swagger 2.0 specification.
    pub fn load(path: &Path) -> Result<Spec, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Spec::parse(&text, &path.display().to_string())
    }

    /// Compiles a Swagger 2.0 specification given as text; `origin` names it
    /// in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Spec, String> {
        let doc: Value =
            serde_yaml_ng::from_str(text).map_err(|e| format!("parsing {origin}: {e}"))?;
        let version = doc["info"]["version"]
            .as_str()
            .ok_or("the spec has no info.version")?
            .to_owned();
        let mut definitions = doc["definitions"].clone();
        if let Some(defs) = definitions.as_object_mut() {
            for def in defs.values_mut() {
                forbid_unknown_properties(def);
            }
        }
        let mut operations = Vec::new();
        let paths = doc["paths"].as_object().ok_or("the spec has no paths")?;
        for (template, ops) in paths {
            let Some(ops) = ops.as_object() else { continue };
            for (method, op) in ops {
                let method = Method::from_bytes(method.to_uppercase().as_bytes())
                    .map_err(|e| format!("bad method {method}: {e}"))?;
                let mut body = None;
                for param in op["parameters"].as_array().into_iter().flatten() {
                    if param["in"] != "body" {
                        continue;
                    }
                    let mut schema = param["schema"].clone();
                    forbid_unknown_properties(&mut schema);
                    let root = json!({
                        "allOf": [schema],
                        "definitions": definitions,
                    });
                    let validator = jsonschema::draft4::new(&root)
                        .map_err(|e| format!("compiling {method} {template}: {e}"))?;
                    body = Some((validator, param["required"] == true));
                }
                operations.push(Operation {
                    segments: template.split('/').map(str::to_owned).collect(),
                    method,
                    body,
                });
            }
        }
        Ok(Spec {
            version,
            operations,
        })
    }

    /// The specification fixture of [`SPEC_VERSION`], built in: a jailed
    /// double cannot see the source tree.
    pub fn fixture() -> Spec {
        Spec::parse(SPEC_FIXTURE, "the built-in specification fixture")
            .expect("the Firecracker spec fixture loads")
    }

    /// `info.version` of the loaded specification.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Checks one request; the error is Firecracker-style text for a 400.
    pub fn check(&self, method: &Method, path: &str, body: &[u8]) -> Result<(), String> {
        let segments: Vec<&str> = path.split('/').collect();
        let op = self
            .operations
            .iter()
            .find(|op| {
                op.method == *method
                    && op.segments.len() == segments.len()
                    && op
                        .segments
                        .iter()
                        .zip(&segments)
                        .all(|(t, s)| t.starts_with('{') || t == s)
            })
            .ok_or_else(|| format!("Invalid request method and/or path: {method} {path}."))?;
        let Some((validator, required)) = &op.body else {
            return Ok(());
        };
        if body.is_empty() {
            return if *required {
                Err("Empty request body: a JSON body is required.".into())
            } else {
                Ok(())
            };
        }
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            format!("An error occurred when deserializing the json body of a request: {e}.")
        })?;
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| format!("{} at '{}'", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "An error occurred when deserializing the json body of a request: {}.",
                errors.join("; ")
            ))
        }
    }
}

/// Firecracker's request types refuse unknown fields (serde
/// `deny_unknown_fields`); the spec leaves that implicit.
fn forbid_unknown_properties(schema: &mut Value) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    if obj.contains_key("properties") && !obj.contains_key("additionalProperties") {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
    if let Some(props) = obj.get_mut("properties").and_then(Value::as_object_mut) {
        for p in props.values_mut() {
            forbid_unknown_properties(p);
        }
    }
}

/// One request the double received.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Request path.
    pub path: String,
    /// Parsed JSON body (`Null` without one).
    pub body: Value,
    /// The status the double answered.
    pub status: u16,
}

/// Lifecycle of the simulated VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmState {
    /// Configuring; nothing runs yet.
    NotStarted,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
}

/// What the simulated guest does on its own.
#[derive(Debug, Clone)]
pub struct GuestBehaviour {
    /// Whether the guest powers off on `SendCtrlAltDel` (needs an i8042
    /// keyboard in its kernel); when not, the VMM keeps running.
    pub honours_ctrl_alt_del: bool,
    /// Guest ports with a listener, answered with `OK` on a host-initiated
    /// `CONNECT`; each echoes what it receives.
    pub listening_ports: Vec<u32>,
    /// Host port the simulated agent connects to after boot or restore.
    pub agent_port: Option<u32>,
    /// Also write the serial console to stdout, as Firecracker does.
    pub echo_console: bool,
    /// Append every request as a JSON line to this file.
    pub request_log: Option<PathBuf>,
}

impl Default for GuestBehaviour {
    fn default() -> Self {
        GuestBehaviour {
            honours_ctrl_alt_del: true,
            listening_ports: vec![52],
            agent_port: Some(crate::AGENT_VSOCK_PORT),
            echo_console: false,
            request_log: None,
        }
    }
}

#[derive(Default)]
struct Config {
    machine: Option<Value>,
    boot_source: Option<Value>,
    drives: BTreeMap<String, Value>,
    ifaces: BTreeMap<String, Value>,
    vsock: Option<Value>,
    mmds_config: Option<Value>,
}

struct State {
    vmm: VmmState,
    config: Config,
    logger: bool,
    metrics: bool,
    mmds: Option<Value>,
    requests: Vec<Recorded>,
    injected: HashMap<(Method, String), (u16, String)>,
    vsock_task: Option<tokio::task::JoinHandle<()>>,
    vsock_uds: Option<PathBuf>,
    /// The TAP devices attached, held like Firecracker holds them.
    taps: HashMap<String, std::os::fd::OwnedFd>,
    /// The booted kernel has no i8042 keyboard (`sandcast_double.no_i8042`).
    no_i8042: bool,
    /// Loaded from a snapshot and not yet resumed.
    restored: bool,
}

/// An in-process Firecracker double serving one API socket.
#[derive(Clone)]
pub struct FirecrackerDouble {
    spec: Arc<Spec>,
    id: String,
    guest: Arc<GuestBehaviour>,
    state: Arc<Mutex<State>>,
    /// Set when the guest has powered off (the process then exits).
    shutdown: watch::Sender<bool>,
    /// Serial console output of the simulated guest.
    console: Arc<Mutex<Vec<String>>>,
}

impl FirecrackerDouble {
    /// A fresh double, like a Firecracker process started with `--id id`.
    pub fn new(spec: Arc<Spec>, id: &str, guest: GuestBehaviour) -> Self {
        FirecrackerDouble {
            spec,
            id: id.to_owned(),
            guest: Arc::new(guest),
            state: Arc::new(Mutex::new(State {
                vmm: VmmState::NotStarted,
                config: Config::default(),
                logger: false,
                metrics: false,
                mmds: None,
                requests: Vec::new(),
                injected: HashMap::new(),
                vsock_task: None,
                vsock_uds: None,
                taps: HashMap::new(),
                no_i8042: false,
                restored: false,
            })),
            shutdown: watch::channel(false).0,
            console: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Binds `socket` and serves the API until the guest powers off or the
    /// task is dropped.
    pub fn serve(&self, socket: &Path) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let listener = UnixListener::bind(socket)?;
        let this = self.clone();
        Ok(tokio::spawn(async move {
            let mut shutdown = this.shutdown.subscribe();
            loop {
                let stream = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(_) => break,
                    },
                    _ = shutdown.wait_for(|s| *s) => break,
                };
                let this = this.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let this = this.clone();
                        async move { Ok::<_, std::convert::Infallible>(this.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }))
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The VMM's state now.
    pub fn vmm_state(&self) -> VmmState {
        self.state.lock().unwrap().vmm
    }

    /// The MMDS data store now.
    pub fn mmds(&self) -> Option<Value> {
        self.state.lock().unwrap().mmds.clone()
    }

    /// Lines the simulated guest wrote to its serial console.
    pub fn console(&self) -> Vec<String> {
        self.console.lock().unwrap().clone()
    }

    /// Resolves once the guest has powered off.
    pub fn powered_off(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Makes the next `method path` fail with `status` and this fault
    /// message, as a Firecracker-side failure would.
    pub fn inject_fault(&self, method: Method, path: &str, status: u16, fault: &str) {
        self.state
            .lock()
            .unwrap()
            .injected
            .insert((method, path.to_owned()), (status, fault.to_owned()));
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return fault(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let result = match self.spec.check(&method, &path, &body) {
            Err(msg) => Err((StatusCode::BAD_REQUEST, msg)),
            Ok(()) => {
                let injected = self
                    .state
                    .lock()
                    .unwrap()
                    .injected
                    .remove(&(method.clone(), path.clone()));
                match injected {
                    Some((status, msg)) => Err((
                        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                        msg,
                    )),
                    None => {
                        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        self.apply(&method, &path, value).await
                    }
                }
            }
        };
        let (status, response) = match result {
            Ok(Some(v)) => (
                StatusCode::OK,
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(v.to_string())))
                    .unwrap(),
            ),
            Ok(None) => (
                StatusCode::NO_CONTENT,
                Response::builder()
                    .status(StatusCode::NO_CONTENT)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            ),
            Err((status, msg)) => (status, fault(status, &msg)),
        };
        let rec = Recorded {
            method,
            path,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            status: status.as_u16(),
        };
        if let Some(log) = &self.guest.request_log {
            use std::io::Write;
            let line = json!({
                "method": rec.method.as_str(),
                "path": rec.path,
                "body": rec.body,
                "status": rec.status,
            });
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
            {
                let _ = writeln!(f, "{line}");
            }
        }
        self.state.lock().unwrap().requests.push(rec);
        response
    }

    /// Applies a request that passed the schema check, with Firecracker's
    /// state rules.
    async fn apply(
        &self,
        method: &Method,
        path: &str,
        body: Value,
    ) -> Result<Option<Value>, (StatusCode, String)> {
        let bad = |m: &str| Err((StatusCode::BAD_REQUEST, m.to_owned()));
        const AFTER_START: &str =
            "The requested operation is not supported after starting the microVM.";
        const BEFORE_START: &str =
            "The requested operation is not supported before starting the microVM.";
        let mut st = self.state.lock().unwrap();
        let started = st.vmm != VmmState::NotStarted;
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method.as_str(), segs.as_slice()) {
            ("GET", [""]) => {
                let state = match st.vmm {
                    VmmState::NotStarted => "Not started",
                    VmmState::Running => "Running",
                    VmmState::Paused => "Paused",
                };
                Ok(Some(json!({
                    "app_name": "Firecracker",
                    "id": self.id,
                    "state": state,
                    "vmm_version": SPEC_VERSION,
                })))
            }
            ("GET", ["version"]) => Ok(Some(json!({ "firecracker_version": SPEC_VERSION }))),
            ("PUT", ["logger"]) => {
                if let Some(p) = body["log_path"].as_str() {
                    open_output(p).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
                }
                st.logger = true;
                Ok(None)
            }
            ("PUT", ["metrics"]) => {
                if st.metrics {
                    return bad("Reinitialization of metrics not allowed.");
                }
                open_output(body["metrics_path"].as_str().unwrap_or_default())
                    .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
                st.metrics = true;
                Ok(None)
            }
            (_, ["machine-config"]) if started => bad(AFTER_START),
            ("PUT", ["machine-config"]) => {
                if body["mem_size_mib"] == 0 {
                    return bad("The memory size (MiB) is invalid.");
                }
                let vcpus = body["vcpu_count"].as_u64().unwrap_or(1);
                if body["smt"] == true && vcpus > 1 && vcpus % 2 == 1 {
                    return bad("The number of vCPUs is invalid.");
                }
                st.config.machine = Some(body);
                Ok(None)
            }
            ("PUT", ["boot-source"]) if started => bad(AFTER_START),
            ("PUT", ["boot-source"]) => {
                let kernel = body["kernel_image_path"].as_str().unwrap_or_default();
                if let Err(e) = std::fs::File::open(kernel) {
                    return bad(&format!("The kernel file cannot be opened: {e}"));
                }
                if let Some(initrd) = body["initrd_path"].as_str()
                    && let Err(e) = std::fs::File::open(initrd)
                {
                    return bad(&format!(
                        "The initrd file cannot be opened due to invalid permissions or missing file: {e}"
                    ));
                }
                st.config.boot_source = Some(body);
                Ok(None)
            }
            ("PUT", ["drives", id]) if started => {
                let _ = id;
                bad(AFTER_START)
            }
            ("PUT", ["drives", id]) => {
                if body["drive_id"] != *id {
                    return bad("The id from the path does not match the id from the body!");
                }
                let Some(host) = body["path_on_host"].as_str() else {
                    return bad(
                        "Unable to create the virtio block device: path_on_host is required for a virtio-block drive.",
                    );
                };
                let ro = body["is_read_only"] == true;
                if let Err(e) = std::fs::OpenOptions::new().read(true).write(!ro).open(host) {
                    return bad(&format!(
                        "Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: {e} {host}"
                    ));
                }
                if body["is_root_device"] == true
                    && st
                        .config
                        .drives
                        .iter()
                        .any(|(k, d)| k != id && d["is_root_device"] == true)
                {
                    return bad("A root block device already exists!");
                }
                st.config.drives.insert((*id).to_owned(), body);
                Ok(None)
            }
            ("PATCH", ["drives", _]) if !started => bad(BEFORE_START),
            ("PATCH", ["drives", id]) => {
                if body["drive_id"] != *id {
                    return bad("The id from the path does not match the id from the body!");
                }
                let Some(drive) = st.config.drives.get_mut(*id) else {
                    return bad(&format!(
                        "Unable to patch the block device: Device {id} not found."
                    ));
                };
                if let Some(host) = body["path_on_host"].as_str() {
                    if let Err(e) = std::fs::metadata(host) {
                        return bad(&format!(
                            "Unable to patch the block device: Error manipulating the backing file: {e} {host}"
                        ));
                    }
                    drive["path_on_host"] = json!(host);
                }
                Ok(None)
            }
            ("PUT", ["network-interfaces", _]) if started => bad(AFTER_START),
            ("PUT", ["network-interfaces", id]) => {
                if body["iface_id"] != *id {
                    return bad("The id from the path does not match the id from the body!");
                }
                let tap = body["host_dev_name"].as_str().unwrap_or_default();
                let fd = match attach_tap(tap) {
                    Ok(fd) => fd,
                    Err(e) => {
                        return bad(&format!(
                            "Could not create the network device: Open tap device failed: {e}. Invalid TUN/TAP Backend provided by {tap}. Check our documentation on setting up the network devices."
                        ));
                    }
                };
                st.taps.insert((*id).to_owned(), fd);
                st.config.ifaces.insert((*id).to_owned(), body);
                Ok(None)
            }
            ("PUT", ["vsock"]) if started => bad(AFTER_START),
            ("PUT", ["vsock"]) => {
                let uds = PathBuf::from(body["uds_path"].as_str().unwrap_or_default());
                drop(st);
                let task = self.bind_vsock(&uds).map_err(|e| {
                    (
                        StatusCode::BAD_REQUEST,
                        format!("Cannot create vsock device: {e}"),
                    )
                })?;
                let mut st = self.state.lock().unwrap();
                if let Some(old) = st.vsock_task.replace(task) {
                    old.abort();
                }
                st.vsock_uds = Some(uds);
                st.config.vsock = Some(body);
                Ok(None)
            }
            ("PUT", ["mmds", "config"]) if started => bad(AFTER_START),
            ("PUT", ["mmds", "config"]) => {
                let ok = body["network_interfaces"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|i| i.as_str().is_some_and(|i| st.config.ifaces.contains_key(i)));
                if !ok {
                    return bad(
                        "The list of network interface IDs that allow forwarding MMDS requests is empty or contains an ID that does not exist.",
                    );
                }
                st.config.mmds_config = Some(body);
                Ok(None)
            }
            ("PUT", ["mmds"]) => {
                st.mmds = Some(body);
                Ok(None)
            }
            ("PATCH", ["mmds"]) => {
                let mut cur = st.mmds.take().unwrap_or_else(|| json!({}));
                merge_patch(&mut cur, body);
                st.mmds = Some(cur);
                Ok(None)
            }
            ("GET", ["mmds"]) => match &st.mmds {
                Some(v) => Ok(Some(v.clone())),
                None => Err((
                    StatusCode::NOT_FOUND,
                    "The MMDS data store is not initialized.".into(),
                )),
            },
            ("PUT", ["actions"]) => match body["action_type"].as_str() {
                Some("InstanceStart") => {
                    if started {
                        return bad(AFTER_START);
                    }
                    let Some(boot) = st.config.boot_source.clone() else {
                        return bad(
                            "Start microVM error: Cannot start microvm without kernel configuration.",
                        );
                    };
                    let kernel = boot["kernel_image_path"].as_str().unwrap_or_default();
                    match std::fs::read(kernel) {
                        Ok(bytes) if bytes.starts_with(b"\x7fELF") => {}
                        Ok(_) => {
                            return bad(
                                "Start microVM error: Cannot load kernel due to invalid memory configuration or invalid kernel image: Kernel Loader: failed to load ELF kernel image",
                            );
                        }
                        Err(e) => return bad(&format!("Start microVM error: {e}")),
                    }
                    st.vmm = VmmState::Running;
                    let args = boot["boot_args"].as_str().unwrap_or_default().to_owned();
                    st.no_i8042 = args.split(' ').any(|a| a == "sandcast_double.no_i8042");
                    drop(st);
                    self.guest_boots(&args);
                    Ok(None)
                }
                Some("SendCtrlAltDel") => {
                    if !started {
                        return bad(BEFORE_START);
                    }
                    drop(st);
                    let no_i8042 = self.state.lock().unwrap().no_i8042;
                    if self.guest.honours_ctrl_alt_del && !no_i8042 {
                        self.say("reboot: Restarting system");
                        let _ = self.shutdown.send(true);
                    }
                    Ok(None)
                }
                Some("FlushMetrics") => {
                    if !started {
                        return bad(BEFORE_START);
                    }
                    Ok(None)
                }
                _ => bad("Invalid action type."),
            },
            ("PATCH", ["vm"]) => {
                if !started {
                    return bad(BEFORE_START);
                }
                st.vmm = if body["state"] == "Paused" {
                    VmmState::Paused
                } else {
                    VmmState::Running
                };
                // The first run after a restore: vsock connections were reset,
                // so the agent connects again.
                let reconnect = st.vmm == VmmState::Running && std::mem::take(&mut st.restored);
                drop(st);
                if reconnect {
                    self.guest_resumes();
                }
                Ok(None)
            }
            ("PUT", ["snapshot", "create"]) => {
                if st.vmm != VmmState::Paused {
                    return bad(
                        "Create snapshot error: Cannot save the microVM state: the microVM must be paused before creating a snapshot.",
                    );
                }
                let saved = json!({
                    "firecracker_version": SPEC_VERSION,
                    "machine": st.config.machine,
                    "drives": st.config.drives,
                    "ifaces": st.config.ifaces,
                    "vsock": st.config.vsock,
                    "mmds_config": st.config.mmds_config,
                });
                let snap = body["snapshot_path"].as_str().unwrap_or_default();
                let mem = body["mem_file_path"].as_str().unwrap_or_default();
                let mem_mib = st
                    .config
                    .machine
                    .as_ref()
                    .and_then(|m| m["mem_size_mib"].as_u64())
                    .unwrap_or(128);
                std::fs::write(snap, saved.to_string())
                    .and_then(|()| {
                        let f = std::fs::File::create(mem)?;
                        // Sparse, like guest memory that was mostly never touched.
                        f.set_len(mem_mib << 20)
                    })
                    .map_err(|e| {
                        (
                            StatusCode::BAD_REQUEST,
                            format!("Create snapshot error: {e}"),
                        )
                    })?;
                Ok(None)
            }
            ("PUT", ["snapshot", "load"]) => {
                let c = &st.config;
                if started
                    || c.machine.is_some()
                    || c.boot_source.is_some()
                    || !c.drives.is_empty()
                    || !c.ifaces.is_empty()
                    || c.vsock.is_some()
                    || c.mmds_config.is_some()
                {
                    return bad(
                        "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
                    );
                }
                let snap = body["snapshot_path"].as_str().unwrap_or_default();
                let saved: Value = std::fs::read(snap)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                    .map_err(|e| (StatusCode::BAD_REQUEST, format!("Load snapshot error: Failed to restore from snapshot: Failed to get snapshot state from file: {e}")))?;
                let mem = body["mem_backend"]["backend_path"]
                    .as_str()
                    .or(body["mem_file_path"].as_str())
                    .unwrap_or_default();
                if let Err(e) = std::fs::metadata(mem) {
                    return bad(&format!(
                        "Load snapshot error: Failed to restore from snapshot: Failed to load guest memory: {e}"
                    ));
                }
                let mut ifaces: BTreeMap<String, Value> =
                    serde_json::from_value(saved["ifaces"].clone()).unwrap_or_default();
                for o in body["network_overrides"].as_array().into_iter().flatten() {
                    let id = o["iface_id"].as_str().unwrap_or_default();
                    match ifaces.get_mut(id) {
                        Some(i) => i["host_dev_name"] = o["host_dev_name"].clone(),
                        None => {
                            return bad(&format!(
                                "Load snapshot error: Invalid network override: unknown interface {id}"
                            ));
                        }
                    }
                }
                let mut vsock = saved["vsock"].clone();
                if let Some(uds) = body["vsock_override"]["uds_path"].as_str() {
                    if vsock.is_null() {
                        return bad(
                            "Load snapshot error: The snapshot has no vsock device to override.",
                        );
                    }
                    vsock["uds_path"] = json!(uds);
                }
                st.config.machine = Some(saved["machine"].clone());
                st.config.drives =
                    serde_json::from_value(saved["drives"].clone()).unwrap_or_default();
                st.taps.clear();
                for (id, iface) in &ifaces {
                    let tap = iface["host_dev_name"].as_str().unwrap_or_default();
                    match attach_tap(tap) {
                        Ok(fd) => {
                            st.taps.insert(id.clone(), fd);
                        }
                        Err(e) => {
                            return bad(&format!(
                                "Load snapshot error: Failed to restore from snapshot: Open tap device failed: {e} ({tap})"
                            ));
                        }
                    }
                }
                st.config.ifaces = ifaces;
                st.config.mmds_config = Some(saved["mmds_config"].clone()).filter(|v| !v.is_null());
                // MMDS contents are not part of a snapshot.
                st.mmds = None;
                st.vmm = if body["resume_vm"] == true {
                    VmmState::Running
                } else {
                    VmmState::Paused
                };
                let resume = st.vmm == VmmState::Running;
                st.restored = !resume;
                drop(st);
                if let Some(uds) = vsock["uds_path"].as_str().map(PathBuf::from) {
                    let task = self.bind_vsock(&uds).map_err(|e| {
                        (
                            StatusCode::BAD_REQUEST,
                            format!("Load snapshot error: Cannot restore vsock device: {e}"),
                        )
                    })?;
                    let mut st = self.state.lock().unwrap();
                    st.vsock_task = Some(task);
                    st.vsock_uds = Some(uds);
                    st.config.vsock = Some(vsock);
                }
                if resume {
                    self.guest_resumes();
                }
                Ok(None)
            }
            _ => bad(&format!(
                "Invalid request method and/or path: {method} {path}."
            )),
        }
    }

    /// Binds the vsock host socket and answers host-initiated connections.
    fn bind_vsock(&self, uds: &Path) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let listener = UnixListener::bind(uds)?;
        let ports = self.guest.listening_ports.clone();
        Ok(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let ports = ports.clone();
                tokio::spawn(host_initiated(stream, ports));
            }
        }))
    }

    fn say(&self, line: &str) {
        self.console.lock().unwrap().push(line.to_owned());
        if self.guest.echo_console {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    fn guest_boots(&self, boot_args: &str) {
        self.say(&format!("Kernel command line: {boot_args}"));
        self.say("Run /usr/local/bin/sandcast-agent as init process");
        self.guest_agent_connects();
    }

    fn guest_resumes(&self) {
        self.say("sandcast double: resumed from snapshot");
        self.guest_agent_connects();
    }

    /// The simulated agent connects to the host port, as a guest-initiated
    /// vsock connection arrives on `<uds_path>_<port>`, and says hello.
    fn guest_agent_connects(&self) {
        let (Some(port), Some(uds)) = (
            self.guest.agent_port,
            self.state.lock().unwrap().vsock_uds.clone(),
        ) else {
            return;
        };
        let target = PathBuf::from(format!("{}_{port}", uds.display()));
        let id = self.id.clone();
        tokio::spawn(async move {
            let Ok(mut s) = UnixStream::connect(&target).await else {
                return;
            };
            let hello = sandcast_proto::Message::Hello(sandcast_proto::Hello {
                protocol: sandcast_proto::PROTOCOL_VERSION,
                role: sandcast_proto::Role::Control,
                agent_version: format!("double-{id}"),
            });
            let _ = s.write_all(&sandcast_proto::encode_message(&hello)).await;
            // Hold the connection like an agent would, until the host closes it.
            let mut sink = [0u8; 256];
            while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
        });
    }
}

/// Attaches to the TAP device `name` as Firecracker does: `/dev/net/tun`,
/// `TUNSETIFF` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`. Only an existing
/// device is taken: where `/proc` shows this network namespace's devices
/// (outside a jail) a missing one is refused first, since root would create
/// it; in a jail an unprivileged process can only attach to a TAP it owns.
fn attach_tap(name: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(devs) = std::fs::read_to_string("/proc/self/net/dev")
        && !devs
            .lines()
            .any(|l| l.trim_start().split(':').next() == Some(name))
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no device {name} in this network namespace"),
        ));
    }
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // struct ifreq: the name, then the flags (a short) in the union.
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifreq` holds.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

/// Firecracker's host side of a host-initiated vsock connection: reads
/// `CONNECT <port>\n`; if the guest listens there, answers `OK <host port>\n`
/// and the stream is connected, otherwise closes it.
async fn host_initiated(stream: UnixStream, ports: Vec<u32>) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let port = line
        .strip_prefix("CONNECT ")
        .and_then(|r| r.strip_suffix('\n'))
        .and_then(|p| p.parse::<u32>().ok());
    let Some(port) = port.filter(|p| ports.contains(p)) else {
        return;
    };
    let mut stream = reader.into_inner();
    // Firecracker names the ephemeral host-side port it allocated.
    if stream
        .write_all(format!("OK {}\n", 1_073_741_824u32 + port).as_bytes())
        .await
        .is_err()
    {
        return;
    }
    // The guest's service echoes.
    let (mut r, mut w) = stream.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

fn open_output(path: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map(|_| ())
        .map_err(|e| format!("Cannot open output file {path}: {e}"))
}

fn merge_patch(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge_patch(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}

fn fault(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({ "fault_message": msg }).to_string(),
        )))
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_is_the_release_sandcast_targets() {
        assert_eq!(Spec::fixture().version(), SPEC_VERSION);
    }

    #[test]
    fn spec_checks_paths_methods_and_bodies() {
        let spec = Spec::fixture();
        let ok = |m: Method, p: &str, b: &str| spec.check(&m, p, b.as_bytes());
        assert!(
            ok(
                Method::PUT,
                "/machine-config",
                r#"{"vcpu_count":2,"mem_size_mib":512}"#
            )
            .is_ok()
        );
        // Missing required field.
        let e = ok(Method::PUT, "/machine-config", r#"{"vcpu_count":2}"#).unwrap_err();
        assert!(e.contains("mem_size_mib"), "{e}");
        // Out of range.
        assert!(
            ok(
                Method::PUT,
                "/machine-config",
                r#"{"vcpu_count":33,"mem_size_mib":512}"#
            )
            .is_err()
        );
        // Wrong type.
        assert!(
            ok(
                Method::PUT,
                "/machine-config",
                r#"{"vcpu_count":"2","mem_size_mib":512}"#
            )
            .is_err()
        );
        // Unknown field.
        let e = ok(
            Method::PUT,
            "/boot-source",
            r#"{"kernel_image_path":"/k","bogus":1}"#,
        )
        .unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        // Bad enum value.
        assert!(ok(Method::PUT, "/actions", r#"{"action_type":"Reboot"}"#).is_err());
        assert!(
            ok(
                Method::PUT,
                "/actions",
                r#"{"action_type":"InstanceStart"}"#
            )
            .is_ok()
        );
        // Nested schema through a $ref.
        assert!(ok(Method::PUT, "/snapshot/load", r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"Disk","backend_path":"/m"}}"#).is_err());
        assert!(ok(Method::PUT, "/snapshot/load", r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"},"vsock_override":{"uds_path":"/v"}}"#).is_ok());
        // Unknown path or method.
        assert!(
            ok(Method::PUT, "/nope", "{}")
                .unwrap_err()
                .contains("Invalid request")
        );
        assert!(ok(Method::DELETE, "/vsock", "").is_err());
        // Required body missing.
        assert!(ok(Method::PUT, "/vsock", "").is_err());
        // Vsock CID below 3.
        assert!(ok(Method::PUT, "/vsock", r#"{"guest_cid":2,"uds_path":"/v"}"#).is_err());
    }

    #[test]
    fn mmds_contents_may_hold_any_properties() {
        let spec = Spec::fixture();
        assert!(
            spec.check(&Method::PUT, "/mmds", br#"{"anything":{"goes":[1,2]}}"#)
                .is_ok()
        );
    }
}
