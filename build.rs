//! Compiles every bpf/*.c with clang and generates one libbpf-rs skeleton per program into OUT_DIR.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let include = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("include");
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok(other) => panic!("no vmlinux.h for target arch {other}"),
        Err(_) => panic!("cargo sets CARGO_CFG_TARGET_ARCH"),
    };

    let mut sources: Vec<PathBuf> = std::fs::read_dir("bpf")
        .expect("reading bpf/")
        .map(|entry| entry.expect("reading bpf/").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "c"))
        .collect();
    sources.sort();

    for source in &sources {
        let name = source.file_stem().unwrap().to_str().unwrap();
        // libbpf-cargo insists on a .bpf.c name; the layout (and `make`) keeps plain .c files.
        let staged = out_dir.join(format!("{name}.bpf.c"));
        std::fs::copy(source, &staged).expect("staging BPF source in OUT_DIR");
        SkeletonBuilder::new()
            .source(&staged)
            .obj(out_dir.join(format!("{name}.bpf.o")))
            .clang_args([
                format!("-I{}", include.display()),
                "-Wall".into(),
                "-Werror".into(),
                format!("-D__TARGET_ARCH_{arch}"),
            ])
            .build_and_generate(out_dir.join(format!("{name}.skel.rs")))
            .unwrap_or_else(|err| panic!("building {}: {err:#}", source.display()));
        println!("cargo:rerun-if-changed={}", source.display());
    }
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-changed=include");
}
