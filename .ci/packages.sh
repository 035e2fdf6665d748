#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The published crates, checked as a dependent gets them: `cargo publish --workspace
# --dry-run` packages every publishable crate (the unpublished path dependencies are
# resolved among them), then the packages are unpacked into a workspace of their own,
# outside this one, and their tests and doc tests build and run from the packages
# alone; the doc tests run a second time where /dev/kvm does not exist (a private mount
# namespace), where each example that needs it must say so and stop, not fail.
#
# Needs cargo 1.90 or newer (`cargo publish --workspace`), and root for the mount
# namespace (the step is skipped, saying so, without it).
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")

log() { printf '\n== %s\n' "$*"; }

publishable=(guest-memfd vm-private-memory vm-private-memory-vfio vm-private-memory-vhost-user privmem)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

log "cargo publish --workspace --dry-run"
cargo publish --workspace --dry-run --locked --no-verify --allow-dirty
# The same packages, as files to unpack (`cargo package` keeps them in target/package).
rm -f "$target"/package/*.crate
cargo package --locked --no-verify --allow-dirty "${publishable[@]/#/--package=}"

unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
{
    printf '[workspace]\nresolver = "2"\nmembers = ['
    for crate in "${publishable[@]}"; do printf '"%s-%s", ' "$crate" "$version"; done
    printf ']\n\n[patch.crates-io]\n'
    # Libraries only: the binary crate is nobody's dependency.
    for crate in "${publishable[@]}"; do
        [ "$crate" = privmem ] || printf '%s = { path = "%s-%s" }\n' "$crate" "$crate" "$version"
    done
} >"$unpacked/Cargo.toml"
for crate in "${publishable[@]}"; do
    tar -xzf "$target/package/$crate-$version.crate" -C "$unpacked"
done
# Nothing else of this workspace comes along: only the packages and the lock's versions.
cp Cargo.lock "$unpacked/"
# Packaged files carry a fixed old mtime: make them newer than any earlier build of the
# same crates in the shared target directory, or cargo would take that build as fresh.
find "$unpacked" -type f -exec touch {} +

log "the packages' tests and doc tests, built from the packages alone"
(cd "$unpacked" && CARGO_TARGET_DIR=$target cargo test --workspace --no-run)
(cd "$unpacked" && CARGO_TARGET_DIR=$target cargo test --workspace --doc)

log "the packages' doc tests where /dev/kvm does not exist"
# Each example that needs /dev/kvm opens it with a `let Ok(kvm) = Kvm::new() else`
# that prints a SKIPPED line and stops (rustdoc does not show a passing example's
# output, so the sources are checked for it), and passes here.
if grep -rnE '^\s*//[/!].*Kvm::new\(\)\.unwrap\(\)' "${publishable[@]/#/crates/}"; then
    echo "the doc examples above fail where /dev/kvm is missing: open it with the SKIPPED pattern" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "SKIPPED the doc tests without /dev/kvm: a private mount namespace needs root"
else
unshare --mount --propagation private bash -ec '
    dev=$(mktemp -d)
    mount -t tmpfs tmpfs "$dev"
    for node in null zero full random urandom; do cp -a "/dev/$node" "$dev/"; done
    ln -s /proc/self/fd "$dev/fd"
    mount --bind "$dev" /dev
    [ ! -e /dev/kvm ]
    cd "$1" && CARGO_TARGET_DIR=$2 cargo test --workspace --doc --offline
' bash "$unpacked" "$target"
fi

log "cargo install of the packaged privmem, and its probe"
install_root=$(mktemp -d)
trap 'rm -rf "$unpacked" "$install_root"' EXIT
CARGO_TARGET_DIR=$target cargo install --offline --debug --locked --root "$install_root" \
    --path "$unpacked/privmem-$version"
"$install_root/bin/privmem" probe --json >"$install_root/report.json"
grep -q '"findings"' "$install_root/report.json"
"$install_root/bin/privmem" probe

log "a fresh project on the packages alone builds and runs a copy of the example VMM"
project="$unpacked/../example-vmm-$$"
trap 'rm -rf "$unpacked" "$install_root" "$project"' EXIT
mkdir -p "$project/src"
cp crates/vm-private-memory/examples/vmm.rs "$project/src/main.rs"
cat >"$project/Cargo.toml" <<TOML
[package]
name = "example-vmm"
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
guest-memfd = "$version"
vm-private-memory = "$version"
kvm-ioctls = "0.25"
vm-memory = { version = "0.18", features = ["backend-mmap", "backend-atomic"] }
virtio-queue = { version = "0.18", features = ["test-utils"] }

[patch.crates-io]
guest-memfd = { path = "$unpacked/guest-memfd-$version" }
vm-private-memory = { path = "$unpacked/vm-private-memory-$version" }

[workspace]
TOML
cp Cargo.lock "$project/"
(cd "$project" && CARGO_TARGET_DIR=$target cargo run --offline) | tee "$project/output"
# It runs to its end, or (on a host without in-place guest_memfd) says why it cannot.
grep -qE "the host's read of it is refused: true|^SKIPPED: " "$project/output"
