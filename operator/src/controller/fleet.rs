//! Reads the scorer pods of a ModelDeployment the way the Service reaches them: the
//! EndpointSlices of `<name>-scorer` (ready and not-ready endpoints), then `GET /v1/status`
//! on each, concurrently, with a short timeout. A pod that does not answer is reported as
//! such; it never counts as having a version.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::BodyExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use recsys_core::serving::fleet::{Fleet, PodReport, ScorerStatus};

use super::Error;

/// Longest wait for one pod's status.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Path of the scorer's status.
pub const STATUS_PATH: &str = "/v1/status";

/// One endpoint of the Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Address and port.
    pub address: SocketAddr,
    /// The pod behind it, when the slice names it.
    pub pod: Option<String>,
    /// Whether it is ready.
    pub ready: bool,
}

/// The endpoints of Service `service` in `ns`, from every EndpointSlice labelled for it (those
/// the control plane maintains, and any a user added for scorers outside the cluster).
pub async fn endpoints(
    client: &kube::Client,
    ns: &str,
    service: &str,
    port_name: &str,
) -> Result<Vec<Endpoint>, Error> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .map_err(Error::Kube)?;
    let mut out = vec![];
    for slice in list.items {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port_name) || p.name.is_none())
            .and_then(|p| p.port)
        else {
            continue;
        };
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        for e in slice.endpoints {
            let conditions = e.conditions.unwrap_or_default();
            // Terminating endpoints leave; they do not decide a rollout.
            if conditions.terminating == Some(true) {
                continue;
            }
            let pod = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone());
            for ip in e.addresses {
                let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
                    continue;
                };
                out.push(Endpoint {
                    address: SocketAddr::new(ip, port),
                    pod: pod.clone(),
                    // Unset means ready (the API's convention).
                    ready: conditions.ready != Some(false),
                });
            }
        }
    }
    out.sort_by_key(|e| e.address);
    out.dedup_by_key(|e| e.address);
    Ok(out)
}

/// `GET path` on `address`, within [`STATUS_TIMEOUT`]: the body of a 200 answer.
pub async fn get(address: SocketAddr, path: &str) -> Result<hyper::body::Bytes, String> {
    get_from(&address.to_string(), path, STATUS_TIMEOUT).await
}

/// `GET path` (with its query) on `authority` (`host:port`, a name resolved through the
/// system's resolver), within `timeout`: the body of a 2xx answer.
pub async fn get_from(
    authority: &str,
    path: &str,
    timeout: Duration,
) -> Result<hyper::body::Bytes, String> {
    let call = async {
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header("host", authority)
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            let snippet: String = text.chars().take(300).collect();
            return Err(format!("{path} answered {status}: {snippet}"));
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// Reads every endpoint's `/v1/status`.
pub async fn observe(endpoints: &[Endpoint]) -> Fleet {
    let reads = endpoints.iter().map(|e| async move {
        let status = get(e.address, STATUS_PATH).await.and_then(|body| {
            serde_json::from_slice::<ScorerStatus>(&body)
                .map_err(|err| format!("{STATUS_PATH}: not a scorer status: {err}"))
        });
        PodReport {
            address: e.address.to_string(),
            pod: e.pod.clone(),
            ready: e.ready,
            status,
        }
    });
    Fleet {
        pods: futures::future::join_all(reads).await,
    }
}
