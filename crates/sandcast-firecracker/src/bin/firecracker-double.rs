//! A stand-in for the `firecracker` binary where no microVM can boot: serves
//! the API on `--api-sock` through [`sandcast_firecracker::testing`], checking
//! every request against Firecracker's specification, writes the simulated
//! guest's serial console to stdout and every request to
//! `<api-sock>.requests.jsonl`, and exits when the guest powers off.
//!
//! Under the jailer (or `jailer-double`) it runs in the jail, so the paths it
//! is given are the jail's.
//!
//! The simulated guest ignores Ctrl+Alt+Del (like a kernel without an i8042
//! keyboard) when its kernel command line contains `sandcast_double.no_i8042`.

use std::sync::Arc;

use sandcast_firecracker::testing::{FirecrackerDouble, GuestBehaviour, Spec};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `--flag value` or `--flag=value`, as Firecracker takes them (the
    // jailer passes `--id=<id>`).
    let value = |flag: &str| {
        args.iter().enumerate().find_map(|(i, a)| {
            if a == flag {
                args.get(i + 1).cloned()
            } else {
                a.strip_prefix(flag)
                    .and_then(|rest| rest.strip_prefix('='))
                    .map(str::to_owned)
            }
        })
    };
    let Some(api_sock) = value("--api-sock") else {
        eprintln!("Error: missing --api-sock");
        std::process::exit(1);
    };
    let id = value("--id").unwrap_or_else(|| "anonymous-instance".into());
    let spec = Arc::new(Spec::fixture());
    let double = FirecrackerDouble::new(
        spec,
        &id,
        GuestBehaviour {
            echo_console: true,
            request_log: Some(format!("{api_sock}.requests.jsonl").into()),
            ..GuestBehaviour::default()
        },
    );
    if let Err(e) = double.serve(std::path::Path::new(&api_sock)) {
        eprintln!("Error: Failed to open the API socket at {api_sock}: {e}");
        std::process::exit(1);
    }
    let mut off = double.powered_off();
    let _ = off.wait_for(|o| *o).await;
}
