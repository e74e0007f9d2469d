//! Compiles `proto/streamoasis/v1/tagger.proto` with a pure-Rust protobuf compiler (no `protoc`
//! needed) into the tonic service and prost messages, plus the encoded descriptor set that the
//! gRPC reflection service serves.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Embed libtorch's directory as an rpath so test binaries run without LD_LIBRARY_PATH.
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = root.join("streamoasis/v1/tagger.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("streamoasis_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
