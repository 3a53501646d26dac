//! `sandcast doctor`: checks the host and says exactly what is missing.

use std::path::Path;
use std::process::ExitCode;

use sandcast_backend::Check;

use crate::ServeArgs;

fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn tool(name: &str, package: &str) -> Check {
    match which(name) {
        Some(p) => Check {
            name: name.into(),
            ok: true,
            detail: p.display().to_string(),
        },
        None => Check {
            name: name.into(),
            ok: false,
            detail: format!("{name} not found on PATH: apt-get install {package}"),
        },
    }
}

/// Runs every check; exit 1 when one fails.
pub fn run(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let config = args.load().map_err(anyhow::Error::msg)?;
    let mut checks = vec![
        tool("Xvfb", "xvfb"),
        tool("x11vnc", "x11vnc"),
        tool("unshare", "util-linux"),
    ];
    let browser = &config.browser.binary;
    checks.push(Check {
        name: "browser".into(),
        ok: Path::new(browser).is_file(),
        detail: if Path::new(browser).is_file() {
            browser.clone()
        } else {
            format!("{browser} not found: apt-get install chromium")
        },
    });
    let agent = sandcast_server::agent_binary(&config);
    checks.push(Check {
        name: "agent".into(),
        ok: agent.is_file(),
        detail: if agent.is_file() {
            agent.display().to_string()
        } else {
            format!(
                "{} not found: cargo build --release -p sandcast-agent (or set agent_binary)",
                agent.display()
            )
        },
    });
    let data_ok = std::fs::create_dir_all(&config.data_dir).is_ok();
    checks.push(Check {
        name: "data_dir".into(),
        ok: data_ok,
        detail: if data_ok {
            config.data_dir.display().to_string()
        } else {
            format!("cannot create {}", config.data_dir.display())
        },
    });
    let mut warnings = Vec::new();
    if let Some((cert, key)) = config.tls_files() {
        let loaded = sandcast_server::tls::load_pair(cert, key);
        checks.push(Check {
            name: "tls".into(),
            ok: loaded.is_ok(),
            detail: match loaded {
                Ok(_) => format!("{} with {}", cert.display(), key.display()),
                Err(e) => e,
            },
        });
        warnings.extend(sandcast_server::tls::key_mode_warning(key));
    }
    warnings.extend(config.plain_http_warning());
    let rt = tokio::runtime::Runtime::new()?;
    match sandcast_server::backend(&config) {
        Ok(backend) => {
            let r = rt.block_on(backend.readiness());
            checks.extend(r.checks.into_iter().map(|mut c| {
                c.name = format!("{}: {}", backend.name(), c.name);
                c
            }));
        }
        Err(e) => checks.push(Check {
            name: format!("backend {}", config.backend),
            ok: false,
            detail: e.to_string(),
        }),
    }
    let mut ok = true;
    for c in &checks {
        println!(
            "{} {:<28} {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
        ok &= c.ok;
    }
    for w in &warnings {
        println!("warn {:<28} {w}", "tls");
    }
    // Sessions start on an overcommitted host, but may be killed under
    // memory pressure: a warning, not a failure.
    if let Some(w) = config.overcommit_warning() {
        println!("warn {:<28} {w}", "memory");
    }
    if ok {
        println!("everything sandcast needs is here");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("some checks failed: see above for what to install or change");
        Ok(ExitCode::FAILURE)
    }
}
