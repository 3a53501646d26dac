//! The sandcast server: HTTP API, session manager, store, VNC gateway.
