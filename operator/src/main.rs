//! `recsys-operator`: reconciles ModelDeployment, BatchJob and FeatureDefinition.

use clap::Parser;
use recsys_operator::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    recsys_core::telemetry::init(&args.telemetry)?;
    recsys_operator::run(args).await
}
