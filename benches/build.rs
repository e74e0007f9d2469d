// Embed libtorch's directory as an rpath so the bench binaries run without LD_LIBRARY_PATH.
//
// With the `cuda` feature (scripts/gpu-bench), link libtorch_cuda and c10_cuda even though no
// symbol of theirs is referenced: without them loaded, libtorch registers no CUDA backend.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let dir = std::env::var("DEP_TCH_LIBTORCH_LIB").ok();
    if let Some(dir) = &dir {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        match &dir {
            Some(dir) if std::path::Path::new(dir).join("libtorch_cuda.so").exists() => {
                println!("cargo:rustc-link-arg=-L{dir}");
                println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-lc10_cuda,--as-needed");
            }
            _ => println!(
                "cargo:warning=feature `cuda`: libtorch_cuda.so not found next to libtorch ({}); building a CPU-only binary",
                dir.as_deref().unwrap_or("DEP_TCH_LIBTORCH_LIB unset")
            ),
        }
    }
}
