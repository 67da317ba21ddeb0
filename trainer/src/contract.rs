//! The trainer's command line as the operator builds it from a `BatchJob`, beside the parser
//! that reads it. Typed options (`spec.backfill`, `spec.cfTrain`) become flags whose names are
//! read from the parser's own definitions, so a renamed flag breaks this module's tests, not a
//! user's Job; and [`check`] runs the whole command line through the real parser, so the
//! operator refuses a BatchJob whose parameters the trainer would refuse, before any Pod runs.

use clap::{Args, Command, CommandFactory, FromArgMatches};
use recsys_crds::batch_job::BatchJobSpec;

use crate::{Cli, cf, features};

/// Why a BatchJob's command line cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContractError {
    /// A parameter names a flag a typed field of the spec already sets.
    #[error("spec.parameters.{key}: set by {field}; remove the parameter")]
    OwnedByField {
        /// The parameter.
        key: String,
        /// The spec field that sets it.
        field: &'static str,
    },
    /// The trainer refuses the command line.
    #[error("the trainer refuses {args}: {message}")]
    Refused {
        /// The command line, without the program name.
        args: String,
        /// What the parser said (first line).
        message: String,
    },
    /// The parser has no flag this module writes (a broken build, caught by the tests).
    #[error("recsys-trainer {job} has no option {id}")]
    NoSuchOption {
        /// The subcommand.
        job: &'static str,
        /// The option's id.
        id: &'static str,
    },
}

/// `--<long>` of the option `id` of the arguments `A`.
fn flag<A: Args>(job: &'static str, id: &'static str) -> Result<String, ContractError> {
    A::augment_args(Command::new(job))
        .get_arguments()
        .find(|a| a.get_id() == id)
        .and_then(|a| a.get_long())
        .map(|long| format!("--{long}"))
        .ok_or(ContractError::NoSuchOption { job, id })
}

/// What the operator adds for one run, beyond the spec.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunOptions {
    /// `cf-train` with `spec.cfTrain.handOffTo`: the ModelDeployment's stable version to
    /// compare the new one against, and the least ratio of their offline NDCG that passes.
    pub compare_to: Option<(String, f64)>,
}

/// The typed options of `spec` as `(flag, value)`, each with the spec field that sets it.
fn typed(
    spec: &BatchJobSpec,
    options: &RunOptions,
) -> Result<Vec<(String, String, &'static str)>, ContractError> {
    let mut out = vec![];
    if let Some(b) = &spec.backfill {
        let job = "backfill";
        out.push((
            flag::<features::BackfillArgs>(job, "features")?,
            b.features.join(","),
            "spec.backfill.features",
        ));
        out.push((
            flag::<features::BackfillArgs>(job, "from")?,
            b.from.0.to_string(),
            "spec.backfill.from",
        ));
        out.push((
            flag::<features::BackfillArgs>(job, "to")?,
            b.to.0.to_string(),
            "spec.backfill.to",
        ));
    }
    if let Some(cf) = &spec.cf_train {
        // `handOffTo` is the operator's business: it reads what the run published.
        out.push((
            flag::<cf::TrainArgs>("cf-train", "model_name")?,
            cf.model.clone(),
            "spec.cfTrain.model",
        ));
        if let Some((version, ratio)) = &options.compare_to {
            out.push((
                flag::<cf::TrainArgs>("cf-train", "compare_to")?,
                version.clone(),
                "spec.cfTrain.handOffTo",
            ));
            out.push((
                flag::<cf::TrainArgs>("cf-train", "min_metric_ratio")?,
                ratio.to_string(),
                "spec.cfTrain.handOffTo",
            ));
        }
    }
    Ok(out)
}

/// The trainer's arguments for `spec`: the subcommand, `--key=value` per parameter (sorted),
/// then the typed options and those of the run. Refuses a parameter that a typed field sets.
pub fn args(spec: &BatchJobSpec, options: &RunOptions) -> Result<Vec<String>, ContractError> {
    // The flags a run may add are owned even when this run adds none.
    let owned = typed(
        spec,
        &RunOptions {
            compare_to: Some((String::new(), 1.0)),
        },
    )?;
    for key in spec.parameters.keys() {
        let as_flag = format!("--{key}");
        if let Some((_, _, field)) = owned.iter().find(|(f, _, _)| *f == as_flag) {
            return Err(ContractError::OwnedByField {
                key: key.clone(),
                field,
            });
        }
    }
    let typed = typed(spec, options)?;
    let mut args = vec![spec.job.as_str().to_owned()];
    args.extend(spec.parameters.iter().map(|(k, v)| format!("--{k}={v}")));
    args.extend(typed.into_iter().map(|(f, v, _)| format!("{f}={v}")));
    Ok(args)
}

