//! `rust-fibonacci`: F(n), iteratively, in u64 (n <= 93; the schema says so
//! and the handler checks again, since a function must not trust its caller).

use fnrt_sdk::{Context, Error, export};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Params {
    n: u64,
    #[serde(default)]
    sequence: bool,
}

#[derive(Serialize)]
struct Answer {
    n: u64,
    value: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sequence: Option<Vec<u64>>,
}

fn fibonacci(params: Params, _context: Context) -> Result<Answer, Error> {
    if params.n > 93 {
        return Err(Error::invalid_params("n must be at most 93: F(94) does not fit in 64 bits"));
    }
    let mut seq = Vec::with_capacity(params.n as usize + 1);
    let (mut a, mut b) = (0u64, 1u64);
    for _ in 0..=params.n {
        seq.push(a);
        (a, b) = (b, a.saturating_add(b));
    }
    Ok(Answer {
        n: params.n,
        value: seq[params.n as usize],
        sequence: params.sequence.then_some(seq),
    })
}

export!(fibonacci);
