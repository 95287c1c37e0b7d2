//! Languages and Language-Titles.
//!
//! A Language-Title is `{language}-{title}`: the language is the part before
//! the first `-`, the title matches `[a-z0-9][a-z0-9-]{0,62}`. Parsing happens
//! once, at the edge, so a value that reaches a registry, a path or a command
//! line has already been checked.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The entrypoint of a function that is a Rust crate (its files arrive as
/// a tree, see `registry::manifest`).
pub const CRATE_ENTRYPOINT: &str = "Cargo.toml";

/// A language the controller can run functions in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Nodejs,
    Python,
    Rust,
    Wasm,
    /// A function whose body is other functions (`function::pipeline`).
    Pipeline,
}

impl Language {
    /// Every language, in the order `/health` reports them.
    pub const ALL: [Language; 5] = [
        Language::Nodejs,
        Language::Python,
        Language::Rust,
        Language::Wasm,
        Language::Pipeline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Nodejs => "nodejs",
            Language::Python => "python",
            Language::Rust => "rust",
            Language::Wasm => "wasm",
            Language::Pipeline => "pipeline",
        }
    }

    /// The file name a function's code gets when its manifest names none.
    pub fn default_entrypoint(self) -> &'static str {
        match self {
            Language::Nodejs => "index.js",
            Language::Python => "main.py",
            Language::Rust => CRATE_ENTRYPOINT,
            Language::Wasm => "module.wat",
            // A pipeline has no code: its manifest lists its steps.
            Language::Pipeline => "",
        }
    }

    /// File extensions an entrypoint of this language may have.
    pub fn entrypoint_extensions(self) -> &'static [&'static str] {
        match self {
            Language::Nodejs => &[".js", ".cjs"],
            Language::Python => &[".py"],
            Language::Rust => &[CRATE_ENTRYPOINT],
            // WAT text, a binary module as base64, or a Rust crate built
            // for wasm32-wasip1.
            Language::Wasm => &[".wat", ".wasm", CRATE_ENTRYPOINT],
            Language::Pipeline => &[],
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Language {
    type Err = TitleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Language::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| TitleError::UnknownLanguage(truncate(s)))
    }
}

/// Why a Language-Title was refused. The messages never echo more than a
/// short, printable prefix of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TitleError {
    #[error("Language-Title must look like '{{language}}-{{title}}', e.g. 'nodejs-calculator'")]
    Shape,
    #[error("unknown language '{0}'; known languages: nodejs, python, rust, wasm, pipeline")]
    UnknownLanguage(String),
    #[error("title must match [a-z0-9][a-z0-9-]{{0,62}}")]
    Title,
}

/// A checked `{language}-{title}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LanguageTitle {
    language: Language,
    full: String,
}

impl LanguageTitle {
    pub fn language(&self) -> Language {
        self.language
    }

    pub fn title(&self) -> &str {
        &self.full[self.language.as_str().len() + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl fmt::Display for LanguageTitle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl FromStr for LanguageTitle {
    type Err = TitleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The longest valid value is "nodejs-" + 63 characters; anything much
        // longer is refused before it is looked at further.
        if s.len() > 80 {
            return Err(TitleError::Shape);
        }
        let (language, title) = s.split_once('-').ok_or(TitleError::Shape)?;
        if language.is_empty() || !language.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(TitleError::Shape);
        }
        let language: Language = language.parse()?;
        if !valid_title(title) {
            return Err(TitleError::Title);
        }
        Ok(LanguageTitle {
            language,
            full: s.to_owned(),
        })
    }
}

fn valid_title(title: &str) -> bool {
    let bytes = title.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// A short, printable prefix of untrusted input, for error messages.
fn truncate(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic()).take(20).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_language_and_title() {
        let lt: LanguageTitle = "nodejs-calculator".parse().unwrap();
        assert_eq!(lt.language(), Language::Nodejs);
        assert_eq!(lt.title(), "calculator");
        let lt: LanguageTitle = "python-image-resize-2".parse().unwrap();
        assert_eq!(lt.language(), Language::Python);
        assert_eq!(lt.title(), "image-resize-2");
    }

    #[test]
    fn refuses_bad_titles() {
        for bad in [
            "",
            "nodejs",
            "nodejs-",
            "nodejs-Calc",
            "nodejs-../etc",
            "nodejs-a/b",
            "nodejs-a\r\nb",
            "nodejs-ä",
            "nodejs--x",
            "NODEJS-x",
            "cobol-x",
            "-x",
        ] {
            assert!(bad.parse::<LanguageTitle>().is_err(), "{bad:?} accepted");
        }
        let long = format!("nodejs-{}", "a".repeat(64));
        assert!(long.parse::<LanguageTitle>().is_err());
        let max = format!("nodejs-{}", "a".repeat(63));
        assert!(max.parse::<LanguageTitle>().is_ok());
    }

    #[test]
    fn unknown_language_message_is_short_and_printable() {
        let err = "c\u{1b}[31mobol-x".parse::<LanguageTitle>().unwrap_err();
        assert_eq!(err, TitleError::Shape);
        let err = "cobol-x".parse::<LanguageTitle>().unwrap_err();
        assert!(err.to_string().contains("'cobol'"));
    }
}
