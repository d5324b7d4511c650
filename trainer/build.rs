//! Puts libtorch's directory (from the torch wheel tch was built against) on the rpath of the
//! trainer's binaries and tests, so they run without LD_LIBRARY_PATH; and compiles the c10d
//! shim (csrc/c10d_shim.cpp: torch.distributed's process groups for multi-process training)
//! against that wheel's headers, as tch builds its own shim.
//!
//! The shim needs Gloo's headers, which the torch wheel does not ship (Debian: libgloo-dev;
//! elsewhere set GLOO_INCLUDE). Without them the trainer builds without distributed training
//! and says so when a run asks for it. The `nccl` feature adds the NCCL process group (CUDA
//! torch wheel, nccl.h from the wheel's nvidia-nccl package or NCCL_INCLUDE).
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(reddino_c10d)");
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    for v in ["GLOO_INCLUDE", "NCCL_INCLUDE", "VIRTUAL_ENV"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    match c10d(Path::new(&lib)) {
        Ok(()) => println!("cargo:rustc-cfg=reddino_c10d"),
        // Asked for by name: a build without it would only fail later, on the cluster.
        Err(why) if std::env::var("CARGO_FEATURE_NCCL").is_ok() => {
            panic!("the `nccl` feature needs the c10d shim, which did not build: {why}")
        }
        Err(why) => println!(
            "cargo:warning=distributed training left out: {why} (Debian: apt install libgloo-dev)"
        ),
    }
}

fn c10d(lib: &Path) -> Result<(), String> {
    let gloo = std::env::var("GLOO_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/usr/include"));
    if !gloo.join("gloo/algorithm.h").is_file() {
        return Err(format!("no Gloo headers in {}", gloo.display()));
    }
    let (includes, abi) = torch_headers(lib)?;
    let mut b = cc::Build::new();
    b.cpp(true)
        .file("csrc/c10d_shim.cpp")
        .includes(&includes)
        .include(&gloo)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .define("USE_C10D_GLOO", None)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false);
    if std::env::var("CARGO_FEATURE_NCCL").is_ok() {
        let nccl = std::env::var("NCCL_INCLUDE").map(PathBuf::from).ok();
        if let Some(n) = nccl {
            b.include(n);
        }
        b.define("USE_C10D_NCCL", None).define("RD_C10D_NCCL", None);
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
    b.try_compile("reddino_c10d").map_err(|e| e.to_string())?;
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    Ok(())
}

/// libtorch's include directories (beside its lib directory, as the wheel lays them out) and
/// C++ ABI (asked of the python tch was built with: `python` in a venv, else `python3`).
fn torch_headers(lib: &Path) -> Result<(Vec<PathBuf>, String), String> {
    let root = lib
        .parent()
        .ok_or("libtorch's lib directory has no parent")?;
    let include = root.join("include");
    if !include
        .join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp")
        .is_file()
    {
        return Err(format!("no c10d headers under {}", include.display()));
    }
    let includes = vec![include.clone(), include.join("torch/csrc/api/include")];
    let python = match std::env::var_os("VIRTUAL_ENV") {
        Some(_) => "python",
        None => "python3",
    };
    let abi = Command::new(python)
        .args([
            "-c",
            "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "1".into());
    Ok((includes, abi))
}
