use std::process::ExitCode;

use hydra_upgrade::{cli::Cli, exit};

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("hydra-upgrade: error: {err:#}");
            let code = exit::exit_of(&err);
            if let Some(hint) = exit::hint(code) {
                eprintln!("hydra-upgrade: hint: {hint}");
            }
            code.into()
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse_with_exit_codes();
    hydra_upgrade::run(cli).map(ExitCode::from)
}
