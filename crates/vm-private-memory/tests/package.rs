// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the published package offers a dependent: no cargo feature, so nothing a crate
//! elsewhere in a build can switch on changes this crate's behaviour.

use std::path::Path;

#[test]
fn the_package_has_no_features_for_a_dependent_to_enable() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let tables: Vec<&str> = manifest
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with('['))
        .collect();
    assert!(
        !tables.iter().any(|t| t.starts_with("[features")),
        "{tables:?}"
    );
    assert!(
        !manifest.contains("path = \".\""),
        "the crate does not depend on itself (as it did to enable a test feature)"
    );
    // Nor does the documentation offer a test seam.
    let mut dirs = vec![root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for seam in ["fault-injection", "inject_failure", "cfg(feature"] {
                assert!(!text.contains(seam), "{}: {seam}", path.display());
            }
        }
    }
}
