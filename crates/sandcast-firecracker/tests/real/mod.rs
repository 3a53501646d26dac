//! The real Firecracker and jailer binaries and the tiny guest, for the
//! tests and benchmarks that run them: `SANDCAST_FC_BIN` and
//! `SANDCAST_JAILER_BIN`, else `../shared/firecracker/bin/` beside the
//! project. Each finder says why when there is none.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The line the tiny guest prints on its serial console.
pub const HELLO: &str = "sandcast tiny guest: hello";

fn find(var: &str, name: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(var) {
        return Ok(p.into());
    }
    let shared = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/firecracker/bin")
        .join(name);
    if shared.is_file() {
        return Ok(shared);
    }
    Err(format!(
        "no real {name}: {var} is not set and {} does not exist",
        shared.display()
    ))
}

/// The real Firecracker, if there is one.
pub fn firecracker() -> Result<PathBuf, String> {
    find("SANDCAST_FC_BIN", "firecracker")
}

/// The real jailer, beside the real Firecracker.
pub fn jailer() -> Result<PathBuf, String> {
    find("SANDCAST_JAILER_BIN", "jailer")
}

/// Assembles the tiny guest into `dir`; `stay`: it halts instead of
/// resetting, so the VM runs until stopped.
pub fn tiny_guest(dir: &Path, stay: bool) -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/tiny-pvh.S");
    let obj = dir.join("tiny.o");
    let elf = dir.join(if stay { "tiny-stay.elf" } else { "tiny.elf" });
    let run = |cmd: &mut std::process::Command| -> Result<(), String> {
        let name = cmd.get_program().to_string_lossy().into_owned();
        let out = cmd
            .output()
            .map_err(|e| format!("{name} (binutils) cannot run: {e}"))?;
        if !out.status.success() {
            return Err(format!("{name}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    };
    let mut assemble = std::process::Command::new("as");
    assemble.arg("--64");
    if stay {
        assemble.args(["--defsym", "STAY=1"]);
    }
    run(assemble.arg("-o").arg(&obj).arg(&src))?;
    run(std::process::Command::new("ld")
        .args([
            "-m",
            "elf_x86_64",
            "-nostdlib",
            "-static",
            "-Ttext=0x100000",
            "-e",
            "start",
            "-o",
        ])
        .arg(&elf)
        .arg(&obj))?;
    Ok(elf)
}
