#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Reads the output of `cargo test --workspace -- --show-output` and says, per host:

- how many of the host test binaries' tests ran for real (at least 70%, or it fails) (on real KVM, or on the
  stand-in for KVM where the host lacks in-place guest_memfd: `STAND-IN` lines) and how
  many skipped (`SKIPPED` lines), with the share that ran;
- whether every skip is covered elsewhere, and fails (exit 1) if one is not (doc tests
  and examples, whose output cargo does not show, are judged by their source: one that
  can say SKIPPED for want of guest_memfd must be in the lab's IN_PLACE_DOCTESTS or
  IN_PLACE_EXAMPLES):
  * a test skipped because this host's KVM lacks guest_memfd or its MMAP | INIT_SHARED
    flags, or run here on the stand-in for KVM, must be run on real KVM by the nested
    lab's in-place pass on 7.x: its binary must be in fixtures/lab/run.sh's
    IN_PLACE_TESTS ("package lib" for unit tests), with a filter the test's name
    matches; on a host that has in-place guest_memfd, such a skip fails outright;
  * every skip reads `SKIPPED <test>: <what is missing>`, inside its test's output
    (a log without --show-output has none), and where this host lacks in-place
    guest_memfd at least one test says it ran on the stand-in;
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
# As `privmem probe` names them: KVM_CAP_GUEST_MEMFD (234), KVM_CAP_GUEST_MEMFD_FLAGS (244).
GUEST_MEMFD_REASON = re.compile(r"KVM_CAP_GUEST_MEMFD(_FLAGS)? \(\d+\)")
# What a skip line must look like, and the word that makes a line look like one.
SKIP_LINE = re.compile(r"^SKIPPED \S+: ")
SKIP_WORD = re.compile(r"\bskip", re.I)
# The least share of the host's tests that must run here (the rest in the lab).
MIN_SHARE = 70


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


def package_of_artifact(artifact, top):
    """The workspace package a unit-test binary (target/debug/deps/NAME-HASH) was built
    from: NAME is the crate's name, the package's with '_' for '-'."""
    crate = re.sub(r"-[0-9a-f]+$", "", os.path.basename(artifact))
    for manifest in glob.glob(os.path.join(top, "crates/*/Cargo.toml")) + glob.glob(
        os.path.join(top, "*/Cargo.toml")
    ):
        match = re.search(r'^name = "([^"]+)"', open(manifest).read(), re.M)
        if match and match.group(1).replace("-", "_") == crate:
            return match.group(1)
    sys.exit(f"test_census: no workspace package builds {artifact}")


def parse(log):
    """Per test binary: its tests and what each printed. Yields dicts."""
    binaries = []
    current = None
    section = None
    for raw in open(log, encoding="utf-8", errors="replace"):
        line = raw.rstrip("\n")
        m = re.match(r"\s+Running (?:unittests )?(\S+) \((\S+)\)", line)
        if m:
            current = {"source": m.group(1), "artifact": m.group(2), "tests": {},
                       "output": {}, "stray": []}
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
        elif line.startswith(("SKIPPED", "STAND-IN")):
            current["stray"].append(line)
    return binaries


def host_capabilities():
    """What this host's KVM offers a default-type VM: guest_memfd, in-place (MMAP |
    INIT_SHARED), memory attributes; all False without a usable /dev/kvm."""
    import fcntl

    kvm_check_extension, kvm_create_vm = 0xAE03, 0xAE01
    none = {"kvm": False, "guest_memfd": False, "in_place": False, "attributes": False}
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return dict(none, error=str(e))
    try:
        vm = fcntl.ioctl(kvm, kvm_create_vm, 0)
    except OSError as e:
        os.close(kvm)
        return dict(none, error=str(e))

    def cap(number):
        try:
            return fcntl.ioctl(vm, kvm_check_extension, number)
        except OSError:
            return 0

    guest_memfd = cap(234) > 0
    found = {"kvm": True, "guest_memfd": guest_memfd,
             "in_place": guest_memfd and cap(244) & 3 == 3, "attributes": cap(233) & 8 != 0}
    os.close(vm)
    # Memory attributes may belong to KVM_X86_SW_PROTECTED_VM (type 1) only.
    try:
        protected = fcntl.ioctl(kvm, kvm_create_vm, 1)
        vm = protected
        found["attributes"] = found["attributes"] or cap(233) & 8 != 0
        os.close(protected)
    except OSError:
        pass
    os.close(kvm)
    return found


