//! `recsys-scorer`: recommendations, scores and features over HTTP.

use clap::Parser;
use recsys_scorer::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    recsys_core::telemetry::init(&args.telemetry)?;
    recsys_scorer::run(args).await?;
    Ok(())
}
