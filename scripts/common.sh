# Shared by scripts/run and scripts/test: install what is missing, quickly
# and idempotently, on Debian 12 (root). Sourced, not executed.

set -euo pipefail

SANDCAST_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# One target directory per checkout, kept outside it so that a fresh clone
# reuses its builds. Checkouts do not share one: cargo names and fingerprints
# a workspace's outputs independently of where it lives, so a binary built in
# one checkout would pass as current in another while still pointing at the
# first one's files. Override by setting CARGO_TARGET_DIR.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sandcast-target/$(printf '%s' "$SANDCAST_ROOT" | tr -c 'A-Za-z0-9_.\n' '-' | sed 's/^-*//')}"
# The oldest toolchain that builds the workspace (edition 2024).
MIN_RUST="1.85"

# Building and running a session: compilers and C libraries of the encoders,
# the browser and display stack a session runs, the sandbox's tools.
RUN_PACKAGES=(
  ca-certificates curl git
  g++ pkg-config nasm libvpx-dev clang libclang-dev
  chromium xvfb xauth x11vnc fonts-liberation fonts-dejavu-core
  bubblewrap nftables iptables iproute2 procps util-linux e2fsprogs perl
)
# Tests also build images, drive X displays and inspect them, and run
# throw-away PostgreSQL servers (the cluster's store).
TEST_PACKAGES=(
  "${RUN_PACKAGES[@]}"
  mmdebstrap debian-archive-keyring
  x11-utils x11-xserver-utils xdotool
  ffmpeg
  postgresql-15
)

say() {
  if [ -t 2 ]; then printf '\033[1m==> %s\033[0m\n' "$*" >&2; else printf '==> %s\n' "$*" >&2; fi
}
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

require_root() {
  [ "$(id -u)" = 0 ] || die "run as root: sessions need namespaces, cgroups and nftables (and apt-get installs packages)"
}

# Installs the Debian packages given that are not installed yet; runs apt only
# when something is missing.
ensure_packages() {
  local missing=() p status
  for p in "$@"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)"
    [ "$status" = installed ] || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    return 0
  fi
  command -v apt-get >/dev/null || die "apt-get not found; install these Debian 12 packages by hand: ${missing[*]}"
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Node.js 18 or newer with npm: Debian 12's when there is none (a newer
# Node.js already installed, e.g. 20, is kept).
ensure_node() {
  local major=0
  if command -v node >/dev/null; then
    major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
  fi
  if [ "$major" -lt 18 ]; then
    ensure_packages nodejs npm
    major="$(node -p 'process.versions.node.split(".")[0]')"
    [ "$major" -ge 18 ] || die "Node.js $major is too old; the browser tests need Node.js 18 or newer"
  fi
  if ! command -v npm >/dev/null; then
    ensure_packages npm
  fi
}

version_ge() { # version_ge A B: A >= B
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

# A current stable Rust toolchain. Debian 12's cargo (1.65) cannot build
# edition 2024, so when there is no cargo at all, rustup's official installer
# installs one into ~/.cargo.
ensure_rust() {
  if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null; then
    say "installing a stable Rust toolchain with rustup (https://sh.rustup.rs)"
    local installer
    installer="$(mktemp)"
    if ! curl --proto '=https' --tlsv1.2 -sSf --max-time 60 https://sh.rustup.rs -o "$installer"; then
      rm -f "$installer"
      die "cargo is missing and rustup's installer (https://sh.rustup.rs) is not reachable from this host; install Rust $MIN_RUST or newer (with rustfmt and clippy) another way and put cargo on PATH"
    fi
    sh "$installer" -y --no-modify-path --profile minimal --default-toolchain stable -c rustfmt -c clippy ||
      die "rustup could not install a toolchain (are static.rust-lang.org and sh.rustup.rs reachable?)"
    rm -f "$installer"
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  local have
  have="$(cargo --version | awk '{print $2}')"
  version_ge "${have%%-*}" "$MIN_RUST" ||
    die "cargo $have is too old: sandcast needs Rust $MIN_RUST or newer (edition 2024); run 'rustup update stable'"
}

# rustfmt and clippy for the test script's checks.
ensure_rust_tools() {
  if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
    return 0
  fi
  command -v rustup >/dev/null ||
    die "cargo fmt / cargo clippy are missing and there is no rustup to add them; install rustfmt and clippy for $(cargo --version)"
  say "adding rustfmt and clippy"
  rustup component add rustfmt clippy
}
