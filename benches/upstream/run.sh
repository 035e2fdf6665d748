#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The benchmarks on vm-memory 0.18.0 with an upstream change applied, in a build of
# their own: what the change would give every vm-memory user, this crate's memory and
# GuestMemoryMmap alike. Nothing in the checkout changes: the workspace is copied to
# target/upstream/ws (without target/ and .git/; modification times kept, so cargo
# rebuilds only what changed), vm-memory is patched in target/upstream/vm-memory, and
# the copy's own .cargo/config.toml points cargo at it.
#
#   bash benches/upstream/run.sh [cargo bench arguments...]
#   bash benches/upstream/run.sh --bench bytes -- --warm-up-time 1 --measurement-time 3
#
# vm-memory-single-slice.patch: `Bytes<GuestAddress>::read` and `write` (which
# `read_slice`, `write_slice`, `read_obj` and `write_obj` go through) copy through the
# first slice directly, from or into the slice itself, instead of through
# `stop_on_error`'s `Peekable`, `try_fold` and a sub-slice per copy; slices past the
# first (an access across regions) as before. Most accesses lie in one region. With a
# bitmap slice type that has a destructor (this crate's access guard) the adapters keep
# the compiler from inlining the access; see BENCHMARKS.md.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
here="$top/benches/upstream"
work="$top/target/upstream"
cd "$top"

# The vm-memory the workspace is locked to, which the patch was written against.
version=$(awk '/^name = "vm-memory"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
[ "$version" = 0.18.0 ] ||
    { echo "Cargo.lock has vm-memory $version; the patch is for 0.18.0: port it first" >&2; exit 1; }
cargo fetch --locked >/dev/null
registry="${CARGO_HOME:-$HOME/.cargo}/registry/src"
src=""
for dir in "$registry"/*/"vm-memory-$version"; do
    [ -d "$dir" ] && { src=$dir; break; }
done
[ -n "$src" ] || { echo "vm-memory $version is not in $registry after cargo fetch" >&2; exit 1; }

mkdir -p "$work"
# The patched copy is made again only when the patch changed (a new copy would make
# cargo rebuild everything above vm-memory).
if ! cmp -s "$here/vm-memory-single-slice.patch" "$work/vm-memory.applied" 2>/dev/null; then
    rm -rf "$work/vm-memory" "$work/vm-memory.applied"
    cp -r "$src" "$work/vm-memory"
    patch --quiet -d "$work/vm-memory" -p1 <"$here/vm-memory-single-slice.patch"
    cp "$here/vm-memory-single-slice.patch" "$work/vm-memory.applied"
fi

# The workspace, copied (Cargo.lock included: cargo rewrites the copy's, never ours).
rm -rf "$work/ws"
mkdir -p "$work/ws"
tar -C "$top" --exclude=./target --exclude=./.git --exclude=./fuzz/target -cf - . |
    tar -C "$work/ws" -xf -
mkdir -p "$work/ws/.cargo"
printf '[patch.crates-io]\nvm-memory = { path = "%s" }\n' "$work/vm-memory" \
    >"$work/ws/.cargo/config.toml"
cd "$work/ws"
CARGO_TARGET_DIR="$work/target" cargo bench -p benches "$@"
