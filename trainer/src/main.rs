//! `recsys-trainer`: one subcommand per batch job.

use clap::Parser;
use recsys_trainer::Cli;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = recsys_core::telemetry::init(&cli.telemetry) {
        eprintln!("recsys-trainer: {e}");
        std::process::exit(recsys_core::exit::NOT_RETRYABLE);
    }
    if let Err(e) = recsys_trainer::run(&cli.job).await {
        tracing::error!(
            job = cli.job.name(),
            kind = e.kind(),
            error = &e as &dyn std::error::Error,
            "job failed"
        );
        eprintln!("recsys-trainer {}: {e}", cli.job.name());
        std::process::exit(e.exit_code());
    }
}
