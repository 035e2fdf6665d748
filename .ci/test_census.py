#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Reads the output of `cargo test --workspace -- --show-output` and says, per host:

- how many of the host test binaries' tests ran for real (on real KVM, or on the
  stand-in for KVM where the host lacks in-place guest_memfd: `STAND-IN` lines) and how
  many skipped (`SKIPPED` lines), with the share that ran;
- whether every skip is covered elsewhere, and fails (exit 1) if one is not (doc tests
  and examples, whose output cargo does not show, are judged by their source: one that
  can say SKIPPED for want of guest_memfd must be in the lab's IN_PLACE_DOCTESTS or
  IN_PLACE_EXAMPLES):
  * a test skipped because this host's KVM lacks guest_memfd or its MMAP | INIT_SHARED
    flags must be run by the nested lab's in-place pass on 7.x: its binary must be in
    fixtures/lab/run.sh's IN_PLACE_TESTS, with a filter the test's name matches;
  * any other skip must match the pattern of skips the lab's dual pass covers
    (`--allowed`, from .ci/run).

usage: test_census.py LOG LAB_SCRIPT --allowed REGEX [--in-place LIST]
       test_census.py --probe     (one line: what this host's KVM offers)

`--in-place` replaces the lab's list ("package test [filter]" entries separated by ';'),
to show that the check fails when a binary is missing from it.
"""

import argparse
import glob
import os
import re
import shlex
import sys

# The reasons a skip may give for this host lacking what the in-place pass has.
GUEST_MEMFD_REASON = re.compile(r"KVM_CAP_GUEST_MEMFD|MMAP \| INIT_SHARED")


def lab_array(script, name):
    """The words of bash array `name` in the lab script (quoted entries stay whole)."""
    text = open(script, encoding="utf-8").read()
    match = re.search(r"^%s=\((.*?)\)\s*$" % re.escape(name), text, re.S | re.M)
    if not match:
        sys.exit(f"test_census: no {name}=( ... ) in {script}")
    return shlex.split(match.group(1), comments=True)


def lab_entries(script, name):
    """The entries of array `name` in the lab script: (package, test, filter)."""
    return [tuple((entry.split() + [""])[:3]) for entry in lab_array(script, name)]


def needs_guest_memfd(path):
    """Whether the doc examples or example program in `path` can say SKIPPED for want of
    guest_memfd."""
    text = open(path, encoding="utf-8").read()
    return re.search(r'println!\("SKIPPED: this example needs guest_memfd', text) is not None


def examples_outside_the_lab(top, script):
    """The doc tests and examples that can skip for want of guest_memfd and that the
    lab's in-place pass does not run: (what, why) pairs."""
    doctests = set(lab_array(script, "IN_PLACE_DOCTESTS"))
    examples = {tuple(e.split()[:2]) for e in lab_array(script, "IN_PLACE_EXAMPLES")}
    missing = []
    for manifest in glob.glob(os.path.join(top, "crates/*/Cargo.toml")):
        crate = os.path.dirname(manifest)
        name = re.search(r'^name = "([^"]+)"', open(manifest).read(), re.M).group(1)
        sources = glob.glob(os.path.join(crate, "src/**/*.rs"), recursive=True)
        if name not in doctests and any(needs_guest_memfd(f) for f in sources):
            missing.append((f"{name}'s doc tests", "not in the lab's IN_PLACE_DOCTESTS"))
        for example in glob.glob(os.path.join(crate, "examples/*.rs")):
            stem = os.path.splitext(os.path.basename(example))[0]
            if needs_guest_memfd(example) and (name, stem) not in examples:
                missing.append((f"{name}'s example {stem}", "not in the lab's IN_PLACE_EXAMPLES"))
    return missing


def package_of(test_file, top):
    """The workspace package whose tests/ holds `test_file` (e.g. tests/state.rs)."""
    found = []
    for manifest in glob.glob(os.path.join(top, "crates/*/Cargo.toml")) + [
        os.path.join(top, "integration/Cargo.toml")
    ]:
        crate = os.path.dirname(manifest)
        if os.path.exists(os.path.join(crate, test_file)):
            name = re.search(r'^name = "([^"]+)"', open(manifest).read(), re.M).group(1)
            found.append(name)
    if len(found) != 1:
        sys.exit(f"test_census: {test_file} is in {len(found)} packages ({found}): name it apart")
    return found[0]


def parse(log):
    """Per test binary: its tests and what each printed. Yields dicts."""
    binaries = []
    current = None
    section = None
    for raw in open(log, encoding="utf-8", errors="replace"):
        line = raw.rstrip("\n")
        m = re.match(r"\s+Running (?:unittests )?(\S+) \(", line)
        if m:
            current = {"source": m.group(1), "tests": {}, "output": {}}
            binaries.append(current)
            section = None
            continue
        if line.lstrip().startswith("Doc-tests "):
            current = None
            continue
        if current is None:
            continue
        m = re.match(r"test (\S+) \.\.\. (ok|FAILED|ignored)", line)
        if m:
            current["tests"][m.group(1)] = m.group(2)
            continue
        m = re.match(r"---- (\S+) stdout ----$", line)
        if m:
            section = m.group(1)
            current["output"].setdefault(section, [])
            continue
        if line in ("successes:", "failures:") or line.startswith("test result:"):
            section = None
            continue
        if section is not None:
            current["output"][section].append(line)
    return binaries


def probe():
    """One line: what this host's KVM offers, and so what the lab covers."""
    import fcntl

    kvm_check_extension, kvm_create_vm = 0xAE03, 0xAE01
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        vm = fcntl.ioctl(kvm, kvm_create_vm, 0)
    except OSError as e:
        return f"this host: no usable /dev/kvm ({e}); the lab covers every KVM test"

    def cap(number):
        try:
            return fcntl.ioctl(vm, kvm_check_extension, number)
        except OSError:
            return 0

    guest_memfd = cap(234) > 0
    in_place = guest_memfd and cap(244) & 3 == 3
    attributes = cap(233) & 8 != 0
    os.close(vm)
    os.close(kvm)
    yes = {True: "yes", False: "no"}
    covers = "the crates' kernel-facing tests (in-place pass) and the dual strategy"
    if in_place:
        covers = "the dual strategy (memory attributes, real exits) and the stock Linux boots"
    return (f"this host: guest_memfd {yes[guest_memfd]}, in-place (MMAP | INIT_SHARED) "
            f"{yes[in_place]}, memory attributes {yes[attributes]}; the lab covers {covers}"
            + ("" if in_place else "; crate logic runs here on the stand-in for KVM"))


def main():
    if sys.argv[1:] == ["--probe"]:
        print(probe())
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("lab_script")
    parser.add_argument("--allowed", required=True)
    parser.add_argument("--in-place")
    args = parser.parse_args()
    top = os.path.dirname(os.path.dirname(os.path.abspath(args.lab_script)))
    top = os.path.dirname(top)
    if args.in_place is not None:
        in_place = [tuple((e.split() + [""])[:3]) for e in args.in_place.split(";") if e.strip()]
    else:
        in_place = lab_entries(args.lab_script, "IN_PLACE_TESTS")
    allowed = re.compile(args.allowed)

    total = ran = stand_in = skipped = 0
    uncovered = []
    lab_binaries = set()
    for binary in parse(args.log):
        source = binary["source"]
        for test, result in binary["tests"].items():
            total += 1
            lines = binary["output"].get(test, [])
            skips = [l for l in lines if l.startswith("SKIPPED")]
            if not skips:
                ran += 1
                stand_in += any(l.startswith("STAND-IN") for l in lines)
                continue
            skipped += 1
            for skip in skips:
                if GUEST_MEMFD_REASON.search(skip):
                    if not source.startswith("tests/"):
                        uncovered.append((source, skip, "a unit test cannot run in the lab"))
                        continue
                    package = package_of(source, top)
                    stem = os.path.splitext(os.path.basename(source))[0]
                    if any(p == package and t == stem and f in test for p, t, f in in_place):
                        lab_binaries.add(f"{package} {stem}")
                    else:
                        uncovered.append(
                            (source, skip, f'"{package} {stem}" is not in the lab\'s IN_PLACE_TESTS (or its filter misses {test})')
                        )
                elif not allowed.search(skip):
                    uncovered.append((source, skip, "not a skip the lab's dual pass covers"))

    for what, why in examples_outside_the_lab(top, args.lab_script):
        uncovered.append((what, "may say SKIPPED for want of guest_memfd", why))

    share = 100.0 * ran / total if total else 0.0
    print(f"host tests: {total}; ran for real here: {ran} ({share:.1f}%), "
          f"{stand_in} of them on the stand-in for KVM; skipped: {skipped}")
    if lab_binaries:
        print("skipped here for want of guest_memfd, run by the lab's 7.x in-place pass: "
              + ", ".join(sorted(lab_binaries)))
    print("the lab's in-place pass also runs the doc tests of "
          + ", ".join(lab_array(args.lab_script, "IN_PLACE_DOCTESTS"))
          + " and the examples " + ", ".join(lab_array(args.lab_script, "IN_PLACE_EXAMPLES")))
    if uncovered:
        for source, skip, why in uncovered:
            print(f"UNCOVERED {source}: {skip}\n    {why}")
        print(f"test_census: {len(uncovered)} skips above run nowhere", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
