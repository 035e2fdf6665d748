#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The benchmarks on vm-memory 0.18.0 with an upstream change applied, in a build of
# their own: what the change would give every vm-memory user, this crate's memory and
# GuestMemoryMmap alike. Nothing the crates depend on changes: the patched copy and
# this build live under target/upstream/, and Cargo.lock is put back afterwards.
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

cargo fetch --locked >/dev/null
registry="${CARGO_HOME:-$HOME/.cargo}/registry/src"
src=$(find "$registry" -maxdepth 2 -type d -name vm-memory-0.18.0 | head -n 1)
[ -n "$src" ] || { echo "vm-memory 0.18.0 is not in $registry after cargo fetch" >&2; exit 1; }

# The patched copy is made again only when the patch changed (a new copy would make
# cargo rebuild everything above vm-memory).
if ! cmp -s "$here/vm-memory-single-slice.patch" "$work/vm-memory.applied" 2>/dev/null; then
    rm -rf "$work/vm-memory" "$work/vm-memory.applied"
    mkdir -p "$work"
    cp -r "$src" "$work/vm-memory"
    patch --quiet -d "$work/vm-memory" -p1 <"$here/vm-memory-single-slice.patch"
    cp "$here/vm-memory-single-slice.patch" "$work/vm-memory.applied"
fi

cp Cargo.lock "$work/Cargo.lock.saved"
trap 'cp "$work/Cargo.lock.saved" Cargo.lock' EXIT
CARGO_TARGET_DIR="$work/target" cargo bench -p benches \
    --config "patch.crates-io.vm-memory.path=\"$work/vm-memory\"" "$@"
