//! Logging set-up shared by every binary: `RUST_LOG` filter, text or JSON output.

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Telemetry options, flattened into each binary's arguments.
#[derive(Args, Clone, Debug)]
pub struct TelemetryArgs {
    /// Log format.
    #[arg(long, env = "RECSYS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax, for example `info,recsys_operator=debug`.
    #[arg(
        long,
        env = "RUST_LOG",
        default_value = "info,kube=warn,aws=warn,sqlx=warn"
    )]
    pub log_filter: String,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter string does not parse.
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        /// The filter given.
        filter: String,
        /// What the parser said.
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber is already installed.
    #[error("logging is already initialised: {0}")]
    AlreadySet(String),
}

impl TelemetryError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Filter { .. } => "InvalidLogFilter",
            Self::AlreadySet(_) => "LoggingAlreadySet",
        }
    }
}

/// Installs the global subscriber. Logs go to stderr: stdout is left to what a command
/// prints as its result (the trainer's JSON report), so a warning never corrupts it.
pub fn init(args: &TelemetryArgs) -> Result<(), TelemetryError> {
    let filter = EnvFilter::try_new(&args.log_filter).map_err(|source| TelemetryError::Filter {
        filter: args.log_filter.clone(),
        source,
    })?;
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| TelemetryError::AlreadySet(e.to_string()))
}
