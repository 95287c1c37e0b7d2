//! The controller's HTTP API as the CLI calls it.

use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Why a call failed.
#[derive(Debug)]
pub enum Failure {
    /// The controller could not be reached.
    Unreachable(String),
    /// It answered with an error: the status and the contract's error body.
    Api {
        status: StatusCode,
        code: String,
        message: String,
        body: Value,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(why) => write!(f, "cannot reach the controller: {why}"),
            Failure::Api { code, message, .. } => write!(f, "{code}: {message}"),
        }
    }
}

impl Failure {
    /// An error answer: the contract's code and message from its body.
    fn from_answer(status: StatusCode, body: Value) -> Failure {
        let text = |key: &str| body["error"][key].as_str().map(str::to_owned);
        Failure::Api {
            status,
            code: text("code").unwrap_or_else(|| status.as_str().to_owned()),
            message: text("message").unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned()),
            body,
        }
    }
}

pub struct Api {
    client: reqwest::Client,
    url: String,
    token: String,
}

impl Api {
    pub fn new(url: &str, token: &str) -> Self {
        Api {
            client: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        }
    }

    /// One call; the answer's body (`null` for an empty one), or why not.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<(Value, reqwest::header::HeaderMap), Failure> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let answer = req.send().await.map_err(|e| Failure::Unreachable(e.to_string()))?;
        let status = answer.status();
        let headers = answer.headers().clone();
        let bytes = answer.bytes().await.map_err(|e| Failure::Unreachable(e.to_string()))?;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        if status.is_success() {
            return Ok((body, headers));
        }
        Err(Failure::from_answer(status, body))
    }

    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        Ok(self.call(Method::GET, path, &[], None).await?.0)
    }

    /// A Server-Sent Events stream.
    pub async fn events(&self, path: &str) -> Result<Events, Failure> {
        let answer = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        if !answer.status().is_success() {
            let status = answer.status();
            return Err(Failure::from_answer(status, answer.json().await.unwrap_or_default()));
        }
        Ok(Events {
            answer,
            buffer: String::new(),
        })
    }
}

/// Events read off an SSE answer: (event, data).
pub struct Events {
    answer: reqwest::Response,
    buffer: String,
}

impl Events {
    /// The next event, or `None` when the stream ends.
    pub async fn next(&mut self) -> Result<Option<(String, Value)>, Failure> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let field = |name: &str| {
                    frame
                        .lines()
                        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
                        .map(|v| v.trim().to_owned())
                };
                if let (Some(event), Some(data)) = (field("event"), field("data")) {
                    return Ok(Some((
                        event,
                        serde_json::from_str(&data).unwrap_or(Value::String(data)),
                    )));
                }
            }
            match self.answer.chunk().await {
                Ok(Some(chunk)) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(None) => return Ok(None),
                Err(e) => return Err(Failure::Unreachable(e.to_string())),
            }
        }
    }
}
