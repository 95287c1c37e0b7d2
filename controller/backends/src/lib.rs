//! The runtime backends and what goes with them: where instances run and how
//! Rust functions are built.
//!
//! # Layout
//!
//! - [`process`]: child processes running a language's runtime server
//!   (Node.js, Python, Rust), each in bubblewrap with its own uid,
//!   namespaces, cgroup, limits and scratch tmpfs mounts; the protocol to
//!   them is `fnrt_core::runtime::remote`'s.
//! - [`docker`]: containers through the Docker Engine API (Docker or
//!   Podman), placed by `--placement LANGUAGE=docker`; the same runtime
//!   servers and protocol behind the engine's walls.
//! - [`sandbox`]: the bubblewrap walls around instances and builds;
//!   [`netns`]: their private network through slirp4netns; [`egress`]: the
//!   allow-list of a function with `network.egress` in that network.
//! - [`uids`]: instance uids, one per instance on the host, and the cgroup
//!   that counts each one's processes; [`cgroups`]: the memory cap of an
//!   instance (all its processes together) and a build step's memory and
//!   tasks caps; [`budget`]: the memory all process instances may reserve
//!   together; [`idle`]: instances that work between their calls, stopped.
//! - [`wasm`]: wasmtime sandboxes inside the controller, a fresh instance
//!   per run.
//! - [`unused`]: what the caches on disk (installs, package files, compiled
//!   modules) share: marking an entry used, removing unused directories.
//! - [`build`]: cargo builds of Rust functions (native libraries, wasm
//!   modules), which also say where a version's artifact is
//!   ([`fnrt_core::runtime::Artifacts`]).
//! - this module: [`Backends`], which checks code at registration
//!   ([`CodeCheck`]) with the backend the placement gives its language, and
//!   where crates' artifacts are.

pub mod budget;
pub mod build;
pub mod cgroups;
pub mod deps;
pub mod docker;
pub mod egress;
pub mod idle;
pub mod netns;
pub mod packages;
pub mod process;
pub mod sandbox;
pub mod uids;
pub mod unused;
pub mod wasm;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use fnrt_core::artifact::{BuildState, Target};
use fnrt_core::function::{CheckError, Code, CodeCheck, FunctionVersion};
use fnrt_core::language::Language;
use fnrt_core::runtime::placement::Placement;
use fnrt_core::runtime::{Artifacts, InstanceError};

use crate::build::{Builder, Tenant};
use crate::deps::{Dependencies, Installer};

/// The name of the controller's files socket in an instance's directory
/// (beside the runtime's own socket): the runtimes' file helpers connect to it.
pub const FILES_SOCKET: &str = "files.sock";

/// Puts the controller's files socket into an instance's directory as a
/// hard link, which reaches it from inside any sandbox or container the
/// directory is mounted in. Without it the function's file helpers say
/// files are unavailable; the instance still runs.
pub fn link_files_socket(socket: Option<&std::path::Path>, dir: &std::path::Path) {
    if let Some(socket) = socket
        && let Err(e) = std::fs::hard_link(socket, dir.join(FILES_SOCKET))
    {
        tracing::warn!(error = %e, socket = %socket.display(), "linking the files socket into an instance");
    }
}

/// Takes write access to an instance's directory away from the instance,
/// once its runtime has made its socket there. The directory is on the
/// host's disk, where nothing caps what is written (an instance's scratch
/// space is size-capped tmpfs): writable, it would let a function fill the
/// disk. Root's from then on, with search alone for the instance's group
/// (`gid`), so it still reaches its socket, its package's files and the
/// files socket by name. The runtimes write a single-file function's code
/// into their working directory, a tmpfs.
pub fn seal_instance_dir(dir: &Path, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))?;
    std::os::unix::fs::chown(dir, Some(0), Some(gid))
}

/// A system tool's path (`bwrap`, `slirp4netns`, `nft`): on `PATH`, else
/// where Debian installs it (root's tools are in `/usr/sbin`, which a
/// service's `PATH` may lack).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/bin", "/usr/sbin"].map(|d| Path::new(d).join(name)))
        .find(|p| p.is_file())
}

/// The registry's [`CodeCheck`]: checks code with the backend that runs its
/// language, and builds Rust crates with the [`Builder`].
pub struct Backends {
    placement: Arc<Placement>,
    /// Why Rust crates cannot be built here, when they cannot.
    builder: Result<Arc<Builder>, String>,
    /// Installs packages' dependencies.
    installer: Option<Arc<Installer>>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends").field("placement", &self.placement).finish()
    }
}

impl Backends {
    pub fn new(
        placement: Arc<Placement>,
        builder: Result<Arc<Builder>, String>,
        installer: Option<Arc<Installer>>,
    ) -> Self {
        Backends {
            placement,
            builder,
            installer,
        }
    }

    fn builder(&self) -> Result<&Arc<Builder>, String> {
        self.builder
            .as_ref()
            .map_err(|e| format!("Rust functions cannot be built here: {e}"))
    }
}