def probe():
    """One line: what this host's KVM offers, and so what the lab covers."""
    host = host_capabilities()
    if not host["kvm"]:
        return f"this host: no usable /dev/kvm ({host['error']}); the lab covers every KVM test"
    yes = {True: "yes", False: "no"}
    covers = "the crates' kernel-facing tests (in-place pass) and the dual strategy"
    if host["in_place"]:
        covers = "the dual strategy (memory attributes, real exits) and the stock Linux boots"
    return (f"this host: guest_memfd {yes[host['guest_memfd']]}, in-place (MMAP | INIT_SHARED) "
            f"{yes[host['in_place']]}, memory attributes {yes[host['attributes']]}; the lab covers {covers}"
            + ("" if host["in_place"] else "; crate logic runs here on the stand-in for KVM"))


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
    # The dual pass, where the skips --allowed names must run.
    dual = lab_entries(args.lab_script, "OUR_TESTS")
    if args.in_place is not None:
        in_place = [tuple((e.split() + [""])[:3]) for e in args.in_place.split(";") if e.strip()]
    else:
        in_place = lab_entries(args.lab_script, "IN_PLACE_TESTS")
    allowed = re.compile(args.allowed)

    host = host_capabilities()
    total = ran = stand_in = skipped = ignored = 0
    uncovered = []
    lab_binaries = set()

    def in_lab(binary, test, kind, passes=None):
        """Whether the lab's in-place pass (or `passes`) runs `test` of `binary`; else an
        UNCOVERED entry saying why, for a test that `kind` (skipped, or met only the
        stand-in)."""
        entries = in_place if passes is None else passes
        source = binary["source"]
        if source.startswith("tests/"):
            package = package_of(source, top)
            stem = os.path.splitext(os.path.basename(source))[0]
        else:
            # Unit tests: "package lib" in the lab's list.
            package = package_of_artifact(binary["artifact"], top)
            stem = "lib"
        if any(p == package and t == stem and f in test for p, t, f in entries):
            if passes is None:
                lab_binaries.add(f"{package} {stem}")
            return True
        lists = "IN_PLACE_TESTS" if passes is None else "OUR_TESTS or IN_PLACE_TESTS"
        uncovered.append((source, f"{test} {kind}",
                          f'"{package} {stem}" is not in the lab\'s {lists} (or its filter misses {test})'))
        return False

    for binary in parse(args.log):
        source = binary["source"]
        for line in binary["stray"]:
            uncovered.append((source, line, "printed outside any test's output: was --show-output given?"))
        for test, result in binary["tests"].items():
            total += 1
            if result == "ignored":
                ignored += 1
                continue
            lines = binary["output"].get(test, [])
            for line in lines:
                if SKIP_WORD.search(line) and not SKIP_LINE.match(line):
                    uncovered.append((source, line, f"{test}: a skip must read 'SKIPPED <test>: <what is missing>'"))
            skips = [l for l in lines if l.startswith("SKIPPED")]
            if not skips:
                ran += 1
                if any(l.startswith("STAND-IN") for l in lines):
                    stand_in += 1
                    # Logic that met only the stand-in here meets the kernel in the lab.
                    in_lab(binary, test, "ran on the stand-in")
                continue
            skipped += 1
            for skip in skips:
                if GUEST_MEMFD_REASON.search(skip):
                    if host["in_place"]:
                        uncovered.append((source, skip, "this host has in-place guest_memfd: the test must run here"))
                    else:
                        in_lab(binary, test, "skipped")
                elif not allowed.search(skip):
                    uncovered.append((source, skip, "not a skip the lab's dual pass covers"))
                else:
                    in_lab(binary, test, "skipped", passes=dual + in_place)

    if total == 0:
        uncovered.append((args.log, "no test", "the log holds no test at all"))
    elif 100 * ran < MIN_SHARE * (total - ignored):
        uncovered.append((args.log, f"{ran} of {total - ignored} tests ran",
                          f"fewer than {MIN_SHARE}% of the host's tests ran here"))
    if not host["in_place"] and total and stand_in == 0:
        uncovered.append((args.log, "no STAND-IN line",
                          "this host lacks in-place guest_memfd, so the crates' logic tests must say they ran on the stand-in"))

    for what, why in examples_outside_the_lab(top, args.lab_script):
        uncovered.append((what, "may say SKIPPED for want of guest_memfd", why))

    share = 100.0 * ran / (total - ignored) if total > ignored else 0.0
    print(f"host tests: {total - ignored}; ran for real here: {ran} ({share:.1f}%), "
          f"{stand_in} of them on the stand-in for KVM; skipped: {skipped}"
          + (f"; ignored: {ignored}" if ignored else ""))
    if lab_binaries:
        print("skipped here for want of guest_memfd, or run here on the stand-in, and run on "
              "real KVM by the lab's 7.x in-place pass: "
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
