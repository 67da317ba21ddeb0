//! Where check results are kept: the Postgres table `data_quality_results`, one row per check
//! per run (migration `0004`), written in one statement per run.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{CheckResult, CheckType, QualityReport, Verdict};

/// Stores every result of `report` (a run already stored is replaced check by check).
pub async fn store(pool: &PgPool, report: &QualityReport) -> Result<u64, sqlx::Error> {
    let at: DateTime<Utc> = DateTime::parse_from_rfc3339(&report.at)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|_| Utc::now());
    let r = &report.results;
    let col = |f: &dyn Fn(&CheckResult) -> String| r.iter().map(f).collect::<Vec<String>>();
    let done = sqlx::query(
        "INSERT INTO data_quality_results
           (run_id, job, check_name, check_type, target, observed, threshold, verdict, blocking, message, checked_at)
         SELECT $1, $2, c, t, g, o, th, v, b, m, $3
         FROM UNNEST($4::text[], $5::text[], $6::text[], $7::float8[], $8::float8[], $9::text[], $10::bool[], $11::text[])
              AS x(c, t, g, o, th, v, b, m)
         ON CONFLICT (run_id, check_name, target) DO UPDATE SET
           observed = EXCLUDED.observed, threshold = EXCLUDED.threshold, verdict = EXCLUDED.verdict,
           blocking = EXCLUDED.blocking, message = EXCLUDED.message, checked_at = EXCLUDED.checked_at",
    )
    .bind(&report.run_id)
    .bind(&report.job)
    .bind(at)
    .bind(col(&|c| c.check.clone()))
    .bind(col(&|c| c.check_type.as_str().to_owned()))
    .bind(col(&|c| c.target.clone()))
    // Postgres double precision holds infinities; NaN is kept out.
    .bind(r.iter().map(|c| c.observed.filter(|v| !v.is_nan())).collect::<Vec<_>>())
    .bind(r.iter().map(|c| c.threshold.filter(|v| !v.is_nan())).collect::<Vec<_>>())
    .bind(col(&|c| c.verdict.as_str().to_owned()))
    .bind(r.iter().map(|c| c.blocking).collect::<Vec<_>>())
    .bind(col(&|c| c.message.clone()))
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// A stored result with its run.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResult {
    /// The run.
    pub run_id: String,
    /// The job that ran it.
    pub job: String,
    /// When.
    pub checked_at: DateTime<Utc>,
    /// The result.
    pub result: CheckResult,
}

type Row = (
    String,
    String,
    String,
    String,
    String,
    Option<f64>,
    Option<f64>,
    String,
    bool,
    String,
    DateTime<Utc>,
);

fn check_type(s: &str) -> CheckType {
    CheckType::ALL
        .into_iter()
        .find(|t| t.as_str() == s)
        .unwrap_or(CheckType::Schema)
}

fn verdict(s: &str) -> Verdict {
    Verdict::ALL
        .into_iter()
        .find(|v| v.as_str() == s)
        .unwrap_or(Verdict::Skipped)
}

fn stored(row: Row) -> StoredResult {
    let (run_id, job, check, ty, target, observed, threshold, v, blocking, message, checked_at) =
        row;
    StoredResult {
        run_id,
        job,
        checked_at,
        result: CheckResult {
            check,
            check_type: check_type(&ty),
            target,
            observed,
            threshold,
            verdict: verdict(&v),
            blocking,
            message,
        },
    }
}

/// The latest result of every check on `target`, by check name.
pub async fn latest(pool: &PgPool, target: &str) -> Result<Vec<StoredResult>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT DISTINCT ON (check_name) run_id, job, check_name, check_type, target, observed,
                threshold, verdict, blocking, message, checked_at
         FROM data_quality_results WHERE target = $1
         ORDER BY check_name, checked_at DESC",
    )
    .bind(target)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(stored).collect())
}

/// Every result of one run, by check name.
pub async fn run(pool: &PgPool, run_id: &str) -> Result<Vec<StoredResult>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT run_id, job, check_name, check_type, target, observed, threshold, verdict,
                blocking, message, checked_at
         FROM data_quality_results WHERE run_id = $1 ORDER BY target, check_name",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(stored).collect())
}
