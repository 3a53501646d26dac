//! Screen capture of the X root window, through MIT-SHM or plain GetImage.

use std::os::fd::{FromRawFd, OwnedFd};
use std::ptr::NonNull;

use x11rb::connection::{Connection, RequestConnection};
use x11rb::protocol::shm::{self, ConnectionExt as _};
use x11rb::protocol::xproto::{self, ConnectionExt as _, ImageFormat};
use x11rb::rust_connection::RustConnection;

use crate::error::{Error, Result};
use crate::xutil;

/// How pixels travel from the X server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMethod {
    /// The server writes into memory shared with us (about 0.2 ms at 720p).
    Shm,
    /// The pixels come over the socket (about 10 ms at 720p); for servers
    /// without MIT-SHM and for comparison.
    GetImage,
}

/// One captured screen, borrowed from the capture's buffer.
#[derive(Debug, Clone, Copy)]
pub struct CapturedFrame<'a> {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes per row.
    pub stride: u32,
    /// Pixels as B, G, R, X bytes.
    pub bgra: &'a [u8],
}

/// A shared-memory segment mapped here and attached in the X server.
struct ShmSegment {
    seg: shm::Seg,
    ptr: NonNull<u8>,
    len: usize,
}

impl ShmSegment {
    fn new(conn: &RustConnection, len: usize) -> Result<ShmSegment> {
        // memfd instead of SysV shm: nothing outlives this process, even if
        // it is killed, and nothing needs an IPC id.
        // SAFETY: a NUL-terminated name and valid flags.
        let fd = unsafe { libc::memfd_create(c"sandcast-capture".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::os("memfd_create for the capture buffer"));
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        use std::os::fd::AsRawFd;
        // SAFETY: valid fd, plain length.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
            return Err(Error::os("ftruncate of the capture buffer"));
        }
        // SAFETY: mapping a fresh fd of `len` bytes; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::os("mmap of the capture buffer"));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).expect("mmap never returns NULL on success");
        let seg = match conn.generate_id() {
            Ok(seg) => seg,
            Err(e) => {
                // SAFETY: unmapping exactly what was mapped above.
                unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
                return Err(e.into());
            }
        };
        let attached = conn
            .shm_attach_fd(seg, fd, false)
            .map_err(Error::from)
            .and_then(|c| c.check().map_err(Error::from));
        if let Err(e) = attached {
            // SAFETY: as above.
            unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
            return Err(e);
        }
        Ok(ShmSegment { seg, ptr, len })
    }

    fn release(&mut self, conn: &RustConnection) {
        // The server may be gone already; the mapping is ours to drop anyway.
        let _ = conn.shm_detach(self.seg);
        let _ = conn.flush();
        // SAFETY: unmapping exactly what `new` mapped, once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }

    fn bytes(&self, len: usize) -> &[u8] {
        // SAFETY: the mapping is `self.len` bytes, alive while self is, and
        // the server writes into it only during a GetImage we wait for.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len.min(self.len)) }
    }
}

/// Captures the root window of one X display.
pub struct Capture {
    conn: RustConnection,
    root: xproto::Window,
    method: CaptureMethod,
    width: u32,
    height: u32,
    shm: Option<ShmSegment>,
    buf: Vec<u8>,
    captures: u64,
}

// SAFETY: the raw pointer is to a private mapping that only this struct uses.
unsafe impl Send for Capture {}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("method", &self.method)
            .field("width", &self.width)
            .field("height", &self.height)
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// Connects to `display` and prepares to capture its first screen.
    pub fn open(display: &str, method: CaptureMethod) -> Result<Capture> {
        let (conn, screen) = xutil::connect(display)?;
        let setup = conn.setup();
        let root_info = &setup.roots[screen];
        let root = root_info.root;
        // We read pixels as 32-bit B,G,R,X: that needs depth 24 in 32 bits
        // per pixel, least significant byte first, red in the high byte.
        let bpp = setup
            .pixmap_formats
            .iter()
            .find(|f| f.depth == root_info.root_depth)
            .map(|f| f.bits_per_pixel);
        let visual = root_info
            .allowed_depths
            .iter()
            .flat_map(|d| d.visuals.iter())
            .find(|v| v.visual_id == root_info.root_visual);
        let ok = root_info.root_depth == 24
            && bpp == Some(32)
            && setup.image_byte_order == xproto::ImageOrder::LSB_FIRST
            && visual.is_some_and(|v| v.red_mask == 0xff0000 && v.blue_mask == 0xff);
        if !ok {
            return Err(Error::Unsupported(format!(
                "display {display} has depth {} at {bpp:?} bits per pixel; sandcast captures 24-bit BGRX only",
                root_info.root_depth
            )));
        }
        if method == CaptureMethod::Shm {
            let have = conn
                .extension_information(shm::X11_EXTENSION_NAME)?
                .is_some();
            let version = if have {
                Some(conn.shm_query_version()?.reply()?)
            } else {
                None
            };
            // Attaching an fd needs MIT-SHM 1.2.
            if version.is_none_or(|v| (v.major_version, v.minor_version) < (1, 2)) {
                return Err(Error::MissingExtension("MIT-SHM 1.2"));
            }
        }
        let (width, height) = (
            u32::from(root_info.width_in_pixels),
            u32::from(root_info.height_in_pixels),
        );
        Ok(Capture {
            conn,
            root,
            method,
            width,
            height,
            shm: None,
            buf: Vec::new(),
            captures: 0,
        })
    }

    /// The connection, for the caller's own requests and events.
    pub fn conn(&self) -> &RustConnection {
        &self.conn
    }

    /// The root window captured.
    pub fn root(&self) -> xproto::Window {
        self.root
    }

