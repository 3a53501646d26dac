//! Starts, watches and restarts the session's processes: the display first,
//! then the browser, the VNC server and the launch command on it.
//!
//! Every child runs in its own process group (so its helpers die with it) and
//! with a parent-death signal (so nothing outlives the agent). Its output goes
//! to the server line by line, and its last lines are kept for the report
//! when it dies. A child whose display goes away is restarted on the new one
//! without counting as a crash.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandcast_proto::{
    ChildReport, ChildState, ExitInfo, LogLine, LogStream, Message, SessionConfig,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::children::{self, Command};
use crate::devtools::Choice;
use crate::media::{self, SharedSizes};
use crate::opener::{OpenRequest, Opener};
use crate::restart::RestartTracker;

/// How long a child may take to become ready on its first start.
const READY_TIMEOUT: Duration = Duration::from_secs(45);
/// How long a child gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Lines of output kept per child for its exit report.
const TAIL_LINES: usize = 30;
/// Longest log line sent; the rest is cut.
const MAX_LINE: usize = 4000;

/// What the supervisor tells the agent's main loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Display, browser and VNC server are all up for the first time.
    Ready,
    /// An essential child cannot be kept running.
    Fatal(String),
    /// The launch command of a `launch_once` session exited.
    LaunchEnded(ExitInfo),
}

/// The running supervisor.
pub struct Supervisor {
    stop: watch::Sender<bool>,
    stop_display: watch::Sender<bool>,
    /// Xvfb's task, stopped last.
    display_task: Option<tokio::task::JoinHandle<()>>,
    /// Whether anyone watches, as the server last said.
    watched: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// The opener's socket, served until shutdown.
    open_task: Option<tokio::task::JoinHandle<()>>,
    /// The opener's scripts and socket, removed at shutdown.
    opener: Option<Opener>,
    /// Answers to file choosers, for the browser's DevTools task.
    choices: mpsc::Sender<Choice>,
    /// The display (`:N`) while Xvfb is up.
    pub display: watch::Receiver<Option<String>>,
    /// The VNC server's port on the session's loopback while it is up.
    pub vnc_port: watch::Receiver<Option<u16>>,
    /// The browser's DevTools port on the session's loopback while it is up.
    pub devtools_port: watch::Receiver<Option<u16>>,
    /// Ready and fatal events.
    pub events: mpsc::Receiver<Event>,
    ctx: Arc<Ctx>,
    /// URLs for the browser's DevTools task; kept here too so the channel
    /// stays open whatever becomes of the opener.
    opens: mpsc::Sender<OpenRequest>,
    claimed: bool,
}

#[derive(Default)]
struct ReadyFlags {
    display: bool,
    browser: bool,
    vnc: bool,
    sent: bool,
}

impl Ctx {
    /// The configuration now.
    fn config(&self) -> SessionConfig {
        self.config.lock().unwrap().clone()
    }

    /// The stop a child of `kind` obeys: the display's comes last.
    fn stop_for(&self, kind: Kind) -> watch::Receiver<bool> {
        if kind == Kind::Xvfb {
            self.stop_display.clone()
        } else {
            self.stop.clone()
        }
    }
}

struct Ctx {
    /// The session's configuration; a claim (see [`Supervisor::claim`])
    /// replaces it once, so a child started or restarted later follows it.
    config: Mutex<SessionConfig>,
    out: mpsc::Sender<Message>,
    stop: watch::Receiver<bool>,
    /// The display's own stop, given once everything on it has stopped (a
    /// browser losing its display mid-shutdown dies without saving).
    stop_display: watch::Receiver<bool>,
    display: watch::Sender<Option<String>>,
    vnc_port: watch::Sender<Option<u16>>,
    devtools_port: watch::Sender<Option<u16>>,
    events: mpsc::Sender<Event>,
    ready: Mutex<ReadyFlags>,
    own_sandbox: bool,
    /// Whether anyone watches: the browser is paused after
    /// `pause_unwatched_ms` without.
    watched: watch::Receiver<bool>,
    /// The display size to give a new display and a new browser window.
    sizes: SharedSizes,
    /// URLs programs in the session asked to open, taken by the browser's
    /// DevTools task of the moment.
    opens: Arc<tokio::sync::Mutex<mpsc::Receiver<OpenRequest>>>,
    /// The server's answers to file choosers, taken likewise.
    choices: Arc<tokio::sync::Mutex<mpsc::Receiver<Choice>>>,
    /// The `xdg-open` scripts for the launch command, when installed.
    opener: Option<Opener>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Xvfb,
    Browser,
    Vnc,
    Launch,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Xvfb => "xvfb",
            Kind::Browser => "browser",
            Kind::Vnc => "vnc",
            Kind::Launch => "launch",
        }
    }

    /// A crash loop of an essential child fails the session.
    fn essential(self) -> bool {
        self != Kind::Launch
    }
}

