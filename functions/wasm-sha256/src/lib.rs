//! `wasm-sha256`: the SHA-256 of base64 input. Built for wasm32-wasip1, it
//! runs in a fresh wasmtime sandbox per execution: no files, no network, no
//! environment beyond its manifest's.

use base64::Engine as _;
use fnrt_sdk::{Context, Error, export};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct Params {
    data: String,
}

#[derive(Serialize)]
struct Answer {
    sha256: String,
    bytes: usize,
}

fn sha256(params: Params, _context: Context) -> Result<Answer, Error> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(params.data.as_bytes())
        .map_err(|e| Error::invalid_params(format!("'data' is not base64: {e}")))?;
    let digest = Sha256::digest(&bytes);
    let sha256 = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(Answer {
        sha256,
        bytes: bytes.len(),
    })
}

export!(sha256);