#[async_trait]
impl CodeCheck for Backends {
    async fn check(&self, language: Language, code: Code<'_>, build: bool) -> Result<u64, CheckError> {
        let Some(backend) = self.placement.backend_for_language(language) else {
            return Ok(0);
        };
        let (files, tenant) = match code {
            Code::File { entrypoint, text } => {
                return backend
                    .check_code(language, entrypoint, text)
                    .map(|()| 0)
                    .map_err(CheckError::Invalid);
            }
            Code::Crate { files, owner } => (files, Tenant::of(owner)),
            Code::Package { files, scripts } => {
                let Some(deps) = Dependencies::of(language, files, scripts) else {
                    return Ok(0);
                };
                let installer = self
                    .installer
                    .as_ref()
                    .ok_or_else(|| CheckError::Invalid("dependencies cannot be installed here".into()))?;
                if !build {
                    installer.ensure(&deps);
                    return Ok(0);
                }
                installer.install(&deps).await.map_err(CheckError::BuildFailed)?;
                return Ok(installer.installed_bytes(&deps).await);
            }
        };
        let builder = self.builder().map_err(CheckError::Invalid)?;
        let target = Target::for_language(language);
        if !build {
            builder.ensure(target, &tenant, files);
            return Ok(0);
        }
        let artifact = builder
            .build(target, &tenant, files)
            .await
            .map_err(CheckError::BuildFailed)?;
        let bytes = tokio::fs::read(&artifact)
            .await
            .map_err(|e| CheckError::Invalid(format!("reading the built artifact: {e}")))?;
        backend
            .check_artifact(language, &bytes)
            .map(|()| 0)
            .map_err(CheckError::Invalid)
    }
}

/// The built artifact of a crate function, read whole.
pub async fn built_artifact(builder: &Arc<Builder>, function: &FunctionVersion) -> Result<Vec<u8>, InstanceError> {
    let path = locate(builder, function)?;
    tokio::fs::read(&path)
        .await
        .map_err(|e| InstanceError::Protocol(format!("reading the built artifact: {e}")))
}

/// Whether `function` can start now: a source function can; a crate once
/// its artifact is built (or was already read for an earlier instance).
pub fn crate_ready(builder: Option<&Arc<Builder>>, function: &FunctionVersion) -> Result<(), InstanceError> {
    if function.files.is_none() || function.init_payload.initialized() {
        return Ok(());
    }
    let builder = builder.ok_or_else(|| InstanceError::Unavailable {
        language: function.language(),
        message: "Rust functions cannot be built here".into(),
    })?;
    locate(builder, function).map(drop)
}

/// Where the built artifact of a crate function is; `NotReady` or
/// `BuildFailed` when there is none yet. Starts a build this controller has
/// not seen (a function registered by another replica, or an artifact lost
/// with a data dir).
pub fn locate(builder: &Arc<Builder>, function: &FunctionVersion) -> Result<PathBuf, InstanceError> {
    let Some(files) = &function.files else {
        return Err(InstanceError::Protocol("the function is not a crate".into()));
    };
    let tenant = Tenant::of(function.owner.as_deref());
    match builder.ensure(Target::for_language(function.language()), &tenant, files) {
        BuildState::Ready(path) => Ok(path),
        BuildState::Building => Err(InstanceError::NotReady {
            message: format!(
                "function '{}' version {} is still being built; retry shortly",
                function.language_title, function.version
            ),
        }),
        BuildState::Failed(failure) => Err(InstanceError::BuildFailed(failure)),
    }
}

/// Where `function`'s installed dependencies are, if it has any;
/// `NotReady` or `BuildFailed` while there are none. Starts an install this
/// controller has not seen (a function registered by another replica).
pub fn dependencies_dir(
    installer: Option<&Arc<Installer>>,
    function: &FunctionVersion,
) -> Result<Option<PathBuf>, InstanceError> {
    let Some(deps) = &function.dependencies else {
        return Ok(None);
    };
    let installer = installer.ok_or_else(|| InstanceError::Unavailable {
        language: function.language(),
        message: "dependencies cannot be installed here".into(),
    })?;
    match installer.ensure(deps) {
        BuildState::Ready(path) => Ok(Some(path)),
        BuildState::Building => Err(InstanceError::NotReady {
            message: format!(
                "the dependencies of function '{}' version {} are still being installed; retry shortly",
                function.language_title, function.version
            ),
        }),
        BuildState::Failed(failure) => Err(InstanceError::BuildFailed(failure)),
    }
}

/// The builder as the core's [`Artifacts`]: what `/init` of a crate sends.
pub struct BuiltArtifacts(pub Arc<Builder>);

impl Artifacts for BuiltArtifacts {
    fn locate(&self, function: &FunctionVersion) -> Result<PathBuf, InstanceError> {
        locate(&self.0, function)
    }
}
