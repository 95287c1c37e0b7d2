//! A function folder, as `fnrt deploy` reads it: `function.json` (the
//! manifest, docs/function-manifest.md) and the code beside it: the
//! entrypoint file alone, or, when the folder holds more (a Node or Python
//! package, a Rust crate), every file of it but `function.json`, hidden
//! ones, `target/`, `node_modules/` and `__pycache__/`. The
//! folder's name is the Language-Title unless one is given.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::{Map, Value};

use fnrt_core::function::PackageLimits;
use fnrt_core::function::package::read_folder;
use fnrt_core::language::{CRATE_ENTRYPOINT, LanguageTitle};

/// Files of a crate folder at most: a registration is one JSON body.
const MAX_CRATE_FILES: usize = 256;

/// The registration body (`POST /api/v1/functions`) for the folder.
pub fn registration(dir: &Path, language_title: Option<&str>) -> anyhow::Result<(LanguageTitle, Value)> {
    let name = match language_title {
        Some(lt) => lt.to_owned(),
        None => dir
            .canonicalize()
            .with_context(|| format!("{} not found", dir.display()))?
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned(),
    };
    let lt: LanguageTitle = name.parse().map_err(|e| {
        anyhow::anyhow!("'{name}' is not a Language-Title ({e}); name the folder after the function or pass --name")
    })?;
    let manifest_path = dir.join("function.json");
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", manifest_path.display()))?;
    let Value::Object(mut body) = manifest else {
        bail!("{} must hold a JSON object", manifest_path.display());
    };
    let entrypoint = body
        .get("entrypoint")
        .and_then(Value::as_str)
        .unwrap_or(lt.language().default_entrypoint())
        .to_owned();
    if lt.language() == fnrt_core::language::Language::Pipeline {
        // Its steps are its body: the manifest is all there is to send.
    } else if entrypoint == CRATE_ENTRYPOINT {
        body.insert("files".into(), Value::Object(crate_files(dir)?));
    } else {
        // The server's limits decide; the walk only stops at absurd sizes.
        let limits = PackageLimits {
            max_files: 100_000,
            max_bytes: 1 << 30,
        };
        match read_folder(dir, &entrypoint, limits).with_context(|| format!("reading {}", dir.display()))? {
            Some(files) => {
                body.insert("files".into(), serde_json::to_value(files)?);
            }
            None => {
                let path = dir.join(&entrypoint);
                let code = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                body.insert("code".into(), Value::String(code));
            }
        }
    }
    body.insert("language_title".into(), Value::String(lt.to_string()));
    Ok((lt, Value::Object(body)))
}

fn crate_files(dir: &Path) -> anyhow::Result<Map<String, Value>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).with_context(|| format!("reading {}", current.display()))? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let relative = path.strip_prefix(dir)?.to_string_lossy().into_owned();
            if name.starts_with('.') || relative == "target" || relative == "function.json" {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                let text = std::fs::read_to_string(&path).with_context(|| format!("{relative} is not UTF-8 text"))?;
                files.insert(relative, Value::String(text));
                if files.len() > MAX_CRATE_FILES {
                    bail!("more than {MAX_CRATE_FILES} files in {}", dir.display());
                }
            }
        }
    }
    Ok(files.into_iter().collect())
}
