//! Builds an image from the command line, as `sandcast image build` does:
//!
//! ```text
//! cargo run --release -p sandcast-image --example build-image -- \
//!     OUTPUT_DIR AGENT_BINARY [--tiny] [--suite SUITE] [--mirror URL] [--ubuntu]
//! ```

use std::time::Instant;

use sandcast_image::{BuildOptions, Distro, Variant, build_with_report};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!(
            "usage: build-image OUTPUT_DIR AGENT_BINARY [--tiny] [--suite S] [--mirror URL] [--ubuntu]"
        );
        std::process::exit(2);
    }
    let mut opts = BuildOptions::new(&args[0], &args[1], env!("CARGO_PKG_VERSION"));
    let mut rest = args[2..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--tiny" => opts.variant = Variant::Tiny,
            "--ubuntu" => opts.distro = Distro::Ubuntu,
            "--suite" => opts.suite = rest.next().cloned(),
            "--mirror" => opts.mirror = rest.next().cloned(),
            other => {
                eprintln!("unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let t = Instant::now();
    match build_with_report(&opts) {
        Ok(r) => {
            println!(
                "built {} in {:.1} s (ran {:?}, skipped {:?}); {} packages, ext4 {} MiB, sha256 {}",
                opts.output.display(),
                t.elapsed().as_secs_f64(),
                r.ran,
                r.skipped,
                r.manifest.packages.len(),
                r.manifest.ext4_size >> 20,
                r.manifest.ext4_sha256
            );
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
