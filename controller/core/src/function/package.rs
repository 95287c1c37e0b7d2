//! Multi-file functions ("packages"): a Node or Python function registered
//! as a map of relative paths to contents (`files`, or an unpacked archive)
//! instead of one source file.
//!
//! The stored form is the map as JSON (the version's `code`), so the
//! database stays the one source of truth on every replica; a backend writes
//! the files out once per version ([`PackageFiles::bytes`]) and shows them to
//! the instances of that version only.
//!
//! # Layout
//! - [`FileContent`]: one file, text or `{"base64": ...}`.
//! - [`PackageLimits`]: how many files and bytes a package may hold.
//! - [`check_package`]: parses the stored form and checks every path, the
//!   limits and the entrypoint.
//! - [`DependencyFiles`]: what a package asks to install, and its key.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::manifest::{ManifestError, valid_file_name};
use crate::language::Language;

/// Default most files in a package (`MAX_PACKAGE_FILES`).
pub const DEFAULT_MAX_FILES: usize = 256;
/// Default most bytes of a package, unpacked (`MAX_PACKAGE_MB`).
pub const DEFAULT_MAX_BYTES: u64 = 50 * 1024 * 1024;
/// Deepest path in a package (`a/b/c/d/e/f/g/h.py`).
pub const MAX_DEPTH: usize = 8;

/// One file of a package: UTF-8 text, or any bytes as base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum FileContent {
    Text(String),
    Binary {
        /// Standard base64 of the file's bytes.
        base64: String,
    },
}

impl FileContent {
    /// The file's bytes; an error names what is wrong with the base64.
    pub fn bytes(&self) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        match self {
            FileContent::Text(text) => Ok(text.as_bytes().into()),
            FileContent::Binary { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64.trim())
                .map(Into::into)
                .map_err(|e| format!("is not valid base64: {e}")),
        }
    }

    /// Bytes that are UTF-8 are kept as text (readable in the stored form),
    /// the rest as base64.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        match String::from_utf8(bytes) {
            Ok(text) => FileContent::Text(text),
            Err(e) => FileContent::Binary {
                base64: base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
            },
        }
    }
}

/// A package's files: relative path -> content.
pub type PackageFiles = BTreeMap<String, FileContent>;

/// How large a package may be (configurable on the controller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackageLimits {
    pub max_files: usize,
    /// Unpacked bytes, all files together.
    pub max_bytes: u64,
}

