//! Each production store client reaches its real server: sqlx → Postgres, redis → Redis,
//! aws-sdk-s3 → the S3 server (path-style, both checksum modes).

use aws_sdk_s3::primitives::ByteStream;
use recsys_core::stores::{self, ChecksumMode, PostgresArgs, RedisArgs};
use recsys_tests::TestEnv;

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

#[tokio::test]
async fn postgres_round_trip() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let pool = stores::postgres(&PostgresArgs {
        url: env.var("RECSYS_TEST_DATABASE_URL")?.to_owned(),
        max_connections: 2,
    })
    .await?;
    // One transaction, rolled back: nothing is left behind, and every statement is static SQL
    // with bound parameters.
    let mut tx = pool.begin().await?;
    sqlx::query(
        "CREATE TEMP TABLE seam_check (id bigint PRIMARY KEY, name text NOT NULL) ON COMMIT DROP",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO seam_check VALUES ($1, $2), ($3, $4)")
        .bind(1_i64)
        .bind("view")
        .bind(2_i64)
        .bind("purchase")
        .execute(&mut *tx)
        .await?;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT name FROM seam_check WHERE id > $1 ORDER BY id")
            .bind(0_i64)
            .fetch_all(&mut *tx)
            .await?;
    tx.rollback().await?;
    assert_eq!(names, ["view", "purchase"]);
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await?;
    assert!(
        version.starts_with(|c: char| c.is_ascii_digit()),
        "{version}"
    );
    Ok(())
}

#[tokio::test]
async fn postgres_refusal_is_a_clear_error() -> anyhow::Result<()> {
    let err = stores::postgres(&PostgresArgs {
        url: "postgres://recsys:wrong-password@127.0.0.1:1/recsys".into(),
        max_connections: 1,
    })
    .await
    .expect_err("nothing listens on port 1");
    assert_eq!(err.kind(), "PostgresUnavailable");
    let text = err.to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("wrong-password"), "password leaked: {text}");
    Ok(())
}

#[tokio::test]
async fn redis_round_trip_with_ttl() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let mut conn = stores::redis(&RedisArgs {
        url: env.var("RECSYS_TEST_REDIS_URL")?.to_owned(),
    })
    .await?;
    let key = unique("seam:check");
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("0.75")
        .arg("EX")
        .arg(60)
        .query_async(&mut conn)
        .await?;
    let (value, ttl): (String, i64) = redis::pipe()
        .cmd("GET")
        .arg(&key)
        .cmd("TTL")
        .arg(&key)
        .query_async(&mut conn)
        .await?;
    let () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await?;
    assert_eq!(value, "0.75");
    assert!((1..=60).contains(&ttl), "ttl {ttl}");
    Ok(())
}

#[tokio::test]
async fn s3_round_trip_path_style_both_checksum_modes() -> anyhow::Result<()> {
    let env = TestEnv::load()?;
    let bucket = env.var("RECSYS_TEST_S3_BUCKET")?.to_owned();
    for checksums in [ChecksumMode::WhenSupported, ChecksumMode::WhenRequired] {
        let client = stores::s3(&env.s3_args(checksums)?).await?;
        let prefix = unique("seam-check");
        // 3 MiB: large enough that the SDK streams it with a trailing checksum when asked to.
        let body: Vec<u8> = (0..3 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
        let key = format!("{prefix}/factors.bin");
        client
            .put_object()
            .bucket(&bucket)
            .key(&key)
            .body(ByteStream::from(body.clone()))
            .send()
            .await?;
        let got = client.get_object().bucket(&bucket).key(&key).send().await?;
        let bytes = got.body.collect().await?.into_bytes();
        assert_eq!(bytes.len(), body.len(), "{checksums:?}: stored size");
        assert!(
            bytes.as_ref() == body.as_slice(),
            "{checksums:?}: content differs"
        );
        let listed = client
            .list_objects_v2()
            .bucket(&bucket)
            .prefix(&prefix)
            .send()
            .await?;
        let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
        assert_eq!(keys, [key.as_str()]);
        client
            .delete_object()
            .bucket(&bucket)
            .key(&key)
            .send()
            .await?;
        let missing = client.head_object().bucket(&bucket).key(&key).send().await;
        assert!(
            missing.is_err(),
            "{checksums:?}: object still there after delete"
        );
    }
    Ok(())
}
