use std::process::ExitCode;

use hydra_upgrade::{cli::Cli, exit};

fn main() -> ExitCode {
    let cli = Cli::parse_with_exit_codes();
    let json = cli.global.json;
    match run(cli) {
        Ok(code) => code,
        Err(err) => exit::report(&err, json).into(),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    hydra_upgrade::run(cli).map(ExitCode::from)
}
