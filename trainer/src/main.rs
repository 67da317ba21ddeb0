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
    let started = std::time::Instant::now();
    match recsys_trainer::run(&cli.job).await {
        Ok(summary) => recsys_trainer::write_summary(&summary),
        Err(e) => {
            tracing::error!(
                job = cli.job.name(),
                kind = e.kind(),
                error = &e as &dyn std::error::Error,
                "job failed"
            );
            eprintln!("recsys-trainer {}: {e}", cli.job.name());
            let seconds = started.elapsed().as_secs_f64();
            recsys_trainer::write_summary(&recsys_trainer::failure_summary(&cli.job, &e, seconds));
            std::process::exit(e.exit_code());
        }
    }
}