/// Runs `args` through the trainer's parser without reading the environment (a trainer Pod's
/// environment is not the caller's), as the trainer will parse them.
pub fn parse(args: &[String]) -> Result<Cli, ContractError> {
    let refused = |message: String| ContractError::Refused {
        args: args.join(" "),
        message,
    };
    let matches = checking_command()
        .try_get_matches_from(std::iter::once("recsys-trainer".to_owned()).chain(args.to_vec()))
        .map_err(|e| refused(first_line(&e.to_string())))?;
    Cli::from_arg_matches(&matches).map_err(|e| refused(first_line(&e.to_string())))
}

/// The trainer's parser with every environment variable unbound: values in the caller's
/// environment would satisfy or break options that a Pod gets otherwise.
fn checking_command() -> Command {
    Cli::command()
        .mut_args(|a| a.env(None))
        .mut_subcommands(|sub| sub.mut_args(|a| a.env(None)))
}

/// [`args`], checked by [`parse`].
pub fn check(spec: &BatchJobSpec, options: &RunOptions) -> Result<Vec<String>, ContractError> {
    let args = args(spec, options)?;
    parse(&args)?;
    Ok(args)
}

fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Job;
    use recsys_crds::JobKind;

    fn spec(yaml: &str) -> BatchJobSpec {
        serde_yaml::from_str(yaml).expect("spec")
    }

    /// Every job kind, with every typed option its kind allows set, parses as that job with
    /// those values.
    #[test]
    fn every_kind_with_every_typed_option_parses() {
        for kind in JobKind::ALL {
            let mut s = spec(&format!("job: {}", kind.as_str()));
            match kind {
                JobKind::Backfill => {
                    s = spec(
                        "{job: backfill, backfill: {features: [popularity_score, freshness_score@2], from: '2026-01-01T00:00:00Z', to: '2026-02-01T00:00:00Z'}}",
                    )
                }
                JobKind::CfTrain => {
                    s = spec(
                        "{job: cf-train, cfTrain: {model: shop-als, handOffTo: shop}, parameters: {factors: '32'}}",
                    )
                }
                _ => {}
            }
            let options = RunOptions {
                compare_to: (kind == JobKind::CfTrain).then(|| ("20261201-0300".into(), 0.98)),
            };
            let args = check(&s, &options).unwrap_or_else(|e| panic!("{}: {e}", kind.as_str()));
            let cli = parse(&args).expect("parsed once already");
            assert_eq!(cli.job.name(), kind.as_str());
            match cli.job {
                Job::Backfill(b) => {
                    assert_eq!(b.features, ["popularity_score", "freshness_score@2"]);
                    assert_eq!(b.from.as_deref(), Some("2026-01-01T00:00:00Z"));
                    assert_eq!(b.to.as_deref(), Some("2026-02-01T00:00:00Z"));
                }
                Job::CfTrain(t) => {
                    assert_eq!((t.model_name.as_str(), t.model.factors), ("shop-als", 32));
                    assert_eq!(t.compare_to.as_deref(), Some("20261201-0300"));
                    assert_eq!(t.min_metric_ratio, 0.98);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn parameters_the_trainer_refuses_are_refused_with_its_message() {
        let none = RunOptions::default();
        let err =
            check(&spec("{job: popularity, parameters: {windw: 90d}}"), &none).expect_err("typo");
        let ContractError::Refused { args, message } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(args, "popularity --windw=90d");
        assert!(message.contains("--windw"), "{message}");
        // A typed field owns its flag.
        let err = check(
            &spec("{job: cf-train, cfTrain: {model: als}, parameters: {model-name: other}}"),
            &none,
        )
        .expect_err("owned");
        assert_eq!(
            err.to_string(),
            "spec.parameters.model-name: set by spec.cfTrain.model; remove the parameter"
        );
        // So are the flags a run adds, even when this one adds none.
        let err = check(
            &spec("{job: cf-train, cfTrain: {model: als}, parameters: {compare-to: v1}}"),
            &none,
        )
        .expect_err("owned");
        assert!(
            err.to_string().contains("set by spec.cfTrain.handOffTo"),
            "{err}"
        );
    }

    /// The trainer's own environment does not leak into the check: a value the Pod gets from
    /// its ConfigMap is not required of the caller, and a broken one of the caller's does not
    /// fail it. The parser the check uses reads no variable at all, while the trainer's does.
    #[test]
    fn the_check_reads_no_environment() {
        let env_args = |c: &Command| -> Vec<String> {
            c.get_arguments()
                .chain(c.get_subcommands().flat_map(|s| s.get_arguments()))
                .filter(|a| a.get_env().is_some())
                .map(|a| a.get_id().to_string())
                .collect()
        };
        assert!(
            env_args(&Cli::command()).contains(&"database_url".to_owned()),
            "the trainer reads its stores from the environment"
        );
        assert_eq!(env_args(&checking_command()), Vec::<String>::new());
    }

    #[test]
    fn flags_come_from_the_parser() {
        assert_eq!(
            flag::<cf::TrainArgs>("cf-train", "model_name").as_deref(),
            Ok("--model-name")
        );
        assert_eq!(
            flag::<cf::TrainArgs>("cf-train", "no_such"),
            Err(ContractError::NoSuchOption {
                job: "cf-train",
                id: "no_such"
            })
        );
    }
}