impl Supervisor {
    /// Starts every child of `config`; messages for the server go to `out`.
    /// Every new display is resized to `sizes.wanted` before anything runs
    /// on it.
    pub async fn start(
        config: SessionConfig,
        out: mpsc::Sender<Message>,
        sizes: SharedSizes,
    ) -> Supervisor {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (stop_display_tx, stop_display_rx) = watch::channel(false);
        let (display_tx, display_rx) = watch::channel(None);
        let (vnc_tx, vnc_rx) = watch::channel(None);
        let (devtools_tx, devtools_rx) = watch::channel(None);
        let (events_tx, events_rx) = mpsc::channel(8);
        // Until the server says otherwise (an older one never does), the
        // session counts as watched and the browser is never paused.
        let (watched_tx, watched_rx) = watch::channel(true);
        // Chromium refuses to run its own sandbox as root (a microVM's init,
        // or a test host), whatever the kernel allows.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let own_sandbox = !root && children::user_namespaces_work().await;
        let launch = config.launch.clone().filter(|argv| !argv.is_empty());
        let (open_tx, open_rx) = mpsc::channel(16);
        let (opener, open_task) = start_opener(open_tx.clone(), &out);
        let (choices_tx, choices_rx) = mpsc::channel(8);
        let ctx = Arc::new(Ctx {
            config: Mutex::new(config),
            out,
            stop: stop_rx,
            stop_display: stop_display_rx,
            display: display_tx,
            vnc_port: vnc_tx,
            devtools_port: devtools_tx,
            events: events_tx,
            ready: Mutex::new(ReadyFlags::default()),
            own_sandbox,
            watched: watched_rx,
            sizes,
            opens: Arc::new(tokio::sync::Mutex::new(open_rx)),
            choices: Arc::new(tokio::sync::Mutex::new(choices_rx)),
            opener,
        });
        let mut tasks = JoinSet::new();
        let mut kinds = vec![Kind::Browser, Kind::Vnc];
        if launch.is_some() {
            kinds.push(Kind::Launch);
        }
        for kind in kinds {
            tasks.spawn(supervise(ctx.clone(), kind));
        }
        let display_task = tokio::spawn(supervise(ctx.clone(), Kind::Xvfb));
        Supervisor {
            stop: stop_tx,
            stop_display: stop_display_tx,
            display_task: Some(display_task),
            watched: watched_tx,
            tasks,
            open_task,
            opener: ctx.opener.clone(),
            choices: choices_tx,
            display: display_rx,
            vnc_port: vnc_rx,
            devtools_port: devtools_rx,
            events: events_rx,
            ctx,
            opens: open_tx,
            claimed: false,
        }
    }