impl Default for PackageLimits {
    fn default() -> Self {
        PackageLimits {
            max_files: DEFAULT_MAX_FILES,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// The stored form of a package's files.
pub fn package_code(files: &PackageFiles) -> String {
    serde_json::to_string(files).unwrap_or_default()
}

/// Checks a relative path of a package or an archive entry: parts of
/// `[A-Za-z0-9_.-]`, none `.` or `..`, none starting with `.` but a few
/// well-known dotfiles, at most [`MAX_DEPTH`] deep.
pub fn check_path(path: &str) -> Result<(), String> {
    let shown = path.chars().take(80).collect::<String>();
    let parts: Vec<&str> = path.split('/').collect();
    if path.starts_with('/') {
        return Err(format!("{shown:?} is an absolute path"));
    }
    if parts.contains(&"..") {
        return Err(format!("{shown:?} leaves the package ('..')"));
    }
    if parts.len() > MAX_DEPTH {
        return Err(format!("{shown:?} is deeper than {MAX_DEPTH} directories"));
    }
    if let Some(bad) = parts
        .iter()
        .find(|p| !valid_file_name(p) || (p.starts_with('.') && !allowed_dotfile(p)))
    {
        return Err(format!(
            "{shown:?} has a part {:?} that is not 1-64 of [A-Za-z0-9_.-] (not starting with '.')",
            bad.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

fn allowed_dotfile(name: &str) -> bool {
    matches!(name, ".npmrc" | ".gitignore" | ".nvmrc" | ".python-version")
}

/// Why a package was refused.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// A bad path, bad base64, a missing entrypoint.
    #[error(transparent)]
    Invalid(#[from] ManifestError),
    /// More files or bytes than [`PackageLimits`] allow.
    #[error("{0}")]
    TooLarge(String),
}

/// Parses and checks a package's stored form: paths, limits, and that the
/// entrypoint is one of its files (for Python, importable as a module:
/// every directory on its path and its stem an identifier).
pub fn check_package(
    code: &str,
    language: Language,
    entrypoint: &str,
    limits: PackageLimits,
) -> Result<PackageFiles, PackageError> {
    let invalid = |m: String| PackageError::Invalid(ManifestError(m));
    let files: PackageFiles = serde_json::from_str(code)
        .map_err(|_| invalid("'files' must map relative paths to text or {\"base64\": \"...\"}".into()))?;
    if files.is_empty() {
        return Err(invalid("'files' must not be empty".into()));
    }
    if files.len() > limits.max_files {
        return Err(PackageError::TooLarge(format!(
            "the package has {} files; at most {} are allowed (MAX_PACKAGE_FILES)",
            files.len(),
            limits.max_files
        )));
    }
    let mut total: u64 = 0;
    for (path, content) in &files {
        check_path(path).map_err(|m| invalid(format!("'files' path {m}")))?;
        let bytes = content.bytes().map_err(|m| invalid(format!("'files.{path}' {m}")))?;
        total += bytes.len() as u64;
        if total > limits.max_bytes {
            return Err(PackageError::TooLarge(format!(
                "the package is larger than {} bytes unpacked (MAX_PACKAGE_MB)",
                limits.max_bytes
            )));
        }
        // A path that is both a file and a directory (`a` and `a/b`).
        let dir = format!("{path}/");
        if files
            .range(dir.clone()..)
            .next()
            .is_some_and(|(p, _)| p.starts_with(&dir))
        {
            return Err(invalid(format!(
                "'files' has {path:?} both as a file and as a directory"
            )));
        }
    }
    if !files.contains_key(entrypoint) {
        let listed: Vec<&str> = files.keys().map(String::as_str).take(10).collect();
        return Err(invalid(format!(
            "'entrypoint' {entrypoint:?} is not one of the package's files ({})",
            listed.join(", ")
        )));
    }
    if language == Language::Python {
        let module = entrypoint.trim_end_matches(".py");
        if !module.split('/').all(is_identifier) {
            return Err(invalid(format!(
                "'entrypoint' {entrypoint:?} must be importable as a Python module: every directory and \
                 the file name (without .py) an identifier"
            )));
        }
    }
    Ok(files)
}

fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Names a function folder's walk skips: the manifest, hidden files, and
/// what tools leave behind (installed dependencies are installed again).
fn skipped(relative: &str, name: &str) -> bool {
    (name.starts_with('.') && !allowed_dotfile(name))
        || matches!(relative, "function.json" | "target")
        || matches!(name, "node_modules" | "__pycache__")
}

/// The files of a function folder (`functions/NAME`, `fnrt deploy DIR`)
/// as a package: every file but `function.json`, hidden ones, `target/`,
/// `node_modules/` and `__pycache__/`. `None` when the folder holds only
/// its manifest and `entrypoint`: a one-file function.
pub fn read_folder(
    dir: &std::path::Path,
    entrypoint: &str,
    limits: PackageLimits,
) -> std::io::Result<Option<PackageFiles>> {
    let too_many = || std::io::Error::other(format!("more than {} files in {}", limits.max_files, dir.display()));
    let mut files = PackageFiles::new();
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let relative = path
                .strip_prefix(dir)
                .map_err(std::io::Error::other)?
                .to_string_lossy()
                .into_owned();
            if skipped(&relative, &name) {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                let bytes = std::fs::read(&path)?;
                total += bytes.len() as u64;
                if total > limits.max_bytes {
                    return Err(std::io::Error::other(format!(
                        "{} holds more than {} bytes",
                        dir.display(),
                        limits.max_bytes
                    )));
                }
                files.insert(relative, FileContent::from_bytes(bytes));
                if files.len() > limits.max_files {
                    return Err(too_many());
                }
            }
        }
    }
    if files.len() == 1 && files.contains_key(entrypoint) {
        return Ok(None);
    }
    Ok(Some(files))
}

/// What a package asks to install: a `requirements.txt` at the root of a
/// Python package with a requirement in it, or a `package.json` with
/// `dependencies` (and its lock file) at the root of a Node one, with the
/// files under `vendor/` they may name by path. Computed once per version;
/// a backend installs it (`fnrt_backends::deps`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependencyFiles {
    pub language: Language,
    /// (file name, contents), in a fixed order.
    pub files: Vec<(String, Vec<u8>)>,
    /// Whether the dependencies' own install code may run (`install.scripts`).
    pub scripts: bool,
    /// [`Self::key`], computed once: initializes ask for it.
    key: String,
}

impl DependencyFiles {
    /// What `files` asks to install, if anything.
    pub fn of(language: Language, files: &PackageFiles, scripts: bool) -> Option<Self> {
        let read = |name: &str| files.get(name).and_then(|c| c.bytes().ok()).map(|b| b.into_owned());
        let wanted: Vec<(String, Vec<u8>)> = match language {
            Language::Python => {
                let requirements = read("requirements.txt")?;
                let text = String::from_utf8_lossy(&requirements);
                let any = text.lines().any(|l| {
                    let l = l.trim();
                    !l.is_empty() && !l.starts_with('#')
                });
                if !any {
                    return None;
                }
                vec![("requirements.txt".into(), requirements)]
            }
            Language::Nodejs => {
                let manifest = read("package.json")?;
                let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap_or_default();
                if parsed["dependencies"].as_object().is_none_or(|d| d.is_empty()) {
                    return None;
                }
                let mut wanted = vec![("package.json".to_owned(), manifest)];
                for lock in ["package-lock.json", "npm-shrinkwrap.json"] {
                    if let Some(bytes) = read(lock) {
                        wanted.push((lock.to_owned(), bytes));
                    }
                }
                wanted
            }
            _ => return None,
        };
        // Vendored packages (wheels, sdists, npm tarballs) the dependency
        // files may name by path (`./vendor/x.tar.gz`, `file:vendor/x.tgz`).
        let mut wanted = wanted;
        for (path, content) in files.range("vendor/".to_owned()..) {
            if !path.starts_with("vendor/") {
                break;
            }
            wanted.push((
                path.clone(),
                content.bytes().map(|b| b.into_owned()).unwrap_or_default(),
            ));
        }
        let key = install_key(language, scripts, &wanted);
        Some(DependencyFiles {
            language,
            files: wanted,
            scripts,
            key,
        })
    }

    /// The install's key: the language, the switch and every file; the
    /// same for every function and version that asks for the same set.
    pub fn key(&self) -> &str {
        &self.key
    }
}

fn install_key(language: Language, scripts: bool, files: &[(String, Vec<u8>)]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!("deps-v1\0{language}\0{scripts}\0"));
    for (name, bytes) in files {
        h.update(name.as_bytes());
        h.update([0]);
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(entries: &[(&str, &str)]) -> String {
        package_code(
            &entries
                .iter()
                .map(|(p, c)| (p.to_string(), FileContent::Text(c.to_string())))
                .collect(),
        )
    }

    #[test]
    fn asks_for_an_install_only_when_something_is_required() {
        let pkg = |entries: &[(&str, &str)]| -> PackageFiles {
            entries
                .iter()
                .map(|(p, c)| (p.to_string(), FileContent::Text(c.to_string())))
                .collect()
        };
        let none = pkg(&[("main.py", ""), ("requirements.txt", "# nothing\n\n")]);
        assert!(DependencyFiles::of(Language::Python, &none, false).is_none());
        let node_none = pkg(&[("index.js", ""), ("package.json", r#"{"name": "x"}"#)]);
        assert!(DependencyFiles::of(Language::Nodejs, &node_none, false).is_none());

        let some = pkg(&[("main.py", "x"), ("requirements.txt", "jinja2==3.1.6\n")]);
        let deps = DependencyFiles::of(Language::Python, &some, false).unwrap();
        // The key depends on the dependency files only, and on the switch.
        let other_code = pkg(&[("main.py", "y"), ("requirements.txt", "jinja2==3.1.6\n")]);
        assert_eq!(
            deps.key(),
            DependencyFiles::of(Language::Python, &other_code, false).unwrap().key()
        );
        assert_ne!(
            deps.key(),
            DependencyFiles::of(Language::Python, &some, true).unwrap().key()
        );
        let newer = pkg(&[("main.py", "x"), ("requirements.txt", "jinja2==3.1.5\n")]);
        assert_ne!(
            deps.key(),
            DependencyFiles::of(Language::Python, &newer, false).unwrap().key()
        );
    }

    #[test]
    fn accepts_nested_packages_and_binary_files() {
        let mut map: PackageFiles = [("app/__init__.py", ""), ("app/main.py", "x = 1")]
            .map(|(p, c)| (p.to_owned(), FileContent::Text(c.to_owned())))
            .into();
        map.insert("app/logo.png".into(), FileContent::from_bytes(vec![0x89, b'P', 0xff]));
        assert!(matches!(map["app/logo.png"], FileContent::Binary { .. }));
        let checked = check_package(
            &package_code(&map),
            Language::Python,
            "app/main.py",
            PackageLimits::default(),
        );
        assert_eq!(
            checked.unwrap()["app/logo.png"].bytes().unwrap().as_ref(),
            &[0x89, b'P', 0xff]
        );
    }

    #[test]
    fn refuses_escapes_limits_and_bad_entrypoints() {
        let limits = PackageLimits::default();
        let refused = [
            (files(&[("../x.js", "")]), "index.js", ".."),
            (files(&[("/etc/x.js", "")]), "index.js", "absolute"),
            (files(&[("a/./b.js", "")]), "index.js", "part"),
            (files(&[(".env", "")]), "index.js", "part"),
            (files(&[("a", ""), ("a/b.js", "")]), "a/b.js", "both"),
            (files(&[("index.js", "")]), "main.js", "not one of"),
            (r#"{"x.js": {"base64": "%%%"}}"#.to_owned(), "x.js", "base64"),
        ];
        for (code, entry, expected) in refused {
            let e = check_package(&code, Language::Nodejs, entry, limits).unwrap_err();
            assert!(e.to_string().contains(expected), "{code}: {e}");
        }
        let e = check_package(
            &files(&[("my-app/main.py", "")]),
            Language::Python,
            "my-app/main.py",
            limits,
        );
        assert!(e.unwrap_err().to_string().contains("importable"));
        let small = PackageLimits {
            max_files: 1,
            max_bytes: 4,
        };
        let e = check_package(&files(&[("a.js", ""), ("b.js", "")]), Language::Nodejs, "a.js", small);
        assert!(matches!(e, Err(PackageError::TooLarge(m)) if m.contains("MAX_PACKAGE_FILES")));
        let e = check_package(&files(&[("a.js", "12345")]), Language::Nodejs, "a.js", small);
        assert!(matches!(e, Err(PackageError::TooLarge(m)) if m.contains("MAX_PACKAGE_MB")));
    }
}
