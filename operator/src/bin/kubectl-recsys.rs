//! `kubectl-recsys`: the `kubectl recsys` plugin (status, promote, abort, retry, undo, history).

use clap::Parser;
use recsys_operator::plugin::{PluginArgs, run};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = PluginArgs::parse();
    let mut out = String::new();
    let result = run(args, &mut out).await;
    print!("{out}");
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