    /// A pooled session is given to its user (see [`Message::Claim`]): the
    /// configuration becomes `config`, its start URL opens in a tab that
    /// replaces the warm-up's, and its launch command starts (the server
    /// says the session is watched first, so a paused browser runs). The
    /// answer comes when the tab is open. Only once: a session is
    /// claimed by one request.
    pub fn claim(
        &mut self,
        config: SessionConfig,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, String> {
        if self.claimed {
            return Err("the session was claimed already".into());
        }
        self.claimed = true;
        let url = config.start_url.clone();
        let launch = config.launch.as_ref().is_some_and(|argv| !argv.is_empty());
        *self.ctx.config.lock().unwrap() = config;
        if launch {
            self.tasks.spawn(supervise(self.ctx.clone(), Kind::Launch));
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.opens
            .try_send(OpenRequest {
                url,
                replace: true,
                reply,
            })
            .map_err(|e| format!("the browser's tab cannot be opened: {e}"))?;
        Ok(answer)
    }

    /// The server says whether anyone watches the session.
    pub fn set_watched(&self, watched: bool) {
        self.watched.send_replace(watched);
    }

    /// The server's answer to a file chooser, for the browser of the
    /// moment; dropped when answers pile up (the person can choose again).
    pub fn choose(&self, choice: Choice) {
        let _ = self.choices.try_send(choice);
    }

    /// Stops every child (SIGTERM, then SIGKILL after a grace period) and
    /// waits for them.
    pub async fn shutdown(mut self) {
        if let Some(t) = self.open_task.take() {
            t.abort();
        }
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        let _ = self.stop_display.send(true);
        if let Some(t) = self.display_task.take() {
            let _ = t.await;
        }
        if let Some(o) = &self.opener {
            o.remove();
        }
    }
}

/// What a child needs before it can start, and how it is known to be ready.
enum Probe {
    Display(tokio::fs::File),
    /// The browser's window class, and its DevTools port to announce once
    /// the window is up.
    Window(String, u16),
    Vnc(u16),
    Started,
}

struct Prepared {
    command: Command,
    probe: Probe,
    /// A descriptor the child must inherit (Xvfb's `-displayfd` pipe).
    inherit: Option<OwnedFd>,
    /// The browser's DevTools pipe.
    devtools: Option<DevtoolsPipe>,
    /// Variables set on top of the agent's environment.
    env: Vec<(String, String)>,
}

/// Two pipes for `--remote-debugging-pipe`: the browser reads commands on
/// its descriptor 3 and writes on 4.
struct DevtoolsPipe {
    /// The agent's ends: it writes commands, reads replies and events.
    to_browser: OwnedFd,
    from_browser: OwnedFd,
    /// The browser's ends, put on 3 and 4 in the child.
    browser_reads: OwnedFd,
    browser_writes: OwnedFd,
}

impl DevtoolsPipe {
    fn new() -> std::io::Result<DevtoolsPipe> {
        let (browser_reads, to_browser) = pipe()?;
        let (from_browser, browser_writes) = pipe()?;
        Ok(DevtoolsPipe {
            to_browser,
            from_browser,
            browser_reads,
            browser_writes,
        })
    }
}

fn prepare(ctx: &Ctx, kind: Kind, display: &str) -> anyhow::Result<Prepared> {
    let config = &ctx.config();
    Ok(match kind {
        Kind::Xvfb => {
            let (read, write) = pipe()?;
            Prepared {
                command: children::xvfb(write.as_raw_fd(), children::xvfb_size(config)),
                probe: Probe::Display(tokio::fs::File::from_std(std::fs::File::from(read))),
                inherit: Some(write),
                devtools: None,
                env: Vec::new(),
            }
        }
        Kind::Browser => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
            let profile = std::path::Path::new(&home).join(".sandcast-browser");
            // A profile kept from a session that ended uncleanly still
            // holds its lock, naming a process of that session: Chromium
            // would take it for another browser using the profile. Only
            // this agent starts browsers on it.
            for lock in ["SingletonLock", "SingletonCookie", "SingletonSocket"] {
                let _ = std::fs::remove_file(profile.join(lock));
            }
            let _ = display;
            // The window starts at the display's size now, not the
            // configured one: the viewer may have resized since.
            let mut config = config.clone();
            (config.width, config.height) = ctx.sizes.lock().unwrap().wanted;
            let port = children::free_port()?;
            Prepared {
                command: children::browser(&config, &profile, ctx.own_sandbox, port),
                probe: Probe::Window(children::window_class(&config.browser.binary), port),
                inherit: None,
                devtools: Some(DevtoolsPipe::new()?),
                env: Vec::new(),
            }
        }
        Kind::Vnc => {
            let port = children::free_port()?;
            Prepared {
                command: children::vnc(display, port),
                probe: Probe::Vnc(port),
                inherit: None,
                devtools: None,
                env: Vec::new(),
            }
        }
        Kind::Launch => Prepared {
            command: children::launch(config.launch.as_deref().unwrap_or_default())
                .ok_or_else(|| anyhow::anyhow!("empty launch command"))?,
            probe: Probe::Started,
            inherit: None,
            devtools: None,
            env: ctx
                .opener
                .as_ref()
                .map(|o| o.env(std::env::var("PATH").ok().as_deref()))
                .unwrap_or_default(),
        },
    })
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The outcome of one run of a child.
enum RunEnd {
    Exited(ExitInfo),
    DisplayChanged,
    Stop,
    NotReady(String),
}

async fn supervise(ctx: Arc<Ctx>, kind: Kind) {
    let name = kind.name();
    let mut tracker = RestartTracker::new(ctx.config().restart);
    let mut stop = ctx.stop_for(kind);
    let mut display_rx = ctx.display.subscribe();
    let mut last_exit = None;
    let mut first = true;
    loop {
        // Dependents wait for the display.
        let display = if kind == Kind::Xvfb {
            String::new()
        } else {
            loop {
                if *stop.borrow() {
                    return;
                }
                if let Some(d) = display_rx.borrow_and_update().clone() {
                    break d;
                }
                tokio::select! {
                    _ = display_rx.changed() => {}
                    _ = stop.changed() => {}
                }
            }
        };
        if *stop.borrow() {
            return;
        }
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let started = Instant::now();
        let end = run_once(
            &ctx,
            kind,
            &display,
            &tail,
            &mut display_rx,
            first,
            &tracker,
            last_exit,
        )
        .await;
        if kind == Kind::Xvfb {
            ctx.display.send_replace(None);
        }
        if kind == Kind::Vnc {
            ctx.vnc_port.send_replace(None);
        }
        if kind == Kind::Browser {
            ctx.devtools_port.send_replace(None);
        }
        let tail_lines: Vec<String> = tail.lock().unwrap().iter().cloned().collect();
        let exit = match end {
            RunEnd::Stop => {
                report(
                    &ctx,
                    name,
                    ChildState::Stopped,
                    None,
                    tracker.restarts(),
                    last_exit,
                    tail_lines,
                )
                .await;
                return;
            }
            RunEnd::DisplayChanged => continue,
            RunEnd::NotReady(reason) => {
                let reason = format!("{name} {reason}; last output: {}", tail_lines.join(" | "));
                log(&ctx, &reason);
                if kind.essential() {
                    let _ = ctx.events.send(Event::Fatal(reason)).await;
                    report(
                        &ctx,
                        name,
                        ChildState::Stopped,
                        None,
                        tracker.restarts(),
                        last_exit,
                        tail_lines,
                    )
                    .await;
                    return;
                }
                ExitInfo {
                    code: None,
                    signal: None,
                }
            }
            RunEnd::Exited(exit) => exit,
        };
        if kind == Kind::Launch && ctx.config().launch_once {
            // Its exit is the session's outcome, not a crash to mend.
            log(&ctx, &format!("{name} ended ({exit}); it runs once"));
            report(
                &ctx,
                name,
                ChildState::Stopped,
                None,
                tracker.restarts(),
                Some(exit),
                tail_lines,
            )
            .await;
            let _ = ctx.events.send(Event::LaunchEnded(exit)).await;
            return;
        }
        first = false;
        last_exit = Some(exit);
        let decision = tracker.on_exit(Instant::now(), started.elapsed());
        let state = if decision.crash_loop {
            ChildState::CrashLoop
        } else {
            ChildState::Restarting
        };
        log(
            &ctx,
            &format!(
                "{name} ended ({exit}); restarting in {} ms",
                decision.delay.as_millis()
            ),
        );
        report(
            &ctx,
            name,
            state,
            None,
            tracker.restarts(),
            last_exit,
            tail_lines.clone(),
        )
        .await;
        if decision.crash_loop && kind.essential() {
            let reason = format!(
                "{name} is in a crash loop: it died {} times, last with {exit}; last output: {}",
                tracker.restarts(),
                tail_lines
                    .iter()
                    .rev()
                    .take(5)
                    .rev()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            let _ = ctx.events.send(Event::Fatal(reason)).await;
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(decision.delay) => {}
            _ = stop.changed() => return,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_once(
    ctx: &Arc<Ctx>,
    kind: Kind,
    display: &str,
    tail: &Arc<Mutex<VecDeque<String>>>,
    display_rx: &mut watch::Receiver<Option<String>>,
    first: bool,
    tracker: &RestartTracker,
    last_exit: Option<ExitInfo>,
) -> RunEnd {
    let name = kind.name();
    let mut stop = ctx.stop_for(kind);
    let prepared = match prepare(ctx, kind, display) {
        Ok(p) => p,
        Err(e) => {
            push_tail(tail, format!("cannot prepare {name}: {e:#}"));
            return RunEnd::Exited(ExitInfo {
                code: Some(127),
                signal: None,
            });
        }
    };
    let mut child = match spawn(&prepared, kind != Kind::Xvfb, display) {
        Ok(c) => c,
        Err(e) => {
            let line = format!("cannot start {}: {e}", prepared.command.program);
            push_tail(tail, line.clone());
            log(ctx, &line);
            return RunEnd::Exited(ExitInfo {
                code: Some(127),
                signal: None,
            });
        }
    };
    // The child holds its copy; ours must close so EOF means Xvfb is gone.
    drop(prepared.inherit);
    let mut close = None;
    if let Some(d) = prepared.devtools {
        // Likewise: EOF on the pipe means the browser is gone, which ends
        // the task.
        drop((d.browser_reads, d.browser_writes));
        let (tx, rx) = tokio::sync::oneshot::channel();
        close = Some(tx);
        tokio::spawn(crate::devtools::run(
            d.to_browser,
            d.from_browser,
            ctx.out.clone(),
            ctx.opens.clone(),
            rx,
            ctx.choices.clone(),
            ctx.config().transfers.then(|| {
                std::env::var_os("HOME")
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| sandcast_proto::files::SESSION_HOME.into())
            }),
        ));
    }
    let pid = child.id();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(
            ctx.clone(),
            name,
            LogStream::Stdout,
            out,
            tail.clone(),
        ));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(
            ctx.clone(),
            name,
            LogStream::Stderr,
            err,
            tail.clone(),
        ));
    }
    report(
        ctx,
        name,
        ChildState::Starting,
        pid,
        tracker.restarts(),
        last_exit,
        vec![],
    )
    .await;

    let probe = wait_ready(ctx, prepared.probe, display);
    let timeout = if first {
        READY_TIMEOUT
    } else {
        READY_TIMEOUT * 2
    };
    tokio::select! {
        status = child.wait() => {
            kill_group(pid, libc::SIGKILL);
            return RunEnd::Exited(exit_info(status));
        }
        r = tokio::time::timeout(timeout, probe) => match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                stop_child(&mut child, pid).await;
                return RunEnd::NotReady(format!("failed to become ready: {e:#}"));
            }
            Err(_) => {
                stop_child(&mut child, pid).await;
                return RunEnd::NotReady(format!("was not ready within {} s", timeout.as_secs()));
            }
        },
        _ = display_changed(kind, display_rx) => {
            stop_child(&mut child, pid).await;
            return RunEnd::DisplayChanged;
        }
        _ = stop.changed() => {
            close_then_stop(&mut child, pid, close.take()).await;
            return RunEnd::Stop;
        }
    }
    mark_ready(ctx, kind).await;
    report(
        ctx,
        name,
        ChildState::Running,
        pid,
        tracker.restarts(),
        last_exit,
        vec![],
    )
    .await;
    // Only the browser is paused, and only when the configuration says
    // after how long.
    let pause_ms = ctx.config().pause_unwatched_ms;
    let pause_after =
        (kind == Kind::Browser && pause_ms > 0).then(|| Duration::from_millis(pause_ms));
    let mut watched = ctx.watched.clone();
    let mut watch_open = true;
    let mut paused = false;
    loop {
        let unwatched = !*watched.borrow_and_update();
        let pause = async {
            match pause_after {
                Some(after) if unwatched && !paused => tokio::time::sleep(after).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            status = child.wait() => {
                kill_group(pid, libc::SIGKILL);
                return RunEnd::Exited(exit_info(status));
            }
            _ = display_changed(kind, display_rx) => {
                stop_child(&mut child, pid).await;
                return RunEnd::DisplayChanged;
            }
            _ = stop.changed() => {
                close_then_stop(&mut child, pid, close.take()).await;
                return RunEnd::Stop;
            }
            () = pause => {
                // The whole process group: renderers and the GPU process
                // draw too. Nothing of it runs until someone watches.
                kill_group(pid, libc::SIGSTOP);
                paused = true;
                report(ctx, name, ChildState::Paused, pid, tracker.restarts(), last_exit, vec![]).await;
            }
            changed = watched.changed(), if pause_after.is_some() && watch_open => {
                if changed.is_err() {
                    // The supervisor is going away; its stop follows.
                    watch_open = false;
                    continue;
                }
                if paused && *watched.borrow() {
                    kill_group(pid, libc::SIGCONT);
                    paused = false;
                    report(ctx, name, ChildState::Running, pid, tracker.restarts(), last_exit, vec![]).await;
                }
            }
        }
    }
}

/// Resolves when the display a dependent runs on is no longer current.
async fn display_changed(kind: Kind, rx: &mut watch::Receiver<Option<String>>) {
    if kind == Kind::Xvfb {
        return std::future::pending().await;
    }
    let _ = rx.changed().await;
}

async fn wait_ready(ctx: &Arc<Ctx>, probe: Probe, display: &str) -> anyhow::Result<()> {
    match probe {
        Probe::Display(pipe) => {
            let d = children::read_display(pipe).await?;
            // Xvfb starts at the largest size; the session's size is set
            // before the display is announced, so the browser starts on it.
            let (sizes, out, display) = (ctx.sizes.clone(), ctx.out.clone(), d.clone());
            tokio::task::spawn_blocking(move || {
                media::apply_wanted_size(&display, &sizes, &out, true)
            })
            .await?;
            // The layout too, so the browser and the input injector start
            // with the keymap the person's keyboard expects.
            if let Some(layout) = &ctx.config().keyboard_layout {
                children::set_keyboard_layout(&d, layout).await?;
            }
            ctx.display.send_replace(Some(d));
            Ok(())
        }
        Probe::Window(class, devtools_port) => {
            let display = display.to_string();
            tokio::task::spawn_blocking(move || children::wait_window_blocking(&display, &class))
                .await??;
            ctx.devtools_port.send_replace(Some(devtools_port));
            Ok(())
        }
        Probe::Vnc(port) => {
            children::wait_vnc(port).await?;
            ctx.vnc_port.send_replace(Some(port));
            Ok(())
        }
        Probe::Started => Ok(()),
    }
}

async fn mark_ready(ctx: &Arc<Ctx>, kind: Kind) {
    let send = {
        let mut flags = ctx.ready.lock().unwrap();
        match kind {
            Kind::Xvfb => flags.display = true,
            Kind::Browser => flags.browser = true,
            Kind::Vnc => flags.vnc = true,
            Kind::Launch => {}
        }
        let all = flags.display && flags.browser && flags.vnc;
        let send = all && !flags.sent;
        flags.sent |= all;
        send
    };
    if send {
        let _ = ctx.events.send(Event::Ready).await;
    }
}

/// The capability to lower niceness (linux/capability.h).
const CAP_SYS_NICE: libc::c_ulong = 23;

fn spawn(
    prepared: &Prepared,
    with_display: bool,
    display: &str,
) -> std::io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&prepared.command.program);
    cmd.args(&prepared.command.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if with_display {
        cmd.env("DISPLAY", display);
    }
    cmd.envs(prepared.env.iter().map(|(k, v)| (k, v)));
    let inherit = prepared.inherit.as_ref().map(|fd| fd.as_raw_fd());
    let devtools = prepared
        .devtools
        .as_ref()
        .map(|d| (d.browser_reads.as_raw_fd(), d.browser_writes.as_raw_fd()));
    let niceness = prepared.command.niceness;
    // SAFETY: only async-signal-safe calls (setpriority, prctl, fcntl)
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Raising one's own niceness is always allowed; a failure would
            // only leave the child at the agent's priority.
            if niceness != 0 {
                libc::setpriority(libc::PRIO_PROCESS, 0, niceness);
                // A child run as root (in a microVM, in tests) could lower it
                // again: Chromium puts its display threads at -8 when it
                // may. Without CAP_SYS_NICE it cannot. Unprivileged, the
                // drop fails and is not needed: RLIMIT_NICE already forbids it.
                libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_NICE, 0, 0, 0);
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = inherit
                && libc::fcntl(fd, libc::F_SETFD, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((reads, writes)) = devtools {
                // Copies above 10 first (closed at exec), so putting one on
                // 3 or 4 cannot overwrite the other; dup2's copies are kept.
                let r = libc::fcntl(reads, libc::F_DUPFD_CLOEXEC, 10);
                let w = libc::fcntl(writes, libc::F_DUPFD_CLOEXEC, 10);
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
}

fn exit_info(status: std::io::Result<std::process::ExitStatus>) -> ExitInfo {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => ExitInfo {
            code: s.code(),
            signal: s.signal(),
        },
        Err(_) => ExitInfo {
            code: None,
            signal: None,
        },
    }
}

fn kill_group(pid: Option<u32>, signal: i32) {
    if let Some(pid) = pid {
        // SAFETY: kill has no memory effects; a stale group id only fails.
        unsafe {
            libc::kill(-(pid as i32), signal);
        }
    }
}

/// How long a browser asked to close gets to save its profile (cookies,
/// local storage) and exit before it is stopped with signals.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Stops a child at the session's end: a browser is first asked to close
/// over its DevTools pipe (`close`), the only way it writes everything of
/// its profile out; then, or for the others, signals.
async fn close_then_stop(
    child: &mut tokio::process::Child,
    pid: Option<u32>,
    close: Option<tokio::sync::oneshot::Sender<()>>,
) {
    if let Some(close) = close {
        kill_group(pid, libc::SIGCONT);
        if close.send(()).is_ok()
            && tokio::time::timeout(CLOSE_GRACE, child.wait())
                .await
                .is_ok()
        {
            // Its helpers may linger a moment after it.
            kill_group(pid, libc::SIGKILL);
            return;
        }
    }
    stop_child(child, pid).await;
}

async fn stop_child(child: &mut tokio::process::Child, pid: Option<u32>) {
    // A paused group handles SIGTERM only once it runs again.
    kill_group(pid, libc::SIGCONT);
    kill_group(pid, libc::SIGTERM);
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        kill_group(pid, libc::SIGKILL);
        let _ = child.wait().await;
    }
    kill_group(pid, libc::SIGKILL);
}

