//! The `sanctum` command line: parses arguments, calls the `runner` and `attest` crates, prints.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(err) => {
            if cli::is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("sanctum: error: {}", cli::describe(&err));
            ExitCode::from(cli::exit_code_for(&err))
        }
    }
}
