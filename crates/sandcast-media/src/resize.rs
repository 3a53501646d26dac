//! Display resize with RandR, and the browser following.
//!
//! Xvfb's RandR cannot grow the screen past the size it started with, so
//! the agent starts Xvfb at the largest size it allows (for example
//! `-screen 0 3840x2160x24`) and shrinks it to the viewer's size. Xvfb
//! offers one mode per size it was asked for; any other size needs a mode
//! created and added to its output in the same connection that uses it.
//!
//! There is no window manager to maximise the browser, so windows that
//! covered the whole screen before are resized to cover it after.

use x11rb::connection::Connection;
use x11rb::protocol::randr::{self, ConnectionExt as _, ModeFlag, ModeInfo, Rotation, SetConfig};
use x11rb::protocol::xproto::{ConfigureWindowAux, ConnectionExt as _, MapState, Window};
use x11rb::rust_connection::RustConnection;

use crate::error::{Error, Result};
use crate::xutil;

/// Smallest display sandcast sets, in pixels.
pub const MIN_DISPLAY_SIZE: (u32, u32) = (320, 240);

/// Largest display sandcast sets, in pixels (the H.264 encoder's limit).
pub const MAX_DISPLAY_SIZE: (u32, u32) = (3840, 2160);

/// Prefix of the RandR modes sandcast creates, so it can clean up after itself.
const MODE_PREFIX: &str = "sandcast-";

/// Resizes `display` to `width`x`height` (rounded down to even sides, as the
/// encoders need, and down to what the X server can hold) and resizes the
/// windows that filled the screen. Returns the size set.
pub fn resize_display(display: &str, width: u32, height: u32) -> Result<(u32, u32)> {
    let (min, max) = (MIN_DISPLAY_SIZE, MAX_DISPLAY_SIZE);
    if !(min.0..=max.0).contains(&width) || !(min.1..=max.1).contains(&height) {
        return Err(Error::BadSize {
            width,
            height,
            min_width: min.0,
            min_height: min.1,
            max_width: max.0,
            max_height: max.1,
        });
    }
    let (conn, screen) = xutil::connect(display)?;
    let root = conn.setup().roots[screen].root;
    let version = conn
        .randr_query_version(1, 5)?
        .reply()
        .map_err(|_| Error::MissingExtension("RANDR"))?;
    if (version.major_version, version.minor_version) < (1, 2) {
        return Err(Error::MissingExtension("RANDR 1.2"));
    }
    let range = conn.randr_get_screen_size_range(root)?.reply()?;
    let w = width.min(u32::from(range.max_width)) & !1;
    let h = height.min(u32::from(range.max_height)) & !1;
    let old = conn.get_geometry(root)?.reply()?;
    let (old_w, old_h) = (u32::from(old.width), u32::from(old.height));
    if (w, h) == (old_w, old_h) {
        return Ok((w, h));
    }

    let res = conn.randr_get_screen_resources_current(root)?.reply()?;
    let (output, crtc) = first_active_output(&conn, &res)?;
    let names = mode_names(&res);
    let mode = match res
        .modes
        .iter()
        .zip(&names)
        .find(|(m, _)| (u32::from(m.width), u32::from(m.height)) == (w, h))
    {
        Some((m, _)) => {
            // Known to the server but maybe not to this output.
            let _ = conn.randr_add_output_mode(output, m.id)?.check();
            m.id
        }
        None => {
            let name = format!("{MODE_PREFIX}{w}x{h}");
            let info = ModeInfo {
                id: 0,
                width: w as u16,
                height: h as u16,
                // A plausible 60 Hz timing; Xvfb ignores it, clients may not.
                dot_clock: w * h * 60,
                hsync_start: w as u16,
                hsync_end: w as u16,
                htotal: w as u16,
                hskew: 0,
                vsync_start: h as u16,
                vsync_end: h as u16,
                vtotal: h as u16,
                name_len: name.len() as u16,
                mode_flags: ModeFlag::default(),
            };
            let mode = conn
                .randr_create_mode(root, info, name.as_bytes())?
                .reply()?
                .mode;
            conn.randr_add_output_mode(output, mode)?.check()?;
            mode
        }
    };

    // The screen must hold the CRTC at every step: grow it first, shrink it
    // last.
    let mm = |px: u32| px * 254 / 960; // 96 dpi
    let (big_w, big_h) = (w.max(old_w), h.max(old_h));
    if (big_w, big_h) != (old_w, old_h) {
        conn.randr_set_screen_size(root, big_w as u16, big_h as u16, mm(big_w), mm(big_h))?
            .check()?;
    }
    let info = conn
        .randr_get_crtc_info(crtc, res.config_timestamp)?
        .reply()?;
    let set = conn
        .randr_set_crtc_config(
            crtc,
            x11rb::CURRENT_TIME,
            res.config_timestamp,
            0,
            0,
            mode,
            Rotation::ROTATE0,
            &[output],
        )?
        .reply()?;
    if set.status != SetConfig::SUCCESS {
        return Err(Error::Unsupported(format!(
            "the X server refused mode {w}x{h} ({:?})",
            set.status
        )));
    }
    if (big_w, big_h) != (w, h) {
        conn.randr_set_screen_size(root, w as u16, h as u16, mm(w), mm(h))?
            .check()?;
    }
    forget_old_modes(&conn, root, output, info.mode, mode)?;
    follow(&conn, root, (old_w, old_h), (w, h))?;
    conn.flush()?;
    Ok((w, h))
}