async fn pump(
    ctx: Arc<Ctx>,
    name: &'static str,
    stream: LogStream,
    reader: impl AsyncRead + Unpin,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut line = String::from_utf8_lossy(&buf).trim_end().to_string();
        if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        push_tail(&tail, line.clone());
        // Logs are best effort: under a flood they are dropped, never queued
        // without bound and never in the way of state reports.
        let _ = ctx.out.try_send(Message::Log(LogLine {
            source: name.into(),
            stream,
            line,
        }));
    }
}

fn push_tail(tail: &Mutex<VecDeque<String>>, line: String) {
    let mut t = tail.lock().unwrap();
    if t.len() == TAIL_LINES {
        t.pop_front();
    }
    t.push_back(line);
}

fn log(ctx: &Ctx, line: &str) {
    let _ = ctx.out.try_send(Message::Log(LogLine {
        source: "agent".into(),
        stream: LogStream::Agent,
        line: line.into(),
    }));
}

async fn report(
    ctx: &Ctx,
    name: &str,
    state: ChildState,
    pid: Option<u32>,
    restarts: u32,
    last_exit: Option<ExitInfo>,
    tail: Vec<String>,
) {
    let _ = ctx
        .out
        .send(Message::Child(ChildReport {
            name: name.into(),
            state,
            pid,
            restarts,
            last_exit,
            tail,
        }))
        .await;
}

/// Installs the `xdg-open` scripts and serves their socket; without them a
/// launch command still runs, it just cannot open URLs (said in the log).
fn start_opener(
    tx: mpsc::Sender<OpenRequest>,
    out: &mpsc::Sender<Message>,
) -> (Option<Opener>, Option<tokio::task::JoinHandle<()>>) {
    let dir = std::env::var_os("TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/tmp".into())
        .join(".sandcast-open");
    let installed = std::env::current_exe()
        .and_then(|agent| Opener::install(&dir, &agent))
        .and_then(|o| o.bind().map(|l| (o, l)));
    match installed {
        Ok((opener, listener)) => {
            let task = tokio::spawn(async move {
                let _ = Opener::serve(listener, tx).await;
            });
            (Some(opener), Some(task))
        }
        Err(e) => {
            let _ = out.try_send(Message::Log(sandcast_proto::LogLine {
                source: "agent".into(),
                stream: LogStream::Agent,
                line: format!("xdg-open will not reach the browser: {e}"),
            }));
            (None, None)
        }
    }
}
