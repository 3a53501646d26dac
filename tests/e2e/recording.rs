//! Recordings: a session created with `record: true` shows the latency
//! benchmark's clock (`bench/latency/decode.js` draws `Date.now()` as a row
//! of blocks; the same file reads it back, run by node on the frames ffmpeg
//! decodes). No viewer is connected: the recording alone keeps the encoder
//! running and the page drawing. Checked: ffprobe reads H.264 at the
//! session's size and a duration within 5 % of the wall time recorded; one
//! frame a second shows the page's clock advancing by a second each (so
//! frame times come from the capture times; a paint the loaded machine
//! delayed may show an older clock, never a newer one); range requests answer the
//! right bytes (206, 416); a server killed with SIGKILL while recording
//! leaves, after its restart, a file ffprobe reads and ffmpeg decodes
//! without an error; a session that does not record answers 404. And the
//! file plays in Chromium's `<video>` straight from the server, seeking
//! included (`browser/recording-playback.mjs`).
//!
//! Needs ffmpeg/ffprobe and node; skipped (saying so) without them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sandcast_e2e::{Server, ServerOptions, data_url, run_browser, wait_no_leftovers};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(40);
const W: u32 = 1024;
const H: u32 = 576;
/// Seconds recorded.
const RECORD_SECS: u64 = 20;

fn decode_js() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/latency/decode.js")
}

/// The clock page of `bench/latency/clock.html`, inlined (a session has no
/// route to the host): decode.js as a classic script draws the time on
/// every animation frame at the top-left corner.
fn clock_page() -> String {
    let decode = std::fs::read_to_string(decode_js()).expect("bench/latency/decode.js");
    let decode = decode.replace("\nexport ", "\n");
    data_url(&format!(
        "<!doctype html><html><head><style>html,body{{margin:0;background:#808080;overflow:hidden}}\
         #clock{{position:fixed;left:0;top:0}}</style></head><body><canvas id=clock></canvas><script>\
         {decode}\n\
         const canvas = document.getElementById('clock');\
         canvas.width = BLOCKS * 16; canvas.height = 16;\
         const ctx = canvas.getContext('2d');\
         function frame() {{ drawClock(ctx, Date.now()); requestAnimationFrame(frame); }}\
         requestAnimationFrame(frame);</script></body></html>"
    ))
}

fn tools_missing() -> Option<String> {
    for tool in ["ffmpeg", "ffprobe", "node"] {
        let ok = Command::new(tool)
            .arg(if tool == "node" {
                "--version"
            } else {
                "-version"
            })
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Some(tool.to_string());
        }
    }
    None
}

fn recording_path(id: &str) -> String {
    format!("/api/sessions/{id}/recording")
}

/// `ffprobe`'s stream and format of a file, as JSON.
fn ffprobe(file: &Path) -> Value {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_streams",
            "-show_format",
            "-of",
            "json",
        ])
        .arg(file)
        .output()
        .expect("run ffprobe");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "ffprobe {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ffprobe JSON")
}