    /// The size captured now.
    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// How many captures were taken.
    pub fn captures(&self) -> u64 {
        self.captures
    }

    /// Asks the server for the root window's size again (after a resize).
    pub fn refresh_size(&mut self) -> Result<(u32, u32)> {
        let geo = self.conn.get_geometry(self.root)?.reply()?;
        self.width = u32::from(geo.width);
        self.height = u32::from(geo.height);
        Ok((self.width, self.height))
    }

    /// Captures the whole root window.
    pub fn grab(&mut self) -> Result<CapturedFrame<'_>> {
        let (w, h) = (self.width, self.height);
        let len = w as usize * h as usize * 4;
        self.captures += 1;
        match self.method {
            CaptureMethod::Shm => {
                if self.shm.as_ref().is_none_or(|s| s.len < len) {
                    if let Some(mut old) = self.shm.take() {
                        old.release(&self.conn);
                    }
                    self.shm = Some(ShmSegment::new(&self.conn, len)?);
                }
                let seg = self.shm.as_ref().expect("segment allocated above");
                self.conn
                    .shm_get_image(
                        self.root,
                        0,
                        0,
                        w as u16,
                        h as u16,
                        !0,
                        ImageFormat::Z_PIXMAP.into(),
                        seg.seg,
                        0,
                    )?
                    .reply()?;
                Ok(CapturedFrame {
                    width: w,
                    height: h,
                    stride: w * 4,
                    bgra: seg.bytes(len),
                })
            }
            CaptureMethod::GetImage => {
                let reply = self
                    .conn
                    .get_image(
                        ImageFormat::Z_PIXMAP,
                        self.root,
                        0,
                        0,
                        w as u16,
                        h as u16,
                        !0,
                    )?
                    .reply()?;
                self.buf = reply.data;
                if self.buf.len() < len {
                    return Err(Error::Unsupported(format!(
                        "GetImage returned {} bytes for {w}x{h}",
                        self.buf.len()
                    )));
                }
                Ok(CapturedFrame {
                    width: w,
                    height: h,
                    stride: w * 4,
                    bgra: &self.buf[..len],
                })
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut seg) = self.shm.take() {
            seg.release(&self.conn);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::xvfb::Xvfb;
    use x11rb::protocol::xproto::{
        ChangeGCAux, CreateGCAux, CreateWindowAux, EventMask, Rectangle, WindowClass,
    };

    /// An override-redirect window filled with `rgb`, mapped and drawn.
    pub(crate) fn fill_rect(
        conn: &RustConnection,
        screen: usize,
        rect: (i16, i16, u16, u16),
        rgb: u32,
    ) -> xproto::Window {
        let s = &conn.setup().roots[screen];
        let win = conn.generate_id().unwrap();
        conn.create_window(
            24,
            win,
            s.root,
            rect.0,
            rect.1,
            rect.2,
            rect.3,
            0,
            WindowClass::INPUT_OUTPUT,
            0,
            &CreateWindowAux::new()
                .background_pixel(rgb)
                .override_redirect(1)
                .event_mask(EventMask::EXPOSURE),
        )
        .unwrap();
        conn.map_window(win).unwrap();
        // A window's background is painted by the server on map; also draw,
        // so capture sees rendering, not only window management.
        let gc = conn.generate_id().unwrap();
        conn.create_gc(gc, win, &CreateGCAux::new().foreground(rgb))
            .unwrap();
        conn.change_gc(gc, &ChangeGCAux::new().foreground(rgb))
            .unwrap();
        conn.poly_fill_rectangle(
            win,
            gc,
            &[Rectangle {
                x: 0,
                y: 0,
                width: rect.2,
                height: rect.3,
            }],
        )
        .unwrap();
        conn.get_input_focus().unwrap().reply().unwrap();
        win
    }

    fn pixel(f: &CapturedFrame<'_>, x: u32, y: u32) -> u32 {
        let i = (y * f.stride + x * 4) as usize;
        u32::from_le_bytes(f.bgra[i..i + 4].try_into().unwrap()) & 0xff_ffff
    }

    #[test]
    fn both_methods_capture_what_was_drawn() {
        let x = Xvfb::start(320, 240).unwrap();
        let (conn, screen) = xutil::connect(x.display()).unwrap();
        fill_rect(&conn, screen, (10, 20, 50, 40), 0x12_34_56);
        for method in [CaptureMethod::Shm, CaptureMethod::GetImage] {
            let mut cap = Capture::open(x.display(), method).unwrap();
            let f = cap.grab().unwrap();
            assert_eq!((f.width, f.height, f.stride), (320, 240, 1280));
            assert_eq!(pixel(&f, 10, 20), 0x12_34_56, "{method:?}");
            assert_eq!(pixel(&f, 59, 59), 0x12_34_56, "{method:?}");
            assert_eq!(pixel(&f, 60, 60), 0, "{method:?}");
            assert_eq!(pixel(&f, 9, 20), 0, "{method:?}");
        }
    }

    #[test]
    fn shm_capture_sees_later_changes_and_resizes_its_buffer() {
        let x = Xvfb::start(320, 240).unwrap();
        let (conn, screen) = xutil::connect(x.display()).unwrap();
        let mut cap = Capture::open(x.display(), CaptureMethod::Shm).unwrap();
        assert_eq!(pixel(&cap.grab().unwrap(), 100, 100), 0);
        fill_rect(&conn, screen, (90, 90, 20, 20), 0xff_00_00);
        assert_eq!(pixel(&cap.grab().unwrap(), 100, 100), 0xff_00_00);
        assert_eq!(cap.captures(), 2);
    }
}
