//! `cargo run --release --bin bench -- --builds 100000 --runs 3`: the side-by-side
//! benchmark of BENCHMARKS.md. All of its logic is in `hydra_upgrade::bench`.

use clap::Parser;

fn main() {
    let args = hydra_upgrade::bench::BenchArgs::parse();
    if let Err(e) = hydra_upgrade::bench::main(&args) {
        eprintln!("bench failed: {e:#}");
        std::process::exit(1);
    }
}
