//! The scorer's command line: `--help` documents every option with its environment variable
//! and never shows a credential's value taken from the environment.

#[test]
fn help_never_shows_a_credential_from_the_environment() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_recsys-scorer"))
        .arg("--help")
        .env(
            "RECSYS_DATABASE_URL",
            "postgres://recsys:hunter22@db/recsys",
        )
        .env("RECSYS_REDIS_URL", "redis://:hunter22@cache:6379/0")
        .env("AWS_SECRET_ACCESS_KEY", "hunter22")
        .env("AWS_ACCESS_KEY_ID", "AKIAHUNTER22")
        .output()
        .expect("recsys-scorer --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for option in [
        "RECSYS_DATABASE_URL",
        "RECSYS_REDIS_URL",
        "RECSYS_SCORER_AUTH_TOKENS_DIR",
        "RECSYS_SCORER_MAX_CONCURRENCY",
        "RECSYS_SCORER_SHUTDOWN_DELAY",
    ] {
        assert!(text.contains(option), "{option} is not documented:\n{text}");
    }
    assert!(
        !text.contains("hunter22") && !text.contains("HUNTER22"),
        "--help shows a credential:\n{text}"
    );
}
