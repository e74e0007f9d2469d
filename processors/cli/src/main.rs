//! `streamoasis`: one binary, one subcommand per job. `main` only parses and calls `run`.

use clap::Parser;

mod cli;
mod cmd;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Signals are handled from here on: a SIGTERM during start-up (model load, connections) stops
    // the process cleanly instead of killing it mid-way.
    match rt.block_on(async {
        let shutdown = cmd::shutdown_on_signal();
        cmd::run(args, shutdown).await
    }) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