fn mode_names(res: &randr::GetScreenResourcesCurrentReply) -> Vec<String> {
    let mut at = 0usize;
    res.modes
        .iter()
        .map(|m| {
            let len = usize::from(m.name_len);
            let name = res
                .names
                .get(at..at + len)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            at += len;
            name
        })
        .collect()
}

fn first_active_output(
    conn: &RustConnection,
    res: &randr::GetScreenResourcesCurrentReply,
) -> Result<(randr::Output, randr::Crtc)> {
    for &output in &res.outputs {
        let info = conn
            .randr_get_output_info(output, res.config_timestamp)?
            .reply()?;
        if info.crtc != x11rb::NONE {
            return Ok((output, info.crtc));
        }
        if let Some(&crtc) = info.crtcs.first() {
            return Ok((output, crtc));
        }
    }
    Err(Error::Unsupported(
        "the X server has no RandR output with a CRTC to resize".into(),
    ))
}

/// Removes the mode sandcast created for the previous size, so modes do not
/// pile up over a long session.
fn forget_old_modes(
    conn: &RustConnection,
    root: Window,
    output: randr::Output,
    previous: randr::Mode,
    current: randr::Mode,
) -> Result<()> {
    if previous == current || previous == x11rb::NONE {
        return Ok(());
    }
    let res = conn.randr_get_screen_resources_current(root)?.reply()?;
    let names = mode_names(&res);
    for (m, name) in res.modes.iter().zip(&names) {
        if m.id == previous && name.starts_with(MODE_PREFIX) {
            // Best effort: a mode still in use elsewhere stays.
            let _ = conn.randr_delete_output_mode(output, m.id)?.check();
            let _ = conn.randr_destroy_mode(m.id)?.check();
        }
    }
    Ok(())
}

/// Resizes the mapped top-level windows that filled the old screen.
fn follow(conn: &RustConnection, root: Window, old: (u32, u32), new: (u32, u32)) -> Result<()> {
    let tree = conn.query_tree(root)?.reply()?;
    for win in tree.children {
        let Ok(attrs) = conn.get_window_attributes(win)?.reply() else {
            continue; // gone meanwhile
        };
        if attrs.map_state != MapState::VIEWABLE {
            continue;
        }
        let Ok(geo) = conn.get_geometry(win)?.reply() else {
            continue;
        };
        let covers = geo.x <= 0
            && geo.y <= 0
            && i32::from(geo.x) + i32::from(geo.width) >= old.0 as i32
            && i32::from(geo.y) + i32::from(geo.height) >= old.1 as i32;
        if covers {
            conn.configure_window(
                win,
                &ConfigureWindowAux::new()
                    .x(0)
                    .y(0)
                    .width(new.0)
                    .height(new.1),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::tests::fill_rect;
    use crate::xvfb::Xvfb;

    fn size_of(conn: &RustConnection, win: Window) -> (u16, u16) {
        let g = conn.get_geometry(win).unwrap().reply().unwrap();
        (g.width, g.height)
    }

    #[test]
    fn shrinks_and_grows_the_screen_and_full_screen_windows_follow() {
        let x = Xvfb::start(1920, 1080).unwrap();
        let (conn, screen) = xutil::connect(x.display()).unwrap();
        let root = conn.setup().roots[screen].root;
        let full = fill_rect(&conn, screen, (0, 0, 1920, 1080), 0x20_20_20);
        let small = fill_rect(&conn, screen, (10, 10, 100, 100), 0x80_80_80);
        assert_eq!(resize_display(x.display(), 1280, 720).unwrap(), (1280, 720));
        assert_eq!(size_of(&conn, root), (1280, 720));
        assert_eq!(size_of(&conn, full), (1280, 720));
        assert_eq!(size_of(&conn, small), (100, 100));
        // Odd sizes are made even; growing works up to the start size.
        assert_eq!(resize_display(x.display(), 1601, 901).unwrap(), (1600, 900));
        assert_eq!(size_of(&conn, root), (1600, 900));
        assert_eq!(size_of(&conn, full), (1600, 900));
        // Beyond what Xvfb holds: the largest it can.
        assert_eq!(
            resize_display(x.display(), 2560, 1440).unwrap(),
            (1920, 1080)
        );
        assert_eq!(size_of(&conn, root), (1920, 1080));
        // Back and forth does not pile up modes.
        for _ in 0..3 {
            resize_display(x.display(), 800, 600).unwrap();
            resize_display(x.display(), 1024, 768).unwrap();
        }
        let res = conn
            .randr_get_screen_resources_current(root)
            .unwrap()
            .reply()
            .unwrap();
        let ours = mode_names(&res)
            .iter()
            .filter(|n| n.starts_with(MODE_PREFIX))
            .count();
        assert!(ours <= 2, "{ours} sandcast modes left");
    }

    #[test]
    fn sizes_out_of_range_are_refused_by_value() {
        let err = resize_display(":0", 10, 10).unwrap_err();
        assert!(err.to_string().contains("10x10"), "{err}");
        let err = resize_display(":0", 5000, 1000).unwrap_err();
        assert!(err.to_string().contains("5000x1000"), "{err}");
    }
}
