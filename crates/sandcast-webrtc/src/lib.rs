//! The WebRTC gateway: one UDP socket for every session and viewer, video out and input back.
