//! Screen capture, video encoding, input injection, clipboard and resize on the session's X display.
