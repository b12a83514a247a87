//! A client of the HTTP APIs (the hub's, and a worker's order API): token-authenticated
//! JSON over HTTP/1.1 or HTTPS (rustls), with no proxy (they are reached directly).

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection, or no answer in time.
    #[error("{url}: {source}")]
    Transport {
        /// What was called.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// An error answer.
    #[error("{url}: {status}: {message}")]
    Status {
        /// What was called.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The error it gave.
        message: String,
    },
}

/// A client of one API.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    /// A client of the API at `base` (e.g. `http://127.0.0.1:8600`) with `token`; calls
    /// give up after `timeout`. An `https` API's certificate must chain to the system's
    /// roots.
    pub fn new(base: &str, token: &str, timeout: Duration) -> Self {
        let http = Self::builder(timeout).build().unwrap_or_default();
        Self::over(base, token, http)
    }

    /// [`Client::new`], trusting the certificates in `ca` (PEM: the private CA that
    /// signed the API's certificate) besides the system's roots.
    pub fn trusting(
        base: &str,
        token: &str,
        timeout: Duration,
        ca: Option<&[u8]>,
    ) -> Result<Self, reqwest::Error> {
        let Some(ca) = ca else {
            return Ok(Self::new(base, token, timeout));
        };
        let mut builder = Self::builder(timeout);
        for certificate in reqwest::Certificate::from_pem_bundle(ca)? {
            builder = builder.add_root_certificate(certificate);
        }
        Ok(Self::over(base, token, builder.build()?))
    }

    /// Every client's settings: no proxy, and `timeout` per call.
    fn builder(timeout: Duration) -> reqwest::ClientBuilder {
        reqwest::Client::builder().no_proxy().timeout(timeout)
    }

    fn over(base: &str, token: &str, http: reqwest::Client) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
        }
    }

    /// The API's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        url: String,
    ) -> Result<T, ClientError> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<crate::model::ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Status {
                url,
                status: status.as_u16(),
                message,
            });
        }
        let body = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes
        };
        serde_json::from_slice(body).map_err(|e| ClientError::Status {
            url,
            status: status.as_u16(),
            message: format!("bad answer: {e}"),
        })
    }

    /// GET `path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.get(&url), url).await
    }

    /// POST `body` as JSON to `path`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.post(&url).json(body), url).await
    }

    /// POST `body` with its own time limit.
    pub async fn post_within<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.post(&url).json(body).timeout(timeout), url)
            .await
    }

    /// DELETE `path`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.delete(&url), url).await
    }
}

/// Clients of several servers of one API (the hubs sharing a registry): a call goes to
/// the one that answered last, and on to the next while one cannot be reached or
/// answers with a server error (a hub cut off from its registry answers 500). Any other
/// answer, an error included, is final.
#[derive(Debug)]
pub struct Failover {
    clients: Vec<Client>,
    current: std::sync::atomic::AtomicUsize,
}

impl Failover {
    /// Over `clients`, the first one first; `None` if there is none.
    pub fn new(clients: Vec<Client>) -> Option<Self> {
        if clients.is_empty() {
            return None;
        }
        Some(Self {
            clients,
            current: Default::default(),
        })
    }

    fn current(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Relaxed) % self.clients.len()
    }

    /// The base URL of the server calls go to now.
    pub fn base(&self) -> &str {
        self.clients[self.current()].base()
    }

    /// Every server's base URL.
    pub fn bases(&self) -> Vec<&str> {
        self.clients.iter().map(Client::base).collect()
    }

    /// Makes `call` on the current server, and on the next ones while a server cannot
    /// be reached.
    async fn call<'a, T, F>(&'a self, call: impl Fn(&'a Client) -> F) -> Result<T, ClientError>
    where
        F: std::future::Future<Output = Result<T, ClientError>>,
    {
        let first = self.current();
        let mut step = 0;
        loop {
            let index = (first + step) % self.clients.len();
            let result = call(&self.clients[index]).await;
            step += 1;
            let unserved = matches!(
                &result,
                Err(ClientError::Transport { .. }) | Err(ClientError::Status { status: 500.., .. })
            );
            match result {
                Err(e) if unserved && step < self.clients.len() => {
                    tracing::warn!("{e}: trying the next hub");
                }
                Err(e) if unserved => return Err(e),
                answered => {
                    if index != first {
                        tracing::info!(hub = self.clients[index].base(), "now talking to this hub");
                    }
                    self.current
                        .store(index, std::sync::atomic::Ordering::Relaxed);
                    return answered;
                }
            }
        }
    }

    /// POST `body` as JSON to `path`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(|client| client.post(path, body)).await
    }

    /// POST `body` with its own time limit.
    pub async fn post_within<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        self.call(|client| client.post_within(path, body, timeout))
            .await
    }
}
