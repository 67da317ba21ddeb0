//! [`S3Store`]: artifacts in an S3-compatible bucket.

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;

use super::ArtifactError;
use super::store::{ArtifactStore, Revision, Versioned, validate_key, validate_prefix};

/// Artifacts as objects of one bucket, key `a/b` at `<prefix>/a/b`.
///
/// The client comes from [`stores::s3`](crate::stores::s3), which sets the endpoint,
/// credentials, path-style addressing and checksum behaviour. A `PutObject` is atomic on S3,
/// so readers never see part of an object; conditional writes use `If-None-Match: *` and
/// `If-Match: <ETag>` (AWS S3 since 2024, SeaweedFS, MinIO).
#[derive(Clone, Debug)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

impl S3Store {
    /// A store in `bucket` under `prefix` (leading and trailing `/` are ignored; empty for the
    /// bucket's root). No request is sent.
    pub fn new(client: aws_sdk_s3::Client, bucket: impl Into<String>, prefix: &str) -> Self {
        Self {
            client,
            bucket: bucket.into(),
            prefix: prefix.trim_matches('/').to_owned(),
        }
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix, without slashes at either end.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn object_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn location(&self, object_key: &str) -> String {
        format!("s3://{}/{object_key}", self.bucket)
    }

    async fn read(
        &self,
        key: &str,
    ) -> Result<Option<(Vec<u8>, Option<String>, String)>, ArtifactError> {
        validate_key(key)?;
        let object_key = self.object_key(key);
        let location = self.location(&object_key);
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if status(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(s3_error("GetObject", location, e)),
        };
        let etag = out.e_tag().map(str::to_owned);
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| ArtifactError::S3 {
                op: "GetObject",
                location: location.clone(),
                message: format!("reading the body: {}", DisplayErrorContext(&e)),
                retryable: true,
            })?
            .into_bytes()
            .to_vec();
        Ok(Some((bytes, etag, location)))
    }
}

fn status<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

fn s3_error<E>(op: &'static str, location: String, err: SdkError<E, HttpResponse>) -> ArtifactError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    let retryable = match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => {
            matches!(status(&err), Some(408 | 429 | 500..=599))
                || matches!(
                    err.code(),
                    Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable")
                )
        }
        _ => false,
    };
    ArtifactError::S3 {
        op,
        location,
        message: DisplayErrorContext(&err).to_string(),
        retryable,
    }
}

#[async_trait]
impl ArtifactStore for S3Store {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArtifactError> {
        validate_key(key)?;
        let object_key = self.object_key(key);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| s3_error("PutObject", self.location(&object_key), e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ArtifactError> {
        Ok(self.read(key).await?.map(|(bytes, _, _)| bytes))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, ArtifactError> {
        validate_prefix(prefix)?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let full = format!("{strip}{prefix}");
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_error("ListObjectsV2", self.location(&full), e))?;
            for object in page.contents() {
                let Some(key) = object.key().and_then(|k| k.strip_prefix(&strip)) else {
                    continue;
                };
                // Objects this store cannot address (folder markers, `..`) are not artifacts.
                if validate_key(key).is_ok() {
                    keys.push(key.to_owned());
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<(), ArtifactError> {
        validate_key(key)?;
        let object_key = self.object_key(key);
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(s3_error("DeleteObject", self.location(&object_key), e)),
        }
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, ArtifactError> {
        let Some((bytes, etag, location)) = self.read(key).await? else {
            return Ok(None);
        };
        let etag = etag.ok_or_else(|| ArtifactError::S3 {
            op: "GetObject",
            location,
            message: "the response has no ETag, so the object cannot be updated safely".into(),
            retryable: false,
        })?;
        Ok(Some(Versioned {
            bytes,
            revision: Revision(etag),
        }))
    }

    async fn put_if(
        &self,
        key: &str,
        bytes: Vec<u8>,
        expected: Option<&Revision>,
    ) -> Result<(), ArtifactError> {
        validate_key(key)?;
        let object_key = self.object_key(key);
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .body(ByteStream::from(bytes));
        let request = match expected {
            None => request.if_none_match("*"),
            Some(revision) => request.if_match(&revision.0),
        };
        match request.send().await {
            Ok(_) => Ok(()),
            // 412: the precondition failed; 409: a concurrent conditional write won; 404: the
            // object expected at a revision is gone.
            Err(e) if matches!(status(&e), Some(409 | 412)) => Err(ArtifactError::Conflict {
                key: key.to_owned(),
                reason: if expected.is_none() {
                    "the object already exists"
                } else {
                    "the object changed since it was read"
                },
            }),
            Err(e) if expected.is_some() && status(&e) == Some(404) => {
                Err(ArtifactError::Conflict {
                    key: key.to_owned(),
                    reason: "the object no longer exists",
                })
            }
            Err(e) => Err(s3_error("PutObject", self.location(&object_key), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    #[test]
    fn keys_go_under_the_prefix() {
        let store = S3Store::new(client(), "b", "/runs/r1/");
        assert_eq!(store.prefix(), "runs/r1");
        assert_eq!(
            store.object_key("models/m/registry.json"),
            "runs/r1/models/m/registry.json"
        );
        assert_eq!(store.location("x"), "s3://b/x");
        let root = S3Store::new(client(), "b", "");
        assert_eq!(root.object_key("a"), "a");
    }
}
