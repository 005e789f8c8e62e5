//! Builds the eBPF programs (`port-trace-ebpf`) for the BPF target with the
//! nightly toolchain and bpf-linker, via aya-build; the object is embedded
//! in the binary.

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = format!("{manifest_dir}/../port-trace-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "port-trace-ebpf", root_dir: &root_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
