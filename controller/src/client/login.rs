//! Where `fnrt login` keeps the controller's URL and the token:
//! `$FNRT_CONFIG`, else `$XDG_CONFIG_HOME/fnrt/config.json`, else
//! `~/.config/fnrt/config.json`; the file is 0600 and its folder 0700, since
//! the token is a secret.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Login {
    /// The controller's base URL (`http://127.0.0.1:8080`).
    pub url: String,
    pub token: String,
}

/// The config file's path.
pub fn path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FNRT_CONFIG") {
        return Ok(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set; set FNRT_CONFIG")?).join(".config"),
    };
    Ok(base.join("fnrt").join("config.json"))
}

/// The saved login, if any.
pub fn load() -> anyhow::Result<Option<Login>> {
    let path = path()?;
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Saves `login`, readable by its owner alone; returns the file's path.
pub fn save(login: &Login) -> anyhow::Result<PathBuf> {
    let path = path()?;
    // A folder it makes is its owner's alone; one that exists (FNRT_CONFIG
    // may name a file in /var/tmp) is left as it is: the file is 0600.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    // Written beside, then renamed: a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(&serde_json::to_vec_pretty(login)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}