/// Decodes every frame with ffmpeg; panics on any error it reports. Frames
/// keep their own times (a changing screen is variable frame rate), at the
/// file's 90 kHz.
fn decodes_cleanly(file: &Path) {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-xerror", "-i"])
        .arg(file)
        .args(["-fps_mode", "passthrough", "-enc_time_base", "1/90000"])
        .args(["-f", "null", "-"])
        .output()
        .expect("run ffmpeg");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "ffmpeg decoding {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The page's clock in one frame a second (ffmpeg's `fps=1`, as RGBA),
/// read by decode.js in node; `None` where the pattern is unreadable.
fn clock_per_second(file: &Path, dir: &Path) -> Vec<Option<f64>> {
    let raw = dir.join("frames.rgba");
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i"])
        .arg(file)
        .args(["-vf", "fps=1", "-f", "rawvideo", "-pix_fmt", "rgba"])
        .arg(&raw)
        .output()
        .expect("run ffmpeg");
    assert!(
        out.status.success(),
        "ffmpeg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // decode.js as a classic script, as the latency benchmark's driver
    // loads it: one rule for drawing and reading the clock.
    let script = r#"
const fs = require('fs');
const [decodePath, rawPath, w, h] = process.argv.slice(1);
const src = fs.readFileSync(decodePath, 'utf8').replace(/^export /gm, '');
const { decodeImageData } = new Function(src + '; return { decodeImageData };')();
const raw = fs.readFileSync(rawPath);
const size = w * h * 4;
const out = [];
for (let o = 0; o + size <= raw.length; o += size) {
  out.push(decodeImageData({ width: +w, height: +h, data: raw.subarray(o, o + size) }));
}
console.log(JSON.stringify(out));
"#;
    let out = Command::new("node")
        .arg("-e")
        .arg(script)
        .arg(decode_js())
        .arg(&raw)
        .arg(W.to_string())
        .arg(H.to_string())
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "node: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<Value> = serde_json::from_slice(&out.stdout).expect("node's JSON");
    v.iter().map(Value::as_f64).collect()
}

/// Polls until the recording serves a file of at least `min` bytes; returns
/// when it first did.
fn wait_recording(s: &Server, id: &str, min: usize, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        let r = s.api("GET", &recording_path(id), None);
        if r.status == 200 && r.bytes.len() >= min {
            return Instant::now();
        }
        assert!(
            r.status == 200 || r.status == 404,
            "GET recording while it starts: {r:?}"
        );
        assert!(
            Instant::now() < deadline,
            "no recording of {min} bytes within {timeout:?}: {} {}",
            r.status,
            r.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Creates a recorded session of the clock page; does not wait for it.
fn create_recorded(s: &Server) -> String {
    let created = s.create(&json!({
        "start_url": clock_page(),
        "width": W,
        "height": H,
        "kiosk": true,
        "idle_timeout_seconds": 600,
        "record": true,
        "recording_ttl_seconds": 600,
    }));
    assert_eq!(created["record"], true, "{created}");
    created["id"].as_str().unwrap().to_string()
}

#[test]
fn a_recorded_clock_plays_back_with_the_times_it_was_captured() {
    if let Some(tool) = tools_missing() {
        eprintln!("SKIPPED: {tool} is not installed (scripts/common.sh TEST_PACKAGES has ffmpeg)");
        return;
    }
    // An unwatched browser would be paused after a second: the recording
    // must count as watching for the clock to go on.
    let s = Server::start(ServerOptions {
        env: vec![(
            "SANDCAST_SESSION__PAUSE_UNWATCHED_SECONDS".into(),
            "1".into(),
        )],
        ..Default::default()
    });
    let tmp = tempfile::tempdir().unwrap();

    // A session that does not record has no recording.
    let plain = s.create(&json!({"start_url": "about:blank"}));
    let plain_id = plain["id"].as_str().unwrap();
    assert_eq!(plain["record"], false);
    let r = s.api("GET", &recording_path(plain_id), None);
    assert_eq!(r.status, 404, "{r:?}");
    assert!(
        r.json()["error"].as_str().unwrap().contains("not recorded"),
        "{}",
        r.body
    );
    s.delete(plain_id);
    let bad = s.api(
        "POST",
        "/api/sessions",
        Some(r#"{"start_url":"about:blank","recording_ttl_seconds":60}"#),
    );
    assert_eq!(bad.status, 400, "a TTL without record: {bad:?}");

    let id = create_recorded(&s);
    // Without the key: refused like the rest of the API.
    let anon = s.raw("GET", &recording_path(&id), &[], None);
    assert_eq!(anon.status, 401, "{anon:?}");

    // Recording starts with the first key frame (the display is up, maybe
    // before the browser): the wall time counts from when its init segment
    // is served, to when the session is asked to stop.
    let started = wait_recording(&s, &id, 1, READY);
    s.wait_state(&id, "ready", READY);
    std::thread::sleep(Duration::from_secs(RECORD_SECS / 2).saturating_sub(started.elapsed()));
    // While it records: the complete fragments so far, a file of its own.
    let r = s.api("GET", &recording_path(&id), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let partial = tmp.path().join("partial.mp4");
    std::fs::write(&partial, &r.bytes).unwrap();
    assert_eq!(ffprobe(&partial)["streams"][0]["codec_name"], "h264");
    decodes_cleanly(&partial);
    std::thread::sleep(Duration::from_secs(RECORD_SECS).saturating_sub(started.elapsed()));
    let wall = started.elapsed().as_secs_f64();
    s.delete(&id);

    let r = s.api("GET", &recording_path(&id), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("video/mp4"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("sandcast-recording-segments"), Some("1"));
    let whole = r.bytes.clone();
    let file = tmp.path().join("clock.mp4");
    std::fs::write(&file, &whole).unwrap();

    let probe = ffprobe(&file);
    let stream = &probe["streams"][0];
    assert_eq!(stream["codec_name"], "h264", "{probe:#}");
    assert_eq!(
        (stream["width"].as_u64(), stream["height"].as_u64()),
        (Some(W.into()), Some(H.into()))
    );
    let duration: f64 = probe["format"]["duration"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no duration: {probe:#}"));
    assert!(
        (duration - wall).abs() <= wall * 0.05,
        "duration {duration:.2} s is not within 5 % of the {wall:.2} s recorded"
    );
    decodes_cleanly(&file);

    // The clock in one frame a second advances by about a second each.
    let clocks = clock_per_second(&file, tmp.path());
    let read: Vec<(usize, f64)> = clocks
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.map(|c| (i, c)))
        .collect();
    assert!(
        read.len() + 3 >= clocks.len() && read.len() >= 15,
        "the clock is readable in most frames: {clocks:?}"
    );
    // Frame i (at i s) shows the clock at about start + i s: its offset
    // (clock - i s) is the same for every frame, give or take a frame. A
    // page that did not paint for a while (a loaded machine) shows an older
    // clock, never a newer one: a frame's time is its capture's.
    for w in read.windows(2) {
        assert!(w[1].1 > w[0].1, "the clock goes back: {clocks:?}");
    }
    let mut offsets: Vec<f64> = read.iter().map(|&(i, c)| c - i as f64 * 1000.0).collect();
    offsets.sort_by(f64::total_cmp);
    let median = offsets[offsets.len() / 2];
    let on_time = offsets
        .iter()
        .filter(|o| (*o - median).abs() <= 250.0)
        .count();
    assert!(
        offsets.iter().all(|o| *o <= median + 250.0) && on_time * 5 >= offsets.len() * 4,
        "frames one second apart show clocks one second apart: {clocks:?}"
    );
    eprintln!(
        "recorded {wall:.2} s wall, {duration:.2} s in the file, {} bytes; clock read in {}/{} frames",
        whole.len(),
        read.len(),
        clocks.len()
    );

    // Played in Chromium's <video> from the server (its own range
    // requests): the same size and length, and seeking shows the clock ten
    // seconds on between 5 s and 15 s.
    let played = run_browser(
        "recording-playback.mjs",
        &json!({"base": s.base, "path": recording_path(&id), "key": s.api_key, "at": [5, 15]}),
    );
    assert_eq!(played["ok"], true, "{played:#}");
    assert_eq!(
        (played["width"].as_u64(), played["height"].as_u64()),
        (Some(W.into()), Some(H.into())),
        "{played:#}"
    );
    let played_duration = played["duration"].as_f64().unwrap();
    assert!(
        (played_duration - duration).abs() <= duration * 0.05,
        "{played:#}"
    );
    assert!(
        played["ranges"].as_u64().unwrap() >= 1,
        "the <video> asked for ranges: {played:#}"
    );
    let (a, b) = (played["clocks"][0].as_f64(), played["clocks"][1].as_f64());
    let (Some(a), Some(b)) = (a, b) else {
        panic!("the clock is readable at 5 s and 15 s: {played:#}")
    };
    let apart = played["times"][1].as_f64().unwrap() - played["times"][0].as_f64().unwrap();
    assert!(
        ((b - a) - apart * 1000.0).abs() <= 250.0,
        "{a} → {b} over {apart} s: {played:#}"
    );
    eprintln!(
        "<video>: {played_duration:.2} s, clock {:.0} ms apart from about 5 s to 15 s, {} range requests",
        b - a,
        played["ranges"]
    );

    // Range requests.
    let len = whole.len();
    let range = |h: &str| {
        let auth = format!("Bearer {}", s.api_key);
        s.raw(
            "GET",
            &recording_path(&id),
            &[("authorization", auth.as_str()), ("range", h)],
            None,
        )
    };
    let r = range("bytes=0-99");
    assert_eq!(r.status, 206, "{r:?}");
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 0-99/{len}").as_str())
    );
    assert_eq!(r.bytes, whole[..100]);
    let mid = len / 2;
    let r = range(&format!("bytes={mid}-"));
    assert_eq!(r.status, 206);
    assert_eq!(r.bytes, whole[mid..]);
    let r = range("bytes=-50");
    assert_eq!(r.status, 206);
    assert_eq!(r.bytes, whole[len - 50..]);
    let r = range(&format!("bytes={len}-"));
    assert_eq!(r.status, 416, "{r:?}");
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{len}").as_str())
    );
    let r = s.api("GET", &format!("{}?segment=1", recording_path(&id)), None);
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.body.contains("segment 1"), "{}", r.body);
    assert!(wait_no_leftovers(&id, Duration::from_secs(10)).is_empty());
}

#[test]
fn a_server_killed_while_recording_leaves_a_playable_file() {
    if let Some(tool) = tools_missing() {
        eprintln!("SKIPPED: {tool} is not installed (scripts/common.sh TEST_PACKAGES has ffmpeg)");
        return;
    }
    let mut s = Server::start(ServerOptions {
        tables: "[recording]\nfragment_ms = 1000\n".into(),
        ..Default::default()
    });
    let tmp = tempfile::tempdir().unwrap();
    let id = create_recorded(&s);
    s.wait_state(&id, "ready", READY);
    // Several fragments in, while more are being written.
    wait_recording(&s, &id, 100_000, READY);
    s.restart();
    s.wait_output(
        "recordings of the last run recovered",
        Duration::from_secs(10),
    );
    let r = s.api("GET", &recording_path(&id), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let file = tmp.path().join("killed.mp4");
    std::fs::write(&file, &r.bytes).unwrap();
    let probe = ffprobe(&file);
    assert_eq!(probe["streams"][0]["codec_name"], "h264", "{probe:#}");
    decodes_cleanly(&file);
    let frames = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
        .arg(&file)
        .output()
        .unwrap();
    let n: u64 = String::from_utf8_lossy(&frames.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(n >= 10, "frames decoded after the kill: {n}");
    // The session itself ended with the server.
    let row = s.session(&id);
    assert_eq!(row["state"], "stopped", "{row}");
    assert!(wait_no_leftovers(&id, Duration::from_secs(10)).is_empty());
}
