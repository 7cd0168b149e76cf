//! `sanctum hw detect`: this machine as a hardware profile (`hardware-profiles/*.toml`).

use std::io::Write as _;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use runner::hardware;

use super::bench::build_features;

#[derive(Debug, Subcommand)]
pub enum HwCommand {
    /// Print this machine as a hardware profile (TOML), to save under hardware-profiles/.
    Detect(DetectArgs),
}

#[derive(Debug, Args)]
pub struct DetectArgs {
    /// The profile's name [default: the CPU's name and core count].
    #[arg(long)]
    name: Option<String>,
    /// Skip the memory-bandwidth measurement (about a second, 512 MiB).
    #[arg(long)]
    no_bandwidth: bool,
}

pub fn run(cmd: HwCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        HwCommand::Detect(args) => {
            let profile =
                hardware::detect(args.name.as_deref(), &build_features(), !args.no_bandwidth);
            std::io::stdout()
                .lock()
                .write_all(profile.to_toml().as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
