//! Puts libtorch's directory (from the torch wheel tch was built against) on the rpath of the
//! trainer's binaries and tests, so they run without LD_LIBRARY_PATH.
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
