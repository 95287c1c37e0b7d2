//! `fnrt`, the client CLI, in the style of faas-cli and wsk: log in once,
//! deploy a function folder, invoke it, list, describe and remove
//! functions, from a terminal or a script.
//!
//! It is a second binary of this package (`src/bin/fnrt.rs`) rather than
//! subcommands of `controller`: users who only call a controller install
//! the client alone, and `controller`'s flags (a server's settings) stay
//! apart from a client's.
//!
//! # Layout
//!
//! - [`cli`]: the commands (clap), their human and `--json` output, and the
//!   exit codes.
//! - [`api`]: the HTTP calls, and the API's error body as a [`api::Failure`].
//! - [`login`]: where the URL and token are kept (a 0600 file).
//! - [`folder`]: a function folder read into a registration body.

pub mod api;
pub mod cli;
pub mod folder;
pub mod login;
