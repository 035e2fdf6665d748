// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Assembles the guest programs in `fixtures/guest/*.S` into flat binaries with GNU as
//! and objcopy (binutils), so that `cargo build` always runs the sources as written.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {what} ({e}): install binutils (`apt-get install binutils`)")
    });
    assert!(status.success(), "{what} failed: {cmd:?}");
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let src_dir = manifest.join("../fixtures/guest");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", src_dir.display());

    let mut names = Vec::new();
    for entry in fs::read_dir(&src_dir).expect("fixtures/guest") {
        let path = entry.unwrap().path();
        println!("cargo:rerun-if-changed={}", path.display());
        if path.extension().and_then(|e| e.to_str()) != Some("S") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
        assemble(&path, &src_dir, &out_dir, &stem);
        names.push(stem);
    }
    names.sort();
    let mut table = String::new();
    for name in &names {
        table.push_str(&format!(
            "/// The guest program assembled from `fixtures/guest/{name}.S`.\n\
             pub const {}: &[u8] = include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{name}.bin\"));\n",
            name.to_uppercase()
        ));
    }
    fs::write(out_dir.join("programs.rs"), table).unwrap();
}

fn assemble(source: &Path, include: &Path, out_dir: &Path, stem: &str) {
    let object = out_dir.join(format!("{stem}.o"));
    let binary = out_dir.join(format!("{stem}.bin"));
    run(
        Command::new("as")
            .arg("--64")
            .arg("-I")
            .arg(include)
            .arg("-o")
            .arg(&object)
            .arg(source),
        "as",
    );
    run(
        Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&object)
            .arg(&binary),
        "objcopy",
    );
}
